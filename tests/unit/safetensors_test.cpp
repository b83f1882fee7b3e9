#include "io/safetensors.hpp"

#include "test_util.hpp"
#include "tm/error.hpp"

using tmtest::safetensors_bytes;
using tmtest::TempDir;

namespace {

// Parses bytes as a safetensors file; returns the error text ("" if it parsed).
std::string parse_error(const std::string& bytes) {
    TempDir d;
    tmtest::write_file(d / "m.safetensors", bytes);
    try {
        tmc::SafetensorsFile f(d / "m.safetensors");
        return "";
    } catch (const tmc::Error& e) {
        return e.what();
    }
}

}  // namespace

TEST(Safetensors, ParsesTensors) {
    TempDir d;
    std::string data(8 + 6, '\x01');
    tmtest::write_file(d / "m.safetensors",
                       safetensors_bytes(R"({"__metadata__":{"format":"pt"},)"
                                         R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                         R"("b":{"dtype":"BF16","shape":[1,3],"data_offsets":[8,14]}})",
                                         data));
    tmc::SafetensorsFile f(d / "m.safetensors");
    ASSERT_EQ(f.tensors().size(), 2u);
    EXPECT_EQ(f.tensors()[0].name, "a");
    EXPECT_EQ(f.tensors()[1].dtype, tmc::DType::BF16);
    EXPECT_EQ(f.tensors()[1].shape, (std::vector<int64_t>{1, 3}));
    EXPECT_EQ(f.tensors()[1].bytes, 6u);
}

TEST(Safetensors, RejectsTruncatedFile) {
    EXPECT_NE(parse_error("").find("too small"), std::string::npos);
    EXPECT_NE(parse_error("abc").find("too small"), std::string::npos);
}

TEST(Safetensors, RejectsHeaderPastEnd) {
    std::string b = safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "xxxx");
    b.resize(20);
    EXPECT_NE(parse_error(b).find("exceeds file size"), std::string::npos) << parse_error(b);
}

TEST(Safetensors, RejectsHugeHeaderLength) {
    std::string b(8, '\xff');
    b += "{}";
    EXPECT_NE(parse_error(b).find("exceeds file size"), std::string::npos);
}

TEST(Safetensors, RejectsBadJson) {
    EXPECT_NE(parse_error(safetensors_bytes("{\"a\": ", "")).find("not valid JSON"), std::string::npos);
    EXPECT_NE(parse_error(safetensors_bytes("[1,2]", "")).find("not a JSON object"), std::string::npos);
}

TEST(Safetensors, RejectsLyingOffsets) {
    auto e = parse_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "1234"));
    EXPECT_NE(e.find("outside the data"), std::string::npos) << e;
    e = parse_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", "12345678"));
    EXPECT_NE(e.find("end before begin"), std::string::npos) << e;
}

TEST(Safetensors, RejectsOverlap) {
    auto e = parse_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                           R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                           "12345678"));
    EXPECT_NE(e.find("overlap"), std::string::npos) << e;
}

TEST(Safetensors, RejectsShapeByteMismatch) {
    auto e = parse_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678"));
    EXPECT_NE(e.find("shape needs 12 bytes"), std::string::npos) << e;
}

TEST(Safetensors, RejectsHugeShape) {
    auto e = parse_error(safetensors_bytes(
        R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", "12345678"));
    EXPECT_NE(e.find("overflows"), std::string::npos) << e;
}

TEST(Safetensors, RejectsUnknownDtypeAndMissingFields) {
    auto e = parse_error(safetensors_bytes(R"({"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", "1"));
    EXPECT_NE(e.find("unknown dtype Q4"), std::string::npos) << e;
    e = parse_error(safetensors_bytes(R"({"a":{"dtype":"U8","data_offsets":[0,1]}})", "1"));
    EXPECT_NE(e.find("missing shape"), std::string::npos) << e;
    e = parse_error(safetensors_bytes(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "1"));
    EXPECT_NE(e.find("two unsigned integers"), std::string::npos) << e;
    e = parse_error(safetensors_bytes(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", "1"));
    EXPECT_NE(e.find("negative"), std::string::npos) << e;
    e = parse_error(safetensors_bytes(R"({"a":7})", ""));
    EXPECT_NE(e.find("not an object"), std::string::npos) << e;
}

TEST(Safetensors, ReadsRealModel) {
    tmc::SafetensorsModel m(tmtest::shared_dir() + "/models/tinytech-25m");
    EXPECT_EQ(m.get("model.embed_tokens.weight").shape, (std::vector<int64_t>{32000, 384}));
    EXPECT_THROW(m.get("nope"), tmc::Error);
}

TEST(Safetensors, ReadsShardsThroughIndex) {
    TempDir d;
    tmtest::write_file(d / "model-00001-of-00002.safetensors",
                       safetensors_bytes(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "1"));
    tmtest::write_file(d / "model-00002-of-00002.safetensors",
                       safetensors_bytes(R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "23"));
    tmtest::write_file(d / "model.safetensors.index.json",
                       R"({"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors",)"
                       R"("b":"model-00002-of-00002.safetensors"}})");
    tmc::SafetensorsModel m(d.path());
    EXPECT_EQ(m.num_tensors(), 2u);
    EXPECT_EQ(m.get("b").data[1], '3');
}
