// A two-turn chat through tm's public API (tm-api(3)): open a workspace or
// a Hugging Face directory, apply the chat template, stream the answers of
// one session; the second turn reuses the first turn's KV cache.
//   example-chat WS ["first question" ["second question"]]
#include <iostream>

#include "tm/engine.hpp"

int main(int argc, char** argv) {
    if (argc < 2) {
        std::cerr << "usage: example-chat WS [QUESTION [QUESTION]]\n";
        return 2;
    }
    try {
        auto engine = tmc::Engine::open(argv[1]);
        std::vector<tmc::ChatMessage> chat;
        const char* turns[2] = {argc > 2 ? argv[2] : "What is a pipe in Unix?",
                                argc > 3 ? argv[3] : "Show an example."};
        for (const char* question : turns) {
            chat.push_back({"user", question});
            tmc::Request req;
            req.prompt = engine->encode_chat(chat);
            req.session_id = 1;  // keep the KV cache between turns
            req.sampling.temperature = 0;
            req.sampling.max_tokens = 48;
            std::cout << ">>> " << question << "\n";
            std::string answer;
            tmc::Output out;
            for (auto stream = engine->generate(std::move(req)); stream.next(out);) {
                std::cout << out.text << std::flush;
                answer += out.text;
            }
            std::cout << "\n[" << out.usage.prompt_tokens << " prompt tokens, " << out.usage.cached_tokens
                      << " from the session cache, " << out.usage.completion_tokens << " generated]\n";
            chat.push_back({"assistant", answer});
        }
        engine->end_session(1);
    } catch (const std::exception& e) {
        std::cerr << "example-chat: error: " << e.what() << "\n";
        return 1;
    }
}
