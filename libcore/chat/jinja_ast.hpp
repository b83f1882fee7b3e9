// The parsed form of a chat template (chat/jinja.cpp has the language):
// expressions and statement nodes, as jinja_parse.cpp builds them and
// jinja.cpp renders them.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chat/value.hpp"
#include "tm/error.hpp"

namespace tmc::jinja {

struct Pos {
    int line = 1, col = 1;
};

[[noreturn]] inline void fail(Pos p, const std::string& msg) {
    throw Error("chat template: line " + std::to_string(p.line) + ", column " + std::to_string(p.col) + ": " + msg);
}

struct Expr;
using ExprP = std::unique_ptr<Expr>;
struct Expr {
    enum Kind { Lit, Var, Attr, Index, Slice, Call, Filter, Test, Unary, Binary, Cond, ListLit, DictLit } kind;
    Pos pos;
    Value lit;
    std::string name;  // Var, Attr, Filter, Test, operator
    std::vector<ExprP> args;  // children
    std::vector<std::pair<std::string, ExprP>> kwargs;
    bool negate = false;  // "is not"
};

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;
struct Node {
    enum Kind { Text, Output, If, For, Set, SetBlock } kind;
    Pos pos;
    std::string text;                            // Text
    std::vector<std::pair<ExprP, Body>> branches;  // If: (cond or null for else, body)
    std::vector<std::string> targets;            // For loop vars / Set target (name or ns.attr)
    std::string attr;                            // Set ns.attr
    ExprP expr, filter;                          // Output/Set value; For iterable + filter
    Body body, else_body;
};

// Lexes and parses a template's source; throws tmc::Error naming the line
// and column of the first problem.
Body parse_template(const std::string& source);

}  // namespace tmc::jinja
