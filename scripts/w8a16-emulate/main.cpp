// Runs the W8A16 kernel through emu.h on shapes that reach every tile configuration, partial tiles,
// split-K (a small multiprocessor count forces it) and repeated launches; compares with float64.
#include "emu.h"
template <class... A> cudaError_t emu_noop(A...) { return cudaSuccess; }
#include "gen/kernels/cuda/w8a16_gemm.cpp"

#include <cmath>
#include <cstdio>
#include <random>

using namespace llmq;
using namespace llmq::cuda;

static uint16_t to16(float v, DType d) {
  if (d == DType::BF16) { __nv_bfloat16 b = __float2bfloat16_rn(v); uint16_t u; std::memcpy(&u, &b, 2); return u; }
  __half h = __float2half_rn(v); uint16_t u; std::memcpy(&u, &h, 2); return u;
}
static float from16(uint16_t u, DType d) {
  if (d == DType::BF16) return __uint_as_float(uint32_t(u) << 16);
  return __half2float(__ushort_as_half(u));
}

int failures = 0;
void run(int64_t M, int64_t N, int64_t K, DType act, bool per_channel, int bias_kind, int num_sms, bool eager, int reps = 1) {
  std::mt19937_64 rng(M * 7919 + N * 31 + K);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<uint16_t> x(M * K);
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) { x[i] = to16(u(rng), act); xf[i] = from16(x[i], act); }
  std::vector<int8_t> w(N * K);
  for (auto& q : w) q = int8_t(int(rng() % 256) - 128);
  std::vector<float> scale(per_channel ? N : 1);
  for (auto& s : scale) s = 0.001f + 0.01f * (u(rng) + 1);
  std::vector<float> bias_f(N);
  std::vector<uint16_t> bias16(N);
  for (int64_t n = 0; n < N; ++n) { bias16[n] = to16(u(rng), DType::BF16); bias_f[n] = bias_kind == 1 ? from16(bias16[n], DType::BF16) : u(rng); }
  const void* bias = bias_kind == 0 ? nullptr : bias_kind == 1 ? (const void*)bias16.data() : (const void*)bias_f.data();
  const DType bias_dtype = bias_kind == 1 ? DType::BF16 : DType::F32;
  emu_eager = eager;
  if (!w8a16_supported(M, N, K, x.data(), w.data())) { std::printf("unsupported?\n"); ++failures; return; }
  W8A16Plan plan = w8a16_plan(M, N, K, num_sms);
  std::vector<float> partial(plan.partial_floats + 1, NAN);
  std::vector<unsigned> counters(plan.counters + 1, 0);
  std::vector<float> out(M * N, NAN), first;
  for (int r = 0; r < reps; ++r) {
    std::fill(out.begin(), out.end(), NAN);
    w8a16_gemm(x.data(), act, w.data(), M, N, K, scale.data(), per_channel, bias, bias_dtype, out.data(), plan,
               partial.data(), counters.data(), nullptr);
    if (r == 0) first = out;
    else if (std::memcmp(first.data(), out.data(), out.size() * 4)) { std::printf("  repeat differs\n"); ++failures; }
  }
  for (int64_t i = 0; i < plan.counters; ++i) if (counters[i]) { std::printf("  counter %ld left %u\n", (long)i, counters[i]); ++failures; break; }
  double worst = 0;
  int64_t bad = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double dot = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) { dot += double(xf[m * K + k]) * w[n * K + k]; mag += std::fabs(double(xf[m * K + k]) * w[n * K + k]); }
      const float s = scale[per_channel ? n : 0];
      const double ref = dot * s + (bias ? bias_f[n] : 0.0);
      const double err = std::fabs(double(out[m * N + n]) - ref) / (mag * s * 1e-6 + 1e-6);
      if (!(err <= 1.0)) ++bad;
      if (!(err <= worst)) worst = err;
    }
  std::printf("M=%ld N=%ld K=%ld %s %s bias=%d sms=%d splits=%d %s: %s (worst %.3g of tolerance, %ld bad)\n", (long)M, (long)N,
              (long)K, act == DType::BF16 ? "bf16" : "f16", per_channel ? "per-channel" : "per-tensor", bias_kind, num_sms,
              plan.splits, eager ? "eager" : "deferred", bad ? "FAIL" : "ok", worst, (long)bad);
  if (bad) ++failures;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1;
  // Small tiles (BM 16/32/64), with and without split-K, N and M not tile multiples.
  run(9, 19, 64, DType::BF16, true, 0, 132, false);
  run(16, 128, 128, DType::F16, true, 1, 132, false);
  run(17, 200, 256, DType::BF16, false, 2, 132, true);
  run(33, 130, 512, DType::F16, true, 1, 16, false, 2);     // split-K, twice
  run(64, 256, 1024, DType::BF16, true, 2, 8, true, 2);
  run(40, 64, 512, DType::BF16, true, 0, 132, false);
  // Prefill tiles (BM 128, 8 warps).
  run(65, 19, 64, DType::BF16, true, 1, 132, false);
  run(130, 150, 256, DType::F16, true, 2, 132, true);
  run(128, 128, 512, DType::BF16, false, 1, 8, false, 2);   // split-K
  run(16, 19, 2048, DType::F16, false, 2, 132, false, 2);   // 16 splits, N < 8 columns past a tile
  run(100, 256, 1024, DType::BF16, true, 1, 16, true, 2);   // prefill tiles, 4 splits
  if (!quick) {
    run(257, 260, 320, DType::BF16, true, 1, 132, false);
    run(200, 384, 1024, DType::F16, true, 0, 4, false);
  }
  std::printf("%s\n", failures ? "FAILED" : "ALL OK");
  return failures != 0;
}
