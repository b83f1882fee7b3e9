// Writing JSON: string escaping (always valid UTF-8 out, invalid input bytes
// become U+FFFD) and number formatting. Parsing is simdjson's job.
#pragma once

#include <concepts>
#include <string>
#include <string_view>
#include <vector>

namespace tmc {

// Appends s as a quoted JSON string literal to out.
void json_append_string(std::string& out, std::string_view s);
std::string json_quote(std::string_view s);
// Shortest representation that round-trips a float/double.
std::string json_number(double v);

// Writes one JSON value, member by member, with ", " and ": " between them:
//   JsonWriter w;
//   w.object().field("id", 3).key("tokens").array().value(1).value(2).end().end();
//   w.str()  ->  {"id": 3, "tokens": [1, 2]}
// Strings are escaped by json_append_string, floating-point numbers written
// by json_number. Misuse (a value where a key is due, end() with nothing
// open) is a programming error: it throws std::logic_error.
class JsonWriter {
public:
    JsonWriter& object();
    JsonWriter& array();
    JsonWriter& end();  // closes the innermost object or array
    JsonWriter& key(std::string_view k);
    JsonWriter& value(std::string_view s);
    JsonWriter& value(const char* s) { return value(std::string_view(s)); }
    JsonWriter& value(const std::string& s) { return value(std::string_view(s)); }
    JsonWriter& value(bool b);
    JsonWriter& value(double d);
    JsonWriter& value(float f) { return value(double(f)); }
    template <std::integral I>
        requires(!std::same_as<I, bool>)
    JsonWriter& value(I i) {
        return raw(std::to_string(i));
    }
    JsonWriter& null();
    JsonWriter& raw(std::string_view json);  // a value written elsewhere
    template <class T>
    JsonWriter& field(std::string_view k, const T& v) {
        key(k);
        return value(v);
    }
    // A string value, or null when it is empty.
    JsonWriter& string_or_null(std::string_view s) { return s.empty() ? null() : value(s); }
    const std::string& str() const { return out_; }

private:
    void before_value();
    JsonWriter& open(char bracket);  // '{' or '['
    std::string out_;
    std::vector<char> open_;  // '{' or '[' per level
    bool first_ = true;       // no member yet at this level
    bool keyed_ = false;      // a key was written, its value is due
};

}  // namespace tmc
