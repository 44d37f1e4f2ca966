// The W8A16 kernels (kernels/cuda/w8a16_kernel.cuh) run on the CPU through
// tests/emulated/cuda_emulation.h against a float64 reference. The tiled GEMM with w8a16_plan's
// tiles and splits: every tile shape (BM 16/32/64/128), partial tiles in M and N, split-K (a small
// multiprocessor count forces it) summed in order, copies landing late or at once, repeated
// launches bit for bit. The decode stream kernel and the Hopper (wgmma) kernel, each with INT8
// weights and 16-bit x and with FP8 weights and codes: every instantiation, partial tiles, K rounds,
// pipeline depths, K splits.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
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

struct GemmCase {
  int64_t M, N, K;
  DType act;
  bool per_channel;
  int bias;  // 0 none, 1 BF16, 2 F32
  int num_sms;
  bool eager_copies;  // the tiled kernel's cp.async copies land at once (else when waited for)
};

// Random inputs for a case: x rounded to its 16-bit type, INT8 codes over the whole range, scales,
// a bias.
struct Problem {
  std::vector<uint16_t> x;
  std::vector<float> xf;  // x's values
  std::vector<int8_t> w;
  std::vector<float> scale;
  std::vector<uint16_t> bias16;
  std::vector<float> bias_f;  // the bias's values
  cuda::Epilogue e;
};

Problem make_problem(const GemmCase& c) {
  Problem p;
  Rng rng(uint64_t(c.M * 7919 + c.N * 31 + c.K));
  auto uniform = [&] { return float(rng.uniform() * 2.0 - 1.0); };
  p.x.resize(size_t(c.M * c.K));
  p.xf.resize(p.x.size());
  for (size_t i = 0; i < p.x.size(); ++i) p.xf[i] = decode16(p.x[i] = encode16(uniform(), c.act), c.act);
  p.w.resize(size_t(c.N * c.K));
  for (int8_t& q : p.w) q = int8_t(int(rng.next() % 256) - 128);
  p.scale.resize(c.per_channel ? size_t(c.N) : 1);
  for (float& s : p.scale) s = 0.001f + 0.01f * (uniform() + 1.0f);
  p.bias16.resize(size_t(c.N));
  p.bias_f.resize(size_t(c.N));
  for (size_t n = 0; n < p.bias_f.size(); ++n) {
    p.bias16[n] = encode16(uniform(), DType::BF16);
    p.bias_f[n] = c.bias == 1 ? decode16(p.bias16[n], DType::BF16) : uniform();
  }
  p.e = cuda::Epilogue{nullptr, p.scale.data(), c.per_channel,
                       c.bias == 0 ? nullptr : c.bias == 1 ? static_cast<const void*>(p.bias16.data()) : p.bias_f.data(),
                       c.bias == 1 ? DType::BF16 : DType::F32};
  return p;
}

// Every output within 1e-6 of the sum of |products| (fp32 accumulation) of the float64 result.
void expect_float64_result(const GemmCase& c, const Problem& p, const std::vector<float>& out) {
  int64_t bad = 0;
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; ++n) {
      double dot = 0, magnitude = 0;
      for (int64_t k = 0; k < c.K; ++k) {
        const double product = double(p.xf[size_t(m * c.K + k)]) * p.w[size_t(n * c.K + k)];
        dot += product;
        magnitude += std::fabs(product);
      }
      const double s = p.scale[c.per_channel ? size_t(n) : 0];
      const double expected = dot * s + (c.bias ? p.bias_f[size_t(n)] : 0.0);
      const double got = out[size_t(m * c.N + n)];
      if (!(std::fabs(got - expected) <= magnitude * s * 1e-6 + 1e-6) && ++bad <= 5)
        ADD_FAILURE() << "out[" << m << ", " << n << "] = " << got << ", expected " << expected;
    }
  EXPECT_EQ(bad, 0);
}

std::string describe(const GemmCase& c) {
  return fmt::format("M {} N {} K {} {} {} bias {} sms {}{}", c.M, c.N, c.K, dtype_name(c.act),
                     c.per_channel ? "per-channel" : "per-tensor", c.bias, c.num_sms, c.eager_copies ? " eager" : "");
}

