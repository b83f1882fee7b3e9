#include "backend/gemm_tune_cache.hpp"

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "test_util.hpp"

using tmtest::TempDir;

namespace {

tmc::GemmTuneEntry entry(int n, std::vector<std::pair<int, int>> picks, float beta = 0) {
    tmc::GemmTuneEntry e;
    e.device = "NVIDIA H100 80GB HBM3";
    e.cublaslt = 130100;
    e.ab = "bf16";
    e.y = "f32";
    e.n = n, e.k = 4096, e.ldy = n;
    e.beta = beta;
    e.picks = std::move(picks);
    return e;
}

std::string slurp(const std::string& path) {
    std::ifstream f(path);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}

}  // namespace

TEST(GemmTuneCache, RoundTripsAndReplacesAShapesEntry) {
    TempDir d;
    const std::string path = d / "sub/dir/gemm-tune.jsonl";  // directories are created
    EXPECT_TRUE(tmc::read_gemm_tune_cache(path).empty());
    ASSERT_TRUE(tmc::write_gemm_tune_cache(path, {entry(6144, {{4, -1}, {8, 3}}), entry(4096, {{4, 0}}, 1.0f)}));
    auto got = tmc::read_gemm_tune_cache(path);
    ASSERT_EQ(got.size(), 2u);
    EXPECT_EQ(got[0].device, "NVIDIA H100 80GB HBM3");
    EXPECT_EQ(got[0].cublaslt, 130100);
    EXPECT_EQ(got[0].n, 6144);
    EXPECT_EQ(got[0].picks, (std::vector<std::pair<int, int>>{{4, -1}, {8, 3}}));
    EXPECT_EQ(got[1].beta, 1.0f);
    // The same shape again: replaced, the other kept; a new shape appended.
    ASSERT_TRUE(tmc::write_gemm_tune_cache(path, {entry(6144, {{4, 2}}), entry(28672, {{16, 1}})}));
    got = tmc::read_gemm_tune_cache(path);
    ASSERT_EQ(got.size(), 3u);
    EXPECT_EQ(got[0].picks, (std::vector<std::pair<int, int>>{{4, 2}}));
    EXPECT_EQ(got[1].n, 4096);
    EXPECT_EQ(got[2].n, 28672);
    // Another device or cuBLASLt version is another shape.
    auto other = entry(6144, {{4, 5}});
    other.cublaslt = 130200;
    ASSERT_TRUE(tmc::write_gemm_tune_cache(path, {other}));
    EXPECT_EQ(tmc::read_gemm_tune_cache(path).size(), 4u);
    // One line per entry, in the format's field order.
    const std::string text = slurp(path);
    EXPECT_EQ(text.rfind("{\"format\": \"tm-gemm-tune\", \"version\": 1, \"device\": \"NVIDIA H100 80GB HBM3\", "
                         "\"cublaslt\": 130100, \"ab\": \"bf16\", \"y\": \"f32\", \"n\": 6144, \"k\": 4096, "
                         "\"ldy\": 6144, \"beta\": 0, \"picks\": [[4, 2]]}\n",
                         0),
              0u);
}

TEST(GemmTuneCache, SkipsLinesThatDoNotFollowTheFormat) {
    TempDir d;
    const std::string path = d / "gemm-tune.jsonl";
    const std::string good =
        "{\"format\": \"tm-gemm-tune\", \"version\": 1, \"device\": \"X\", \"cublaslt\": 1, \"ab\": \"bf16\", "
        "\"y\": \"f32\", \"n\": 8, \"k\": 8, \"ldy\": 8, \"beta\": 0, \"picks\": [[4, 1], [8, -1]]}";
    std::string bad_version = good, unsorted = good, bad_index = good, no_picks = good;
    bad_version.replace(bad_version.find("\"version\": 1"), 12, "\"version\": 2");
    unsorted.replace(unsorted.find("[[4, 1], [8, -1]]"), 17, "[[8, 1], [4, -1]]");
    bad_index.replace(bad_index.find("[8, -1]"), 7, "[8, -2]");
    no_picks.replace(no_picks.find("[[4, 1], [8, -1]]"), 17, "[]");
    tmtest::write_file(path, "not json\n" + bad_version + "\n" + unsorted + "\n" + bad_index + "\n" + no_picks +
                                 "\n{\"format\": \"other\"}\n\n" + good + "\n" + good.substr(0, 40));
    const auto got = tmc::read_gemm_tune_cache(path);
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].picks, (std::vector<std::pair<int, int>>{{4, 1}, {8, -1}}));
    // Rewriting keeps the good entry and drops the rest.
    ASSERT_TRUE(tmc::write_gemm_tune_cache(path, {entry(6144, {{4, 0}})}));
    EXPECT_EQ(tmc::read_gemm_tune_cache(path).size(), 2u);
}

TEST(GemmTuneCache, PathFromTheEnvironmentAndUnwritablePlaces) {
    const char* saved_dir = std::getenv("TM_CACHE_DIR");
    const std::string keep = saved_dir ? saved_dir : "";
    ::setenv("TM_CACHE_DIR", "/some/dir", 1);
    EXPECT_EQ(tmc::gemm_tune_cache_path(), "/some/dir/gemm-tune.jsonl");
    ::unsetenv("TM_CACHE_DIR");
    const std::string xdg = std::getenv("XDG_CACHE_HOME") ? std::getenv("XDG_CACHE_HOME") : "";
    ::setenv("XDG_CACHE_HOME", "/x", 1);
    EXPECT_EQ(tmc::gemm_tune_cache_path(), "/x/tm/gemm-tune.jsonl");
    if (xdg.empty()) ::unsetenv("XDG_CACHE_HOME");
    else ::setenv("XDG_CACHE_HOME", xdg.c_str(), 1);
    if (!keep.empty()) ::setenv("TM_CACHE_DIR", keep.c_str(), 1);
    EXPECT_FALSE(tmc::write_gemm_tune_cache("", {entry(8, {{4, 0}})}));
    TempDir d;
    const std::string ro = d / "ro";
    ASSERT_EQ(::mkdir(ro.c_str(), 0555), 0);
    if (::geteuid() != 0) {  // (root writes anywhere)
        EXPECT_FALSE(tmc::write_gemm_tune_cache(ro + "/gemm-tune.jsonl", {entry(8, {{4, 0}})}));
    }
    // A file where the directory should be.
    tmtest::write_file(d / "file", "x");
    EXPECT_FALSE(tmc::write_gemm_tune_cache(d / "file/gemm-tune.jsonl", {entry(8, {{4, 0}})}));
}
