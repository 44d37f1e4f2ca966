#include "engine/server.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/error.h"

namespace llmq {

double Histogram::upper_bound(int bucket) {
  if (bucket >= kBuckets - 1) return std::numeric_limits<double>::infinity();
  return 1e-4 * std::pow(2.0, bucket / 2.0);
}

void Histogram::add(double seconds) {
  int bucket = 0;
  while (bucket < kBuckets - 1 && seconds >= upper_bound(bucket)) ++bucket;
  ++counts_[size_t(bucket)];
  ++total_;
}

double Histogram::quantile(double q) const {
  if (total_ == 0) return 0;
  const double target = q * double(total_);
  double seen = 0;
  for (int b = 0; b < kBuckets; ++b) {
    const double n = double(counts_[size_t(b)]);
    if (n > 0 && seen + n >= target) {
      const double lo = b == 0 ? 0 : upper_bound(b - 1);
      const double hi = b == kBuckets - 1 ? lo * std::sqrt(2.0) : upper_bound(b);
      return lo + (hi - lo) * std::clamp((target - seen) / n, 0.0, 1.0);
    }
    seen += n;
  }
  return upper_bound(kBuckets - 2);
}

Server::Server(Engine& engine, std::mutex& engine_mutex, ServerOptions options)
    : engine_(engine),
      engine_mutex_(engine_mutex),
      options_(std::move(options)),
      scheduler_(engine, options_.scheduler),
      tokenizer_(engine.model().tokenizer()),
      decode_weight_bytes_(engine.weight_bytes_per_step()),
      kv_bytes_per_token_(engine.kv_bytes_per_token()) {
  if (!(options_.peak_bandwidth >= 0) || !std::isfinite(options_.peak_bandwidth))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "server: peak_bandwidth must be a finite number >= 0, got {}", options_.peak_bandwidth);
  if (options_.peak_bandwidth == 0) {
    std::lock_guard<std::mutex> lock(engine_mutex_);
    options_.peak_bandwidth = engine_.measure_peak_bandwidth();
  }
  stats_.peak_bandwidth = options_.peak_bandwidth;
  stats_.kv_blocks_total = engine.allocator().num_blocks();
  if (options_.own_thread) thread_ = std::thread([this] { run(); });
}

Server::~Server() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_cv_.notify_all();
  events_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int64_t Server::submit(Request request, void* user_data) {
  scheduler_.validate(request);
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t id = next_id_++;
  live_.insert(id);
  inbox_.push_back(Pending{id, std::move(request), user_data});
  {
    std::lock_guard<std::mutex> stats_lock(stats_mutex_);
    ++stats_.submitted;
  }
  work_cv_.notify_one();
  return id;
}

bool Server::cancel(int64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!live_.count(id)) return false;
  cancels_.push_back(id);
  work_cv_.notify_one();
  return true;
}

size_t Server::step() {
  if (options_.own_thread)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "server: step() is for host-driven servers; this one steps on its own thread");
  std::lock_guard<std::mutex> lock(step_mutex_);
  step_once();
  std::lock_guard<std::mutex> live_lock(mutex_);
  return live_.size();
}

size_t Server::poll(std::vector<ServerEvent>* out, size_t max, int timeout_ms) {
  if (options_.on_event)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "server: events go to the on_event callback; poll() has nothing to read");
  std::unique_lock<std::mutex> lock(mutex_);
  auto ready = [&] { return !queue_.empty() || stop_; };
  if (timeout_ms < 0) {
    events_cv_.wait(lock, ready);
  } else {
    events_cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), ready);
  }
  size_t n = 0;
  for (; n < max && !queue_.empty(); ++n) {
    out->push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  return n;
}

ServerStats Server::stats() const {
  size_t inbox;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    inbox = inbox_.size();
  }
  std::lock_guard<std::mutex> lock(stats_mutex_);
  ServerStats s = stats_;
  s.waiting += int32_t(inbox);
  return s;
}

void Server::run() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_cv_.wait(lock, [&] { return stop_ || busy_ || !inbox_.empty() || !cancels_.empty(); });
      if (stop_) return;
    }
    step_once();
  }
}

