// The engine's state and the engine thread's steps, shared by its files:
//   engine.cpp     the public API, the inbox and the loop
//   startup.cpp    Engine::open: workspace, backend, KV cache sizing
//   scheduler.cpp  admission, split-fuse chunks, preemption: the batch plan
//   session.cpp    sessions: the one owner of a conversation's sequence
//   step.cpp       one step: sampling decisions, the backend, the sampled tokens
//   output.cpp     token append, stop checks, streaming text, emit, finish
// One thread (the loop) owns everything below the inbox: no locks on it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "backend/backend.hpp"
#include "base/thread_pool.hpp"
#include "engine/block_manager.hpp"
#include "engine/sampler.hpp"
#include "tm/engine.hpp"
#include "tm/workspace.hpp"

namespace tmc {

namespace eng {

using Clock = std::chrono::steady_clock;

struct Seq {
    std::vector<int> tokens;
    int computed = 0;  // tokens whose K/V are in the cache
    std::vector<int> blocks;
};

struct Session;

struct Req {
    uint64_t id = 0;
    Request req;
    Engine::Callback cb;
    Seq seq;
    Session* session = nullptr;
    bool prepared = false;
    int prompt_len = 0;
    int cached = 0;
    Rng rng;
    std::unique_ptr<StreamDecoder> dec;
    std::string held;             // decoded text not yet emitted (may start a stop string)
    std::vector<int> new_ids;     // since the last output
    std::vector<int> pending;     // tokens not yet decoded to text (sent during the next step)
    std::string new_text;
    std::vector<float> prompt_lp;
    std::vector<TokenLogprob> new_lp;  // with new_ids, when sampling.logprobs >= 0
    std::string answer;                // text emitted so far (with req.conversation)
    Clock::time_point t_submit, t_first;
    bool got_first = false;
    FinishReason done = FinishReason::None;  // set when a stop condition hit; finish() follows
    int final_completion = -1;               // completion tokens, fixed when the sequence is handed back
    int out_count() const { return int(seq.tokens.size()) - prompt_len; }
};

struct Session {
    uint64_t id = 0;
    Seq seq;
    uint64_t last_used = 0;
    Req* busy = nullptr;
    bool ending = false;
    std::vector<ChatMessage> conversation;  // Request::conversation with its answers
};

struct Command {
    enum Kind { Submit, Cancel, EndSession, Stop } kind;
    std::unique_ptr<Req> req;
    uint64_t id = 0;
};

}  // namespace eng

struct Engine::Impl {
    using Seq = eng::Seq;
    using Req = eng::Req;
    using Session = eng::Session;
    using Command = eng::Command;
    using Clock = eng::Clock;

    // TM_STEP_LOG=FILE: one JSON line per step (rows, sequences, times).
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> step_log{nullptr, std::fclose};
    // Set once at open.
    std::unique_ptr<Workspace> ws;
    std::unique_ptr<Tokenizer> tok;
    std::optional<ChatTemplate> tpl;
    std::unique_ptr<Backend> backend;
    ModelConfig cfg;
    int max_ctx = 0;
    int max_batch_tokens = 512;
    int max_batch_size = 256;
    std::vector<int> eos_ids;
    // With an asynchronous backend, a step's tokens are decoded and sent
    // while the device runs the next step (requests without stop strings;
    // TM_ASYNC_OUTPUT=0: at once).
    bool defer_text = false;

    // Inbox, shared with callers.
    mutable std::mutex mu;
    std::condition_variable cv, idle_cv;
    std::vector<Command> inbox;
    std::atomic<uint64_t> next_id{1};
    EngineStats snapshot;
    // Sessions as callers see them (session.cpp keeps them current).
    std::unordered_map<uint64_t, std::vector<int>> session_tokens_snapshot;
    std::unordered_map<uint64_t, std::vector<ChatMessage>> session_conversation_snapshot;
    std::unordered_map<uint64_t, uint64_t> session_request;  // set by submit(), cleared by finish()
    bool busy = false;

    // Engine thread state.
    std::unique_ptr<BlockManager> bm;
    // Sampling (temperature, top-k/p, penalties) runs on the host: one
    // sampler per pool thread, the rows of a step split between them.
    std::vector<std::unique_ptr<Sampler>> samplers;
    std::unique_ptr<ThreadPool> sample_pool;
    std::vector<int> picks;
    std::vector<TokenLogprob> pick_lp;
    std::vector<int> sample_jobs;
    std::vector<std::vector<float>> lp_rows;
    std::list<std::unique_ptr<Req>> waiting;
    std::vector<std::unique_ptr<Req>> running;  // oldest first
    std::unordered_map<uint64_t, Session> sessions;
    uint64_t tick = 0;
    EngineStats st;
    BatchPlan plan;
    struct Slot {
        Req* r;
        int rows;
        int logit_begin;   // index of the first logit row of this sequence
        int n_logits;
        bool sample;
    };
    std::vector<Slot> slots;
    std::vector<int> lp_index, lp_target;
    std::vector<float> lp_out;
    std::vector<float*> lp_dest;
    std::thread thread;

    // engine.cpp: the loop.
    void loop();
    bool drain();
    void publish();
    // scheduler.cpp: what runs this step (plan, slots).
    void schedule();
    void schedule_step();  // schedule(), unsticking waiting requests that hold blocks
    void preempt(std::unique_ptr<Req> r);
    // session.cpp
    void prepare(Req& r);
    bool evict_one_session();
    void release_session(Session& s);
    void end_session(uint64_t id);
    void return_to_session(Req& r, FinishReason why);
    // step.cpp
    void step();
    void choose_greedy_only();
    void choose_device_sampling();
    void take_prompt_logprobs();
    void sample_rows(float* logits);
    void apply_step(const int* greedy);
    void log_step(Clock::time_point t_step, Clock::time_point t_fwd, Clock::time_point t_post);
    // output.cpp
    void on_token(Req& r, int token);
    void decode_pending(Req& r);
    void send_pending();
    void emit(Req& r, bool final, FinishReason why, const std::string& error);
    void finish(Req* r, FinishReason why, const std::string& error = {});
};

}  // namespace tmc
