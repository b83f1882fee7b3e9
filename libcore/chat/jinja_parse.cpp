// The chat template's lexer and parser (chat/jinja.cpp describes the
// language): source -> pieces (text, {{ }}, {% %}, whitespace control) ->
// tokens -> expression trees and statement nodes (jinja_ast.hpp).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "chat/jinja_ast.hpp"

namespace tmc::jinja {

namespace {

// ---- lexer ---------------------------------------------------------------

enum class Tok { Name, Str, Int, Float, Op, End };
struct Token {
    Tok type;
    std::string text;
    Pos pos;
};

struct Piece {
    enum Kind { Text, Expr, Stmt } kind;
    std::string text;  // raw text, or tag contents
    Pos pos;           // where the contents start
};

Pos pos_at(const std::string& s, size_t off) {
    Pos p;
    for (size_t i = 0; i < off && i < s.size(); ++i) {
        if (s[i] == '\n') ++p.line, p.col = 1;
        else ++p.col;
    }
    return p;
}

std::vector<Piece> split_pieces(const std::string& src) {
    std::vector<Piece> out;
    size_t i = 0;
    bool trim_next_left = false;  // previous tag ended with "-" (strip all whitespace)
    bool after_block = false;     // previous tag was a block tag (trim_blocks)
    while (i <= src.size()) {
        size_t open = src.find('{', i);
        while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' && src[open + 1] != '%' &&
               src[open + 1] != '#')
            open = src.find('{', open + 1);
        if (open != std::string::npos && open + 1 >= src.size()) open = std::string::npos;
        const std::string raw = src.substr(i, open == std::string::npos ? std::string::npos : open - i);
        // Leading trims: "-" on the previous tag, or trim_blocks after a block tag.
        size_t lead = 0;
        if (trim_next_left) {
            lead = raw.find_first_not_of(" \t\r\n");
            if (lead == std::string::npos) lead = raw.size();
        } else if (after_block && !raw.empty() && raw[0] == '\n') {
            lead = 1;
        }
        if (open == std::string::npos) {
            std::string text = raw.substr(lead);
            if (!text.empty()) out.push_back({Piece::Text, text, pos_at(src, i)});
            break;
        }
        char kind = src[open + 1];
        const char* close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
        bool strip_left = open + 2 < src.size() && src[open + 2] == '-';
        size_t body = open + 2 + (strip_left ? 1 : 0);
        size_t end = src.find(close, body);
        if (end == std::string::npos) fail(pos_at(src, open), std::string("unclosed tag, expected ") + close);
        bool strip_right = end > body && src[end - 1] == '-';
        // Trailing trims: "-" on this tag, or lstrip_blocks before a block tag
        // that has only spaces and tabs before it on its source line.
        size_t tail = raw.size();
        if (strip_left) {
            size_t k = raw.find_last_not_of(" \t\r\n");
            tail = k == std::string::npos ? 0 : k + 1;
        } else if (kind != '{') {
            size_t k = raw.find_last_not_of(" \t");
            bool line_start = k == std::string::npos ? (i == 0 || src[i - 1] == '\n') : raw[k] == '\n';
            if (line_start) tail = k == std::string::npos ? 0 : k + 1;
        }
        std::string text = tail > lead ? raw.substr(lead, tail - lead) : std::string();
        if (!text.empty()) out.push_back({Piece::Text, text, pos_at(src, i)});
        if (kind != '#') {
            std::string inner = src.substr(body, end - body - (strip_right ? 1 : 0));
            out.push_back({kind == '{' ? Piece::Expr : Piece::Stmt, inner, pos_at(src, body)});
        }
        trim_next_left = strip_right;
        after_block = kind != '{';
        i = end + 2;
    }
    return out;
}

std::vector<Token> tokenize(const std::string& s, Pos start) {
    std::vector<Token> out;
    size_t i = 0;
    Pos p = start;
    auto advance = [&](size_t n) {
        for (size_t k = 0; k < n; ++k) {
            if (s[i] == '\n') ++p.line, p.col = 1;
            else ++p.col;
            ++i;
        }
    };
    while (i < s.size()) {
        char c = s[i];
        if (isspace(static_cast<unsigned char>(c))) {
            advance(1);
            continue;
        }
        Pos at = p;
        if (isalpha(static_cast<unsigned char>(c)) || c == '_') {
            size_t j = i;
            while (j < s.size() && (isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
            out.push_back({Tok::Name, s.substr(i, j - i), at});
            advance(j - i);
        } else if (isdigit(static_cast<unsigned char>(c))) {
            size_t j = i;
            while (j < s.size() && isdigit(static_cast<unsigned char>(s[j]))) ++j;
            bool is_float = j + 1 < s.size() && s[j] == '.' && isdigit(static_cast<unsigned char>(s[j + 1]));
            if (is_float) {
                ++j;
                while (j < s.size() && isdigit(static_cast<unsigned char>(s[j]))) ++j;
            }
            out.push_back({is_float ? Tok::Float : Tok::Int, s.substr(i, j - i), at});
            advance(j - i);
        } else if (c == '\'' || c == '"') {
            std::string v;
            size_t j = i + 1;
            for (; j < s.size() && s[j] != c; ++j) {
                if (s[j] == '\\' && j + 1 < s.size()) {
                    char e = s[++j];
                    v += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
                } else {
                    v += s[j];
                }
            }
            if (j >= s.size()) fail(at, "unterminated string");
            out.push_back({Tok::Str, v, at});
            advance(j + 1 - i);
        } else {
            static const char* ops[] = {"//", "==", "!=", "<=", ">=", "**", "+", "-", "*", "/", "%", "~", "(", ")",
                                        "[", "]", "{", "}", ",", ".", ":", "|", "=", "<", ">"};
            bool found = false;
            for (const char* op : ops) {
                size_t n = strlen(op);
                if (s.compare(i, n, op) == 0) {
                    out.push_back({Tok::Op, op, at});
                    advance(n);
                    found = true;
                    break;
                }
            }
            if (!found) fail(at, std::string("unexpected character '") + c + "'");
        }
    }
    out.push_back({Tok::End, "", p});
    return out;
}


ExprP make(Expr::Kind k, Pos p) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->pos = p;
    return e;
}

class ExprParser {
public:
    ExprParser(std::vector<Token> toks) : t_(std::move(toks)) {}

    const Token& peek(size_t k = 0) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
    bool at_op(const char* op) const { return peek().type == Tok::Op && peek().text == op; }
    bool at_name(const char* n) const { return peek().type == Tok::Name && peek().text == n; }
    bool accept_op(const char* op) {
        if (!at_op(op)) return false;
        ++i_;
        return true;
    }
    bool accept_name(const char* n) {
        if (!at_name(n)) return false;
        ++i_;
        return true;
    }
    void expect_op(const char* op) {
        if (!accept_op(op)) fail(peek().pos, std::string("expected '") + op + "'" + got());
    }
    std::string expect_name() {
        if (peek().type != Tok::Name) fail(peek().pos, "expected a name" + got());
        return t_[i_++].text;
    }
    std::string got() const { return peek().type == Tok::End ? ", got the end of the tag" : ", got '" + peek().text + "'"; }
    bool done() const { return peek().type == Tok::End; }
    void expect_end() {
        if (!done()) fail(peek().pos, "unexpected '" + peek().text + "'");
    }

    ExprP expression() {  // a if cond else b
        ExprP e = or_expr();
        while (at_name("if")) {
            Pos p = peek().pos;
            ++i_;
            auto c = make(Expr::Cond, p);
            ExprP cond = or_expr();
            ExprP other;
            if (accept_name("else")) other = or_expr();
            c->args.push_back(std::move(e));
            c->args.push_back(std::move(cond));
            c->args.push_back(std::move(other));
            e = std::move(c);
        }
        return e;
    }
    // Like expression() but without the conditional (for `for x in y if z`).
    ExprP or_expr() {
        ExprP e = and_expr();
        while (at_name("or")) e = binary("or", std::move(e), [&] { return and_expr(); });
        return e;
    }

private:
    template <class F>
    ExprP binary(const std::string& op, ExprP lhs, F rhs) {
        auto b = make(Expr::Binary, peek().pos);
        ++i_;
        b->name = op;
        b->args.push_back(std::move(lhs));
        b->args.push_back(rhs());
        return b;
    }
    ExprP and_expr() {
        ExprP e = not_expr();
        while (at_name("and")) e = binary("and", std::move(e), [&] { return not_expr(); });
        return e;
    }
    ExprP not_expr() {
        if (at_name("not")) {
            auto u = make(Expr::Unary, peek().pos);
            ++i_;
            u->name = "not";
            u->args.push_back(not_expr());
            return u;
        }
        return compare();
    }
    ExprP compare() {
        ExprP e = concat();
        for (;;) {
            if (peek().type == Tok::Op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                           peek().text == ">" || peek().text == "<=" || peek().text == ">=")) {
                std::string op = peek().text;
                e = binary(op, std::move(e), [&] { return concat(); });
            } else if (at_name("in")) {
                e = binary("in", std::move(e), [&] { return concat(); });
            } else if (at_name("not") && peek(1).type == Tok::Name && peek(1).text == "in") {
                ++i_;
                e = binary("notin", std::move(e), [&] { return concat(); });
            } else if (at_name("is")) {
                auto t = make(Expr::Test, peek().pos);
                ++i_;
                t->negate = accept_name("not");
                t->name = expect_name();
                t->args.push_back(std::move(e));
                if (at_op("(")) {
                    ++i_;
                    while (!accept_op(")")) {
                        t->args.push_back(expression());
                        if (!at_op(")")) expect_op(",");
                    }
                } else if (peek().type == Tok::Str || peek().type == Tok::Int || peek().type == Tok::Name) {
                    if (!(at_name("and") || at_name("or") || at_name("else") || at_name("if")))
                        t->args.push_back(primary_postfix());
                }
                e = std::move(t);
            } else {
                return e;
            }
        }
    }
    ExprP concat() {
        ExprP e = additive();
        while (at_op("~")) e = binary("~", std::move(e), [&] { return additive(); });
        return e;
    }
    ExprP additive() {
        ExprP e = multiplicative();
        while (at_op("+") || at_op("-")) {
            std::string op = peek().text;
            e = binary(op, std::move(e), [&] { return multiplicative(); });
        }
        return e;
    }
    ExprP multiplicative() {
        ExprP e = unary();
        while (at_op("*") || at_op("/") || at_op("//") || at_op("%")) {
            std::string op = peek().text;
            e = binary(op, std::move(e), [&] { return unary(); });
        }
        return e;
    }
    ExprP unary() {
        if (at_op("-") || at_op("+")) {
            auto u = make(Expr::Unary, peek().pos);
            u->name = t_[i_++].text;
            u->args.push_back(unary());
            return u;
        }
        return filtered();
    }
    ExprP filtered() {
        ExprP e = primary_postfix();
        while (at_op("|")) {
            auto f = make(Expr::Filter, peek().pos);
            ++i_;
            f->name = expect_name();
            f->args.push_back(std::move(e));
            if (at_op("(")) call_args(*f);
            e = std::move(f);
        }
        return e;
    }
    void call_args(Expr& call) {
        expect_op("(");
        while (!accept_op(")")) {
            if (peek().type == Tok::Name && peek(1).type == Tok::Op && peek(1).text == "=") {
                std::string k = t_[i_].text;
                i_ += 2;
                call.kwargs.emplace_back(k, expression());
            } else {
                call.args.push_back(expression());
            }
            if (!at_op(")")) expect_op(",");
        }
    }
    ExprP primary_postfix() {
        ExprP e = primary();
        for (;;) {
            if (at_op(".")) {
                auto a = make(Expr::Attr, peek().pos);
                ++i_;
                a->name = expect_name();
                a->args.push_back(std::move(e));
                e = std::move(a);
            } else if (at_op("[")) {
                Pos p = peek().pos;
                ++i_;
                ExprP idx[3];
                bool slice = false;
                int part = 0;
                while (!at_op("]")) {
                    if (accept_op(":")) {
                        slice = true;
                        if (++part > 2) fail(p, "too many ':' in a slice");
                        continue;
                    }
                    if (idx[part]) fail(peek().pos, "expected ']'" + got());
                    idx[part] = expression();
                }
                ++i_;
                auto x = make(slice ? Expr::Slice : Expr::Index, p);
                x->args.push_back(std::move(e));
                if (!slice && !idx[0]) fail(p, "empty subscript");
                for (auto& k : idx) x->args.push_back(std::move(k));
                e = std::move(x);
            } else if (at_op("(")) {
                auto c = make(Expr::Call, e->pos);
                c->args.push_back(std::move(e));
                call_args(*c);
                e = std::move(c);
            } else {
                return e;
            }
        }
    }
    ExprP primary() {
        const Token& t = peek();
        Pos p = t.pos;
        switch (t.type) {
            case Tok::Str: {
                auto e = make(Expr::Lit, p);
                std::string s = t_[i_++].text;
                while (peek().type == Tok::Str) s += t_[i_++].text;  // adjacent literals concatenate
                e->lit = Value(s);
                return e;
            }
            case Tok::Int: {
                auto e = make(Expr::Lit, p);
                e->lit = Value(int64_t(std::stoll(t_[i_++].text)));
                return e;
            }
            case Tok::Float: {
                auto e = make(Expr::Lit, p);
                e->lit = Value(std::stod(t_[i_++].text));
                return e;
            }
            case Tok::Name: {
                std::string n = t_[i_++].text;
                auto e = make(Expr::Lit, p);
                if (n == "true" || n == "True") e->lit = Value(true);
                else if (n == "false" || n == "False") e->lit = Value(false);
                else if (n == "none" || n == "None") e->lit = Value::none();
                else {
                    e->kind = Expr::Var;
                    e->name = n;
                }
                return e;
            }
            case Tok::Op:
                if (accept_op("(")) {
                    ExprP e = expression();
                    if (at_op(",")) {  // tuple: treat as a list
                        auto l = make(Expr::ListLit, p);
                        l->args.push_back(std::move(e));
                        while (accept_op(",") && !at_op(")")) l->args.push_back(expression());
                        e = std::move(l);
                    }
                    expect_op(")");
                    return e;
                }
                if (accept_op("[")) {
                    auto l = make(Expr::ListLit, p);
                    while (!accept_op("]")) {
                        l->args.push_back(expression());
                        if (!at_op("]")) expect_op(",");
                    }
                    return l;
                }
                if (accept_op("{")) {
                    auto d = make(Expr::DictLit, p);
                    while (!accept_op("}")) {
                        d->args.push_back(expression());
                        expect_op(":");
                        d->args.push_back(expression());
                        if (!at_op("}")) expect_op(",");
                    }
                    return d;
                }
                [[fallthrough]];
            default: fail(p, "expected an expression" + got());
        }
    }

    std::vector<Token> t_;
    size_t i_ = 0;
};


class Parser {
public:
    explicit Parser(const std::string& src) : pieces_(split_pieces(src)) {}

