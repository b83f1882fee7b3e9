// Writing JSON: string escaping (always valid UTF-8 out, invalid input bytes
// become U+FFFD) and number formatting. Parsing is simdjson's job.
#pragma once

#include <string>
#include <string_view>

namespace tmc {

// Appends s as a quoted JSON string literal to out.
void json_append_string(std::string& out, std::string_view s);
std::string json_quote(std::string_view s);
// Shortest representation that round-trips a float/double.
std::string json_number(double v);

}  // namespace tmc
