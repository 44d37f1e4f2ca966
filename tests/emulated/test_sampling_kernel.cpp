// The CUDA sampling kernel (kernels/cuda/sampling_kernel.cuh) run on the CPU through
// tests/emulated/cuda_emulation.h, against the host sampler: the same tokens, row for row. The GPU test
// (tests/gpu, BackendPair.SamplingDrawsTheHostsTokens) runs the real kernel the same way.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "engine/sampler.h"
#include "sampling_cases.h"

#include "emulated/cuda_emulation.h"  // before the kernel: it stands in for CUDA
#include "kernels/cuda/sampling_kernel.cuh"

namespace llmq {
namespace {

TEST(SamplingKernelEmulated, DrawsTheHostsTokens) {
  SampleScratch scratch;
  int sampled_rows = 0;
  for (int32_t vocab : {1, 3, 7, 19, 64, 733, 4099}) {
    const std::vector<test::SamplingCase> cases =
        test::with_draws(test::random_sampling_cases(uint64_t(vocab) + 77, 12, {vocab}), 4, uint64_t(vocab));
    std::vector<float> logits;
    std::vector<cuda::SampleArgs> args;
    std::vector<int32_t> penalized, expected;
    for (const test::SamplingCase& c : cases) {
      const SampleRow row = c.with_penalized();
      logits.insert(logits.end(), c.logits.begin(), c.logits.end());
      args.push_back(cuda::SampleArgs{row.temperature, row.top_p, row.min_p, row.repetition_penalty, row.top_k,
                                      int32_t(penalized.size()), int32_t(penalized.size()) + row.n_penalized, 0,
                                      row.draw});
      penalized.insert(penalized.end(), c.penalized.begin(), c.penalized.end());
      std::vector<float> scratch_logits = c.logits;
      expected.push_back(sample_row(scratch_logits.data(), vocab, row, scratch));
      sampled_rows += row.temperature > 0.0f;
    }
    std::vector<int32_t> tokens(cases.size(), -1);
    // 64 threads (2 warps): the GPU runs 512, but the code is the same for any multiple of 32, and
    // OS threads are slow to synchronize.
    emulation::launch(dim3(unsigned(cases.size())), 64, 0, [&] {
      cuda::sample_kernel(logits.data(), vocab, args.data(), penalized.data(), tokens.data());
    });
    for (size_t i = 0; i < cases.size(); ++i)
      EXPECT_EQ(tokens[i], expected[i]) << "vocab " << vocab << " row " << i << ": T " << args[i].temperature
                                        << " top_k " << args[i].top_k << " top_p " << args[i].top_p << " min_p "
                                        << args[i].min_p << " penalty " << args[i].repetition_penalty;
  }
  EXPECT_GT(sampled_rows, 200);
}

}  // namespace
}  // namespace llmq