    Body parse_all() {
        Body b;
        std::string end = parse_body(b, {});
        if (!end.empty()) fail(last_pos_, "unexpected {% " + end + " %}");
        return b;
    }

private:
    // Parses nodes until a statement whose keyword is in `stops`; returns
    // that keyword (its parser left positioned after it), or "" at the end.
    std::string parse_body(Body& out, const std::vector<std::string>& stops) {
        while (k_ < pieces_.size()) {
            const Piece& p = pieces_[k_++];
            last_pos_ = p.pos;
            if (p.kind == Piece::Text) {
                auto n = std::make_unique<Node>();
                n->kind = Node::Text;
                n->text = p.text;
                out.push_back(std::move(n));
                continue;
            }
            ExprParser ep(tokenize(p.text, p.pos));
            if (p.kind == Piece::Expr) {
                auto n = std::make_unique<Node>();
                n->kind = Node::Output;
                n->pos = p.pos;
                n->expr = ep.expression();
                ep.expect_end();
                out.push_back(std::move(n));
                continue;
            }
            if (ep.done()) fail(p.pos, "empty statement");
            std::string kw = ep.expect_name();
            if (std::find(stops.begin(), stops.end(), kw) != stops.end()) {
                cur_ = std::make_unique<ExprParser>(std::move(ep));
                return kw;
            }
            if (kw == "if") out.push_back(parse_if(ep, p.pos));
            else if (kw == "for") out.push_back(parse_for(ep, p.pos));
            else if (kw == "set") out.push_back(parse_set(ep, p.pos));
            else if (kw == "generation" || kw == "endgeneration") continue;  // HF's assistant-mask markers
            else fail(p.pos, "unknown statement '" + kw + "'");
        }
        if (!stops.empty()) fail(last_pos_, "missing {% " + stops.back() + " %}");
        return "";
    }