// Runs a kernel that may split K (launch(type tag, out, partial, counters) with the case's plan)
// and checks it against float64, with the output poisoned; with splits, a second launch gives the
// same bits and leaves the tile counters at zero.
template <typename Launch>
void check_with_plan(const GemmCase& c, const Problem& p, const cuda::SplitKPlan& plan, Launch&& launch) {
  std::vector<float> partial(size_t(plan.partial_floats) + 1, NAN);
  std::vector<unsigned> counters(size_t(plan.counters) + 1, 0);
  emulation::eager_copies = c.eager_copies;
  auto run = [&] {
    std::vector<float> out(size_t(c.M * c.N), NAN);  // poisoned: every element must be written
    cuda::with_float_type<false>(c.act, "activations",
                                 [&](auto tag) { launch(tag, out.data(), partial.data(), counters.data()); });
    return out;
  };
  const std::vector<float> out = run();
  if (plan.splits > 1) {
    EXPECT_EQ(0, std::memcmp(out.data(), run().data(), out.size() * sizeof(float))) << "a second launch differs";
    for (int64_t i = 0; i < plan.counters; ++i) ASSERT_EQ(counters[size_t(i)], 0u) << "tile counter " << i << " not reset";
  }
  expect_float64_result(c, p, out);
}

void check(const GemmCase& c) {
  SCOPED_TRACE(describe(c));
  const Problem p = make_problem(c);
  ASSERT_TRUE(cuda::w8a16_supported(c.M, c.N, c.K, p.x.data(), p.w.data()));
  const cuda::SplitKPlan plan = cuda::w8a16_plan(c.M, c.N, c.K, c.num_sms);
  check_with_plan(c, p, plan, [&](auto tag, float* out, float* partial, unsigned* counters) {
    using T = typename decltype(tag)::type;
    cuda::w8a16_for_rows<T>(c.M, c.N, plan, [&](auto kernel, dim3 grid, int threads, int smem) {
      emulation::launch(grid, unsigned(threads), size_t(smem), [&] {
        kernel(reinterpret_cast<const T*>(p.x.data()), p.w.data(), int(c.M), int(c.N), int(c.K), plan.k_steps_per_split,
               p.e, out, partial, counters);
      });
    });
  });
}

// The decode stream kernel: the tile shape it was launched with is checked too, so that every
// instantiation runs; a layout other than Whole: blocks of 16 rows above 16.
template <typename T>
void launch_streams(int64_t M, int64_t K, const void* x, const cuda::StreamJob* jobs, int count,
                    int expected_channels_per_block, cuda::StreamLayout layout) {
  cuda::stream_for_rows<T>(M, layout, [&](auto kernel, int row_blocks, int block_channels, int threads, int smem) {
    EXPECT_EQ(block_channels, expected_channels_per_block);
    EXPECT_EQ(int64_t(row_blocks), layout != cuda::StreamLayout::Whole && M > 16 ? (M + 15) / 16 : 1);
    int blocks = 0;
    const cuda::StreamJobs all = cuda::stream_jobs(jobs, count, block_channels, &blocks);
    emulation::launch(dim3(unsigned(row_blocks), unsigned(blocks)), unsigned(threads), size_t(smem),
                      [&] { kernel(static_cast<const T*>(x), all, int(M), int(K)); });
  });
}
template <typename T>
void launch_stream(int64_t M, int64_t N, int64_t K, const void* x, const void* w, const cuda::Epilogue& e,
                   int expected_channels_per_block, cuda::StreamLayout layout, float* out) {
  const cuda::StreamJob job{w, N, e, out};
  launch_streams<T>(M, K, x, &job, 1, expected_channels_per_block, layout);
}

void check_stream(const GemmCase& c, int expected_channels_per_block,
                  cuda::StreamLayout layout = cuda::StreamLayout::Whole) {
  SCOPED_TRACE(describe(c) + " layout " + std::to_string(int(layout)));
  const Problem p = make_problem(c);
  ASSERT_TRUE(cuda::stream_supported(c.act, c.M, c.N, c.K, p.x.data(), p.w.data()));
  std::vector<float> out(size_t(c.M * c.N), NAN);  // poisoned: every element must be written
  cuda::with_float_type<false>(c.act, "activations", [&](auto tag) {
    launch_stream<typename decltype(tag)::type>(c.M, c.N, c.K, p.x.data(), p.w.data(), p.e,
                                                expected_channels_per_block, layout, out.data());
  });
  expect_float64_result(c, p, out);
}

