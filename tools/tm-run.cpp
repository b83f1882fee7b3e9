// tm-run: local use of a model. This build offers the tokenizer and chat
// template modes (JSON lines in, JSON lines out):
//   tm-run --tokenizer DIR --encode       {"text": ...}      -> {"ids": [...]}
//   tm-run --tokenizer DIR --decode       {"ids": [...]}     -> {"text": ...}
//   tm-run --tokenizer DIR --render-chat  {"messages": [...]} -> {"text": ..., "ids": [...]}
#include <simdjson.h>

#include <cxxopts.hpp>
#include <iostream>
#include <optional>

#include "base/json_write.hpp"
#include "base/mapped_file.hpp"
#include "tm/chat_template.hpp"
#include "tm/error.hpp"
#include "tm/tokenizer.hpp"
#include "tool_main.hpp"

namespace {

const char* kProg = "tm-run";
const char* kUsage =
    "usage: tm-run --tokenizer DIR (--encode | --decode | --render-chat) [--chat-template NAME|FILE]\n";

enum class Mode { Encode, Decode, RenderChat };

struct LineError {
    std::string msg;
};

std::string ids_json(const std::vector<int>& ids) {
    std::string o = "[";
    for (size_t i = 0; i < ids.size(); ++i) {
        if (i) o += ", ";
        o += std::to_string(ids[i]);
    }
    return o + "]";
}

bool opt_bool(simdjson::dom::object& obj, const char* key, bool def) {
    simdjson::dom::element e;
    if (obj[key].get(e) || e.is_null()) return def;
    bool b;
    if (e.get(b)) throw LineError{std::string("\"") + key + "\" must be a boolean"};
    return b;
}

class Runner {
public:
    Runner(Mode mode, const tmc::Tokenizer& tok, std::optional<tmc::ChatTemplate> tpl, bool skip_special)
        : mode_(mode), tok_(tok), tpl_(std::move(tpl)), skip_special_(skip_special) {}

    // Returns the output line (without newline); an error line on bad input.
    std::string handle(const std::string& line, size_t lineno, bool* failed) {
        std::string id_field;
        try {
            simdjson::padded_string text(line);
            simdjson::dom::element root;
            auto err = parser_.parse(text).get(root);
            if (err == simdjson::UTF8_ERROR) throw LineError{"invalid UTF-8"};
            if (err) throw LineError{std::string("invalid JSON: ") + simdjson::error_message(err)};
            simdjson::dom::object obj;
            if (root.get(obj)) throw LineError{"expected a JSON object"};
            simdjson::dom::element idv;
            if (!obj["id"].get(idv)) {
                if (!idv.is_string() && !idv.is_int64() && !idv.is_uint64())
                    throw LineError{"\"id\" must be a string or an integer"};
                id_field = "\"id\": " + std::string(simdjson::minify(idv)) + ", ";
            }
            return "{" + id_field + body(obj) + "}";
        } catch (const LineError& e) {
            *failed = true;
            return error_line(id_field, "line " + std::to_string(lineno) + ": " + e.msg);
        } catch (const tmc::Error& e) {
            *failed = true;
            return error_line(id_field, "line " + std::to_string(lineno) + ": " + e.what());
        }
    }

private:
    static std::string error_line(const std::string& id_field, const std::string& msg) {
        return "{" + id_field + "\"error\": {\"message\": " + tmc::json_quote(msg) +
               ", \"type\": \"invalid_request_error\"}}";
    }

