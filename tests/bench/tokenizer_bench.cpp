// Encode throughput of one tokenizer on one core: tokenizer-bench DIR FILE.
// Encodes the file's lines (as a server sees prompts) and the whole file as
// one string; prints one JSON line with MB/s for each (best of 3 runs, after
// a warm-up that also fills the word cache the way a long-running server would).
#include <chrono>
#include <cstdio>
#include <sstream>

#include "base/mapped_file.hpp"
#include "tm/tokenizer.hpp"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: tokenizer-bench TOKENIZER_DIR TEXT_FILE\n");
        return 2;
    }
    auto t0 = std::chrono::steady_clock::now();
    auto tok = tmc::Tokenizer::load(argv[1]);
    double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::string text = tmc::read_file(argv[2]);
    std::vector<std::string> lines;
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);) lines.push_back(l + "\n");
    auto time = [&](auto&& f) {
        double best = 1e9;
        for (int r = 0; r < 4; ++r) {
            auto a = std::chrono::steady_clock::now();
            f();
            double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
            if (r > 0 && s < best) best = s;  // run 0 is the warm-up
        }
        return best;
    };
    size_t ntok = 0;
    double whole = time([&] { ntok = tok->encode(text, false).size(); });
    double per_line = time([&] {
        for (auto& l : lines) tok->encode(l, false);
    });
    std::printf(
        "{\"tokenizer\": \"%s\", \"bytes\": %zu, \"tokens\": %zu, \"whole_mb_s\": %.1f, \"lines_mb_s\": %.1f, "
        "\"load_s\": %.3f}\n",
        argv[1], text.size(), ntok, text.size() / whole / 1e6, text.size() / per_line / 1e6, load_s);
    return 0;
}
