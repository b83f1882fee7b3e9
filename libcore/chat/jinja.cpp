// A small Jinja2 interpreter for chat templates.
//
// Lexing splits the source into text, {{ expression }}, {% statement %} and
// {# comment #} pieces, applying "-" whitespace control and, as transformers
// configures Jinja, trim_blocks (drop the newline after a block tag) and
// lstrip_blocks (drop spaces/tabs before a block tag on its line). Parsing
// builds a tree of nodes; rendering walks it with a scope stack (a for loop
// opens a scope, so `set` inside it does not leak: hence namespace()).
// The parser is jinja_parse.cpp; this file renders (statements, expressions,
// filters, tests, methods) and holds the ChatTemplate API.
#include <simdjson.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <functional>
#include <map>

#include "chat/jinja_ast.hpp"
#include "tm/chat_template.hpp"

namespace tmc {

namespace jinja {
namespace {

// ---- evaluation ----------------------------------------------------------

class Renderer {
public:
    std::vector<std::map<std::string, Value>> scopes;
    std::string out;

    void render(const Body& body) {
        for (auto& n : body) exec(*n);
    }

private:
    Value lookup(const std::string& name) const {
        for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
            auto f = it->find(name);
            if (f != it->end()) return f->second;
        }
        return Value();
    }

    void exec(const Node& n) {
        switch (n.kind) {
            case Node::Text: out += n.text; break;
            case Node::Output: out += eval(*n.expr).str(); break;
            case Node::If:
                for (auto& [cond, body] : n.branches)
                    if (!cond || eval(*cond).truthy()) {
                        render(body);
                        break;
                    }
                break;
            case Node::Set: {
                Value v = eval(*n.expr);
                if (!n.attr.empty()) {
                    Value ns = lookup(n.targets[0]);
                    if (ns.kind != Value::Object) fail(n.pos, n.targets[0] + " is not a namespace");
                    ns.set(n.attr, v);
                } else if (n.targets.size() == 1) {
                    scopes.back()[n.targets[0]] = v;
                } else {
                    if (v.kind != Value::Array || v.list->size() != n.targets.size())
                        fail(n.pos, "cannot unpack into " + std::to_string(n.targets.size()) + " names");
                    for (size_t k = 0; k < n.targets.size(); ++k) scopes.back()[n.targets[k]] = (*v.list)[k];
                }
                break;
            }
            case Node::SetBlock: {
                std::string saved;
                saved.swap(out);
                render(n.body);
                saved.swap(out);
                scopes.back()[n.targets[0]] = Value(saved);
                break;
            }
            case Node::For: exec_for(n); break;
        }
    }

    void exec_for(const Node& n) {
        Value seq = eval(*n.expr);
        List items;
        if (seq.kind == Value::Array) items = *seq.list;
        else if (seq.kind == Value::Object)
            for (auto& [k, v] : *seq.dict) items.push_back(Value(k));
        else if (seq.kind == Value::Str)
            for (char c : seq.s) items.push_back(Value(std::string(1, c)));
        else if (seq.kind == Value::Undefined || seq.kind == Value::None) items = {};
        else fail(n.expr->pos, std::string("cannot iterate over ") + seq.type_name());
        auto bind = [&](std::map<std::string, Value>& scope, const Value& item) {
            if (n.targets.size() == 1) {
                scope[n.targets[0]] = item;
                return;
            }
            if (item.kind != Value::Array || item.list->size() != n.targets.size())
                fail(n.pos, "cannot unpack loop item into " + std::to_string(n.targets.size()) + " names");
            for (size_t k = 0; k < n.targets.size(); ++k) scope[n.targets[k]] = (*item.list)[k];
        };
        if (n.filter) {
            List kept;
            for (auto& it : items) {
                scopes.emplace_back();
                bind(scopes.back(), it);
                bool keep = eval(*n.filter).truthy();
                scopes.pop_back();
                if (keep) kept.push_back(it);
            }
            items.swap(kept);
        }
        if (items.empty()) {
            render(n.else_body);
            return;
        }
        const int64_t len = int64_t(items.size());
        for (int64_t k = 0; k < len; ++k) {
            scopes.emplace_back();
            auto& scope = scopes.back();
            bind(scope, items[size_t(k)]);
            Value loop = Value::object();
            loop.set("index", Value(k + 1));
            loop.set("index0", Value(k));
            loop.set("revindex", Value(len - k));
            loop.set("revindex0", Value(len - k - 1));
            loop.set("first", Value(k == 0));
            loop.set("last", Value(k == len - 1));
            loop.set("length", Value(len));
            loop.set("previtem", k > 0 ? items[size_t(k - 1)] : Value());
            loop.set("nextitem", k + 1 < len ? items[size_t(k + 1)] : Value());
            scope["loop"] = loop;
            render(n.body);
            scopes.pop_back();
        }
    }

