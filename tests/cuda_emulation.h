// A CPU emulation of the little of CUDA that kernels/cuda/sampling_kernel.cuh uses, so that the
// kernel's logic (its barriers, warp shuffles, scans and radix selection) is tested on machines
// without a GPU: each block runs as blockDim std::threads, one block at a time. __shared__
// variables become function statics (one block at a time shares them), __syncthreads is a barrier
// that exited threads leave (as on the GPU), a warp shuffle exchanges through a per-warp buffer
// between two warp barriers, and shared atomics take a lock. Not emulated: the memory model
// beyond what the barriers order, and everything else CUDA has.
#pragma once

#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedDim3 threadIdx, blockIdx, blockDim;

namespace llmq::emulation {

// A reusable barrier for `count` threads; a thread that leaves lowers the count.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ >= count_) return release();
    cv_.wait(lock, [&] { return generation_ != generation; });
  }
  void leave() {
    std::unique_lock<std::mutex> lock(mutex_);
    --count_;
    if (arrived_ > 0 && arrived_ >= count_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  uint64_t generation_ = 0;
};

struct Block {
  explicit Block(int threads) : block(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Barrier>(32));
    exchange.resize(size_t(threads));
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> exchange;  // one slot per thread
  std::mutex atomics;
};
inline Block* current_block = nullptr;

// Runs fn() as every thread of every block of a 1-D grid; blockDim must be a multiple of 32.
inline void launch(unsigned grid, int block_dim, const std::function<void()>& fn) {
  for (unsigned b = 0; b < grid; ++b) {
    Block block(block_dim);
    current_block = &block;
    std::vector<std::thread> threads;
    for (int t = 0; t < block_dim; ++t)
      threads.emplace_back([&, t] {
        threadIdx.x = unsigned(t);
        blockIdx.x = b;
        blockDim.x = unsigned(block_dim);
        fn();
        block.block.leave();
      });
    for (std::thread& t : threads) t.join();
    current_block = nullptr;
  }
}

template <typename T>
T exchange(T v, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 64 bits");
  Block& b = *current_block;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  std::memcpy(&b.exchange[size_t(warp * 32 + lane)], &v, sizeof v);
  b.warps[size_t(warp)]->wait();
  T out;
  std::memcpy(&out, &b.exchange[size_t(warp * 32 + source_lane)], sizeof out);
  b.warps[size_t(warp)]->wait();  // nobody writes its slot again before everyone has read
  return out;
}

}  // namespace llmq::emulation

inline void __syncthreads() { llmq::emulation::current_block->block.wait(); }

template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
  const int lane = int(threadIdx.x) % 32;
  return llmq::emulation::exchange(v, lane + offset < 32 ? lane + offset : lane);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int offset) {
  const int lane = int(threadIdx.x) % 32;
  return llmq::emulation::exchange(v, lane - offset >= 0 ? lane - offset : lane);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long v) {
  std::lock_guard<std::mutex> lock(llmq::emulation::current_block->atomics);
  const unsigned long long old = *address;
  *address = old + v;
  return old;
}

using std::isfinite;
using std::min;
