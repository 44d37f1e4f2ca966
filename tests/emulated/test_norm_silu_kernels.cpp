// The RMSNorm, SiLU-mul and convert kernels of kernels/cuda/kernels.cuh with their 16-bit copies (the
// input a following BF16 / F16 / INT8 linear reads, written by the op before instead of a
// conversion pass), run on the CPU through tests/emulated/cuda_emulation.h:
// - the fp32 outputs against the CPU backend (RMSNorm: within 2e-6 relative, its sum of squares is
//   reduced in another order; SiLU-mul: bit for bit), the residual bit for bit;
// - each 16-bit copy equal, bit for bit, to engine/dtype.h's round-to-nearest-even of the kernel's
//   own fp32 output, every element written (the copy is poisoned first);
// - the norm's FP8 codes and row scales (dynamic per-row scales) those of engine/quant.h's
//   quantize_row_fp8 of the kernel's own fp32 output;
// - the embedding lookup and the row gather, exact copies.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "engine/backend.h"
#include "engine/dtype.h"
#include "engine/quant.h"
#include "engine/rng.h"

#include "emulated/cuda_emulation.h"  // before the kernels: it stands in for CUDA
#include "kernels/cuda/kernels.cuh"

namespace llmq {
namespace {

uint16_t bits_of(cuda::bf16 v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}
uint16_t bits_of(cuda::f16 v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}
float decode_e4m3(uint8_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(code), __NV_E4M3)));
}
uint16_t reference_bits(float v, cuda::bf16) { return f32_to_bf16(v); }
uint16_t reference_bits(float v, cuda::f16) { return f32_to_f16(v); }

// Elements of `copy` that are not the rounding of `values`.
template <typename R>
size_t copies_that_differ(const std::vector<float>& values, const std::vector<R>& copy) {
  size_t differ = 0;
  for (size_t i = 0; i < values.size(); ++i) differ += bits_of(copy[i]) != reference_bits(values[i], R{});
  return differ;
}

template <typename R>
void check_rmsnorm(bool with_residual, int64_t rows, int64_t dim, Rng& rng) {
  SCOPED_TRACE(testing::Message() << (with_residual ? "add_rmsnorm" : "rmsnorm") << " rows " << rows << " dim "
                                  << dim << (std::is_same_v<R, cuda::bf16> ? " bf16" : " f16"));
  std::unique_ptr<Backend> cpu = make_cpu_backend(CpuBackendOptions{1});
  const size_t n = size_t(rows * dim);
  std::vector<float> x(n), residual(n), weight(static_cast<size_t>(dim));
  for (float& v : x) v = float(rng.uniform() * 8.0 - 4.0);
  for (float& v : residual) v = float(rng.uniform() * 2.0 - 1.0);
  for (float& v : weight) v = float(rng.uniform() * 2.0);
  std::vector<float> expected(n), expected_residual = residual;
  Tensor xt{x.data(), DType::F32, rows, dim}, wt{weight.data(), DType::F32, 1, dim};
  Tensor et{expected.data(), DType::F32, rows, dim}, rt{expected_residual.data(), DType::F32, rows, dim};
  if (with_residual)
    cpu->add_rmsnorm(rt, xt, wt, 1e-5f, et);
  else
    cpu->rmsnorm(xt, wt, 1e-5f, et);

  std::vector<float> out(n, std::nanf("")), row_scales(static_cast<size_t>(rows), std::nanf(""));
  std::vector<R> copy(n);
  std::memset(static_cast<void*>(copy.data()), 0xff, n * sizeof(R));  // NaN in both 16-bit types: poisoned
  std::vector<uint8_t> codes(n, 0x7f);                                // E4M3 NaN: poisoned
  const int threads = dim >= 1024 ? 512 : dim >= 256 ? 256 : 64;     // as the launcher
  emulation::launch(dim3(unsigned(rows)), unsigned(threads), 0, [&] {
    const cuda::RoundedCopy rounded{copy.data(), std::is_same_v<R, cuda::bf16>};
    cuda::rmsnorm_kernel<float>(with_residual ? residual.data() : nullptr, x.data(), weight.data(), 1e-5f, dim,
                                out.data(), cuda::NormCopy{rounded, codes.data(), row_scales.data()});
  });
  double worst = 0.0;
  for (size_t i = 0; i < n; ++i)
    worst = std::max(worst, std::fabs(double(out[i]) - double(expected[i])) / std::max(1e-6, std::fabs(double(expected[i]))));
  EXPECT_LT(worst, 2e-6);
  if (with_residual) {
    EXPECT_EQ(residual, expected_residual);
  }
  EXPECT_EQ(copies_that_differ(out, copy), 0u);
  std::vector<float> expected_values(n), expected_scales(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r)
    expected_scales[size_t(r)] = quantize_row_fp8(out.data() + r * dim, dim, expected_values.data() + r * dim);
  EXPECT_EQ(row_scales, expected_scales);
  size_t differ = 0;
  for (size_t i = 0; i < n; ++i) differ += decode_e4m3(codes[i]) != expected_values[i];
  EXPECT_EQ(differ, 0u);
}

