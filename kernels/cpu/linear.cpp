#include "kernels/cpu/linear.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/fp8.h"

namespace llmq::cpu {

namespace {

constexpr int64_t kMBlock = 32;  // activation rows that share one pass over the weights

// Element k of a weight row, as fp32 (exact).
struct F32Row {
  const float* p;
  float at(int64_t k) const { return p[k]; }
};
struct Bf16Row {
  const uint16_t* p;
  float at(int64_t k) const { return bf16_to_f32(p[k]); }
};
struct F16Row {
  const uint16_t* p;
  float at(int64_t k) const { return f16_to_f32(p[k]); }
};
struct I8Row {
  const int8_t* p;
  float at(int64_t k) const { return float(p[k]); }
};
struct Fp8Row {
  const uint8_t* p;
  float at(int64_t k) const { return fp8_e4m3_table()[p[k]]; }
};

// ---- Portable scalar version: the same lanes and the same order as the AVX2 one. ----

template <typename Row>
float dot_scalar(const float* x, Row w, int64_t K) {
  float acc[8][8] = {};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int i = 0; i < 8; ++i)
      for (int l = 0; l < 8; ++l) acc[i][l] = std::fma(x[k + 8 * i + l], w.at(k + 8 * i + l), acc[i][l]);
  for (int i = 0; k + 8 <= K; k += 8, ++i)
    for (int l = 0; l < 8; ++l) acc[i][l] = std::fma(x[k + l], w.at(k + l), acc[i][l]);
  float v[8], t4[4];
  for (int l = 0; l < 8; ++l)
    v[l] = ((acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l])) + ((acc[4][l] + acc[5][l]) + (acc[6][l] + acc[7][l]));
  for (int l = 0; l < 4; ++l) t4[l] = v[l] + v[l + 4];
  float sum = (t4[0] + t4[2]) + (t4[1] + t4[3]);
  for (; k < K; ++k) sum = std::fma(x[k], w.at(k), sum);
  return sum;
}

// ---- AVX2 + FMA + F16C ----

#define LLMQ_AVX2 __attribute__((target("avx2,fma,f16c")))

LLMQ_AVX2 inline __m256 load8(F32Row w, int64_t k) { return _mm256_loadu_ps(w.p + k); }
LLMQ_AVX2 inline __m256 load8(Bf16Row w, int64_t k) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.p + k)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
LLMQ_AVX2 inline __m256 load8(F16Row w, int64_t k) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.p + k)));
}
LLMQ_AVX2 inline __m256 load8(I8Row w, int64_t k) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.p + k))));
}
LLMQ_AVX2 inline __m256 load8(Fp8Row w, int64_t k) {
  __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.p + k)));
  return _mm256_i32gather_ps(fp8_e4m3_table(), codes, 4);
}

template <typename Row>
LLMQ_AVX2 float dot_avx2(const float* x, Row w, int64_t K) {
  __m256 a[8];
  for (auto& acc : a) acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * i), load8(w, k + 8 * i), a[i]);
  for (int i = 0; k + 8 <= K; k += 8, ++i) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w, k), a[i]);
  __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                           _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
  __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  float sum = _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
  for (; k < K; ++k) sum = std::fma(x[k], w.at(k), sum);
  return sum;
}

template <bool kAvx2, typename Row>
float dot(const float* x, Row w, int64_t K) {
  if constexpr (kAvx2) return dot_avx2(x, w, K);
  return dot_scalar(x, w, K);
}

template <bool kAvx2, typename Row, typename Elem>
void linear_rows_typed(const float* x, int64_t M, int64_t K, const Elem* w, int64_t N, int64_t n_begin,
                       int64_t n_end, float* out) {
  constexpr bool kConverts = !std::is_same<Row, F32Row>::value;
  if (!kConverts || M <= 4) {
    // Decode: each weight row streams from memory once per block of activation rows and is
    // converted in registers; the rows after the first hit the cache.
    for (int64_t m0 = 0; m0 < M; m0 += kMBlock)
      for (int64_t n = n_begin; n < n_end; ++n)
        for (int64_t m = m0; m < std::min(M, m0 + kMBlock); ++m) out[m * N + n] = dot<kAvx2>(x + m * K, Row{w + n * K}, K);
    return;
  }
  // Prefill: convert each weight row to fp32 once per block of activation rows. The conversion is
  // exact, so the results equal the in-register path bit for bit.
  thread_local std::vector<float> converted;
  converted.resize(size_t(K));
  for (int64_t m0 = 0; m0 < M; m0 += kMBlock)
    for (int64_t n = n_begin; n < n_end; ++n) {
      Row row{w + n * K};
      for (int64_t k = 0; k < K; ++k) converted[size_t(k)] = row.at(k);
      for (int64_t m = m0; m < std::min(M, m0 + kMBlock); ++m)
        out[m * N + n] = dot<kAvx2>(x + m * K, F32Row{converted.data()}, K);
    }
}

template <bool kAvx2>
void linear_rows_dispatch(const float* x, int64_t M, int64_t K, const void* w, DType w_dtype, int64_t N,
                          int64_t n_begin, int64_t n_end, float* out) {
  switch (w_dtype) {
    case DType::F32:
      linear_rows_typed<kAvx2, F32Row>(x, M, K, static_cast<const float*>(w), N, n_begin, n_end, out);
      break;
    case DType::BF16:
      linear_rows_typed<kAvx2, Bf16Row>(x, M, K, static_cast<const uint16_t*>(w), N, n_begin, n_end, out);
      break;
    case DType::F16:
      linear_rows_typed<kAvx2, F16Row>(x, M, K, static_cast<const uint16_t*>(w), N, n_begin, n_end, out);
      break;
    case DType::I8:
      linear_rows_typed<kAvx2, I8Row>(x, M, K, static_cast<const int8_t*>(w), N, n_begin, n_end, out);
      break;
    case DType::F8_E4M3:
      linear_rows_typed<kAvx2, Fp8Row>(x, M, K, static_cast<const uint8_t*>(w), N, n_begin, n_end, out);
      break;
    default:
      break;  // callers check the dtype
  }
}

bool detect_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace

bool linear_uses_avx2() {
  static const bool avx2 = detect_avx2();
  return avx2;
}

void linear_rows(const float* x, int64_t M, int64_t K, const void* w, DType w_dtype, int64_t N, int64_t n_begin,
                 int64_t n_end, float* out) {
  if (linear_uses_avx2())
    linear_rows_dispatch<true>(x, M, K, w, w_dtype, N, n_begin, n_end, out);
  else
    linear_rows_dispatch<false>(x, M, K, w, w_dtype, N, n_begin, n_end, out);
}

}  // namespace llmq::cpu