    std::unique_ptr<Node> parse_if(ExprParser& ep, Pos pos) {
        auto n = std::make_unique<Node>();
        n->kind = Node::If;
        n->pos = pos;
        ExprP cond = ep.expression();
        ep.expect_end();
        for (;;) {
            Body b;
            std::string end = parse_body(b, {"elif", "else", "endif"});
            n->branches.emplace_back(std::move(cond), std::move(b));
            if (end == "endif") {
                cur_->expect_end();
                return n;
            }
            if (end == "elif") {
                cond = cur_->expression();
                cur_->expect_end();
            } else {
                cur_->expect_end();
                Body eb;
                parse_body(eb, {"endif"});
                cur_->expect_end();
                n->branches.emplace_back(nullptr, std::move(eb));
                return n;
            }
        }
    }

    std::unique_ptr<Node> parse_for(ExprParser& ep, Pos pos) {
        auto n = std::make_unique<Node>();
        n->kind = Node::For;
        n->pos = pos;
        n->targets.push_back(ep.expect_name());
        while (ep.accept_op(",")) n->targets.push_back(ep.expect_name());
        if (!ep.accept_name("in")) fail(ep.peek().pos, "expected 'in'" + ep.got());
        n->expr = ep.or_expr();
        if (ep.accept_name("if")) n->filter = ep.or_expr();
        if (ep.accept_name("recursive")) fail(pos, "recursive loops are not supported");
        ep.expect_end();
        std::string end = parse_body(n->body, {"else", "endfor"});
        cur_->expect_end();
        if (end == "else") {
            parse_body(n->else_body, {"endfor"});
            cur_->expect_end();
        }
        return n;
    }

    std::unique_ptr<Node> parse_set(ExprParser& ep, Pos pos) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Set;
        n->pos = pos;
        n->targets.push_back(ep.expect_name());
        if (ep.accept_op(".")) n->attr = ep.expect_name();
        while (ep.accept_op(",")) n->targets.push_back(ep.expect_name());
        if (!ep.accept_op("=")) {  // {% set x %}...{% endset %}
            ep.expect_end();
            n->kind = Node::SetBlock;
            parse_body(n->body, {"endset"});
            cur_->expect_end();
            return n;
        }
        n->expr = ep.expression();
        ep.expect_end();
        return n;
    }

    std::vector<Piece> pieces_;
    size_t k_ = 0;
    std::unique_ptr<ExprParser> cur_;
    Pos last_pos_;
};


}  // namespace

Body parse_template(const std::string& source) {
    Parser p(source);
    return p.parse_all();
}

}  // namespace tmc::jinja