TEST(NormSiluKernelsEmulated, RmsnormWritesItsRoundedCopy) {
  Rng rng(11);
  for (bool with_residual : {false, true})
    for (int64_t rows : {1, 3})
      for (int64_t dim : {7, 733, 4096, 5000}) {  // 5000: two batches of the row walk, the second partial
        check_rmsnorm<cuda::bf16>(with_residual, rows, dim, rng);
        check_rmsnorm<cuda::f16>(with_residual, rows, dim, rng);
      }
  // Without copies, the fp32 output alone.
  std::vector<float> x(64, 1.5f), w(64, 2.0f), out(64, 0.0f);
  emulation::launch(dim3(1), 64, 0, [&] {
    cuda::rmsnorm_kernel<float>(nullptr, x.data(), w.data(), 0.0f, 64, out.data(), cuda::NormCopy{});
  });
  EXPECT_EQ(out, std::vector<float>(64, 2.0f));
}

TEST(NormSiluKernelsEmulated, SiluMulEqualsTheCpuAndRoundsItsProduct) {
  Rng rng(12);
  std::unique_ptr<Backend> cpu = make_cpu_backend(CpuBackendOptions{1});
  for (int64_t n : {1, 7, 733, 11008 * 3}) {
    SCOPED_TRACE(testing::Message() << "n " << n);
    const size_t count = static_cast<size_t>(n);
    std::vector<float> gate(count), up(count), expected(count), product(count, std::nanf(""));
    for (size_t i = 0; i < count; ++i) {
      gate[i] = float(rng.uniform() * 24.0 - 12.0);
      up[i] = float(rng.uniform() * 6.0 - 3.0);
    }
    Tensor g{gate.data(), DType::F32, 1, n}, u{up.data(), DType::F32, 1, n}, e{expected.data(), DType::F32, 1, n};
    cpu->silu_mul(g, u, e);
    std::vector<cuda::bf16> as_bf16(count);
    std::vector<cuda::f16> as_f16(count);
    std::memset(static_cast<void*>(as_bf16.data()), 0xff, size_t(n) * 2);
    std::memset(static_cast<void*>(as_f16.data()), 0xff, size_t(n) * 2);
    for (bool vectors : {false, true}) {
      if (vectors && n % 4 != 0) continue;
      SCOPED_TRACE(vectors ? "4 values a step" : "1 value a step");
      std::fill(product.begin(), product.end(), std::nanf(""));
      std::memset(static_cast<void*>(as_bf16.data()), 0xff, count * 2);
      std::memset(static_cast<void*>(as_f16.data()), 0xff, count * 2);
      const unsigned blocks = unsigned(std::min<int64_t>((n + 255) / 256, 4));  // fewer blocks than needed: the stride
      emulation::launch(dim3(blocks), 256, 0, [&] {
        const cuda::SiluMulOf src{gate.data(), up.data(), n};
        cuda::silu_mul_kernel<float>(src, n, product.data(), vectors);
        cuda::silu_mul_kernel<cuda::bf16>(src, n, as_bf16.data(), vectors);
        cuda::silu_mul_kernel<cuda::f16>(src, n, as_f16.data(), vectors);
      });
      EXPECT_EQ(std::memcmp(product.data(), expected.data(), size_t(n) * 4), 0);
      EXPECT_EQ(copies_that_differ(expected, as_bf16), 0u);
      EXPECT_EQ(copies_that_differ(expected, as_f16), 0u);
    }
  }
}

