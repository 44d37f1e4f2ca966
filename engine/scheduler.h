// Continuous batching over Engine::step, the core of the serving runtime (engine/server.h puts
// threads, events and statistics around it). Each step mixes the running sequences' decode tokens
// with chunks of prefill under a token budget and a cap on running sequences. Requests are
// admitted by priority, then first come, first served; when the KV cache runs out, the running
// sequence of lowest priority that arrived last is preempted (its blocks freed, the request
// re-queued and its tokens recomputed later). With prefix caching, full KV blocks of shared
// prefixes are reused through the allocator's cache. Every request's results are those of
// Engine::generate run alone: the engine's logits do not depend on the batch or the chunking
// (bitwise on the CPU), and each request keeps its own sampler.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "engine/engine.h"

namespace llmq {

using Clock = std::chrono::steady_clock;

struct SchedulerOptions {
  int32_t max_batched_tokens = 512;  // tokens per step (at most the engine's max_batch_tokens)
  int32_t max_running = 64;          // sequences holding KV blocks at once
  bool prefix_caching = false;       // reuse full KV blocks of shared prefixes
};

struct Request {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_new_tokens = 256;
  std::vector<int32_t> stop_ids;
  bool ignore_eos = false;
  int32_t priority = 0;            // higher first; equal priorities in arrival order
  Clock::time_point arrival = Clock::now();  // timings count from here
};

// What a finished request reports.
struct FinishedRequest {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // generated, without the stop token
  FinishReason reason = FinishReason::Length;
  llmq_status status = LLMQ_OK;  // not OK with FinishReason::Error: why it failed
  std::string error;
  int32_t prompt_tokens = 0;
  int32_t cached_tokens = 0;     // prompt tokens whose KV came from the prefix cache (first admission)
  int32_t preemptions = 0;
  double queue_time_s = 0;       // arrival to first scheduled
  double time_to_first_token_s = 0;  // arrival to first token (0 if none)
  double decode_time_s = 0;      // first token to finish
};

// One step's output, in order: each new token of a request, then its end when it finished.
struct RequestEvent {
  int64_t id = 0;
  int32_t token = -1;  // a new token; -1 for the end (then `finished` is set)
  std::unique_ptr<FinishedRequest> finished;
};

// What one step computed, for throughput and bandwidth statistics.
struct StepInfo {
  int32_t decode_tokens = 0;
  int32_t prefill_tokens = 0;
  uint64_t kv_tokens_read = 0;  // the attended context of every sequence in the step
  double seconds = 0;           // of Engine::step
};

class Scheduler {
 public:
  Scheduler(Engine& engine, const SchedulerOptions& options);

  // Throws Error (LLMQ_ERR_INVALID_ARGUMENT, _CONTEXT_OVERFLOW or _KV_CACHE_FULL, naming the field)
  // for a request that is invalid or can never fit. Reads only what is fixed at construction, so
  // it may run on any thread.
  void validate(const Request& request) const;
  // Queues a valid request under a caller-chosen id (unique among live requests).
  void submit(int64_t id, Request request);
  // Cancels a waiting or running request: it ends as Cancelled at the next step. False for an id
  // that is unknown or finished already.
  bool cancel(int64_t id);
  // Runs one engine step and appends its events. Returns false when there is nothing left to do.
  // A full cache preempts (or, with one sequence running, ends that one with the error: another
  // user of the engine holds the blocks). Any other engine error is thrown; fail_all() then
  // ends every request with it.
  bool step(std::vector<RequestEvent>* events);
  void fail_all(llmq_status status, const std::string& message, std::vector<RequestEvent>* events);

  bool has_work() const { return !running_.empty() || !waiting_.empty() || !ended_.empty(); }
  size_t running() const { return running_.size(); }
  size_t waiting() const { return waiting_.size(); }
  int64_t preemptions() const { return preemptions_; }
  uint64_t cached_tokens() const { return cached_tokens_; }  // prompt tokens served from the prefix cache
  const StepInfo& last_step() const { return last_step_; }

 private:
  struct Sequence {
    int64_t id = 0;
    Request request;
    std::unique_ptr<Sampler> sampler;
    std::unordered_set<int32_t> stop;
    std::vector<int32_t> tokens;   // prompt + generated: what the KV cache must hold before sampling
    std::unique_ptr<SequenceKv> kv;
    std::vector<int64_t> entries;  // prefix-cache entries of the leading full blocks
    int32_t computed = 0;          // tokens whose K/V are in the cache
    FinishedRequest result;
    bool scheduled = false;
    Clock::time_point first_token;
  };

  bool admit(Sequence& seq);
  void register_full_blocks(Sequence& seq);
  void finish(std::unique_ptr<Sequence> seq, FinishReason reason, std::vector<RequestEvent>* events);
  void preempt_one();
  void enqueue(std::unique_ptr<Sequence> seq);

  Engine& engine_;
  SchedulerOptions options_;
  int64_t preemptions_ = 0;
  uint64_t cached_tokens_ = 0;
  StepInfo last_step_;
  std::deque<std::unique_ptr<Sequence>> waiting_;   // by priority, then arrival
  std::vector<std::unique_ptr<Sequence>> running_;  // in admission order
  std::vector<std::unique_ptr<Sequence>> ended_;    // cancelled, reported at the next step
};

}  // namespace llmq
