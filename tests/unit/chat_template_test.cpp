// Chat templates against transformers' apply_chat_template renders in
// ../shared/golden/chat, and the Jinja features real templates use.
#include "tm/chat_template.hpp"

#include <simdjson.h>

#include <map>

#include "base/mapped_file.hpp"
#include "test_util.hpp"
#include "tm/error.hpp"
#include "tm/tokenizer.hpp"

namespace {

std::string dir_of(std::string_view name) {
    if (name == "tinytech") return tmtest::shared_dir() + "/models/tinytech-25m";
    return tmtest::shared_dir() + "/tokenizers/" + std::string(name);
}

TEST(ChatTemplate, MatchesTransformers) {
    simdjson::dom::parser parser;
    auto text = tmc::read_file(tmtest::shared_dir() + "/golden/chat/chat-templates.jsonl");
    size_t n = 0;
    std::map<std::string, std::unique_ptr<tmc::Tokenizer>> toks;
    for (auto doc : parser.parse_many(text)) {
        std::string_view name = doc["tokenizer"];
        auto& tok = toks[std::string(name)];
        if (!tok) tok = tmc::Tokenizer::load(dir_of(name));
        tmc::ChatTemplate tpl(tok->chat_template());
        tmc::ChatRenderOptions opt;
        opt.add_generation_prompt = bool(doc["add_generation_prompt"]);
        opt.bos_token = tok->bos_token();
        opt.eos_token = tok->eos_token();
        std::string rendered = tpl.render_json(std::string(simdjson::to_string(doc["messages"])), opt);
        EXPECT_EQ(rendered, std::string_view(doc["text"])) << name;
        std::vector<int> want;
        for (auto x : doc["ids"].get_array()) want.push_back(int(int64_t(x)));
        EXPECT_EQ(tok->encode(rendered, false), want) << name << ": " << rendered;
        ++n;
    }
    EXPECT_EQ(n, 30u);
}

std::string render(const std::string& src, const std::string& messages = "[]", bool gen = true) {
    tmc::ChatRenderOptions opt;
    opt.add_generation_prompt = gen;
    opt.bos_token = "<s>";
    opt.eos_token = "</s>";
    return tmc::ChatTemplate(src).render_json(messages, opt);
}

TEST(Jinja, Features) {
    EXPECT_EQ(render("{% for m in messages %}{{ loop.index }}{{ m.role }}{% if not loop.last %},{% endif %}{% endfor %}",
                     R"([{"role":"a"},{"role":"b"}])"),
              "1a,2b");
    EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for x in [1,2,3] %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }}"),
              "6");
    EXPECT_EQ(render("{% set n = 1 %}{% for x in [1] %}{% set n = 5 %}{% endfor %}{{ n }}"), "1");
    EXPECT_EQ(render("{{ 'a b c'.split(' ')[-1] }}|{{ '  x '.strip() }}|{{ 'xy'.startswith('x') }}|{{ [3,4]|length }}"),
              "c|x|True|2");
    EXPECT_EQ(render("{{ {'a': [1, 'x', none, true]}|tojson }}"), "{\"a\": [1, \"x\", null, true]}");
    EXPECT_EQ(render("{{ x is defined }}{{ messages is defined }}{{ 'b' in 'abc' }}{{ 3 not in [1] }}"), "FalseTrueTrueTrue");
    EXPECT_EQ(render("{{ [1,2,3][::-1] }}{{ 'abc'[1:] }}{{ 7 // 2 }}{{ 7 % 3 }}{{ 'a' ~ 1 }}"), "[3, 2, 1]bc31a1");
    EXPECT_EQ(render("{%- if true -%}\n  x  \n{%- endif -%}\n"), "x");
    EXPECT_EQ(render("a\n  {% if true %}\nb\n  {% endif %}\nc"), "a\nb\nc");  // trim_blocks + lstrip_blocks
    EXPECT_EQ(render("{{ 'yes' if add_generation_prompt else 'no' }}", "[]", false), "no");
    EXPECT_EQ(render("{% for m in messages if m.role != 'system' %}{{ m.role }}{% endfor %}",
                     R"([{"role":"system"},{"role":"user"}])"),
              "user");
    EXPECT_EQ(render("{{ messages|selectattr('role', 'equalto', 'user')|list|length }}",
                     R"([{"role":"system"},{"role":"user"}])"),
              "1");
}

TEST(Jinja, ErrorsCarryThePosition) {
    try {
        render("ab\n{{ raise_exception('no system role') }}");
        FAIL();
    } catch (const tmc::Error& e) {
        EXPECT_STREQ(e.what(), "chat template: line 2, column 4: raise_exception: no system role");
    }
    EXPECT_THROW(tmc::ChatTemplate("{% if x %}never closed"), tmc::Error);
    EXPECT_THROW(tmc::ChatTemplate("{{ 1 + }}"), tmc::Error);
    EXPECT_THROW(tmc::ChatTemplate("{% frobnicate %}"), tmc::Error);
    EXPECT_THROW(render("{{ 'a' + 1 }}"), tmc::Error);
    EXPECT_THROW(render("{{ x|nosuchfilter }}"), tmc::Error);
}

TEST(ChatTemplate, BuiltinsRender) {
    for (auto& name : tmc::ChatTemplate::builtin_names()) {
        auto t = tmc::ChatTemplate::builtin(name);
        tmc::ChatRenderOptions opt;
        opt.bos_token = "<s>";
        opt.eos_token = "</s>";
        std::string s = t.render({{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "Bye"}}, opt);
        EXPECT_NE(s.find("Bye"), std::string::npos) << name;
        EXPECT_NE(s.find("Be brief."), std::string::npos) << name;
    }
    tmc::ChatRenderOptions opt;
    opt.bos_token = "<s>";
    EXPECT_EQ(tmc::ChatTemplate::builtin("chatml").render({{"user", "Hi"}}, opt),
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    EXPECT_EQ(tmc::ChatTemplate::builtin("llama2").render({{"user", "Hi"}}, opt), "<s>[INST] Hi [/INST]");
    EXPECT_THROW(tmc::ChatTemplate::builtin("nope"), tmc::Error);
}

}  // namespace
