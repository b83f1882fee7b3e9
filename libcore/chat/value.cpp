#include "chat/value.hpp"

#include <cmath>
#include <cstdio>

#include "tm/json_write.hpp"

namespace tmc::jinja {

bool Value::truthy() const {
    switch (kind) {
        case Undefined:
        case None: return false;
        case Bool: return b;
        case Int: return i != 0;
        case Float: return f != 0;
        case Str: return !s.empty();
        case Array: return !list->empty();
        case Object: return !dict->empty();
    }
    return false;
}

Value Value::get(const std::string& key) const {
    if (kind != Object) return Value();
    for (auto& [k, v] : *dict)
        if (k == key) return v;
    return Value();
}

void Value::set(const std::string& key, Value v) {
    for (auto& [k, x] : *dict)
        if (k == key) {
            x = std::move(v);
            return;
        }
    dict->emplace_back(key, std::move(v));
}

static std::string float_str(double f) {
    if (std::isinf(f)) return f > 0 ? "inf" : "-inf";
    if (std::isnan(f)) return "nan";
    if (f == std::floor(f) && std::fabs(f) < 1e16) {
        char buf[64];
        snprintf(buf, sizeof buf, "%.1f", f);
        return buf;
    }
    return json_number(f);
}

static std::string py_quote(const std::string& s) {
    char q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
    std::string o(1, q);
    for (char c : s) {
        if (c == q || c == '\\') o += '\\', o += c;
        else if (c == '\n') o += "\\n";
        else if (c == '\t') o += "\\t";
        else if (c == '\r') o += "\\r";
        else o += c;
    }
    return o + q;
}

std::string Value::repr() const {
    if (kind == Str) return py_quote(s);
    return str();
}

std::string Value::str() const {
    switch (kind) {
        case Undefined: return "";
        case None: return "None";
        case Bool: return b ? "True" : "False";
        case Int: return std::to_string(i);
        case Float: return float_str(f);
        case Str: return s;
        case Array: {
            std::string o = "[";
            for (size_t k = 0; k < list->size(); ++k) o += (k ? ", " : "") + (*list)[k].repr();
            return o + "]";
        }
        case Object: {
            std::string o = "{";
            for (size_t k = 0; k < dict->size(); ++k)
                o += (k ? ", " : "") + py_quote((*dict)[k].first) + ": " + (*dict)[k].second.repr();
            return o + "}";
        }
    }
    return "";
}

std::string Value::to_json(int indent, int depth) const {
    auto nl = [&](int d) { return indent < 0 ? std::string() : "\n" + std::string(size_t(indent * d), ' '); };
    switch (kind) {
        case Undefined:
        case None: return "null";
        case Bool: return b ? "true" : "false";
        case Int: return std::to_string(i);
        case Float: return std::isfinite(f) ? float_str(f) : (std::isnan(f) ? "NaN" : f > 0 ? "Infinity" : "-Infinity");
        case Str: return json_quote(s);
        case Array: {
            if (list->empty()) return "[]";
            std::string o = "[";
            for (size_t k = 0; k < list->size(); ++k)
                o += (k ? (indent < 0 ? ", " : ",") : "") + nl(depth + 1) + (*list)[k].to_json(indent, depth + 1);
            return o + nl(depth) + "]";
        }
        case Object: {
            if (dict->empty()) return "{}";
            std::string o = "{";
            for (size_t k = 0; k < dict->size(); ++k)
                o += (k ? (indent < 0 ? ", " : ",") : "") + nl(depth + 1) + json_quote((*dict)[k].first) + ": " +
                     (*dict)[k].second.to_json(indent, depth + 1);
            return o + nl(depth) + "}";
        }
    }
    return "null";
}

const char* Value::type_name() const {
    switch (kind) {
        case Undefined: return "undefined";
        case None: return "none";
        case Bool: return "bool";
        case Int: return "int";
        case Float: return "float";
        case Str: return "string";
        case Array: return "list";
        case Object: return "dict";
    }
    return "?";
}

bool operator==(const Value& a, const Value& b) {
    auto num = [](const Value& v) { return v.kind == Value::Int || v.kind == Value::Float || v.kind == Value::Bool; };
    if (num(a) && num(b)) {
        double x = a.kind == Value::Float ? a.f : a.kind == Value::Int ? double(a.i) : a.b;
        double y = b.kind == Value::Float ? b.f : b.kind == Value::Int ? double(b.i) : b.b;
        return x == y;
    }
    if (a.kind != b.kind) return (a.kind == Value::Undefined || a.kind == Value::None) &&
                                 (b.kind == Value::Undefined || b.kind == Value::None) && a.kind == b.kind;
    switch (a.kind) {
        case Value::Str: return a.s == b.s;
        case Value::Array: return *a.list == *b.list;
        case Value::Object: return *a.dict == *b.dict;
        default: return true;
    }
}

}  // namespace tmc::jinja
