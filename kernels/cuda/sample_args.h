// One row of a sampling step as the CUDA kernel reads it (engine/sampler.h's SampleRow, its
// penalized ids at penalized[penalized_begin, penalized_end) of the step's id array).
#pragma once

#include <cstdint>

namespace llmq::cuda {

constexpr int kSampleThreads = 512;  // threads of the block that samples one row

struct SampleArgs {
  float temperature, top_p, min_p, repetition_penalty;
  int32_t top_k, penalized_begin, penalized_end, unused;
  unsigned long long draw;
};

}  // namespace llmq::cuda
