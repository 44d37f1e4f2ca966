// The FP8 activation quantization kernel of kernels/cuda/kernels.cuh, on a tensor and fused with
// SiLU-mul (silu(gate) * up computed in the kernel), run on the CPU through
// tests/emulated/cuda_emulation.h against engine/quant.h's row quantization of the CPU backend's
// silu_mul: the same E4M3 codes, row scales and saturation counts, with dynamic per-token scales,
// a given row amax (tensor parallelism) and static scales that clip.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "engine/backend.h"
#include "engine/quant.h"
#include "engine/rng.h"

#include "emulated/cuda_emulation.h"  // before the kernels: it stands in for CUDA
#include "kernels/cuda/kernels.cuh"

namespace llmq {
namespace {

float decode_e4m3(uint8_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(code), __NV_E4M3)));
}

TEST(Fp8ActivationKernelsEmulated, CodesScalesAndCountsEqualTheCpu) {
  Rng rng(5);
  std::unique_ptr<Backend> cpu = make_cpu_backend(CpuBackendOptions{1});
  for (bool fused : {false, true})
    for (int64_t rows : {1, 3, 7})
      for (int64_t cols : {7, 733, 1500, 9000})  // 9000: more than one batch of the row walk
        for (int mode = 0; mode < 4; ++mode) {  // dynamic, given amax, static, static that clips
          if (fused && mode == 1) continue;      // the fused kernel has no row_amax (see cuda_kernels.h)
          SCOPED_TRACE(testing::Message() << (fused ? "silu_mul fused" : "tensor") << " rows " << rows << " cols "
                                          << cols << " mode " << mode);
          const size_t n = size_t(rows * cols);
          std::vector<float> gate(n), up(n), x(n);
          for (size_t i = 0; i < n; ++i) {
            gate[i] = float(rng.uniform() * 12.0 - 6.0);
            up[i] = float(rng.uniform() * 6.0 - 3.0);
          }
          if (fused) {  // the CPU backend's silu_mul gives the values the kernel quantizes
            Tensor g{gate.data(), DType::F32, rows, cols}, u{up.data(), DType::F32, rows, cols};
            Tensor xt{x.data(), DType::F32, rows, cols};
            cpu->silu_mul(g, u, xt);
          } else {
            x = gate;
          }
          std::vector<float> row_amax(static_cast<size_t>(rows));
          for (int64_t r = 0; r < rows; ++r) {
            float amax = 0.0f;
            for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(x[size_t(r * cols + c)]));
            row_amax[size_t(r)] = 1.5f * amax;  // as if another rank's slice held a larger value
          }
          const float static_scale = mode == 3 ? 0.002f : 0.05f;  // 0.002: values beyond 0.9 clip
          std::vector<float> expected_values(n), expected_scales(static_cast<size_t>(rows));
          unsigned long long expected_clipped = 0;
          for (int64_t r = 0; r < rows; ++r) {
            const float* xr = x.data() + r * cols;
            float* er = expected_values.data() + r * cols;
            if (mode == 0) expected_scales[size_t(r)] = quantize_row_fp8(xr, cols, er);
            if (mode == 1) expected_scales[size_t(r)] = quantize_row_fp8(xr, cols, row_amax[size_t(r)], er);
            if (mode >= 2) {
              expected_clipped += uint64_t(quantize_row_fp8_static(xr, cols, static_scale, er));
              expected_scales[size_t(r)] = static_scale;
            }
          }
          if (mode == 3) {
            EXPECT_GT(expected_clipped, 0u);
          }

          std::vector<uint8_t> codes(n, 0x7f);                                   // E4M3 NaN: poisoned
          std::vector<float> scales(static_cast<size_t>(rows), std::nanf(""));
          std::vector<unsigned long long> counters(kSaturationCounters, 0);
          const float* scale_arg = mode >= 2 ? &static_scale : nullptr;
          const float* amax_arg = mode == 1 ? row_amax.data() : nullptr;
          const int threads = fused ? (cols >= 4096 ? 1024 : cols >= 1024 ? 512 : 256) : 256;  // as the launchers
          emulation::launch(dim3(unsigned(rows)), unsigned(threads), 0, [&] {
            if (fused)
              cuda::quantize_fp8_rows_kernel(cuda::SiluMulOf{gate.data(), up.data(), cols}, cols, scale_arg, amax_arg,
                                             codes.data(), scales.data(), counters.data());
            else
              cuda::quantize_fp8_rows_kernel(cuda::ActivationsOf{x.data(), cols}, cols, scale_arg, amax_arg, codes.data(),
                                             scales.data(), counters.data());
          });
          EXPECT_EQ(scales, expected_scales);
          size_t differ = 0;
          for (size_t i = 0; i < n; ++i) differ += decode_e4m3(codes[i]) != expected_values[i];
          EXPECT_EQ(differ, 0u);
          EXPECT_EQ(counters[kActivationsClipped], mode >= 2 ? expected_clipped : 0u);
          EXPECT_EQ(counters[kActivationsStatic], mode >= 2 ? n : 0u);
        }
}

}  // namespace
}  // namespace llmq