    static double num(const Value& v, Pos p) {
        if (v.kind == Value::Int) return double(v.i);
        if (v.kind == Value::Float) return v.f;
        if (v.kind == Value::Bool) return v.b;
        fail(p, std::string("expected a number, got ") + v.type_name());
    }

    Value eval(const Expr& e) {
        switch (e.kind) {
            case Expr::Lit: return e.lit;
            case Expr::Var: return lookup(e.name);
            case Expr::Attr: {
                Value o = eval(*e.args[0]);
                if (o.kind == Value::Object) return o.get(e.name);
                return Value();
            }
            case Expr::Index: {
                Value o = eval(*e.args[0]), k = eval(*e.args[1]);
                if (o.kind == Value::Object) {
                    if (k.kind != Value::Str) return Value();
                    return o.get(k.s);
                }
                if (o.kind == Value::Array || o.kind == Value::Str) {
                    if (k.kind != Value::Int) fail(e.pos, "index must be an integer");
                    int64_t n = o.kind == Value::Array ? int64_t(o.list->size()) : int64_t(o.s.size());
                    int64_t i = k.i < 0 ? k.i + n : k.i;
                    if (i < 0 || i >= n) return Value();
                    return o.kind == Value::Array ? (*o.list)[size_t(i)] : Value(std::string(1, o.s[size_t(i)]));
                }
                return Value();
            }
            case Expr::Slice: return slice(e);
            case Expr::Call: return call(e);
            case Expr::Filter: return filter(e);
            case Expr::Test: return Value(test(e) != e.negate);
            case Expr::Unary: {
                Value v = eval(*e.args[0]);
                if (e.name == "not") return Value(!v.truthy());
                if (e.name == "-") return v.kind == Value::Int ? Value(-v.i) : Value(-num(v, e.pos));
                return v;
            }
            case Expr::Binary: return binary(e);
            case Expr::Cond: {
                if (eval(*e.args[1]).truthy()) return eval(*e.args[0]);
                return e.args[2] ? eval(*e.args[2]) : Value();
            }
            case Expr::ListLit: {
                List l;
                for (auto& a : e.args) l.push_back(eval(*a));
                return Value::array(std::move(l));
            }
            case Expr::DictLit: {
                Value d = Value::object();
                for (size_t k = 0; k + 1 < e.args.size(); k += 2) d.set(eval(*e.args[k]).str(), eval(*e.args[k + 1]));
                return d;
            }
        }
        return Value();
    }