// The epilogues the gate and up linears leave to the SiLU-mul (the CUDA backend's mlp, where
// cuBLASLt wrote the sums), applied as the values are read: the bits of epilogue_kernel's pass over
// gate and up followed by the kernels on the final values, for the product (fp32 and its 16-bit
// copies, 4 values a step and 1) and for its FP8 quantization, whose deferred row scales are the
// very buffer it writes its own row scales into (the norm's codes' scales, as in the backend).
// gate: per-channel weight scales, FP8-style row scales and a BF16 bias; up: a per-tensor scale
// with the row scales.
TEST(NormSiluKernelsEmulated, SiluMulAppliesDeferredEpilogues) {
  Rng rng(14);
  auto floats = [&](size_t n, double lo, double hi) {
    std::vector<float> v(n);
    for (float& x : v) x = float(lo + rng.uniform() * (hi - lo));
    return v;
  };
  for (int64_t rows : {1, 3})
    for (int64_t cols : {8, 733, 1024}) {
      SCOPED_TRACE(testing::Message() << "rows " << rows << " cols " << cols);
      const size_t n = size_t(rows * cols);
      const std::vector<float> gate_sums = floats(n, -400, 400), up_sums = floats(n, -100, 100);
      const std::vector<float> gate_w = floats(size_t(cols), 1e-3, 3e-2), up_w = floats(1, 1e-3, 3e-2);
      const std::vector<float> row_scales_in = floats(size_t(rows), 0.05, 1.5);
      std::vector<cuda::bf16> gate_bias(static_cast<size_t>(cols));
      for (cuda::bf16& b : gate_bias) b = __float2bfloat16_rn(float(rng.uniform() * 2.0 - 1.0));
      // The deferred epilogues read `row_scales`, which the FP8 kernel below also writes.
      std::vector<float> row_scales = row_scales_in;
      const cuda::LinearScales gate_s{row_scales.data(), gate_w.data(), true, gate_bias.data(), DType::BF16},
          up_s{row_scales.data(), up_w.data(), false, nullptr, DType::F32};
      const cuda::LinearScales gate_passed{row_scales_in.data(), gate_w.data(), true, gate_bias.data(), DType::BF16},
          up_passed{row_scales_in.data(), up_w.data(), false, nullptr, DType::F32};
      std::vector<float> gate = gate_sums, up = up_sums;
      emulation::launch(dim3(unsigned((cols + 1023) / 1024), unsigned(rows)), 256, 0, [&] {
        cuda::epilogue_kernel(gate.data(), rows, cols, cuda::Epilogue{gate_passed});
        cuda::epilogue_kernel(up.data(), rows, cols, cuda::Epilogue{up_passed});
      });
      const cuda::SiluMulOf final_values{gate.data(), up.data(), cols};
      const cuda::SiluMulOf deferred{gate_sums.data(), up_sums.data(), cols, {gate_s}, {up_s}};

      for (bool vectors : {false, true}) {
        if (vectors && cols % 4 != 0) continue;
        SCOPED_TRACE(vectors ? "4 values a step" : "1 value a step");
        std::vector<float> product(n), product_deferred(n, std::nanf(""));
        std::vector<cuda::bf16> as_bf16(n), as_bf16_deferred(n);
        std::memset(static_cast<void*>(as_bf16_deferred.data()), 0xff, n * 2);
        emulation::launch(dim3(2), 128, 0, [&] {  // fewer threads than values: the stride
          cuda::silu_mul_kernel<float>(final_values, int64_t(n), product.data(), vectors);
          cuda::silu_mul_kernel<float>(deferred, int64_t(n), product_deferred.data(), vectors);
          cuda::silu_mul_kernel<cuda::bf16>(final_values, int64_t(n), as_bf16.data(), vectors);
          cuda::silu_mul_kernel<cuda::bf16>(deferred, int64_t(n), as_bf16_deferred.data(), vectors);
        });
        EXPECT_EQ(std::memcmp(product_deferred.data(), product.data(), n * 4), 0);
        EXPECT_EQ(std::memcmp(as_bf16_deferred.data(), as_bf16.data(), n * 2), 0);
      }

      for (bool dynamic : {true, false}) {
        SCOPED_TRACE(dynamic ? "dynamic FP8 scales" : "a static FP8 scale");
        const float static_scale = 0.02f;
        const float* scale_arg = dynamic ? nullptr : &static_scale;
        std::vector<uint8_t> codes(n, 0x7f), codes_deferred(n, 0x7f);
        std::vector<float> scales(size_t(rows), std::nanf(""));
        std::vector<unsigned long long> counters(kSaturationCounters, 0), counters_deferred(kSaturationCounters, 0);
        row_scales = row_scales_in;
        const unsigned threads = cols >= 1024 ? 512 : 256;  // as the launcher
        emulation::launch(dim3(unsigned(rows)), threads, 0, [&] {
          cuda::quantize_fp8_rows_kernel(final_values, cols, scale_arg, nullptr, codes.data(), scales.data(),
                                         counters.data());
        });
        emulation::launch(dim3(unsigned(rows)), threads, 0, [&] {
          cuda::quantize_fp8_rows_kernel(deferred, cols, scale_arg, nullptr, codes_deferred.data(), row_scales.data(),
                                         counters_deferred.data());
        });
        EXPECT_EQ(codes_deferred, codes);
        EXPECT_EQ(std::memcmp(row_scales.data(), scales.data(), size_t(rows) * 4), 0);
        EXPECT_EQ(counters_deferred, counters);
      }
    }
}

