// The GEMV kernel of kernels/cuda/kernels.cuh (at most 8 rows, one warp per output channel) run on
// the CPU through tests/emulated/cuda_emulation.h against float64, for every pair of weight and
// activation types the CUDA backend launches it with: F32 weights with F32 activations, BF16/F16
// weights with activations of the same type,
// INT8 codes with BF16/F16 activations, FP8 codes with FP8 activation codes and row scales; the
// 16-byte and the scalar paths (K a multiple of 16 or not); the fused scale and bias epilogue.
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

// Element type T's encoding of a value, and the value it then stands for.
template <typename T>
T encode(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, cuda::bf16>) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same_v<T, cuda::f16>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, int8_t>) {
    return int8_t(std::lround(std::fmax(-127.0f, std::fmin(127.0f, v * 127.0f))));
  } else {
    return cuda::fp8{__nv_cvt_float_to_fp8(v * 8.0f, __NV_SATFINITE, __NV_E4M3)};
  }
}
template <typename T>
double decode(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, cuda::bf16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<T, cuda::f16>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, int8_t>) {
    return v;
  } else {
    return cuda::fp8_to_f32(v.bits);
  }
}

template <typename W, typename X, int kRowWarps = 1>
void check(int M, int64_t N, int64_t K, bool per_channel, int bias_kind, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "W " << sizeof(W) << " bytes, X " << sizeof(X) << " bytes, M " << M << " N " << N
                                  << " K " << K << (per_channel ? " per-channel" : " per-tensor") << " bias "
                                  << bias_kind << ", " << kRowWarps << " warps per row");
  Rng rng(seed);
  auto uniform = [&] { return float(rng.uniform() * 2.0 - 1.0); };
  std::vector<X> x(static_cast<size_t>(M * K));
  std::vector<W> w(static_cast<size_t>(N * K));
  for (X& v : x) v = encode<X>(uniform());
  for (W& v : w) v = encode<W>(uniform());
  const bool quantized = std::is_same_v<W, int8_t> || std::is_same_v<W, cuda::fp8>;
  std::vector<float> w_scale(per_channel ? static_cast<size_t>(N) : 1), row_scale(static_cast<size_t>(M));
  for (float& s : w_scale) s = 0.01f + 0.01f * (uniform() + 1.0f);
  for (float& s : row_scale) s = 0.1f + 0.1f * (uniform() + 1.0f);
  std::vector<float> bias_f(static_cast<size_t>(N));
  std::vector<cuda::bf16> bias16(static_cast<size_t>(N));
  for (size_t n = 0; n < bias_f.size(); ++n) {
    bias16[n] = __float2bfloat16_rn(uniform());
    bias_f[n] = bias_kind == 1 ? __bfloat162float(bias16[n]) : uniform();
  }
  const bool fp8 = std::is_same_v<W, cuda::fp8>;
  const cuda::Epilogue e{fp8 ? row_scale.data() : nullptr, quantized ? w_scale.data() : nullptr, per_channel,
                         bias_kind == 0 ? nullptr : bias_kind == 1 ? static_cast<const void*>(bias16.data()) : bias_f.data(),
                         bias_kind == 1 ? DType::BF16 : DType::F32};
  std::vector<float> out(size_t(M * N), std::numeric_limits<float>::quiet_NaN());  // poisoned
  constexpr int kRows = cuda::kGemvWarps / kRowWarps;  // channels per block
  const unsigned grid = unsigned((N + kRows - 1) / kRows);
  emulation::launch(dim3(grid), cuda::kGemvWarps * 32, 0, [&] {
    if (K % 16 == 0)
      cuda::gemv_kernel<W, X, true, kRowWarps>(x.data(), w.data(), M, N, K, e, out.data());
    else
      cuda::gemv_kernel<W, X, false>(x.data(), w.data(), M, N, K, e, out.data());
  });
  int64_t bad = 0;
  for (int m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double dot = 0, magnitude = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = decode(x[size_t(m * K + k)]) * decode(w[size_t(n * K + k)]);
        dot += p;
        magnitude += std::fabs(p);
      }
      double scale = quantized ? w_scale[per_channel ? size_t(n) : 0] : 1.0;
      if (fp8) scale *= row_scale[size_t(m)];
      const double expected = dot * scale + (bias_kind ? bias_f[size_t(n)] : 0.0);
      const double got = out[size_t(m * N + n)];
      if (!(std::fabs(got - expected) <= 1e-6 * magnitude * scale + 1e-6) && ++bad <= 5)
        ADD_FAILURE() << "out[" << m << ", " << n << "] = " << got << ", expected " << expected;
    }
  EXPECT_EQ(bad, 0);
}

TEST(GemvKernelEmulated, MatchesFloat64ForEveryTypePair) {
  uint64_t seed = 1;
  int i = 0;  // every bias kind with both scale kinds over the twelve shapes
  for (int M : {1, 3, 8})
    // K = 784: a multiple of 16 that ends inside a warp's 512-byte load step
    for (auto [N, K] : {std::pair<int64_t, int64_t>{19, 733}, {64, 128}, {9, 4096}, {5, 784}}) {
      const int bias = i % 3;
      const bool per_channel = i++ % 2 == 0;
      check<float, float>(M, N, K, per_channel, bias, ++seed);
      check<cuda::bf16, cuda::bf16>(M, N, K, per_channel, bias, ++seed);
      check<cuda::f16, cuda::f16>(M, N, K, per_channel, bias, ++seed);
      check<int8_t, cuda::bf16>(M, N, K, per_channel, bias, ++seed);
      check<int8_t, cuda::f16>(M, N, K, per_channel, bias, ++seed);
      check<cuda::fp8, cuda::fp8>(M, N, K, per_channel, bias, ++seed);
    }
}

// Long rows split over 4 warps (the launcher's choice for K >= 8192 and few channels): K = 8192
// plus one 16-element vector, so that the last warp's turn is nearly empty; N not a multiple of
// the 2 channels a block holds.
TEST(GemvKernelEmulated, RowsSplitOverWarpsMatchFloat64) {
  uint64_t seed = 100;
  for (int M : {1, 5}) {
    check<cuda::bf16, cuda::bf16, 4>(M, 3, 8208, M == 1, 1, ++seed);
    check<int8_t, cuda::bf16, 4>(M, 5, 8208, M == 5, 2, ++seed);
    check<cuda::fp8, cuda::fp8, 4>(M, 3, 4096, true, 0, ++seed);
    check<float, float, 2>(M, 3, 1040, false, 1, ++seed);
  }
}

}  // namespace
}  // namespace llmq
