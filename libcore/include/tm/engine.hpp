// The engine: continuous batching over a paged KV cache, sessions, sampling.
//
//   auto engine = tmc::Engine::open("ws");            // a workspace or a Hugging Face directory
//   tmc::Request req;
//   req.prompt = engine->encode_chat({{"user", "Hello"}});
//   req.sampling.max_tokens = 64;
//   auto stream = engine->generate(std::move(req));
//   for (tmc::Output out; stream.next(out);) std::cout << out.text << std::flush;
//
// submit() takes a callback instead; it runs on the engine's thread and must
// not block. Every request ends with exactly one Output whose `finished` is
// true. See tm-api(3).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "tm/chat_template.hpp"
#include "tm/model_config.hpp"
#include "tm/tokenizer.hpp"

namespace tmc {

struct EngineOptions {
    std::string device = "auto";   // "cpu", "cuda" or "auto" (cuda when a GPU is present)
    int threads = 0;               // CPU backend threads; 0: all cores
    int session_len = 0;           // longest sequence; 0: config.ini's session_len or the model's maximum
    int block_size = 0;            // tokens per KV block; 0: config.ini's cache_block_seq_len
    int64_t cache_tokens = 0;      // KV pool size in tokens; 0: from cache_bytes
    int64_t cache_bytes = 0;       // KV pool size in bytes; 0: the backend's default
    int max_batch_tokens = 0;      // tokens per step (decode + prefill chunks); 0: 512 on the CPU, 4096 on a GPU
    int max_batch_size = 0;        // sequences per step; 0: 256 on the CPU, 1024 on a GPU
    int quant_policy = -1;         // KV cache: 0 (16/32-bit), 8 (int8), 4 (int4); -1: config.ini's
    int tp = 0;                    // tensor-parallel ranks; 0: the workspace's (must match it)
    std::string chat_template;     // built-in name or template text; empty: the tokenizer's
    std::function<void(const std::string&)> log;  // notices (e.g. the backend chosen); default: none
};

struct SamplingParams {
    int max_tokens = 256;          // 0: prefill only (with prompt_logprobs, or to warm a session)
    float temperature = 1.0f;      // 0: greedy
    float top_p = 1.0f;
    int top_k = 0;                 // 0: off
    float min_p = 0.0f;
    float repetition_penalty = 1.0f;  // > 1 discourages tokens already in the prompt or output
    float presence_penalty = 0.0f;    // OpenAI's, on output tokens
    float frequency_penalty = 0.0f;
    std::optional<uint64_t> seed;  // same seed + same input => same output
    std::vector<int> stop_token_ids;
    std::vector<std::string> stop;  // stop strings; not included in the text
    bool ignore_eos = false;
    bool skip_special_tokens = true;
    bool prompt_logprobs = false;  // log p(prompt[i] | prompt[:i]) for i >= 1, in the final Output
    // >= 0: each generated token's log-probability under the model (before
    // penalties, temperature and truncation) and this many most likely
    // alternatives (at most 20); -1: none.
    int logprobs = -1;
};

struct TokenLogprob {
    int token = 0;
    float logprob = 0;
    std::vector<std::pair<int, float>> top;  // most likely first
};

enum class FinishReason { None, Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"

struct Usage {
    int prompt_tokens = 0;
    int completion_tokens = 0;
    int cached_tokens = 0;  // prompt tokens whose KV came from the session (not prefilled)
};

struct Output {
    uint64_t request_id = 0;
    std::vector<int> token_ids;  // tokens since the previous Output
    std::vector<TokenLogprob> logprobs;  // one per token_ids entry, when asked
    std::string text;            // text since the previous Output (stop strings held back)
    bool finished = false;
    FinishReason finish_reason = FinishReason::None;
    std::string error;           // when finish_reason == Error
    Usage usage;                 // on every Output, final on the last
    std::vector<float> prompt_logprobs;  // final Output, when asked: prompt.size() - 1 values
    double time_to_first_token = 0;      // seconds, final Output
};

struct Request {
    std::vector<int> prompt;
    SamplingParams sampling;
    // With a session, the engine keeps the sequence's KV cache after the
    // request ends. The next request of the session reuses the cache for the
    // longest common prefix of its prompt and the session's tokens (so send
    // the whole conversation), or, with `append`, continues the session: the
    // prompt is appended to the session's tokens (LMDeploy's interactive mode).
    std::optional<uint64_t> session_id;
    bool append = false;
    // With a session: the conversation this request answers (its last
    // message is this turn). When the request ends without an error, the
    // session keeps it with the answer appended as an assistant message
    // (session_conversation), so that a client may send only its next turn.
    std::vector<ChatMessage> conversation;
};

struct EngineStats {
    int blocks_total = 0;
    int blocks_free = 0;
    int block_size = 0;
    int running = 0;
    int waiting = 0;
    int sessions = 0;
    uint64_t prompt_tokens_computed = 0;  // prefill rows run, all time
    uint64_t generated_tokens = 0;
    uint64_t steps = 0;
    uint64_t preemptions = 0;
    uint64_t session_evictions = 0;
};

class Engine {
public:
    static std::unique_ptr<Engine> open(const std::string& path, const EngineOptions& opt = {});
    ~Engine();

    const Tokenizer& tokenizer() const;
    const ModelConfig& model() const;
    std::string backend_name() const;
    int session_len() const;

    // Applies the chat template (with the generation prompt) and encodes.
    std::vector<int> encode_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true) const;
    std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true) const;
    // JSON array of message objects (other fields reach the template).
    std::string render_chat_json(const std::string& messages_json, bool add_generation_prompt = true) const;

    using Callback = std::function<void(const Output&)>;
    // Queues the request; returns its id at once. Invalid requests (bad
    // token ids, bad settings) throw tmc::Error; problems found later (a
    // prompt that can never fit) arrive as an Output with finish_reason Error.
    uint64_t submit(Request req, Callback cb);

    class Stream {
    public:
        // Blocks until the next Output; false once the final one was returned.
        bool next(Output& out);
        // Like next() with a timeout; nullopt on timeout.
        std::optional<bool> next_for(Output& out, std::chrono::milliseconds timeout);
        uint64_t id() const { return id_; }

    private:
        friend class Engine;
        struct Queue {
            std::mutex mu;
            std::condition_variable cv;
            std::deque<Output> items;
        };
        std::shared_ptr<Queue> q_;
        uint64_t id_ = 0;
        bool done_ = false;
    };
    Stream generate(Request req);

    // Stops a request; its final Output has finish_reason Cancelled and its
    // KV blocks are freed (or kept by its session) before the next step.
    void cancel(uint64_t request_id);
    // Frees a session's cache (after its running request, if any, ends).
    void end_session(uint64_t session_id);
    // The tokens a session holds (empty if none).
    std::vector<int> session_tokens(uint64_t session_id) const;
    // The conversation a session keeps (Request::conversation and its
    // answers; empty if none, and at once after end_session).
    std::vector<ChatMessage> session_conversation(uint64_t session_id) const;
    // The session's request submitted last, while it has not finished.
    std::optional<uint64_t> session_request(uint64_t session_id) const;

    EngineStats stats() const;
    // Blocks until nothing is running or waiting.
    void wait_idle();

    struct Impl;

private:
    explicit Engine(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

}  // namespace tmc
