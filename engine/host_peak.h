// The host's peaks, measured: memory read bandwidth with a plain streaming read (the CPU backend's
// 100% for model bandwidth utilization: decode reads every weight once per step), and fp32 FMA
// throughput (100% for model FLOPs utilization).
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

// fp32 FLOP/s of `threads` threads (0 = one per core) running independent fused multiply-adds
// (AVX2 + FMA when the CPU has them), best of 3 passes.
double measure_peak_flops(int threads);

}  // namespace llmq