// FP8 linears: E4M3 codes of every finite value for x and the weights, the activations' row
// scales, the weight's scale (per tensor, or per channel as pre-quantized checkpoints have), a bias.
struct Fp8Problem {
  int64_t M, N, K;
  bool per_channel;
  std::vector<uint8_t> x, w;
  std::vector<float> row_scale, w_scale, bias;
  cuda::Epilogue e;
};

Fp8Problem make_fp8_problem(int64_t M, int64_t N, int64_t K, bool per_channel) {
  Fp8Problem p{M, N, K, per_channel, {}, {}, {}, {}, {}, {}};
  Rng rng(uint64_t(M * 31 + N * 7 + K));
  auto code = [&] {  // any E4M3 code but the two NaNs (S.1111.111)
    uint8_t b;
    do b = uint8_t(rng.next() % 256); while ((b & 0x7f) == 0x7f);
    return b;
  };
  p.x.resize(size_t(M * K));
  p.w.resize(size_t(N * K));
  for (uint8_t& b : p.x) b = code();
  for (uint8_t& b : p.w) b = code();
  p.row_scale.resize(size_t(M));
  p.w_scale.resize(per_channel ? size_t(N) : 1);
  p.bias.resize(size_t(N));
  for (float& v : p.row_scale) v = float(0.001 + 0.01 * rng.uniform());
  for (float& v : p.w_scale) v = float(0.001 + 0.01 * rng.uniform());
  for (float& v : p.bias) v = float(rng.uniform() * 2.0 - 1.0);
  p.e = cuda::Epilogue{p.row_scale.data(), p.w_scale.data(), per_channel, p.bias.data(), DType::F32};
  return p;
}

// Every output within 1e-6 of the sum of |products| (times the scales) of the float64 result.
void expect_fp8_result(const Fp8Problem& p, const std::vector<float>& out) {
  int64_t bad = 0;
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = 0; n < p.N; ++n) {
      double dot = 0, magnitude = 0;
      for (int64_t k = 0; k < p.K; ++k) {
        const double product =
            double(cuda::fp8_to_f32(p.x[size_t(m * p.K + k)])) * cuda::fp8_to_f32(p.w[size_t(n * p.K + k)]);
        dot += product;
        magnitude += std::fabs(product);
      }
      const double s = double(p.row_scale[size_t(m)]) * p.w_scale[p.per_channel ? size_t(n) : 0];
      const double expected = dot * s + p.bias[size_t(n)];
      const double got = out[size_t(m * p.N + n)];
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
      {16, 19, 2048, DType::F16, false, 2, 132, false},  // 8 splits, N 19: one element at a time
      {20, 256, 2048, DType::BF16, true, 1, 5, false},   // 5 splits, 16-byte quads: a round of 4 splits and one of 1
      {40, 132, 2048, DType::F16, false, 2, 7, true},    // 7 splits; the second tile 4 channels wide
      // Prefill tiles (BM 128, 8 warps).
      {65, 19, 64, DType::BF16, true, 1, 132, false},
      {130, 150, 256, DType::F16, true, 2, 132, true},
      {128, 128, 512, DType::BF16, false, 1, 8, false},  // split-K
  };
  for (const GemmCase& c : cases) check(c);
}

// The Hopper INT8 kernel's conversion of two codes to two 16-bit values: every pair, exactly.
TEST(W8A16KernelEmulated, CodePairsConvertExactly) {
  for (uint32_t pair = 0; pair < 65536; ++pair) {
    const float c0 = float(int8_t(pair & 0xff)), c1 = float(int8_t(pair >> 8));
    const uint32_t b = cuda::i8x2_to_pair(pair | 0xabcd0000u, cuda::bf16{}), h = cuda::i8x2_to_pair(pair, cuda::f16{});
    ASSERT_EQ(emulation::half_of(b, 0, cuda::bf16{}), c0) << pair;
    ASSERT_EQ(emulation::half_of(b, 1, cuda::bf16{}), c1) << pair;
    ASSERT_EQ(emulation::half_of(h, 0, cuda::f16{}), c0) << pair;
    ASSERT_EQ(emulation::half_of(h, 1, cuda::f16{}), c1) << pair;
  }
}

