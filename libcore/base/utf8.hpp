// UTF-8 helpers (JSON writing, the tokenizer): sequence lengths, lossy repair with the
// "maximal subpart" rule (as Rust's String::from_utf8_lossy, which Hugging
// Face's decoders use), and code point iteration.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace tmc::utf8 {

// Length of the valid sequence at s[i], or 0 if s[i..] does not start one.
size_t valid_len(std::string_view s, size_t i);
// Length of a char from its lead byte alone (1 for invalid leads).
inline size_t lead_len(uint8_t c) { return c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4; }
// Replaces each maximal invalid subpart by U+FFFD.
std::string lossy(std::string_view s);
bool is_valid(std::string_view s);
// Bytes at the end of s that begin a sequence that is valid so far but incomplete.
size_t incomplete_tail(std::string_view s);
void append_codepoint(std::string& out, uint32_t cp);
// Decodes the code point at s[i] (valid input); advances i.
uint32_t next_codepoint(std::string_view s, size_t& i);

}  // namespace tmc::utf8
