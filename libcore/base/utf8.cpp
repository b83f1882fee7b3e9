#include "base/utf8.hpp"

namespace tmc::utf8 {

namespace {

// How many bytes of a sequence starting at s[i] are valid so far (>= 1 when
// the lead byte is a valid lead), and the length the sequence needs.
void scan(std::string_view s, size_t i, size_t* got, size_t* need) {
    auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
    uint8_t c = b(i);
    *got = 0;
    *need = 0;
    if (c < 0x80) {
        *got = *need = 1;
        return;
    }
    uint8_t lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) *need = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        *need = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        *need = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else {
        return;  // invalid lead
    }
    *got = 1;
    for (size_t k = 1; k < *need; ++k) {
        if (i + k >= s.size()) return;
        uint8_t x = b(i + k);
        if (x < lo || x > hi) return;
        lo = 0x80;
        hi = 0xbf;
        ++*got;
    }
}

}  // namespace

size_t valid_len(std::string_view s, size_t i) {
    size_t got, need;
    scan(s, i, &got, &need);
    return got == need && need ? need : 0;
}

bool is_valid(std::string_view s) {
    for (size_t i = 0; i < s.size();) {
        if (static_cast<uint8_t>(s[i]) < 0x80) {
            ++i;
            continue;
        }
        size_t n = valid_len(s, i);
        if (!n) return false;
        i += n;
    }
    return true;
}

std::string lossy(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        size_t got, need;
        scan(s, i, &got, &need);
        if (need && got == need) {
            out.append(s.substr(i, need));
            i += need;
        } else {
            out += "\xef\xbf\xbd";
            i += got ? got : 1;
        }
    }
    return out;
}

size_t incomplete_tail(std::string_view s) {
    size_t start = s.size() >= 3 ? s.size() - 3 : 0;
    for (size_t i = start; i < s.size(); ++i) {
        uint8_t c = static_cast<uint8_t>(s[i]);
        if (c < 0xc0) continue;
        size_t got, need;
        scan(s, i, &got, &need);
        if (need && got == s.size() - i && got < need) return got;
    }
    return 0;
}

void append_codepoint(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out.push_back(char(cp));
    } else if (cp < 0x800) {
        out.push_back(char(0xc0 | (cp >> 6)));
        out.push_back(char(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
        out.push_back(char(0xe0 | (cp >> 12)));
        out.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
        out.push_back(char(0x80 | (cp & 0x3f)));
    } else {
        out.push_back(char(0xf0 | (cp >> 18)));
        out.push_back(char(0x80 | ((cp >> 12) & 0x3f)));
        out.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
        out.push_back(char(0x80 | (cp & 0x3f)));
    }
}

uint32_t next_codepoint(std::string_view s, size_t& i) {
    uint8_t c = static_cast<uint8_t>(s[i]);
    size_t n = lead_len(c);
    if (i + n > s.size()) n = 1;
    uint32_t cp = n == 1 ? c : n == 2 ? c & 0x1f : n == 3 ? c & 0x0f : c & 0x07;
    for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3f);
    i += n;
    return cp;
}

}  // namespace tmc::utf8
