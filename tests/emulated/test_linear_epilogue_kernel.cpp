// The linear epilogue kernel of kernels/cuda/kernels.cuh (the weight scale, the FP8 row scale and
// the bias applied in place after cuBLASLt) run on the CPU through tests/emulated/cuda_emulation.h:
// every element equals, bit for bit, the same fp32 operations done here (scale product, one
// rounded multiply, one add), on the 16-byte path (N a multiple of 4) and the scalar one, with
// fewer blocks along the rows than rows (the stride past 65535 rows), every scale and bias kind.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "engine/rng.h"

#include "emulated/cuda_emulation.h"  // before the kernels: it stands in for CUDA
#include "kernels/cuda/kernels.cuh"

namespace llmq {
namespace {

TEST(LinearEpilogueKernelEmulated, EqualsTheSameFp32Operations) {
  Rng rng(3);
  auto uniform = [&] { return float(rng.uniform() * 2.0 - 1.0); };
  int checked = 0;
  for (int64_t N : {int64_t(1), int64_t(7), int64_t(1028), int64_t(1030)})
    for (int64_t M : {int64_t(1), int64_t(5)})
      for (int variant = 0; variant < 6; ++variant) {
        const bool per_channel = variant % 2 == 0, row_scaled = variant >= 2, bias16 = variant >= 4;
        const bool has_bias = variant != 2 && variant != 3;
        SCOPED_TRACE(testing::Message() << "M " << M << " N " << N << " variant " << variant);
        std::vector<float> acc(static_cast<size_t>(M * N)), w_scale(per_channel ? static_cast<size_t>(N) : 1);
        std::vector<float> row_scale(static_cast<size_t>(M)), bias_f(static_cast<size_t>(N));
        std::vector<cuda::bf16> bias_b(static_cast<size_t>(N));
        for (float& v : acc) v = uniform() * 100.0f;
        for (float& v : w_scale) v = 0.001f + 0.01f * (uniform() + 1.0f);
        for (float& v : row_scale) v = 0.1f + (uniform() + 1.0f);
        for (size_t i = 0; i < size_t(N); ++i) {
          bias_b[i] = __float2bfloat16_rn(uniform());
          bias_f[i] = bias16 ? __bfloat162float(bias_b[i]) : uniform();
        }
        const cuda::Epilogue e{row_scaled ? row_scale.data() : nullptr, w_scale.data(), per_channel,
                               has_bias ? (bias16 ? static_cast<const void*>(bias_b.data()) : bias_f.data()) : nullptr,
                               bias16 ? DType::BF16 : DType::F32};
        std::vector<float> out = acc;
        // One block of 256 threads covers 1024 columns: N = 1028 and 1030 need two along x; two
        // blocks along y for up to 5 rows exercise the row stride.
        const dim3 grid(unsigned((N + 1023) / 1024), unsigned(std::min<int64_t>(M, 2)));
        emulation::launch(grid, 256, 0, [&] { cuda::epilogue_kernel(out.data(), M, N, e); });
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            const float ws = w_scale[per_channel ? size_t(n) : 0];
            const float scale = row_scaled ? row_scale[size_t(m)] * ws : ws;
            float expected = acc[size_t(m * N + n)] * scale;
            if (has_bias) expected += bias_f[size_t(n)];
            const float got = out[size_t(m * N + n)];
            ASSERT_EQ(0, std::memcmp(&got, &expected, sizeof got)) << "out[" << m << ", " << n << "] = " << got
                                                                  << ", expected " << expected;
            ++checked;
          }
      }
  EXPECT_GT(checked, 40000);
}

}  // namespace
}  // namespace llmq
