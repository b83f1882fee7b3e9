// The tokenizer against Hugging Face's outputs in ../shared/golden/tokenizer,
// plus round-trip and streaming properties on random Unicode strings.
#include "tm/tokenizer.hpp"

#include <simdjson.h>

#include <random>

#include "base/mapped_file.hpp"
#include "test_util.hpp"

namespace {

std::vector<int> ids_of(simdjson::dom::element e) {
    std::vector<int> v;
    for (auto x : e.get_array()) v.push_back(int(int64_t(x)));
    return v;
}

class Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(Golden, MatchesHuggingFace) {
    const std::string name = GetParam();
    auto tok = tmc::Tokenizer::load(tmtest::shared_dir() + "/tokenizers/" + name);
    simdjson::dom::parser parser;
    auto text = tmc::read_file(tmtest::shared_dir() + "/golden/tokenizer/" + name + ".jsonl");
    size_t n = 0;
    for (auto doc : parser.parse_many(text)) {
        std::string_view t = doc["text"];
        auto want = ids_of(doc["ids"]);
        EXPECT_EQ(tok->encode(t, false), want) << name << ": " << t;
        EXPECT_EQ(tok->encode(t, true), ids_of(doc["ids_with_special"])) << name << ": " << t;
        std::string_view decoded = doc["decoded"];
        EXPECT_EQ(tok->decode(want), decoded) << name;
        ++n;
    }
    EXPECT_EQ(n, 30u);
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, Golden, ::testing::Values("llama2", "llama3", "qwen3"));

// Random strings mixing ASCII, Latin, CJK, emoji and whitespace.
std::string random_text(std::mt19937& rng) {
    static const char* pieces[] = {"a", "Z", " ", "  ", "\n", "\t", "é", "ß", "你", "好", "😀", "🇫🇷", "ё",
                                   "1", "42", "'s", "<", ">", "|", "ﬁ", "!", "...", "ا"};
    std::uniform_int_distribution<size_t> len(0, 40), pick(0, sizeof pieces / sizeof *pieces - 1);
    std::string s;
    for (size_t i = 0, n = len(rng); i < n; ++i) s += pieces[pick(rng)];
    return s;
}

TEST_P(Golden, RoundTripsAndStreams) {
    const std::string name = GetParam();
    auto tok = tmc::Tokenizer::load(tmtest::shared_dir() + "/tokenizers/" + name);
    std::mt19937 rng(1234);
    for (int iter = 0; iter < 300; ++iter) {
        std::string s = random_text(rng);
        auto ids = tok->encode(s, false);
        std::string back = tok->decode(ids);
        // Lossless for these pieces (no U+2581, which llama2 decodes as a space;
        // all already NFC, which qwen3 applies).
        EXPECT_EQ(back, s) << name << ": " << s;
        tmc::StreamDecoder sd(*tok);
        std::string streamed;
        for (int id : ids) streamed += sd.push(id);
        streamed += sd.finish();
        EXPECT_EQ(streamed, back) << s;
    }
}

TEST(Tokenizer, StreamingNeverSplitsACharacter) {
    auto tok = tmc::Tokenizer::load(tmtest::shared_dir() + "/tokenizers/llama3");
    auto ids = tok->encode("😀🚀 你好", false);
    tmc::StreamDecoder sd(*tok);
    std::string all;
    for (int id : ids) {
        std::string piece = sd.push(id);
        EXPECT_EQ(piece.find("\xef\xbf\xbd"), std::string::npos);
        all += piece;
    }
    all += sd.finish();
    EXPECT_EQ(all, "😀🚀 你好");
}

TEST(Tokenizer, InvalidUtf8IsReplacedNotFatal) {
    for (const char* name : {"llama2", "llama3", "qwen3"}) {
        auto tok = tmc::Tokenizer::load(tmtest::shared_dir() + "/tokenizers/" + name);
        auto ids = tok->encode("ok \xff\xfe broken \xe4\xbd", false);
        EXPECT_FALSE(ids.empty());
        std::string back = tok->decode(ids);
        EXPECT_NE(back.find("\xef\xbf\xbd"), std::string::npos) << name;
        // Random ids decode to valid UTF-8.
        std::mt19937 rng(7);
        std::uniform_int_distribution<int> d(0, tok->vocab_size() - 1);
        std::vector<int> r(64);
        for (auto& x : r) x = d(rng);
        std::string s = tok->decode(r);
        std::string q;
        EXPECT_NO_THROW(q = tok->decode({-5, 1 << 30}));
    }
}

TEST(Tokenizer, SpecialTokensAreMatchedWhole) {
    auto tok = tmc::Tokenizer::load(tmtest::shared_dir() + "/tokenizers/qwen3");
    auto ids = tok->encode("<|im_start|>user\nhi<|im_end|>", false);
    ASSERT_GE(ids.size(), 3u);
    EXPECT_EQ(ids.front(), 151644);
    EXPECT_EQ(ids.back(), 151645);
    EXPECT_EQ(tok->decode(ids, true), "user\nhi");
    EXPECT_EQ(tok->eos_token(), "<|im_end|>");
    EXPECT_EQ(tok->eos_id(), 151645);
}

TEST(Tokenizer, LoadErrorsNameTheFile) {
    tmtest::TempDir d;
    tmtest::write_file(d / "tokenizer.json", R"({"model": {"type": "Unigram", "vocab": []}})");
    try {
        tmc::Tokenizer::load(d.path());
        FAIL();
    } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("tokenizer.json: unsupported tokenizer model Unigram"), std::string::npos)
            << e.what();
    }
}

}  // namespace