    Value slice(const Expr& e) {
        Value o = eval(*e.args[0]);
        int64_t n = o.kind == Value::Array ? int64_t(o.list->size()) : o.kind == Value::Str ? int64_t(o.s.size()) : -1;
        if (n < 0) fail(e.pos, std::string("cannot slice ") + o.type_name());
        auto get = [&](int k, int64_t def) {
            if (!e.args[size_t(k)]) return def;
            Value v = eval(*e.args[size_t(k)]);
            if (v.kind == Value::None) return def;
            if (v.kind != Value::Int) fail(e.pos, "slice bounds must be integers");
            return v.i;
        };
        int64_t step = get(3, 1);
        if (step == 0) fail(e.pos, "slice step cannot be zero");
        int64_t lo, hi;
        if (step > 0) {
            lo = get(1, 0);
            hi = get(2, n);
            if (lo < 0) lo = std::max<int64_t>(0, lo + n);
            if (hi < 0) hi = std::max<int64_t>(0, hi + n);
            lo = std::min(lo, n);
            hi = std::min(hi, n);
        } else {
            lo = get(1, n - 1);
            hi = get(2, -n - 1);
            if (lo < 0) lo += n;
            if (hi < 0) hi += n;
            lo = std::min(lo, n - 1);
        }
        List l;
        std::string s;
        for (int64_t i = lo; step > 0 ? i < hi : i > hi; i += step) {
            if (i < 0 || i >= n) continue;
            if (o.kind == Value::Array) l.push_back((*o.list)[size_t(i)]);
            else s += o.s[size_t(i)];
        }
        return o.kind == Value::Array ? Value::array(std::move(l)) : Value(s);
    }

    Value binary(const Expr& e) {
        const std::string& op = e.name;
        if (op == "and") {
            Value a = eval(*e.args[0]);
            return a.truthy() ? eval(*e.args[1]) : a;
        }
        if (op == "or") {
            Value a = eval(*e.args[0]);
            return a.truthy() ? a : eval(*e.args[1]);
        }
        Value a = eval(*e.args[0]), b = eval(*e.args[1]);
        if (op == "==") return Value(a == b);
        if (op == "!=") return Value(!(a == b));
        if (op == "in" || op == "notin") {
            bool r = false;
            if (b.kind == Value::Str) r = a.kind == Value::Str && b.s.find(a.s) != std::string::npos;
            else if (b.kind == Value::Array) r = std::find(b.list->begin(), b.list->end(), a) != b.list->end();
            else if (b.kind == Value::Object) r = a.kind == Value::Str && !b.get(a.s).is_undefined();
            else if (b.kind != Value::Undefined && b.kind != Value::None)
                fail(e.pos, std::string("'in' needs a string, list or dict, got ") + b.type_name());
            return Value(op == "in" ? r : !r);
        }
        if (op == "~") return Value(a.str() + b.str());
        if (op == "<" || op == ">" || op == "<=" || op == ">=") {
            int c;
            if (a.kind == Value::Str && b.kind == Value::Str) c = a.s.compare(b.s);
            else {
                double x = num(a, e.pos), y = num(b, e.pos);
                c = x < y ? -1 : x > y ? 1 : 0;
            }
            return Value(op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0);
        }
        if (op == "+") {
            if (a.kind == Value::Str && b.kind == Value::Str) return Value(a.s + b.s);
            if (a.kind == Value::Array && b.kind == Value::Array) {
                List l = *a.list;
                l.insert(l.end(), b.list->begin(), b.list->end());
                return Value::array(std::move(l));
            }
            if (a.kind == Value::Str || b.kind == Value::Str)
                fail(e.pos, std::string("cannot add ") + a.type_name() + " and " + b.type_name());
        }
        if (op == "*" && a.kind == Value::Str && b.kind == Value::Int) {
            std::string s;
            for (int64_t k = 0; k < b.i; ++k) s += a.s;
            return Value(s);
        }
        bool ints = a.kind == Value::Int && b.kind == Value::Int;
        double x = num(a, e.pos), y = num(b, e.pos);
        if (op == "+") return ints ? Value(a.i + b.i) : Value(x + y);
        if (op == "-") return ints ? Value(a.i - b.i) : Value(x - y);
        if (op == "*") return ints ? Value(a.i * b.i) : Value(x * y);
        if ((op == "/" || op == "//" || op == "%") && y == 0) fail(e.pos, "division by zero");
        if (op == "/") return Value(x / y);
        if (op == "//") return ints ? Value(int64_t(std::floor(x / y))) : Value(std::floor(x / y));
        if (op == "%") return ints ? Value(((a.i % b.i) + b.i) % b.i) : Value(std::fmod(x, y));
        fail(e.pos, "unknown operator " + op);
    }