    std::string body(simdjson::dom::object& obj) {
        switch (mode_) {
            case Mode::Encode: {
                std::string_view text;
                simdjson::dom::element e;
                if (obj["text"].get(e)) throw LineError{"missing \"text\""};
                if (e.get(text)) throw LineError{"\"text\" must be a string"};
                bool special = opt_bool(obj, "add_special_tokens", false);
                return "\"ids\": " + ids_json(tok_.encode(text, special));
            }
            case Mode::Decode: {
                simdjson::dom::element e;
                simdjson::dom::array arr;
                if (obj["ids"].get(e)) throw LineError{"missing \"ids\""};
                if (e.get(arr)) throw LineError{"\"ids\" must be an array of integers"};
                std::vector<int> ids;
                for (auto x : arr) {
                    int64_t v;
                    if (x.get(v)) throw LineError{"\"ids\" must be an array of integers"};
                    if (v < 0 || v >= tok_.vocab_size())
                        throw LineError{"id " + std::to_string(v) + " is outside the vocabulary (0.." +
                                        std::to_string(tok_.vocab_size() - 1) + ")"};
                    ids.push_back(int(v));
                }
                bool skip = opt_bool(obj, "skip_special_tokens", skip_special_);
                return "\"text\": " + tmc::json_quote(tok_.decode(ids, skip));
            }
            case Mode::RenderChat: {
                simdjson::dom::element e;
                simdjson::dom::array msgs;
                if (obj["messages"].get(e)) throw LineError{"missing \"messages\""};
                if (e.get(msgs)) throw LineError{"\"messages\" must be an array"};
                if (msgs.size() == 0) throw LineError{"\"messages\" is empty"};
                size_t k = 0;
                for (auto m : msgs) {
                    simdjson::dom::object mo;
                    std::string_view role;
                    if (m.get(mo)) throw LineError{"messages[" + std::to_string(k) + "] must be an object"};
                    if (mo["role"].get(role))
                        throw LineError{"messages[" + std::to_string(k) + "].role must be a string"};
                    simdjson::dom::element c;
                    if (mo["content"].get(c) || !(c.is_string() || c.is_null()))
                        throw LineError{"messages[" + std::to_string(k) + "].content must be a string"};
                    ++k;
                }
                tmc::ChatRenderOptions opt;
                opt.add_generation_prompt = opt_bool(obj, "add_generation_prompt", true);
                opt.bos_token = tok_.bos_token();
                opt.eos_token = tok_.eos_token();
                std::string text = tpl_->render_json(std::string(simdjson::minify(e)), opt);
                return "\"text\": " + tmc::json_quote(text) + ", \"ids\": " + ids_json(tok_.encode(text, false));
            }
        }
        return "";
    }

    Mode mode_;
    const tmc::Tokenizer& tok_;
    std::optional<tmc::ChatTemplate> tpl_;
    bool skip_special_;
    simdjson::dom::parser parser_;
};

}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options options(kProg, "Run a model locally; tokenizer and chat template modes.");
    options.custom_help("--tokenizer DIR (--encode | --decode | --render-chat) [options]");
    options.add_options()
        ("tokenizer", "tokenizer directory, model directory or workspace", cxxopts::value<std::string>())
        ("encode", "JSON lines {\"text\"} -> {\"ids\"}")
        ("decode", "JSON lines {\"ids\"} -> {\"text\"}")
        ("render-chat", "JSON lines {\"messages\"} -> {\"text\", \"ids\"}")
        ("chat-template", "built-in template name (llama2, llama3, chatml, internlm2, vicuna) or a template file",
         cxxopts::value<std::string>())
        ("skip-special-tokens", "--decode: leave special tokens out of the text")
        ("h,help", "show this help");
    cxxopts::ParseResult args;
    try {
        args = options.parse(argc, argv);
        if (args.count("help")) {
            std::cout << options.help() << "\nSee tm-run(1).\n";
            return 0;
        }
        if (!args.unmatched().empty()) throw tmc::tool::UsageError("unexpected argument " + args.unmatched()[0]);
        int modes = int(args.count("encode") + args.count("decode") + args.count("render-chat"));
        if (modes != 1) throw tmc::tool::UsageError("choose one of --encode, --decode, --render-chat");
        if (!args.count("tokenizer")) throw tmc::tool::UsageError("missing --tokenizer DIR");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n%s", kProg, e.what(), kUsage);
        return 2;
    }
    try {
        Mode mode = args.count("encode") ? Mode::Encode : args.count("decode") ? Mode::Decode : Mode::RenderChat;
        auto tok = tmc::Tokenizer::load(args["tokenizer"].as<std::string>());
        std::optional<tmc::ChatTemplate> tpl;
        if (mode == Mode::RenderChat) {
            if (args.count("chat-template")) {
                std::string name = args["chat-template"].as<std::string>();
                tpl = tmc::path_exists(name) ? tmc::ChatTemplate(tmc::read_file(name)) : tmc::ChatTemplate::builtin(name);
            } else if (!tok->chat_template().empty()) {
                tpl = tmc::ChatTemplate(tok->chat_template());
            } else {
                throw tmc::Error("the tokenizer has no chat_template; pass --chat-template NAME (" +
                                 std::string("llama2, llama3, chatml, internlm2, vicuna)"));
            }
        }
        Runner runner(mode, *tok, std::move(tpl), args.count("skip-special-tokens") > 0);
        std::ios::sync_with_stdio(false);
        std::string line;
        size_t lineno = 0;
        bool failed = false;
        while (std::getline(std::cin, line)) {
            ++lineno;
            if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
            std::string out = runner.handle(line, lineno, &failed);
            std::fwrite(out.data(), 1, out.size(), stdout);
            std::fputc('\n', stdout);
            std::fflush(stdout);
        }
        return failed ? 1 : 0;
    } catch (const std::exception& e) {
        return tmc::tool::fail(kProg, e.what());
    }
}
