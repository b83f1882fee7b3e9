#include "tm/json_write.hpp"

#include "base/utf8.hpp"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <stdexcept>

namespace tmc {

void json_append_string(std::string& out, std::string_view s) {
    static const char* hex = "0123456789abcdef";
    out.push_back('"');
    for (size_t i = 0; i < s.size();) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c >= 0x80) {
            size_t n = utf8::valid_len(s, i);
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

void JsonWriter::before_value() {
    if (open_.empty()) {
        if (!out_.empty()) throw std::logic_error("JsonWriter: a second top-level value");
        return;
    }
    if (open_.back() == '{') {
        if (!keyed_) throw std::logic_error("JsonWriter: a value without a key");
        keyed_ = false;
        return;
    }
    if (!first_) out_ += ", ";
    first_ = false;
}

JsonWriter& JsonWriter::open(char bracket) {
    before_value();
    out_ += bracket;
    open_.push_back(bracket);
    first_ = true;
    return *this;
}

JsonWriter& JsonWriter::object() { return open('{'); }
JsonWriter& JsonWriter::array() { return open('['); }

JsonWriter& JsonWriter::end() {
    if (open_.empty() || keyed_) throw std::logic_error("JsonWriter: end() with nothing open or a key without value");
    out_ += open_.back() == '{' ? '}' : ']';
    open_.pop_back();
    first_ = false;
    return *this;
}

JsonWriter& JsonWriter::key(std::string_view k) {
    if (open_.empty() || open_.back() != '{' || keyed_) throw std::logic_error("JsonWriter: a key outside an object");
    if (!first_) out_ += ", ";
    first_ = false;
    json_append_string(out_, k);
    out_ += ": ";
    keyed_ = true;
    return *this;
}

JsonWriter& JsonWriter::value(std::string_view s) {
    before_value();
    json_append_string(out_, s);
    return *this;
}

JsonWriter& JsonWriter::value(bool b) { return raw(b ? "true" : "false"); }
JsonWriter& JsonWriter::value(double d) { return raw(json_number(d)); }
JsonWriter& JsonWriter::null() { return raw("null"); }

JsonWriter& JsonWriter::raw(std::string_view json) {
    before_value();
    out_ += json;
    return *this;
}

}  // namespace tmc