    bool test(const Expr& e) {
        Value v = eval(*e.args[0]);
        const std::string& t = e.name;
        if (t == "defined") return !v.is_undefined();
        if (t == "undefined") return v.is_undefined();
        if (t == "none") return v.kind == Value::None;
        if (t == "string") return v.kind == Value::Str;
        if (t == "number") return v.kind == Value::Int || v.kind == Value::Float;
        if (t == "integer") return v.kind == Value::Int;
        if (t == "float") return v.kind == Value::Float;
        if (t == "boolean") return v.kind == Value::Bool;
        if (t == "true") return v.kind == Value::Bool && v.b;
        if (t == "false") return v.kind == Value::Bool && !v.b;
        if (t == "mapping") return v.kind == Value::Object;
        if (t == "sequence" || t == "iterable") return v.kind == Value::Array || v.kind == Value::Str || v.kind == Value::Object;
        if (t == "odd" || t == "even") return v.kind == Value::Int && (v.i % 2 != 0) == (t == "odd");
        if (t == "equalto" || t == "eq" || t == "sameas") {
            if (e.args.size() < 2) fail(e.pos, "test " + t + " needs an argument");
            return v == eval(*e.args[1]);
        }
        fail(e.pos, "unknown test '" + t + "'");
    }

    Value kwarg(const Expr& e, const std::string& name, size_t pos_index, Value def) {
        for (auto& [k, v] : e.kwargs)
            if (k == name) return eval(*v);
        if (pos_index < e.args.size()) return eval(*e.args[pos_index]);
        return def;
    }

    static std::string strip_chars(const std::string& s, const std::string& chars, bool left, bool right) {
        size_t b = 0, en = s.size();
        auto in = [&](char c) { return chars.empty() ? isspace(static_cast<unsigned char>(c)) != 0 : chars.find(c) != std::string::npos; };
        if (left) while (b < en && in(s[b])) ++b;
        if (right) while (en > b && in(s[en - 1])) --en;
        return s.substr(b, en - b);
    }

