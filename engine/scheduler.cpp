#include "engine/scheduler.h"

#include <algorithm>
#include <optional>

#include "engine/error.h"

namespace llmq {

Scheduler::Scheduler(Engine& engine, const SchedulerOptions& options) : engine_(engine), options_(options) {
  if (options.max_batched_tokens < 1 || options.max_batched_tokens > engine.max_batch_tokens())
    fail(LLMQ_ERR_INVALID_ARGUMENT, "scheduler: max_batched_tokens must be in [1, {}], got {}", engine.max_batch_tokens(),
         options.max_batched_tokens);
  if (options.max_running < 1)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "scheduler: max_running must be >= 1, got {}", options.max_running);
}

int64_t Scheduler::submit(Request request) {
  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  try {
    const ModelConfig& c = engine_.model().config();
    if (request.prompt.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "request: the prompt is empty");
    engine_.check_token_ids(request.prompt.data(), request.prompt.size(), "prompt_ids");
    engine_.check_token_ids(request.stop_ids.data(), request.stop_ids.size(), "stop_ids");
    if (request.max_new_tokens < 1)
      fail(LLMQ_ERR_INVALID_ARGUMENT, "request: max_new_tokens must be >= 1, got {}", request.max_new_tokens);
    const int64_t total = int64_t(request.prompt.size()) + request.max_new_tokens;
    if (int64_t(request.prompt.size()) >= c.max_position)
      fail(LLMQ_ERR_CONTEXT_OVERFLOW, "request: the prompt has {} tokens; the model's context is {}",
           request.prompt.size(), c.max_position);
    // A request that cannot fit even alone would wait forever: refuse it now.
    const int64_t capacity = int64_t(engine_.allocator().num_blocks()) * engine_.block_size();
    if (std::min<int64_t>(total, c.max_position) > capacity)
      fail(LLMQ_ERR_KV_CACHE_FULL, "request: {} prompt + {} new tokens can never fit in the KV cache ({} tokens)",
           request.prompt.size(), request.max_new_tokens, capacity);
    seq->sampler = std::make_unique<Sampler>(request.sampling);  // validates the sampling params
  } catch (const Error& e) {
    rejected_.push_back(FinishedRequest{seq->id, {}, FinishReason::Stop, e.status(), e.what()});
    return seq->id;
  }
  seq->stop.insert(request.stop_ids.begin(), request.stop_ids.end());
  if (!request.ignore_eos) seq->stop.insert(engine_.model().config().eos_ids.begin(), engine_.model().config().eos_ids.end());
  seq->tokens = request.prompt;
  seq->request = std::move(request);
  waiting_.push_back(std::move(seq));
  return next_id_ - 1;
}

namespace {

// Removes the sequence matching `pred` from `queue` and returns it (null when none matches).
template <typename Queue, typename Pred>
auto take(Queue& queue, Pred pred) -> typename Queue::value_type {
  auto it = std::find_if(queue.begin(), queue.end(), pred);
  if (it == queue.end()) return nullptr;
  auto seq = std::move(*it);
  queue.erase(it);
  return seq;
}

}  // namespace

bool Scheduler::cancel(int64_t id) {
  auto match = [id](const std::unique_ptr<Sequence>& s) { return s->id == id; };
  std::unique_ptr<Sequence> seq = take(waiting_, match);
  if (!seq) seq = take(running_, match);
  if (!seq) return false;
  finish(std::move(seq), FinishReason::Cancelled, &rejected_);
  return true;
}

void Scheduler::finish(std::unique_ptr<Sequence> seq, FinishReason reason, std::vector<FinishedRequest>* finished) {
  seq->kv.reset();  // the blocks go back to the allocator
  finished->push_back(FinishedRequest{seq->id, std::move(seq->generated), reason, LLMQ_OK, ""});
}

void Scheduler::preempt_latest() {
  // The latest arrival gives up its blocks and goes back to the head of the queue (it arrived
  // before everything still waiting); its tokens are recomputed when it runs again.
  std::unique_ptr<Sequence> seq = std::move(running_.back());
  running_.pop_back();
  seq->kv.reset();
  seq->computed = 0;
  auto pos = std::find_if(waiting_.begin(), waiting_.end(), [&](const auto& w) { return w->id > seq->id; });
  waiting_.insert(pos, std::move(seq));
  ++preemptions_;
}

bool Scheduler::step(std::vector<FinishedRequest>* finished) {
  for (FinishedRequest& r : rejected_) finished->push_back(std::move(r));
  rejected_.clear();
  // Admit in arrival order while there are free blocks for the next request's tokens (the first
  // one always: alone it fits, as submit() checked).
  while (!waiting_.empty() && int32_t(running_.size()) < options_.max_running) {
    const int64_t needed = (int64_t(waiting_.front()->tokens.size()) + engine_.block_size() - 1) / engine_.block_size();
    if (!running_.empty() && needed > engine_.allocator().num_free()) break;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    running_.back()->kv = engine_.new_sequence();
  }
  if (running_.empty()) return !waiting_.empty();

  std::vector<float> logits;
  std::vector<SequenceStep> batch;
  std::vector<Sequence*> in_batch;  // batch[i] is in_batch[i]'s part
  std::vector<Sequence*> sampled;   // the sequences whose last token's logits come back, in order
  for (;;) {
    // Decode tokens first (one each), then prefill chunks, in arrival order, under the budget.
    batch.clear();
    in_batch.clear();
    sampled.clear();
    int32_t budget = options_.max_batched_tokens;
    for (int pass = 0; pass < 2; ++pass)
      for (auto& seq : running_) {
        const int32_t pending = int32_t(seq->tokens.size()) - seq->computed;
        const bool decode = pending == 1;
        if (decode != (pass == 0) || budget == 0) continue;
        const int32_t n = std::min(pending, budget);
        const bool last = n == pending;
        batch.push_back(SequenceStep{seq->kv.get(), seq->tokens.data() + seq->computed, n, false, last});
        in_batch.push_back(seq.get());
        if (last) sampled.push_back(seq.get());
        budget -= n;
      }
    try {
      engine_.step(batch, &logits);
    } catch (const Error& e) {
      if (e.status() != LLMQ_ERR_KV_CACHE_FULL || running_.size() < 2) throw;
      preempt_latest();  // nothing was changed by the failed step; try again with fewer sequences
      continue;
    }
    for (size_t i = 0; i < batch.size(); ++i) in_batch[i]->computed += batch[i].n_tokens;
    break;
  }

  const int32_t vocab = engine_.vocab_size();
  const int64_t max_position = engine_.model().config().max_position;
  for (size_t i = 0; i < sampled.size(); ++i) {
    Sequence* seq = sampled[i];
    const int32_t token = seq->sampler->sample(logits.data() + i * size_t(vocab), vocab, seq->tokens);
    std::optional<FinishReason> reason;
    if (seq->stop.count(token)) {
      reason = FinishReason::Stop;
    } else {
      seq->generated.push_back(token);
      seq->tokens.push_back(token);
      if (int32_t(seq->generated.size()) >= seq->request.max_new_tokens) reason = FinishReason::Length;
      else if (int64_t(seq->tokens.size()) - 1 >= max_position) reason = FinishReason::Context;
    }
    if (reason) {
      finish(take(running_, [&](const auto& s) { return s.get() == seq; }), *reason, finished);
    }
  }
  return !running_.empty() || !waiting_.empty() || !rejected_.empty();
}

}  // namespace llmq
