// The values a chat template computes with: Python/Jinja semantics for
// undefined, None, bool, int, float, str, list and dict (insertion-ordered).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tmc::jinja {

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;

struct Value {
    enum Kind { Undefined, None, Bool, Int, Float, Str, Array, Object };
    Kind kind = Undefined;
    bool b = false;
    int64_t i = 0;
    double f = 0;
    std::string s;
    std::shared_ptr<List> list;  // shared: a namespace() or list mutates in place
    std::shared_ptr<Dict> dict;

    Value() = default;
    static Value none() { Value v; v.kind = None; return v; }
    Value(bool x) : kind(Bool), b(x) {}
    Value(int64_t x) : kind(Int), i(x) {}
    Value(int x) : kind(Int), i(x) {}
    Value(double x) : kind(Float), f(x) {}
    Value(std::string x) : kind(Str), s(std::move(x)) {}
    Value(const char* x) : kind(Str), s(x) {}
    static Value array(List l = {}) {
        Value v;
        v.kind = Array;
        v.list = std::make_shared<List>(std::move(l));
        return v;
    }
    static Value object(Dict d = {}) {
        Value v;
        v.kind = Object;
        v.dict = std::make_shared<Dict>(std::move(d));
        return v;
    }

    bool is_undefined() const { return kind == Undefined; }
    bool truthy() const;
    // Dict lookup; Undefined when absent.
    Value get(const std::string& key) const;
    void set(const std::string& key, Value v);
    // Python str(): None -> "None", True -> "True", lists as Python reprs.
    std::string str() const;
    std::string repr() const;
    // json.dumps(ensure_ascii=False), indent < 0 for none.
    std::string to_json(int indent = -1, int depth = 0) const;
    const char* type_name() const;
};

bool operator==(const Value& a, const Value& b);

}  // namespace tmc::jinja