    Value filter(const Expr& e) {
        Value v = eval(*e.args[0]);
        const std::string& f = e.name;
        if (f == "trim") return Value(strip_chars(v.str(), kwarg(e, "chars", 1, Value("")).str(), true, true));
        if (f == "length" || f == "count") {
            if (v.kind == Value::Str) return Value(int64_t(v.s.size()));
            if (v.kind == Value::Array) return Value(int64_t(v.list->size()));
            if (v.kind == Value::Object) return Value(int64_t(v.dict->size()));
            if (v.kind == Value::Undefined) return Value(int64_t(0));
            fail(e.pos, std::string("object of type ") + v.type_name() + " has no length");
        }
        if (f == "tojson") {
            Value ind = kwarg(e, "indent", 1, Value::none());
            return Value(v.to_json(ind.kind == Value::Int ? int(ind.i) : -1));
        }
        if (f == "string") return Value(v.str());
        if (f == "lower" || f == "upper") {
            std::string s = v.str();
            for (auto& c : s) c = char(f == "lower" ? tolower(static_cast<unsigned char>(c)) : toupper(static_cast<unsigned char>(c)));
            return Value(s);
        }
        if (f == "capitalize") {
            std::string s = v.str();
            for (size_t k = 0; k < s.size(); ++k) s[k] = char(k ? tolower(static_cast<unsigned char>(s[k])) : toupper(static_cast<unsigned char>(s[k])));
            return Value(s);
        }
        if (f == "first" || f == "last") {
            if (v.kind == Value::Array) return v.list->empty() ? Value() : f == "first" ? v.list->front() : v.list->back();
            if (v.kind == Value::Str) return v.s.empty() ? Value() : Value(std::string(1, f == "first" ? v.s.front() : v.s.back()));
            return Value();
        }
        if (f == "join") {
            std::string sep = kwarg(e, "d", 1, Value("")).str(), o;
            if (v.kind != Value::Array) return Value(v.str());
            for (size_t k = 0; k < v.list->size(); ++k) o += (k ? sep : "") + (*v.list)[k].str();
            return Value(o);
        }
        if (f == "default" || f == "d") {
            Value def = kwarg(e, "default_value", 1, Value(""));
            bool boolean = kwarg(e, "boolean", 2, Value(false)).truthy();
            return (v.is_undefined() || (boolean && !v.truthy())) ? def : v;
        }
        if (f == "list") {
            if (v.kind == Value::Array) return v;
            List l;
            if (v.kind == Value::Str) for (char c : v.s) l.push_back(Value(std::string(1, c)));
            if (v.kind == Value::Object) for (auto& [k, x] : *v.dict) l.push_back(Value(k));
            return Value::array(std::move(l));
        }
        if (f == "reverse") {
            if (v.kind == Value::Str) return Value(std::string(v.s.rbegin(), v.s.rend()));
            if (v.kind == Value::Array) return Value::array(List(v.list->rbegin(), v.list->rend()));
            fail(e.pos, "cannot reverse " + std::string(v.type_name()));
        }
        if (f == "replace") {
            std::string s = v.str(), from = kwarg(e, "old", 1, Value("")).str(), to = kwarg(e, "new", 2, Value("")).str();
            if (from.empty()) return Value(s);
            std::string o;
            size_t p = 0;
            for (size_t q; (q = s.find(from, p)) != std::string::npos; p = q + from.size()) o += s.substr(p, q - p) + to;
            return Value(o + s.substr(p));
        }
        if (f == "int") {
            if (v.kind == Value::Int) return v;
            if (v.kind == Value::Float) return Value(int64_t(v.f));
            try { return Value(int64_t(std::stoll(v.str()))); } catch (...) { return Value(int64_t(0)); }
        }
        if (f == "float") {
            if (v.kind == Value::Float) return v;
            if (v.kind == Value::Int) return Value(double(v.i));
            try { return Value(std::stod(v.str())); } catch (...) { return Value(0.0); }
        }
        if (f == "abs") return v.kind == Value::Int ? Value(v.i < 0 ? -v.i : v.i) : Value(std::fabs(num(v, e.pos)));
        if (f == "items") {
            List l;
            if (v.kind == Value::Object)
                for (auto& [k, x] : *v.dict) l.push_back(Value::array({Value(k), x}));
            return Value::array(std::move(l));
        }
        if (f == "selectattr" || f == "rejectattr") {
            if (v.kind != Value::Array) return Value::array();
            std::string attr = kwarg(e, "", 1, Value("")).str();
            std::string tst = e.args.size() > 2 ? eval(*e.args[2]).str() : "";
            Value arg = e.args.size() > 3 ? eval(*e.args[3]) : Value();
            List l;
            for (auto& x : *v.list) {
                Value a = x.get(attr);
                bool ok = tst.empty() ? a.truthy()
                          : tst == "equalto" || tst == "eq" || tst == "==" ? a == arg
                          : tst == "defined" ? !a.is_undefined()
                          : tst == "undefined" ? a.is_undefined()
                          : tst == "none" ? a.kind == Value::None
                          : tst == "string" ? a.kind == Value::Str
                          : (fail(e.pos, "unsupported test '" + tst + "' in " + f), false);
                if (ok == (f == "selectattr")) l.push_back(x);
            }
            return Value::array(std::move(l));
        }
        if (f == "map") {
            if (v.kind != Value::Array) return Value::array();
            Value attr = kwarg(e, "attribute", 99, Value());
            List l;
            if (!attr.is_undefined()) {
                for (auto& x : *v.list) l.push_back(x.get(attr.str()));
            } else if (e.args.size() > 1) {
                std::string fn = eval(*e.args[1]).str();
                for (auto& x : *v.list) l.push_back(fn == "string" ? Value(x.str()) : fn == "trim" ? Value(strip_chars(x.str(), "", true, true)) : x);
            }
            return Value::array(std::move(l));
        }
        if (f == "unique") {
            List l;
            if (v.kind == Value::Array)
                for (auto& x : *v.list) if (std::find(l.begin(), l.end(), x) == l.end()) l.push_back(x);
            return Value::array(std::move(l));
        }
        if (f == "safe" || f == "e" || f == "escape") return v;  // no autoescape in chat templates
        fail(e.pos, "unknown filter '" + f + "'");
    }