void Server::step_once() {
  std::vector<Pending> inbox;
  std::vector<int64_t> cancels;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    inbox.swap(inbox_);
    cancels.swap(cancels_);
  }
  for (Pending& p : inbox) {
    Stream& stream = streams_[p.id];
    stream.user_data = p.user_data;
    stream.previous = p.request.prompt.back();
    scheduler_.submit(p.id, std::move(p.request));
  }
  for (int64_t id : cancels) scheduler_.cancel(id);  // false: it finished meanwhile

  std::vector<RequestEvent> events;
  StepInfo info;
  if (scheduler_.has_work()) {
    std::lock_guard<std::mutex> lock(engine_mutex_);
    try {
      scheduler_.step(&events);
      info = scheduler_.last_step();
    } catch (const Error& e) {
      scheduler_.fail_all(e.status(), e.what(), &events);
    } catch (const std::bad_alloc&) {
      scheduler_.fail_all(LLMQ_ERR_OUT_OF_MEMORY, "out of memory during a step", &events);
    } catch (const std::exception& e) {
      scheduler_.fail_all(LLMQ_ERR_INTERNAL, std::string("internal error: ") + e.what(), &events);
    }
    std::lock_guard<std::mutex> stats_lock(stats_mutex_);
    stats_.kv_blocks_used = engine_.allocator().num_blocks() - engine_.allocator().num_free();
    stats_.kv_blocks_cached_free = engine_.allocator().num_cached_free();
  }
  record(info, events);

  std::vector<ServerEvent> out;
  out.reserve(events.size());
  for (RequestEvent& e : events) {
    auto it = streams_.find(e.id);
    ServerEvent se;
    se.id = e.id;
    se.user_data = it->second.user_data;
    se.token = e.token;
    if (e.token >= 0) ++it->second.generated;
    se.n_generated = it->second.generated;
    if (e.token >= 0 && tokenizer_) {
      se.text = it->second.utf8.push(tokenizer_->token_bytes(it->second.previous, e.token));
      it->second.previous = e.token;
    }
    if (e.finished) {
      se.finished = std::move(e.finished);
      streams_.erase(it);
    }
    out.push_back(std::move(se));
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const ServerEvent& e : out)
      if (e.finished) live_.erase(e.id);
    busy_ = scheduler_.has_work();
    if (!options_.on_event) {
      for (ServerEvent& e : out) queue_.push_back(std::move(e));
      if (!out.empty()) events_cv_.notify_all();
    }
  }
  if (options_.on_event)
    for (const ServerEvent& e : out) options_.on_event(e);
}

void Server::record(const StepInfo& info, const std::vector<RequestEvent>& events) {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_.running = int32_t(scheduler_.running());
  stats_.waiting = int32_t(scheduler_.waiting());
  stats_.preemptions = uint64_t(scheduler_.preemptions());
  stats_.cached_tokens = scheduler_.cached_tokens();
  if (info.decode_tokens + info.prefill_tokens > 0) {
    ++stats_.steps;
    stats_.prompt_tokens += uint64_t(info.prefill_tokens);
    // Decode-only steps read every weight once plus each sequence's KV: that over the step time
    // is the bandwidth achieved (steps with prefill are compute-bound and not counted).
    if (info.prefill_tokens == 0 && info.seconds > 0 && stats_.peak_bandwidth > 0) {
      const double bytes = double(decode_weight_bytes_) + double(info.kv_tokens_read) * double(kv_bytes_per_token_);
      stats_.last_decode_mbu = bytes / info.seconds / stats_.peak_bandwidth;
      decode_bytes_ += bytes;
      stats_.decode_seconds += info.seconds;
      stats_.mean_decode_mbu = decode_bytes_ / stats_.decode_seconds / stats_.peak_bandwidth;
    }
  }
  for (const RequestEvent& e : events) {
    if (e.token >= 0) ++stats_.generated_tokens;
    if (!e.finished) continue;
    const FinishedRequest& f = *e.finished;
    ++stats_.finished;
    if (f.reason == FinishReason::Cancelled) ++stats_.cancelled;
    if (f.reason == FinishReason::Error) ++stats_.failed;
    if (!f.tokens.empty()) stats_.ttft.add(f.time_to_first_token_s);
    if (f.tokens.size() > 1) stats_.tpot.add(f.decode_time_s / double(f.tokens.size() - 1));
  }
}

}  // namespace llmq
