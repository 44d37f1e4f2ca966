// A fixed pool of worker threads for the CPU kernels. parallel_for splits [0, n) into contiguous
// chunks, at most one per thread; each output element is computed by exactly one task, so results
// do not depend on the thread count or on which thread ran which chunk.
//
// A decode step issues a few hundred short parallel_for calls, so waking the workers must be cheap:
// workers and the caller spin briefly on atomics before falling back to sleeping on a condition
// variable. Chunks are claimed, not assigned: the caller and whichever workers are running take
// the next unclaimed chunk, so a worker the OS has not scheduled (more runnable threads than
// cores: a busy host, a serving thread, other processes) delays nothing; the caller runs its
// chunks itself instead of waiting for it.
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
  void worker_loop();
  // Claims and runs chunks of job `generation` until none is left.
  void run_chunks(uint32_t generation);

  int n_threads_;
  std::vector<std::thread> workers_;
  // The job: written by the caller before `ticket_` is published (release). A thread reads it only
  // after claiming a chunk of that job, and the caller does not move on to the next job before
  // every claimed chunk is done, so it is never rewritten while in use.
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_size_ = 0;
  // generation (32 bits) | chunks (16 bits) | next chunk to claim (16 bits), changed by CAS: a
  // claim succeeds only for the job its claimant saw.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> chunks_done_{0};
  std::atomic<uint32_t> generation_{0};  // the latest job, for waking workers
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
};

}  // namespace llmq