// convert_kernel (the 16-bit copy a linear reads when no op before wrote it): engine/dtype.h's
// rounding of every value, 4 values a step and 1.
TEST(NormSiluKernelsEmulated, ConvertRoundsEveryValue) {
  Rng rng(13);
  for (int64_t n : {1, 7, 4096, 4099 * 4}) {
    const size_t count = static_cast<size_t>(n);
    std::vector<float> x(count);
    for (float& v : x) v = float((rng.uniform() * 2.0 - 1.0) * 1e3);
    for (bool vectors : {false, true}) {
      if (vectors && n % 4 != 0) continue;
      SCOPED_TRACE(testing::Message() << "n " << n << (vectors ? " 4 values a step" : " 1 value a step"));
      std::vector<cuda::bf16> as_bf16(count);
      std::vector<cuda::f16> as_f16(count);
      std::memset(static_cast<void*>(as_bf16.data()), 0xff, count * 2);
      std::memset(static_cast<void*>(as_f16.data()), 0xff, count * 2);
      emulation::launch(dim3(3), 64, 0, [&] {
        cuda::convert_kernel<cuda::bf16>(x.data(), n, as_bf16.data(), vectors);
        cuda::convert_kernel<cuda::f16>(x.data(), n, as_f16.data(), vectors);
      });
      EXPECT_EQ(copies_that_differ(x, as_bf16), 0u);
      EXPECT_EQ(copies_that_differ(x, as_f16), 0u);
    }
  }
}

// The embedding lookup (a vocab shard: ids outside it give zero rows) and the row gather: exact
// copies, every element written, at widths of one, several and a partial batch of the row walk.
TEST(NormSiluKernelsEmulated, EmbedAndGatherRowsCopyExactly) {
  Rng rng(17);
  for (int64_t dim : {7, 733, 5000}) {
    SCOPED_TRACE(testing::Message() << "dim " << dim);
    const int64_t table_rows = 5, first_id = 100;
    std::vector<cuda::bf16> table(size_t(table_rows * dim));
    for (cuda::bf16& v : table) v = __float2bfloat16_rn(float(rng.uniform() * 2.0 - 1.0));
    const std::vector<int32_t> tokens = {104, 100, 99, 105, 102};  // 99 and 105: another rank's
    std::vector<float> out(tokens.size() * size_t(dim), std::nanf(""));
    emulation::launch(dim3(unsigned(tokens.size())), 256, 0, [&] {
      cuda::embed_kernel<cuda::bf16>(table.data(), first_id, table_rows, dim, tokens.data(), out.data());
    });
    for (size_t r = 0; r < tokens.size(); ++r)
      for (int64_t i = 0; i < dim; ++i) {
        const int64_t id = tokens[r] - first_id;
        const float expected = id >= 0 && id < table_rows ? __bfloat162float(table[size_t(id * dim + i)]) : 0.0f;
        ASSERT_EQ(out[r * size_t(dim) + size_t(i)], expected) << "row " << r << " element " << i;
      }

    const std::vector<int32_t> rows = {3, 0, 4};
    std::vector<float> gathered(rows.size() * size_t(dim), std::nanf(""));
    emulation::launch(dim3(unsigned(rows.size())), 256, 0,
                      [&] { cuda::gather_rows_kernel(out.data(), dim, rows.data(), gathered.data()); });
    for (size_t r = 0; r < rows.size(); ++r)
      ASSERT_EQ(0, std::memcmp(&gathered[r * size_t(dim)], &out[size_t(rows[r]) * size_t(dim)], size_t(dim) * 4))
          << "gathered row " << r;
  }
}

}  // namespace
}  // namespace llmq
