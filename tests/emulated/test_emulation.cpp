// The emulation itself (tests/emulated/cuda_emulation.h), on which every emulated kernel test
// rests: its barriers order each thread's writes before the others' reads and let exited threads
// leave, warp shuffles read the right lanes, blocks see the blocks before them, a deadlock and an
// exception in one thread come back to the caller as errors, and the next launch runs normally.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "emulated/cuda_emulation.h"

namespace llmq {
namespace {

TEST(Emulation, BarriersShufflesAndBlocksBehaveAsOnTheGpu) {
  constexpr unsigned kThreads = 128, kBlocks = 3;
  std::vector<int> out(kBlocks * kThreads, -1), block_seen(kBlocks, -1);
  emulation::launch(dim3(kBlocks), kThreads, kThreads * sizeof(int), [&] {
    LLMQ_DYNAMIC_SHARED(int, values);
    const int t = int(threadIdx.x), b = int(blockIdx.x);
    values[t] = 1000 * b + t;
    __syncthreads();
    if (t >= 96) return;  // the last warp exits: the barrier below waits for the other three only
    const int neighbour = values[(t + 1) % kThreads];
    __syncthreads();
    values[t] = 0;  // after every read above
    // Lane l gets lane l ^ 1's value; the warp's sum of lane indices, by a butterfly.
    int lane_sum = t % 32;
    for (int mask = 16; mask > 0; mask /= 2) lane_sum += __shfl_xor_sync(0xffffffffu, lane_sum, mask);
    out[size_t(b) * kThreads + size_t(t)] = neighbour + 1000000 * __shfl_xor_sync(0xffffffffu, t, 1) + lane_sum;
    if (t == 0) block_seen[size_t(b)] = b > 0 ? out[size_t(b - 1) * kThreads] : 0;  // the block before's result
  });
  for (int b = 0; b < int(kBlocks); ++b)
    for (int t = 0; t < int(kThreads); ++t) {
      const int expected = t >= 96 ? -1 : 1000 * b + (t + 1) % int(kThreads) + 1000000 * (t ^ 1) + 496;
      EXPECT_EQ(out[size_t(b) * kThreads + size_t(t)], expected) << "block " << b << " thread " << t;
    }
  EXPECT_EQ(block_seen, (std::vector<int>{0, 1000001 + 496, 1001000 + 1 + 496}));
}

TEST(Emulation, DeadlockAndExceptionReachTheCallerAndTheNextLaunchRuns) {
  // Every thread waits on an mbarrier nobody arrives at.
  try {
    emulation::launch(dim3(2), 64, 0, [&] {
      __shared__ uint64_t bar;
      if (threadIdx.x == 0) mbarrier_init(&bar, 1);
      __syncthreads();
      mbarrier_wait(&bar, 0);
    });
    FAIL() << "the deadlock was not reported";
  } catch (const std::logic_error& e) {
    EXPECT_EQ(std::string(e.what()), "emulation: every thread of block (0, 0, 0) waits for the others: a deadlock");
  }
  // One thread of the second block throws while the others wait at a barrier, which it leaves.
  std::vector<int> ran(2 * 64, 0);
  try {
    emulation::launch(dim3(2), 64, 0, [&] {
      if (blockIdx.x == 1 && threadIdx.x == 5) throw std::runtime_error("thread 5 failed");
      __syncthreads();
      ran[blockIdx.x * 64 + threadIdx.x] = 1;
    });
    FAIL() << "the exception was not reported";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "thread 5 failed");
  }
  for (int t = 0; t < 128; ++t) EXPECT_EQ(ran[size_t(t)], t == 64 + 5 ? 0 : 1) << t;
  // The fibers unwound from the deadlock serve again.
  std::vector<int> sums(4, 0);
  emulation::launch(dim3(4), 64, 0, [&] {
    __shared__ int count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    atomicAdd(&count, 1);
    __syncthreads();
    if (threadIdx.x == 63) sums[blockIdx.x] = count;
  });
  EXPECT_EQ(sums, (std::vector<int>{64, 64, 64, 64}));
}

}  // namespace
}  // namespace llmq
