// Host memory read bandwidth, measured with a plain streaming read: the CPU backend's peak for
// model bandwidth utilization (decode reads every weight once per step).
#pragma once

#include <cstddef>
#include <vector>

namespace llmq {

struct MemoryBandwidth {
  double best_bytes_per_s = 0;
  std::vector<double> passes;  // bytes/s of each pass
  bool avx2 = false;           // the read used AVX2 loads
};

// Reads a `bytes` buffer (rounded up to 2 MiB) with `threads` threads; best of `passes` passes.
// Throws LLMQ_ERR_OUT_OF_MEMORY when the buffer cannot be allocated.
MemoryBandwidth measure_read_bandwidth(size_t bytes, int threads, int passes);

}  // namespace llmq