// The Hopper kernel's launch for T activations (16-bit, or FP8 codes) under `plan` (kCopiers: the
// INT8 form with a copier warpgroup).
template <typename T, bool kCopiers = false>
void launch_wgmma(int64_t M, int64_t N, int64_t K, const void* x, const void* w, const cuda::Epilogue& e,
                  const cuda::SplitKPlan& plan, float* out, float* partial, unsigned* counters) {
  emulation::launch(cuda::wgmma_grid<T, kCopiers>(M, N, plan), unsigned(cuda::wgmma_threads<T, kCopiers>()),
                    cuda::WgmmaTiles<T, kCopiers>::kSmemBytes, [&] {
                      cuda::wgmma_kernel<T, kCopiers>()(static_cast<const T*>(x), static_cast<const uint8_t*>(w),
                                                        int(M), int(N), int(K), plan.k_steps_per_split, e, out,
                                                        partial, counters);
                    });
}

// The Hopper kernel: its wgmma descriptors and swizzled tiles against float64 (the emulation reads
// the operands through the descriptors as the PTX ISA defines them), a dynamic shared memory that
// starts off 1024-byte alignment, and wgmma_plan's K splits (few multiprocessors force them):
// summed in order, repeated launches bit for bit, the tile counters left at zero.
template <bool kCopiers>
void check_wgmma(const GemmCase& c, int expected_splits) {
  SCOPED_TRACE(describe(c) + (kCopiers ? " copiers" : ""));
  const Problem p = make_problem(c);
  ASSERT_TRUE(cuda::wgmma_supported(c.act, c.M, c.N, c.K, p.x.data(), p.w.data()));
  const cuda::SplitKPlan plan = cuda::wgmma_plan(c.act, kCopiers, c.M, c.N, c.K, c.num_sms);
  EXPECT_EQ(plan.splits, expected_splits);
  check_with_plan(c, p, plan, [&](auto tag, float* out, float* partial, unsigned* counters) {
    launch_wgmma<typename decltype(tag)::type, kCopiers>(c.M, c.N, c.K, p.x.data(), p.w.data(), p.e, plan, out,
                                                          partial, counters);
  });
}

// The INT8 form (weights as A from registers, 256-token tiles), and with a copier warpgroup
// (mbarriers, 128-token tiles): partial tiles in M (in either 128-token half) and N, one K step, even
// and odd numbers of steps (the two fragment buffers), more steps than pipeline stages (the stages'
// later rounds), both activation types, copies landing late or at once, K split 2, 3 and 5 ways
// (uneven: 25 steps in splits of 9).
TEST(W8A16KernelEmulated, WgmmaKernelMatchesFloat64) {
  struct WgmmaCase {
    GemmCase c;
    int splits;
  };
  const WgmmaCase cases[] = {
      {{1, 19, 64, DType::BF16, true, 0, 132, false}, 1},
      {{65, 128, 128, DType::F16, true, 1, 132, false}, 1},
      {{130, 150, 448, DType::BF16, false, 2, 132, true}, 1},
      {{300, 260, 448, DType::F16, true, 1, 6, false}, 1},  // 6 tiles: one wave already
      {{256, 64, 128, DType::BF16, true, 0, 132, true}, 1},
      {{100, 200, 1024, DType::BF16, true, 2, 4, false}, 2},
      {{64, 130, 1600, DType::F16, false, 1, 6, true}, 3},
      {{100, 200, 3200, DType::BF16, true, 1, 10, false}, 5},  // 16-byte quads, a round of 4 splits and one of 1
  };
  for (const WgmmaCase& w : cases) {
    check_wgmma<false>(w.c, w.splits);
    check_wgmma<true>(w.c, w.splits);
  }
}

