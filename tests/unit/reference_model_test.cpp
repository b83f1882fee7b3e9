// The reference forward pass against Hugging Face's logits (fp32) along the
// golden greedy paths: random Qwen2/Qwen3/Mistral models and tinytech.
#include "model/decoder.hpp"
#include "backend/cpu/reference_model.hpp"

#include <simdjson.h>

#include <algorithm>

#include "base/mapped_file.hpp"
#include "test_util.hpp"

namespace {

void check_golden(const std::string& model, const std::string& golden, size_t max_prompts, size_t max_steps,
                  double tol) {
    tmtest::TempDir d;
    tmc::ConvertOptions opt;
    tmc::convert_hf_model(tmtest::shared_dir() + "/models/" + model, d / "ws", opt);
    tmc::Workspace ws(d / "ws");
    tmc::ReferenceModel ref(ws, tmc::model_program(ws));
    simdjson::dom::parser parser;
    auto text = tmc::read_file(golden);
    size_t prompts = 0, checked = 0;
    for (auto doc : parser.parse_many(text)) {
        simdjson::dom::array pids;
        if (doc["prompt_ids"].get(pids)) continue;  // the perplexity line
        if (prompts++ == max_prompts) break;
        std::vector<int> ids;
        for (auto x : pids) ids.push_back(int(int64_t(x)));
        std::vector<int> out;
        for (auto x : doc["output_ids"].get_array()) out.push_back(int(int64_t(x)));
        auto cache = ref.new_cache();
        auto logits = ref.forward(ids, cache);
        size_t step = 0;
        for (auto top5 : doc["top5"].get_array()) {
            if (step == max_steps) break;
            for (auto pair : top5.get_array()) {
                int id = int(int64_t(pair.at(0)));
                double want = double(pair.at(1));
                EXPECT_NEAR(logits[size_t(id)], want, tol) << model << " prompt " << prompts << " step " << step;
                ++checked;
            }
            logits = ref.forward({out[step]}, cache);  // follow the reference's path
            ++step;
        }
    }
    EXPECT_GT(checked, 0u);
}

TEST(ReferenceModel, RandomModelsMatchTransformers) {
    for (const char* m : {"random-qwen2", "random-qwen3", "random-mistral"})
        check_golden(m, tmtest::shared_dir() + "/golden/random/" + m + ".jsonl", 2, 16, 2e-4);
}

TEST(ReferenceModel, TinytechMatchesTransformers) {
    check_golden("tinytech-25m", tmtest::shared_dir() + "/golden/tinytech/greedy-fp32.jsonl", 2, 6, 2e-4);
}

}  // namespace