    Value call(const Expr& e) {
        const Expr& callee = *e.args[0];
        auto argv = [&](size_t k) { return k + 1 < e.args.size() ? eval(*e.args[k + 1]) : Value(); };
        if (callee.kind == Expr::Var) {
            const std::string& fn = callee.name;
            if (fn == "raise_exception") fail(e.pos, "raise_exception: " + argv(0).str());
            if (fn == "namespace") {
                Value ns = Value::object();
                for (auto& [k, x] : e.kwargs) ns.set(k, eval(*x));
                return ns;
            }
            if (fn == "range") {
                int64_t a = 0, b, step = 1;
                if (e.args.size() == 2) b = int64_t(num(argv(0), e.pos));
                else {
                    a = int64_t(num(argv(0), e.pos));
                    b = int64_t(num(argv(1), e.pos));
                    if (e.args.size() > 3) step = int64_t(num(argv(2), e.pos));
                }
                if (step == 0) fail(e.pos, "range step cannot be zero");
                List l;
                for (int64_t i = a; (step > 0 ? i < b : i > b) && l.size() < 1000000; i += step) l.push_back(Value(i));
                return Value::array(std::move(l));
            }
            if (fn == "strftime_now") {
                char buf[128];
                time_t now = time(nullptr);
                struct tm tmv;
                localtime_r(&now, &tmv);
                strftime(buf, sizeof buf, argv(0).str().c_str(), &tmv);
                return Value(std::string(buf));
            }
            fail(e.pos, "unknown function '" + fn + "'");
        }
        if (callee.kind != Expr::Attr) fail(e.pos, "this expression cannot be called");
        Value self = eval(*callee.args[0]);
        const std::string& m = callee.name;
        if (self.kind == Value::Str) {
            const std::string& s = self.s;
            if (m == "startswith" || m == "endswith") {
                Value a = argv(0);
                List pre = a.kind == Value::Array ? *a.list : List{a};
                for (auto& p : pre) {
                    const std::string& x = p.s;
                    if (m == "startswith" ? s.compare(0, x.size(), x) == 0
                                          : s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0)
                        return Value(true);
                }
                return Value(false);
            }
            if (m == "strip" || m == "lstrip" || m == "rstrip") {
                Value a = argv(0);
                std::string chars = a.kind == Value::Str ? a.s : "";
                return Value(strip_chars(s, chars, m != "rstrip", m != "lstrip"));
            }
            if (m == "split") {
                Value a = argv(0);
                List l;
                if (a.kind != Value::Str) {  // split on runs of whitespace
                    size_t i = 0;
                    while (i < s.size()) {
                        while (i < s.size() && isspace(static_cast<unsigned char>(s[i]))) ++i;
                        size_t j = i;
                        while (j < s.size() && !isspace(static_cast<unsigned char>(s[j]))) ++j;
                        if (j > i) l.push_back(Value(s.substr(i, j - i)));
                        i = j;
                    }
                } else {
                    if (a.s.empty()) fail(e.pos, "empty separator");
                    size_t p = 0;
                    for (size_t q; (q = s.find(a.s, p)) != std::string::npos; p = q + a.s.size()) l.push_back(Value(s.substr(p, q - p)));
                    l.push_back(Value(s.substr(p)));
                }
                return Value::array(std::move(l));
            }
            if (m == "upper" || m == "lower" || m == "title" || m == "capitalize") {
                std::string o = s;
                bool start = true;
                for (size_t k = 0; k < o.size(); ++k) {
                    unsigned char c = static_cast<unsigned char>(o[k]);
                    if (m == "upper") o[k] = char(toupper(c));
                    else if (m == "lower") o[k] = char(tolower(c));
                    else if (m == "capitalize") o[k] = char(k ? tolower(c) : toupper(c));
                    else {
                        o[k] = char(start ? toupper(c) : tolower(c));
                        start = !isalpha(c);
                    }
                }
                return Value(o);
            }
            if (m == "replace") {
                std::string from = argv(0).str(), to = argv(1).str(), o;
                if (from.empty()) return self;
                size_t p = 0;
                for (size_t q; (q = s.find(from, p)) != std::string::npos; p = q + from.size()) o += s.substr(p, q - p) + to;
                return Value(o + s.substr(p));
            }
            if (m == "find") return Value(int64_t(s.find(argv(0).str()) == std::string::npos ? -1 : int64_t(s.find(argv(0).str()))));
            if (m == "format") fail(e.pos, "str.format is not supported");
        }
        if (self.kind == Value::Object) {
            if (m == "get") {
                Value r = self.get(argv(0).str());
                return r.is_undefined() ? (e.args.size() > 2 ? argv(1) : Value::none()) : r;
            }
            if (m == "items") {
                List l;
                for (auto& [k, x] : *self.dict) l.push_back(Value::array({Value(k), x}));
                return Value::array(std::move(l));
            }
            if (m == "keys" || m == "values") {
                List l;
                for (auto& [k, x] : *self.dict) l.push_back(m == "keys" ? Value(k) : x);
                return Value::array(std::move(l));
            }
        }
        if (self.kind == Value::Array && m == "append") {
            self.list->push_back(argv(0));
            return Value::none();
        }
        fail(e.pos, std::string("unknown method '") + m + "' of " + self.type_name());
    }
};

Value from_json(simdjson::dom::element e) {
    using T = simdjson::dom::element_type;
    switch (e.type()) {
        case T::ARRAY: {
            List l;
            for (auto x : e.get_array()) l.push_back(from_json(x));
            return Value::array(std::move(l));
        }
        case T::OBJECT: {
            Value o = Value::object();
            for (auto f : e.get_object()) o.set(std::string(f.key), from_json(f.value));
            return o;
        }
        case T::INT64: return Value(int64_t(e.get_int64()));
        case T::UINT64: return Value(double(uint64_t(e.get_uint64())));
        case T::DOUBLE: return Value(double(e.get_double()));
        case T::STRING: return Value(std::string(std::string_view(e.get_string())));
        case T::BOOL: return Value(bool(e.get_bool()));
        case T::NULL_VALUE: return Value::none();
    }
    return Value();
}

}  // namespace
}  // namespace jinja

