#include "engine/scheduler.h"

#include <algorithm>
#include <optional>

#include "engine/error.h"

namespace llmq {

namespace {

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

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

Scheduler::Scheduler(Engine& engine, const SchedulerOptions& options) : engine_(engine), options_(options) {
  if (options.max_batched_tokens < 1 || options.max_batched_tokens > engine.max_batch_tokens())
    fail(LLMQ_ERR_INVALID_ARGUMENT, "scheduler: max_batched_tokens must be in [1, {}], got {}", engine.max_batch_tokens(),
         options.max_batched_tokens);
  if (options.max_running < 1)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "scheduler: max_running must be >= 1, got {}", options.max_running);
}

void Scheduler::validate(const Request& request) const {
  const ModelConfig& c = engine_.model().config();
  if (request.prompt.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "request: the prompt is empty");
  engine_.check_token_ids(request.prompt.data(), request.prompt.size(), "prompt_ids");
  engine_.check_token_ids(request.stop_ids.data(), request.stop_ids.size(), "stop_ids");
  if (request.max_new_tokens < 1)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "request: max_new_tokens must be >= 1, got {}", request.max_new_tokens);
  const int64_t total = int64_t(request.prompt.size()) + request.max_new_tokens;
  if (total > c.max_position)
    fail(LLMQ_ERR_CONTEXT_OVERFLOW, "request: {} prompt tokens + max_new_tokens {} exceed the model's context of {}",
         request.prompt.size(), request.max_new_tokens, c.max_position);
  // A request that cannot fit even alone would wait forever: refuse it now.
  const int64_t capacity = int64_t(engine_.allocator().num_blocks()) * engine_.block_size();
  if (total > capacity)
    fail(LLMQ_ERR_KV_CACHE_FULL, "request: {} prompt + {} new tokens can never fit in the KV cache ({} tokens)",
         request.prompt.size(), request.max_new_tokens, capacity);
  validate_sampling(request.sampling);
}

void Scheduler::submit(int64_t id, Request request) {
  auto seq = std::make_unique<Sequence>();
  seq->id = id;
  seq->sampler = std::make_unique<Sampler>(request.sampling);
  seq->stop.insert(request.stop_ids.begin(), request.stop_ids.end());
  if (!request.ignore_eos) seq->stop.insert(engine_.model().config().eos_ids.begin(), engine_.model().config().eos_ids.end());
  seq->tokens = request.prompt;
  seq->result.id = id;
  seq->result.prompt_tokens = int32_t(request.prompt.size());
  seq->request = std::move(request);
  enqueue(std::move(seq));
}

void Scheduler::enqueue(std::unique_ptr<Sequence> seq) {
  auto before = [&](const std::unique_ptr<Sequence>& w) {
    return w->request.priority < seq->request.priority || (w->request.priority == seq->request.priority && w->id > seq->id);
  };
  waiting_.insert(std::find_if(waiting_.begin(), waiting_.end(), before), std::move(seq));
}

bool Scheduler::cancel(int64_t id) {
  auto match = [id](const std::unique_ptr<Sequence>& s) { return s->id == id; };
  std::unique_ptr<Sequence> seq = take(waiting_, match);
  if (!seq) seq = take(running_, match);
  if (!seq) return false;
  seq->kv.reset();  // its blocks are free for this step already
  seq->result.reason = FinishReason::Cancelled;
  ended_.push_back(std::move(seq));
  return true;
}

void Scheduler::finish(std::unique_ptr<Sequence> seq, FinishReason reason, std::vector<RequestEvent>* events) {
  seq->kv.reset();  // the blocks go back to the allocator (cached ones stay findable)
  auto result = std::make_unique<FinishedRequest>(std::move(seq->result));
  result->reason = reason;
  const Clock::time_point now = Clock::now();
  if (!result->tokens.empty()) result->decode_time_s = seconds_between(seq->first_token, now);
  if (!seq->scheduled) result->queue_time_s = seconds_between(seq->request.arrival, now);
  events->push_back(RequestEvent{seq->id, -1, std::move(result)});
}

void Scheduler::fail_all(llmq_status status, const std::string& message, std::vector<RequestEvent>* events) {
  std::vector<std::unique_ptr<Sequence>> all;
  for (auto& s : running_) all.push_back(std::move(s));
  for (auto& s : waiting_) all.push_back(std::move(s));
  running_.clear();
  waiting_.clear();
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a->id < b->id; });
  for (auto& seq : all) {
    seq->result.status = status;
    seq->result.error = message;
    finish(std::move(seq), FinishReason::Error, events);
  }
}

void Scheduler::preempt_one() {
  // The lowest priority, and among those the latest arrival, gives up its blocks and goes back to
  // the queue (ahead of everything that arrived after it); its tokens are recomputed when it runs
  // again (from the prefix cache where its blocks are still there).
  auto victim = std::min_element(running_.begin(), running_.end(), [](const auto& a, const auto& b) {
    return a->request.priority < b->request.priority || (a->request.priority == b->request.priority && a->id > b->id);
  });
  std::unique_ptr<Sequence> seq = std::move(*victim);
  running_.erase(victim);
  seq->kv.reset();
  seq->entries.clear();
  seq->computed = 0;
  ++seq->result.preemptions;
  ++preemptions_;
  enqueue(std::move(seq));
}

