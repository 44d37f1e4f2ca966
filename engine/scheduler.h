// Continuous batching over Engine::step (the core of the serving runtime; the asynchronous C ABI
// comes on top of it). Each step mixes the running sequences' decode tokens with chunks of
// prefill under a token budget and a cap on running sequences; requests are admitted first come,
// first served; when the KV cache runs out, the latest-arrived running sequence is preempted (its
// blocks freed, the request re-queued and its tokens recomputed later). Its results are those of
// Engine::generate run alone: the engine's logits do not depend on the batch (bitwise on the CPU),
// and each request keeps its own sampler.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "engine/engine.h"

namespace llmq {

struct SchedulerOptions {
  int32_t max_batched_tokens = 512;  // tokens per step (at most the engine's max_batch_tokens)
  int32_t max_running = 64;          // sequences holding KV blocks at once
};

struct Request {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_new_tokens = 256;
  std::vector<int32_t> stop_ids;
  bool ignore_eos = false;
};

struct FinishedRequest {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // generated, without the stop token
  FinishReason reason = FinishReason::Length;
  llmq_status status = LLMQ_OK;  // not OK: the request was rejected (error says why)
  std::string error;
};

class Scheduler {
 public:
  Scheduler(Engine& engine, const SchedulerOptions& options);

  // Queues a request and returns its id. A request that is invalid, or can never fit in the KV
  // cache, finishes at the next step() with its status and message; the others are not affected.
  int64_t submit(Request request);
  // Cancels a waiting or running request (it finishes as Cancelled); false for an unknown id.
  bool cancel(int64_t id);
  // Runs one engine step and appends the requests that finished to *finished. Returns false when
  // there is nothing left to do.
  bool step(std::vector<FinishedRequest>* finished);

  size_t running() const { return running_.size(); }
  size_t waiting() const { return waiting_.size(); }
  int64_t preemptions() const { return preemptions_; }

 private:
  struct Sequence {
    int64_t id = 0;
    Request request;
    std::unique_ptr<Sampler> sampler;
    std::unordered_set<int32_t> stop;
    std::vector<int32_t> tokens;   // prompt + generated: what the KV cache must hold before sampling
    std::vector<int32_t> generated;
    std::unique_ptr<SequenceKv> kv;
    int32_t computed = 0;          // tokens whose K/V are in the cache
  };

  void finish(std::unique_ptr<Sequence> seq, FinishReason reason, std::vector<FinishedRequest>* finished);
  void preempt_latest();

  Engine& engine_;
  SchedulerOptions options_;
  int64_t next_id_ = 1;
  int64_t preemptions_ = 0;
  std::deque<std::unique_ptr<Sequence>> waiting_;   // in arrival order
  std::vector<std::unique_ptr<Sequence>> running_;  // in arrival order
  std::vector<FinishedRequest> rejected_;           // reported at the next step
};

}  // namespace llmq
