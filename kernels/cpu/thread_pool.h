// A fixed pool of worker threads for the CPU kernels. parallel_for splits [0, n) into contiguous
// chunks, one per thread; each output element is computed by exactly one task, so results do not
// depend on the thread count.
//
// A decode step issues a few hundred short parallel_for calls, so waking the workers must be cheap:
// workers and the caller spin briefly on atomics before falling back to sleeping on a condition
// variable, which keeps the futex wake-up latency off the critical path without burning a core
// when the engine is idle.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace llmq {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads >= 1 (the caller counts as one)
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }
  // Calls fn(begin, end) over [0, n) in at most size() chunks, waiting for all of them. Runs
  // inline when n < 2 * grain (too little work to pay for waking threads). Not reentrant.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker_loop(int index);

  int n_threads_;
  std::vector<std::thread> workers_;
  // The job: written by the caller before `generation_` is bumped (release), read by the workers
  // after they see the new generation (acquire). Every worker checks in through `pending_` for
  // every job, so the caller never rewrites it while a worker may still read it.
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_size_ = 0;
  int job_chunks_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
};

}  // namespace llmq
