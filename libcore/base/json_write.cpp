#include "base/json_write.hpp"

#include <charconv>
#include <cmath>
#include <cstdint>

namespace tmc {

// Length of the valid UTF-8 sequence starting at s[i], or 0 if invalid.
static size_t utf8_seq_len(std::string_view s, size_t i) {
    auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
    uint8_t c = b(i);
    size_t n = s.size() - i;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) return (n >= 2 && (b(i + 1) & 0xc0) == 0x80) ? 2 : 0;
    if (c >= 0xe0 && c <= 0xef) {
        if (n < 3 || (b(i + 1) & 0xc0) != 0x80 || (b(i + 2) & 0xc0) != 0x80) return 0;
        if (c == 0xe0 && b(i + 1) < 0xa0) return 0;   // overlong
        if (c == 0xed && b(i + 1) >= 0xa0) return 0;  // surrogate
        return 3;
    }
    if (c >= 0xf0 && c <= 0xf4) {
        if (n < 4 || (b(i + 1) & 0xc0) != 0x80 || (b(i + 2) & 0xc0) != 0x80 ||
            (b(i + 3) & 0xc0) != 0x80)
            return 0;
        if (c == 0xf0 && b(i + 1) < 0x90) return 0;
        if (c == 0xf4 && b(i + 1) >= 0x90) return 0;
        return 4;
    }
    return 0;
}

void json_append_string(std::string& out, std::string_view s) {
    static const char* hex = "0123456789abcdef";
    out.push_back('"');
    for (size_t i = 0; i < s.size();) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c >= 0x80) {
            size_t n = utf8_seq_len(s, i);
            if (n == 0) {
                out += "\xef\xbf\xbd";
                ++i;
            } else {
                out.append(s.substr(i, n));
                i += n;
            }
            continue;
        }
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            default:
                if (c < 0x20 || c == 0x7f) {
                    out += "\\u00";
                    out.push_back(hex[c >> 4]);
                    out.push_back(hex[c & 15]);
                } else {
                    out.push_back(char(c));
                }
        }
        ++i;
    }
    out.push_back('"');
}

std::string json_quote(std::string_view s) {
    std::string out;
    out.reserve(s.size() + 2);
    json_append_string(out, s);
    return out;
}

std::string json_number(double v) {
    if (!std::isfinite(v)) return "null";
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof buf, v);
    return std::string(buf, r.ptr);
}

}  // namespace tmc