bool Scheduler::admit(Sequence& seq) {
  const int32_t bs = engine_.block_size();
  seq.kv = engine_.new_sequence();
  seq.entries.clear();
  int32_t cached = 0;
  if (options_.prefix_caching) {
    // Full blocks of the known tokens, but never the last token: its logits must be computed.
    const int32_t usable = (int32_t(seq.tokens.size()) - 1) / bs;
    int64_t parent = 0;
    for (int32_t b = 0; b < usable; ++b) {
      std::vector<int32_t> block_tokens(seq.tokens.begin() + b * bs, seq.tokens.begin() + (b + 1) * bs);
      const int32_t block = engine_.allocator().lookup(parent, block_tokens, &parent);
      if (block < 0) break;
      seq.kv->adopt(block);
      seq.entries.push_back(parent);
    }
    cached = int32_t(seq.entries.size()) * bs;
  }
  // Admit while there are free blocks for the rest of its known tokens (the first sequence always:
  // alone it fits, as validate() checked).
  const int64_t needed = (int64_t(seq.tokens.size()) + bs - 1) / bs - int64_t(seq.entries.size());
  if (!running_.empty() && needed > engine_.allocator().num_free()) {
    seq.kv.reset();
    seq.entries.clear();
    return false;
  }
  seq.kv->set_length(cached);
  seq.computed = cached;
  cached_tokens_ += uint64_t(cached);
  if (!seq.scheduled) {
    seq.scheduled = true;
    seq.result.cached_tokens = cached;
    seq.result.queue_time_s = seconds_between(seq.request.arrival, Clock::now());
  }
  return true;
}

void Scheduler::register_full_blocks(Sequence& seq) {
  const int32_t bs = engine_.block_size();
  while (int32_t(seq.entries.size()) < seq.computed / bs) {
    const size_t b = seq.entries.size();
    const int64_t parent = b == 0 ? 0 : seq.entries.back();
    std::vector<int32_t> block_tokens(seq.tokens.begin() + int64_t(b) * bs, seq.tokens.begin() + int64_t(b + 1) * bs);
    seq.entries.push_back(engine_.allocator().register_block(seq.kv->blocks()[b], parent, std::move(block_tokens)));
  }
}

bool Scheduler::step(std::vector<RequestEvent>* events) {
  last_step_ = StepInfo{};
  for (auto& seq : ended_) {
    const FinishReason reason = seq->result.reason;
    finish(std::move(seq), reason, events);
  }
  ended_.clear();
  while (!waiting_.empty() && int32_t(running_.size()) < options_.max_running) {
    if (!admit(*waiting_.front())) break;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  if (running_.empty()) return !waiting_.empty();

  std::vector<int32_t> tokens;
  std::vector<SampleRow> sample_rows;
  std::vector<SequenceStep> batch;
  std::vector<Sequence*> in_batch;  // batch[i] is in_batch[i]'s part
  std::vector<Sequence*> sampled;   // the sequences whose last token's logits come back, in order
  std::vector<bool> decodes;        // batch[i] is a decode token
  for (;;) {
    // Decode tokens first (one each), then prefill chunks, in admission order, under the budget.
    batch.clear();
    in_batch.clear();
    sampled.clear();
    decodes.clear();
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
        decodes.push_back(decode);
        if (last) sampled.push_back(seq.get());
        budget -= n;
      }
    const Clock::time_point start = Clock::now();
    try {
      sample_rows.clear();
      for (Sequence* seq : sampled) sample_rows.push_back(seq->sampler->next_row(seq->tokens, engine_.vocab_size()));
      engine_.step(batch, sample_rows, &tokens);
    } catch (const Error& e) {
      if (e.status() != LLMQ_ERR_KV_CACHE_FULL) throw;
      // Nothing ran: the draws are taken back, so that a sequence's tokens do not depend on retries.
      for (Sequence* seq : sampled) seq->sampler->rewind();
      if (running_.size() < 2) {
        // Alone it fits the cache (validate() checked), so another user of the engine holds
        // blocks: this request fails with the reason; the waiting ones stay queued.
        std::unique_ptr<Sequence> seq = std::move(running_.front());
        running_.clear();
        seq->result.status = e.status();
        seq->result.error = e.what();
        finish(std::move(seq), FinishReason::Error, events);
        return has_work();
      }
      preempt_one();  // nothing was changed by the failed step; try again with fewer sequences
      continue;
    }
    last_step_.seconds = seconds_between(start, Clock::now());
    break;
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence& seq = *in_batch[i];
    seq.computed += batch[i].n_tokens;
    (decodes[i] ? last_step_.decode_tokens : last_step_.prefill_tokens) += batch[i].n_tokens;
    last_step_.kv_tokens_read += uint64_t(seq.computed);
    if (options_.prefix_caching) register_full_blocks(seq);
  }

  const Clock::time_point now = Clock::now();
  for (size_t i = 0; i < sampled.size(); ++i) {
    Sequence* seq = sampled[i];
    const int32_t token = tokens[i];
    std::optional<FinishReason> reason;
    if (seq->stop.count(token)) {
      reason = FinishReason::Stop;
    } else {
      if (seq->result.tokens.empty()) {
        seq->first_token = now;
        seq->result.time_to_first_token_s = seconds_between(seq->request.arrival, now);
      }
      seq->result.tokens.push_back(token);
      seq->tokens.push_back(token);
      events->push_back(RequestEvent{seq->id, token, nullptr});
      if (int32_t(seq->result.tokens.size()) >= seq->request.max_new_tokens) reason = FinishReason::Length;
    }
    if (reason) finish(take(running_, [&](const auto& s) { return s.get() == seq; }), *reason, events);
  }
  return has_work();
}

}  // namespace llmq