struct ChatTemplate::Impl {
    jinja::Body body;
};

ChatTemplate::ChatTemplate(const std::string& source) : impl_(std::make_unique<Impl>()) {
    impl_->body = jinja::parse_template(source);
}
ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

static std::string render_value(const jinja::Body& body, jinja::Value messages, const ChatRenderOptions& opt) {
    jinja::Renderer r;
    r.scopes.emplace_back();
    auto& g = r.scopes.back();
    g["messages"] = std::move(messages);
    g["bos_token"] = jinja::Value(opt.bos_token);
    g["eos_token"] = jinja::Value(opt.eos_token);
    g["add_generation_prompt"] = jinja::Value(opt.add_generation_prompt);
    r.scopes.emplace_back();  // top-level sets go here
    r.render(body);
    return r.out;
}

std::string ChatTemplate::render_json(const std::string& messages_json, const ChatRenderOptions& opt) const {
    simdjson::dom::parser parser;
    simdjson::padded_string text(messages_json);
    simdjson::dom::element root;
    if (auto err = parser.parse(text).get(root)) throw Error(std::string("messages: not valid JSON: ") + simdjson::error_message(err));
    if (!root.is_array()) throw Error("messages must be a JSON array");
    return render_value(impl_->body, jinja::from_json(root), opt);
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, const ChatRenderOptions& opt) const {
    jinja::List l;
    for (auto& m : messages) {
        jinja::Value o = jinja::Value::object();
        o.set("role", jinja::Value(m.role));
        o.set("content", jinja::Value(m.content));
        l.push_back(o);
    }
    return render_value(impl_->body, jinja::Value::array(std::move(l)), opt);
}

}  // namespace tmc

