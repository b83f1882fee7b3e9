#include "tm/workspace.hpp"

#include <fstream>

#include "test_util.hpp"
#include "tm/error.hpp"

using tmtest::TempDir;

namespace {

std::string convert(const TempDir& d, const std::string& model, int tp = 1) {
    tmc::ConvertOptions opt;
    opt.tp = tp;
    std::string out = d / ("ws-" + model);
    tmc::convert_hf_model(tmtest::shared_dir() + "/models/" + model, out, opt);
    return out;
}

}  // namespace

TEST(Manifest, RoundTrips) {
    tmc::Manifest m;
    m.tp = 2;
    tmc::ManifestEntry e;
    e.path = "weights/rank0/x.bin";
    e.is_tensor = true;
    e.dtype = tmc::DType::BF16;
    e.shape = {2, 3};
    e.bytes = 12;
    e.xxh64 = 0xdeadbeef12345678ull;
    m.files.push_back(e);
    auto back = tmc::Manifest::parse(m.to_json(), "m.json");
    ASSERT_EQ(back.files.size(), 1u);
    EXPECT_EQ(back.tp, 2);
    EXPECT_EQ(back.files[0].xxh64, e.xxh64);
    EXPECT_EQ(back.files[0].shape, e.shape);
}

TEST(Manifest, RejectsWrongVersionAndLies) {
    EXPECT_THROW(tmc::Manifest::parse(R"({"format":"tm-workspace","format_version":2,"tp":1,"files":[]})", "m"),
                 tmc::Error);
    EXPECT_THROW(tmc::Manifest::parse(R"({"format_version":1,"tp":1,"files":[]})", "m"), tmc::Error);
    // 2x3 bf16 is 12 bytes, not 10.
    EXPECT_THROW(tmc::Manifest::parse(R"({"format":"tm-workspace","format_version":1,"tp":1,"files":[)"
                                      R"({"path":"a.bin","dtype":"bf16","shape":[2,3],"bytes":10,)"
                                      R"("xxh64":"0000000000000000"}]})",
                                      "m"),
                 tmc::Error);
    EXPECT_THROW(tmc::Manifest::parse(R"({"format":"tm-workspace","format_version":1,"tp":1,"files":[)"
                                      R"({"path":"../etc/passwd","bytes":1,"xxh64":"0000000000000000"}]})",
                                      "m"),
                 tmc::Error);
}

TEST(Workspace, ConvertsAndVerifies) {
    TempDir d;
    auto ws_dir = convert(d, "tinytech-25m");
    tmc::Workspace ws(ws_dir);
    EXPECT_EQ(ws.model().num_layers, 8);
    EXPECT_EQ(ws.model().num_kv_heads, 2);
    EXPECT_TRUE(ws.model().tie_word_embeddings);
    EXPECT_TRUE(ws.verify().empty());
    auto qkv = ws.tensor(0, "layers.0.attention.wqkv.weight");
    EXPECT_EQ(qkv.shape, (std::vector<int64_t>{384 + 2 * 128, 384}));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(qkv.data) % 4096, 0u);  // page-aligned mapping

    // Flip one byte of a weight: verify names the file.
    std::string victim = ws_dir + "/weights/rank0/layers.3.feed_forward.w2.weight.bin";
    {
        std::fstream f(victim, std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(100);
        char c;
        f.seekg(100);
        f.get(c);
        f.seekp(100);
        f.put(char(c ^ 0x40));
    }
    tmc::Workspace ws2(ws_dir);
    auto problems = ws2.verify();
    ASSERT_EQ(problems.size(), 1u);
    EXPECT_NE(problems[0].find("layers.3.feed_forward.w2.weight.bin: checksum mismatch"), std::string::npos);
}

TEST(Workspace, SplitsForTensorParallel) {
    TempDir d;
    auto ws_dir = convert(d, "random-qwen2", 2);
    tmc::Workspace ws(ws_dir);
    EXPECT_EQ(ws.tp(), 2);
    // 4 heads, 2 KV heads, head_dim 16: each rank has 2 q heads + 1 k + 1 v.
    EXPECT_EQ(ws.tensor(1, "layers.0.attention.wqkv.weight").shape, (std::vector<int64_t>{64, 64}));
    EXPECT_EQ(ws.tensor(1, "layers.0.attention.wqkv.bias").shape, (std::vector<int64_t>{64}));
    EXPECT_EQ(ws.tensor(0, "layers.0.feed_forward.w2.weight").shape, (std::vector<int64_t>{64, 96}));
}

TEST(Workspace, RefusesExistingTargetAndLeavesNothingOnFailure) {
    TempDir d;
    auto ws_dir = convert(d, "random-mistral");
    tmc::ConvertOptions opt;
    EXPECT_THROW(tmc::convert_hf_model(tmtest::shared_dir() + "/models/random-mistral", ws_dir, opt), tmc::Error);
    opt.tp = 3;  // 4 heads do not split 3 ways
    EXPECT_THROW(tmc::convert_hf_model(tmtest::shared_dir() + "/models/random-mistral", d / "x", opt), tmc::Error);
    int entries = 0;
    for (auto& e : std::filesystem::directory_iterator(d.path())) entries += e.path().filename() != "ws-random-mistral";
    EXPECT_EQ(entries, 0);
}

TEST(ConfigIni, RejectsTyposAndBadValues) {
    tmc::ModelConfig m;
    tmc::EngineConfig e;
    std::string base =
        "[model]\narchitecture = LlamaForCausalLM\nhidden_size = 8\nnum_layers = 1\nnum_heads = 2\n"
        "num_kv_heads = 1\nhead_dim = 4\nintermediate_size = 16\nvocab_size = 10\n[engine]\n";
    EXPECT_NO_THROW(tmc::parse_config_ini(base + "quant_policy = 8\n", "c.ini", &m, &e));
    EXPECT_EQ(e.quant_policy, 8);
    EXPECT_THROW(tmc::parse_config_ini(base + "quant_polcy = 8\n", "c.ini", &m, &e), tmc::Error);
    EXPECT_THROW(tmc::parse_config_ini(base + "quant_policy = 3\n", "c.ini", &m, &e), tmc::Error);
    EXPECT_THROW(tmc::parse_config_ini(base + "session_len = -5\n", "c.ini", &m, &e), tmc::Error);
    EXPECT_THROW(tmc::parse_config_ini("[model]\nhidden_size = 8\n", "c.ini", &m, &e), tmc::Error);
}