// The same kernel with FP8 weights and FP8 activation codes (the FP8 linear): K steps of 128
// codes, split 1 and 2 ways.
TEST(W8A16KernelEmulated, WgmmaKernelFp8MatchesFloat64) {
  struct Fp8Case {
    int64_t M, N, K;
    bool per_channel;
    int num_sms, splits;
  };
  for (const Fp8Case& c : {Fp8Case{1, 19, 128, false, 132, 1}, Fp8Case{130, 150, 640, true, 132, 1},
                           Fp8Case{64, 70, 2048, false, 2, 2}}) {
    SCOPED_TRACE(testing::Message() << "M " << c.M << " N " << c.N << " K " << c.K << " sms " << c.num_sms);
    const Fp8Problem p = make_fp8_problem(c.M, c.N, c.K, c.per_channel);
    ASSERT_TRUE(cuda::wgmma_supported(DType::F8_E4M3, c.M, c.N, c.K, p.x.data(), p.w.data()));
    const cuda::SplitKPlan plan = cuda::wgmma_plan(DType::F8_E4M3, false, c.M, c.N, c.K, c.num_sms);
    EXPECT_EQ(plan.splits, c.splits);
    std::vector<float> partial(size_t(plan.partial_floats) + 1, NAN), out(size_t(c.M * c.N), NAN);
    std::vector<unsigned> counters(size_t(plan.counters) + 1, 0);
    launch_wgmma<cuda::fp8>(c.M, c.N, c.K, p.x.data(), p.w.data(), p.e, plan, out.data(), partial.data(),
                            counters.data());
    expect_fp8_result(p, out);
  }
}

// The stream kernel with FP8 weights and codes (mma m16n8k32 E4M3): every instantiation, partial
// tiles, more than one round of loads per warp, and the 16-row layouts (each block's row scales).
TEST(W8A16KernelEmulated, StreamKernelFp8MatchesFloat64) {
  struct Fp8Case {
    int64_t M, N, K;
    bool per_channel;
    int channels_per_block;
    cuda::StreamLayout layout;
  };
  using L = cuda::StreamLayout;
  for (const Fp8Case& c : {Fp8Case{1, 19, 64, false, 16, L::Whole}, Fp8Case{3, 19, 4160, true, 16, L::Whole},
                           Fp8Case{9, 40, 2560, true, 16, L::Whole},
                           Fp8Case{17, 33, 192, false, 16, L::Whole}, Fp8Case{64, 70, 1280, true, 32, L::Whole},
                           Fp8Case{40, 33, 1280, true, 16, L::Rows16}, Fp8Case{40, 150, 1280, true, 128, L::Wide}}) {
    SCOPED_TRACE(testing::Message() << "M " << c.M << " N " << c.N << " K " << c.K);
    const Fp8Problem p = make_fp8_problem(c.M, c.N, c.K, c.per_channel);
    ASSERT_TRUE(cuda::stream_supported(DType::F8_E4M3, c.M, c.N, c.K, p.x.data(), p.w.data()));
    std::vector<float> out(size_t(c.M * c.N), NAN);
    launch_stream<cuda::fp8>(c.M, c.N, c.K, p.x.data(), p.w.data(), p.e, c.channels_per_block, c.layout, out.data());
    expect_fp8_result(p, out);
  }
}

