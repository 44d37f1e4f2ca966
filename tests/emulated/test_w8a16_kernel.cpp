// The W8A16 GEMM kernel (kernels/cuda/w8a16_kernel.cuh) run on the CPU through
// tests/emulated/cuda_emulation.h, with w8a16_plan's tiles and splits, against a float64 reference:
// every tile shape (BM 16/32/64/128), partial tiles in M and N, split-K (a small multiprocessor
// count forces it) summed in order, copies landing late or at once, repeated launches bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "engine/rng.h"

#include "emulated/cuda_emulation.h"  // before the kernel: it stands in for CUDA
#include "kernels/cuda/w8a16_kernel.cuh"

namespace llmq {
namespace {

uint16_t encode16(float v, DType dtype) {
  uint16_t u;
  if (dtype == DType::BF16) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    std::memcpy(&u, &b, 2);
  } else {
    const __half h = __float2half_rn(v);
    std::memcpy(&u, &h, 2);
  }
  return u;
}
float decode16(uint16_t u, DType dtype) {
  if (dtype == DType::BF16) return __uint_as_float(uint32_t(u) << 16);
  return __half2float(__ushort_as_half(u));
}

template <typename T>
struct As {
  using type = T;
};

struct GemmCase {
  int64_t M, N, K;
  DType act;
  bool per_channel;
  int bias;  // 0 none, 1 BF16, 2 F32
  int num_sms;
  bool eager_copies;
};

void check(const GemmCase& c) {
  SCOPED_TRACE(testing::Message() << "M " << c.M << " N " << c.N << " K " << c.K << " " << dtype_name(c.act)
                                  << (c.per_channel ? " per-channel" : " per-tensor") << " bias " << c.bias << " sms "
                                  << c.num_sms << (c.eager_copies ? " eager" : " deferred"));
  Rng rng(uint64_t(c.M * 7919 + c.N * 31 + c.K));
  auto uniform = [&] { return float(rng.uniform() * 2.0 - 1.0); };
  std::vector<uint16_t> x(size_t(c.M * c.K));
  std::vector<float> xf(x.size());
  for (size_t i = 0; i < x.size(); ++i) xf[i] = decode16(x[i] = encode16(uniform(), c.act), c.act);
  std::vector<int8_t> w(size_t(c.N * c.K));
  for (int8_t& q : w) q = int8_t(int(rng.next() % 256) - 128);
  std::vector<float> scale(c.per_channel ? size_t(c.N) : 1);
  for (float& s : scale) s = 0.001f + 0.01f * (uniform() + 1.0f);
  std::vector<uint16_t> bias16(size_t(c.N));
  std::vector<float> bias_f(size_t(c.N));
  for (size_t n = 0; n < bias_f.size(); ++n) {
    bias16[n] = encode16(uniform(), DType::BF16);
    bias_f[n] = c.bias == 1 ? decode16(bias16[n], DType::BF16) : uniform();
  }
  const cuda::Epilogue e{nullptr, scale.data(), c.per_channel,
                         c.bias == 0 ? nullptr : c.bias == 1 ? static_cast<const void*>(bias16.data()) : bias_f.data(),
                         c.bias == 1 ? DType::BF16 : DType::F32};
  ASSERT_TRUE(cuda::w8a16_supported(c.M, c.N, c.K, x.data(), w.data()));
  const cuda::W8A16Plan plan = cuda::w8a16_plan(c.M, c.N, c.K, c.num_sms);
  std::vector<float> partial(size_t(plan.partial_floats) + 1, NAN);
  std::vector<unsigned> counters(size_t(plan.counters) + 1, 0);
  emulation::eager_copies = c.eager_copies;
  auto run = [&] {
    std::vector<float> out(size_t(c.M * c.N), NAN);  // poisoned: every element must be written
    auto launch = [&](auto tag) {
      using T = typename decltype(tag)::type;
      cuda::w8a16_for_rows<T>(c.M, c.N, plan, [&](auto kernel, dim3 grid, int threads, int smem) {
        emulation::launch(grid, unsigned(threads), size_t(smem), [&] {
          kernel(reinterpret_cast<const T*>(x.data()), w.data(), int(c.M), int(c.N), int(c.K), plan.k_tiles_per_split,
                 e, out.data(), partial.data(), counters.data());
        });
      });
    };
    if (c.act == DType::BF16)
      launch(As<cuda::bf16>{});
    else
      launch(As<cuda::f16>{});
    return out;
  };
  const std::vector<float> out = run();
  if (plan.splits > 1) {
    EXPECT_EQ(0, std::memcmp(out.data(), run().data(), out.size() * sizeof(float))) << "a second launch differs";
    for (int64_t i = 0; i < plan.counters; ++i) ASSERT_EQ(counters[size_t(i)], 0u) << "tile counter " << i << " not reset";
  }
  // Tolerance: 1e-6 of the sum of |products| (fp32 accumulation), per element.
  int64_t bad = 0;
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; ++n) {
      double dot = 0, magnitude = 0;
      for (int64_t k = 0; k < c.K; ++k) {
        const double p = double(xf[size_t(m * c.K + k)]) * w[size_t(n * c.K + k)];
        dot += p;
        magnitude += std::fabs(p);
      }
      const double s = scale[c.per_channel ? size_t(n) : 0];
      const double expected = dot * s + (c.bias ? bias_f[size_t(n)] : 0.0);
      const double got = out[size_t(m * c.N + n)];
      if (!(std::fabs(got - expected) <= magnitude * s * 1e-6 + 1e-6) && ++bad <= 5)
        ADD_FAILURE() << "out[" << m << ", " << n << "] = " << got << ", expected " << expected;
    }
  EXPECT_EQ(bad, 0);
}

TEST(W8A16KernelEmulated, MatchesFloat64AtEveryTileShape) {
  const GemmCase cases[] = {
      // Decode tiles (BM 16/32/64, 4 warps), with and without split-K; M and N not tile multiples.
      {9, 19, 64, DType::BF16, true, 0, 132, false},
      {16, 128, 128, DType::F16, true, 1, 132, false},
      {17, 200, 256, DType::BF16, false, 2, 132, true},
      {33, 130, 512, DType::F16, true, 1, 16, false},   // split-K
      {64, 256, 1024, DType::BF16, true, 2, 8, true},   // split-K
      {16, 19, 2048, DType::F16, false, 2, 132, false},  // 16 splits
      // Prefill tiles (BM 128, 8 warps).
      {65, 19, 64, DType::BF16, true, 1, 132, false},
      {130, 150, 256, DType::F16, true, 2, 132, true},
      {128, 128, 512, DType::BF16, false, 1, 8, false},  // split-K
  };
  for (const GemmCase& c : cases) check(c);
}

}  // namespace
}  // namespace llmq
