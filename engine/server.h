// The serving runtime: a Scheduler made safe to use from many threads, with events, per-request
// timings and engine statistics. Requests are submitted and cancelled from any thread; they go
// into an inbox that the stepping thread drains before each step, so a submit never waits for a
// forward pass. The stepping thread is either the server's own (own_thread) or whichever host
// thread calls step(). Events go to a callback, called on the stepping thread with no lock held,
// or to a queue that poll() reads with a timeout.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "engine/scheduler.h"
#include "engine/tokenizer.h"

namespace llmq {

// Counts of durations in log-spaced buckets: bucket 0 holds [0, 100 us), bucket i holds
// [100 us * 2^((i-1)/2), 100 us * 2^(i/2)), and the last one everything above (~52 s).
class Histogram {
 public:
  static constexpr int kBuckets = 40;
  static double upper_bound(int bucket);  // seconds; infinity for the last bucket
  void add(double seconds);
  // The value below which a fraction `q` of the samples lie, interpolated within its bucket
  // (0 when empty).
  double quantile(double q) const;
  const std::array<uint64_t, kBuckets>& counts() const { return counts_; }
  uint64_t total() const { return total_; }

 private:
  std::array<uint64_t, kBuckets> counts_{};
  uint64_t total_ = 0;
};

struct ServerEvent {
  int64_t id = 0;
  void* user_data = nullptr;  // the request's, as submitted
  int32_t token = -1;         // a new token; -1 for the end (finished is set)
  int32_t n_generated = 0;    // the request's tokens so far
  std::string text;           // the UTF-8 text the token completes (whole characters only)
  std::shared_ptr<const FinishedRequest> finished;
};

struct ServerStats {
  int32_t running = 0, waiting = 0;
  int32_t kv_blocks_total = 0, kv_blocks_used = 0, kv_blocks_cached_free = 0;
  uint64_t submitted = 0, finished = 0, cancelled = 0, failed = 0;
  uint64_t prompt_tokens = 0;     // computed in prefill (recomputation after preemption included)
  uint64_t generated_tokens = 0;
  uint64_t cached_tokens = 0;     // prompt tokens whose KV came from the prefix cache
  uint64_t steps = 0, preemptions = 0;
  double peak_bandwidth = 0;      // bytes/s that count as 100% MBU (0: unmeasured, no MBU)
  double last_decode_mbu = 0;     // of the last decode-only step
  double mean_decode_mbu = 0;     // all decode-only steps: bytes read over time
  double decode_seconds = 0;      // time in decode-only steps
  Histogram ttft, tpot;
};

struct ServerOptions {
  SchedulerOptions scheduler;
  bool own_thread = true;
  double peak_bandwidth = 0;  // bytes/s; 0 = measure once at start (Engine::measure_peak_bandwidth)
  std::function<void(const ServerEvent&)> on_event;  // empty: events queue for poll()
};

class Server {
 public:
  // engine_mutex is held around each engine step (other users of the engine take it too).
  Server(Engine& engine, std::mutex& engine_mutex, ServerOptions options);
  ~Server();  // stops the thread; unfinished requests are dropped without events
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Validates the request on the calling thread (throwing Error on bad input) and queues it.
  int64_t submit(Request request, void* user_data);
  // Asks for a cancel; the request ends with FinishReason::Cancelled unless it finishes otherwise
  // first. False when the id is unknown or the request has finished.
  bool cancel(int64_t id);
  // Host-driven servers only: runs one step on the calling thread (steps are serialized) and
  // returns how many requests are still unfinished.
  size_t step();
  // Moves up to `max` queued events into *out, waiting up to timeout_ms (< 0: no limit) for the
  // first. Not for a server with a callback.
  size_t poll(std::vector<ServerEvent>* out, size_t max, int timeout_ms);
  ServerStats stats() const;

 private:
  struct Pending {
    int64_t id;
    Request request;
    void* user_data;
  };
  struct Stream {  // per request, on the stepping thread
    void* user_data = nullptr;
    int32_t previous = -1;
    int32_t generated = 0;
    Utf8Stream utf8;
  };

  void run();
  void step_once();
  void record(const StepInfo& info, const std::vector<RequestEvent>& events);

  Engine& engine_;
  std::mutex& engine_mutex_;
  ServerOptions options_;
  Scheduler scheduler_;
  const Tokenizer* tokenizer_;
  uint64_t decode_weight_bytes_, kv_bytes_per_token_;

  mutable std::mutex mutex_;  // inbox, cancels, live ids, the event queue, stop_, busy_
  std::condition_variable work_cv_, events_cv_;
  std::vector<Pending> inbox_;
  std::vector<int64_t> cancels_;
  std::unordered_set<int64_t> live_;
  std::deque<ServerEvent> queue_;
  int64_t next_id_ = 1;
  bool stop_ = false, busy_ = false;

  std::mutex step_mutex_;  // one host-driven step at a time
  std::unordered_map<int64_t, Stream> streams_;

  mutable std::mutex stats_mutex_;
  ServerStats stats_;
  double decode_bytes_ = 0;

  std::thread thread_;
};

}  // namespace llmq
