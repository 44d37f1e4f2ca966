// Weight and activation quantization (engine/quant.h) and the CPU backend's quantized linear,
// against independent float64 computations of the formats' definitions.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "engine/backend.h"
#include "engine/dtype.h"
#include "engine/fp8.h"
#include "engine/quant.h"
#include "engine/rng.h"

namespace llmq {
namespace {

std::vector<uint16_t> random_bf16(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng rng(seed);
  std::vector<uint16_t> v(n);
  for (auto& b : v) b = f32_to_bf16(float((rng.uniform() * 2.0 - 1.0) * scale));
  return v;
}

TEST(Quant, Int8PerChannelMatchesDefinition) {
  const int64_t N = 7, K = 37;
  std::vector<uint16_t> w = random_bf16(size_t(N * K), 1, 3.0f);
  for (int64_t k = 0; k < K; ++k) w[size_t(2 * K + k)] = 0;  // an all-zero row
  QuantizedWeight q = quantize_weight(Tensor{w.data(), DType::BF16, N, K}, QuantMode::Int8WeightOnly, 2);
  ASSERT_EQ(q.dtype, DType::I8);
  ASSERT_EQ(q.scale.size(), size_t(N));
  for (int64_t n = 0; n < N; ++n) {
    double amax = 0;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(double(bf16_to_f32(w[size_t(n * K + k)]))));
    EXPECT_FLOAT_EQ(q.scale[size_t(n)], float(amax / 127.0)) << n;
    for (int64_t k = 0; k < K; ++k) {
      const int code = int8_t(q.data[size_t(n * K + k)]);
      const double exact = amax > 0 ? double(bf16_to_f32(w[size_t(n * K + k)])) * 127.0 / amax : 0.0;
      EXPECT_LE(std::fabs(code - exact), 0.5 + 1e-5) << n << "," << k;
      EXPECT_LE(std::abs(code), 127);
    }
  }
  EXPECT_EQ(q.scale[2], 0.0f);
}

TEST(Quant, Fp8PerTensorMatchesDefinition) {
  const int64_t N = 5, K = 64;
  std::vector<uint16_t> w = random_bf16(size_t(N * K), 2, 0.05f);
  QuantizedWeight q = quantize_weight(Tensor{w.data(), DType::BF16, N, K}, QuantMode::Fp8, 2);
  ASSERT_EQ(q.dtype, DType::F8_E4M3);
  ASSERT_EQ(q.scale.size(), 1u);
  float amax = 0;
  for (uint16_t b : w) amax = std::max(amax, std::fabs(bf16_to_f32(b)));
  EXPECT_EQ(q.scale[0], amax / 448.0f);
  bool saw_max = false;
  for (size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(q.data[i], f32_to_fp8_e4m3(bf16_to_f32(w[i]) * (448.0f / amax))) << i;
    saw_max |= (q.data[i] & 0x7f) == 0x7e;  // +-448
  }
  EXPECT_TRUE(saw_max);
}

TEST(Quant, RowFp8ScaleAndZeroRow) {
  std::vector<float> x = {0.5f, -2.0f, 0.001f, 1.0f}, out(4);
  EXPECT_EQ(quantize_row_fp8(x.data(), 4, out.data()), 2.0f / 448.0f);
  EXPECT_EQ(out[1], -448.0f);
  EXPECT_EQ(out[0], 112.0f);
  std::vector<float> zeros(3, 0.0f), zout(3, 1.0f);
  EXPECT_EQ(quantize_row_fp8(zeros.data(), 3, zout.data()), 0.0f);
  EXPECT_EQ(zout, std::vector<float>(3, 0.0f));
}

// out[m, n] by the definitions in engine/quant.h, in float64.
std::vector<double> reference_linear(const std::vector<float>& x, int64_t M, int64_t K, const QuantizedWeight& q,
                                     QuantMode mode) {
  const int64_t N = q.rows;
  std::vector<double> out(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m) {
    double x_scale = 1.0;
    std::vector<double> xq(static_cast<size_t>(K));
    if (mode == QuantMode::Fp8) {
      float amax = 0;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[size_t(m * K + k)]));
      x_scale = double(amax / 448.0f);
      for (int64_t k = 0; k < K; ++k)
        xq[size_t(k)] = fp8_e4m3_to_f32(f32_to_fp8_e4m3(x[size_t(m * K + k)] * (448.0f / amax)));
    } else {
      for (int64_t k = 0; k < K; ++k) xq[size_t(k)] = bf16_to_f32(f32_to_bf16(x[size_t(m * K + k)]));
    }
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t code = q.data[size_t(n * K + k)];
        acc += xq[size_t(k)] * (mode == QuantMode::Fp8 ? double(fp8_e4m3_to_f32(code)) : double(int8_t(code)));
      }
      out[size_t(m * N + n)] = acc * x_scale * double(q.scale[q.scale.size() == 1 ? 0 : size_t(n)]);
    }
  }
  return out;
}

TEST(Quant, CpuLinearMatchesDefinition) {
  auto backend = make_cpu_backend(CpuBackendOptions{2});
  for (QuantMode mode : {QuantMode::Int8WeightOnly, QuantMode::Fp8})
    for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 19, 733}, {7, 64, 64}, {33, 17, 100}}) {
      std::vector<uint16_t> w = random_bf16(size_t(N * K), uint64_t(M + N + K));
      QuantizedWeight q = quantize_weight(Tensor{w.data(), DType::BF16, N, K}, mode, 1);
      Rng rng(uint64_t(M * K));
      std::vector<float> x(static_cast<size_t>(M * K)), out(static_cast<size_t>(M * N), std::nanf(""));
      for (float& v : x) v = float(rng.uniform() * 8.0 - 4.0);
      Tensor xt{x.data(), DType::F32, M, K}, ot{out.data(), DType::F32, M, N};
      backend->linear(xt, q.view(DType::BF16), nullptr, ot);
      const std::vector<double> ref = reference_linear(x, M, K, q, mode);
      double err2 = 0, ref2 = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        ASSERT_TRUE(std::isfinite(out[i])) << i;
        err2 += (out[i] - ref[i]) * (out[i] - ref[i]);
        ref2 += ref[i] * ref[i];
      }
      // The products are exact in fp32; what remains is fp32 accumulation.
      EXPECT_LE(std::sqrt(err2 / ref2), 1e-6) << quant_mode_name(mode) << " M=" << M << " N=" << N << " K=" << K;
    }
}

}  // namespace
}  // namespace llmq