// Every instantiation (1, 2, 4 tiles of 8 tokens with 16 channels a block; 8 with 32), rows and
// channels that fill no tile; K of 1 step (only warp 0 has work), of a partial round of the 8
// warps, and of more than one round of loads in flight per warp (up to 8 rows, 8 steps a warp:
// 4160 is 65 steps against 8 x 8; 2560 with 9-16 rows: 40 steps against 8 x 4; 1280 with 32
// channels: 20 steps against 8 x 2).
TEST(W8A16KernelEmulated, StreamKernelMatchesFloat64) {
  struct StreamCase {
    GemmCase c;
    int channels_per_block;
  };
  const StreamCase cases[] = {
      {{1, 19, 64, DType::BF16, true, 0, 0, false}, 16},
      {{3, 40, 640, DType::F16, true, 1, 0, false}, 16},
      {{8, 16, 2560, DType::BF16, false, 2, 0, false}, 16},
      {{5, 19, 4160, DType::F16, true, 1, 0, false}, 16},
      {{9, 33, 128, DType::F16, true, 2, 0, false}, 16},
      {{16, 20, 2560, DType::BF16, true, 1, 0, false}, 16},
      {{17, 70, 192, DType::BF16, true, 0, 0, false}, 16},
      {{32, 70, 1280, DType::F16, false, 1, 0, false}, 16},
      {{33, 19, 256, DType::BF16, true, 2, 0, false}, 32},
      {{64, 40, 1280, DType::F16, true, 1, 0, false}, 32},
      {{64, 70, 64, DType::BF16, false, 2, 0, false}, 32},
  };
  for (const StreamCase& s : cases) check_stream(s.c, s.channels_per_block);
  // In blocks of 16 rows: a last block of 1, of 15, and full ones; and 128 channels a block (the
  // warps over all of K, more than one round of loads each), N past a block, K of one step.
  using L = cuda::StreamLayout;
  check_stream({17, 70, 192, DType::BF16, true, 0, 0, false}, 16, L::Rows16);
  check_stream({47, 19, 1280, DType::F16, false, 2, 0, false}, 16, L::Rows16);
  check_stream({64, 40, 640, DType::BF16, true, 1, 0, false}, 16, L::Rows16);
  check_stream({17, 150, 640, DType::BF16, true, 2, 0, false}, 128, L::Wide);
  check_stream({47, 300, 128, DType::F16, false, 1, 0, false}, 128, L::Wide);
  check_stream({64, 129, 64, DType::BF16, true, 0, 0, false}, 128, L::Wide);
}

// Linears of one input in one stream launch (q/k/v, gate/up of a decode step): each output equals
// its own launch's bits (and so float64 within tolerance), blocks of every job written, at 1-8 and
// 9-16 rows (two instantiations). INT8 with 16-bit x, three jobs of other widths, scales and
// biases; FP8 codes, two jobs sharing row scales.
TEST(W8A16KernelEmulated, StreamKernelRunsLinearsOfOneInputTogether) {
  using L = cuda::StreamLayout;
  for (const int64_t M : {1, 5, 8, 12}) {
    SCOPED_TRACE(testing::Message() << "M " << M);
    const GemmCase cases[] = {{M, 19, 640, DType::BF16, true, 1, 0, false},
                              {M, 40, 640, DType::BF16, false, 0, 0, false},
                              {M, 33, 640, DType::BF16, true, 2, 0, false}};
    std::vector<Problem> problems;
    for (const GemmCase& c : cases) {
      problems.push_back(make_problem(c));
      problems.back().x = problems[0].x;  // one input
      problems.back().xf = problems[0].xf;
    }
    std::vector<std::vector<float>> together(3), alone(3);
    cuda::StreamJob jobs[3];
    for (size_t j = 0; j < 3; ++j) {
      together[j].assign(size_t(M * cases[j].N), NAN);
      alone[j].assign(together[j].size(), NAN);
      jobs[j] = cuda::StreamJob{problems[j].w.data(), cases[j].N, problems[j].e, together[j].data()};
      launch_stream<cuda::bf16>(M, cases[j].N, 640, problems[0].x.data(), problems[j].w.data(), problems[j].e, 16,
                                L::Whole, alone[j].data());
    }
    launch_streams<cuda::bf16>(M, 640, problems[0].x.data(), jobs, 3, 16, L::Whole);
    for (size_t j = 0; j < 3; ++j) {
      SCOPED_TRACE(testing::Message() << "job " << j);
      expect_float64_result(cases[j], problems[j], together[j]);
      EXPECT_EQ(0, std::memcmp(together[j].data(), alone[j].data(), alone[j].size() * sizeof(float)));
    }

    Fp8Problem gate = make_fp8_problem(M, 40, 4160, true), up = make_fp8_problem(M, 19, 4160, false);
    up.x = gate.x;
    up.row_scale = gate.row_scale;
    up.e.row_scale = up.row_scale.data();
    std::vector<float> gate_out(size_t(M * 40), NAN), up_out(size_t(M * 19), NAN);
    const cuda::StreamJob fp8_jobs[2] = {{gate.w.data(), 40, gate.e, gate_out.data()},
                                         {up.w.data(), 19, up.e, up_out.data()}};
    launch_streams<cuda::fp8>(M, 4160, gate.x.data(), fp8_jobs, 2, 16, L::Whole);
    expect_fp8_result(gate, gate_out);
    expect_fp8_result(up, up_out);
  }
}

}  // namespace
}  // namespace llmq
