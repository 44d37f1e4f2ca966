#include "kernels/cpu/linear.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace llmq::cpu {

namespace {

constexpr int kTileRows = 4;     // weight rows computed together (they share the x loads)
constexpr int64_t kMBlock = 32;  // activation rows per pass, to keep them in cache

inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const uint16_t* p, DType dtype) {
  return dtype == DType::BF16 ? bf16_to_f32(*p) : f16_to_f32(*p);
}

// ---- Portable scalar version: the same lanes and the same order as the AVX2 one. ----

template <typename Load>
void dot_tile_scalar(const float* x, int64_t K, int rows, Load load_w, float* out) {
  for (int r = 0; r < rows; ++r) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      for (int lane = 0; lane < 16; ++lane) acc[lane] = std::fma(x[k + lane], load_w(r, k + lane), acc[lane]);
    float v[8], t4[4];
    for (int i = 0; i < 8; ++i) v[i] = acc[i] + acc[i + 8];
    for (int i = 0; i < 4; ++i) t4[i] = v[i] + v[i + 4];
    float sum = (t4[0] + t4[2]) + (t4[1] + t4[3]);
    for (; k < K; ++k) sum = std::fma(x[k], load_w(r, k), sum);
    out[r] = sum;
  }
}

void linear_rows_scalar(const float* x, int64_t M, int64_t K, const void* w, DType w_dtype, int64_t N,
                        int64_t n_begin, int64_t n_end, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n_begin; n < n_end; n += kTileRows) {
      int rows = int(std::min<int64_t>(kTileRows, n_end - n));
      float tile[kTileRows];
      if (w_dtype == DType::F32) {
        const float* wf = static_cast<const float*>(w) + n * K;
        dot_tile_scalar(x + m * K, K, rows, [&](int r, int64_t k) { return wf[r * K + k]; }, tile);
      } else {
        const uint16_t* wh = static_cast<const uint16_t*>(w) + n * K;
        dot_tile_scalar(x + m * K, K, rows, [&](int r, int64_t k) { return load_scalar(wh + r * K + k, w_dtype); },
                        tile);
      }
      std::memcpy(out + m * N + n, tile, sizeof(float) * rows);
    }
  }
}

// ---- AVX2 + FMA + F16C ----

#define LLMQ_AVX2 __attribute__((target("avx2,fma,f16c")))

LLMQ_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LLMQ_AVX2 inline __m256 load8_bf16(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
LLMQ_AVX2 inline __m256 load8_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

struct F32Rows {
  const float* base;
  LLMQ_AVX2 __m256 load(int64_t offset) const { return load8(base + offset); }
  float scalar(int64_t offset) const { return base[offset]; }
};
struct Bf16Rows {
  const uint16_t* base;
  LLMQ_AVX2 __m256 load(int64_t offset) const { return load8_bf16(base + offset); }
  float scalar(int64_t offset) const { return bf16_to_f32(base[offset]); }
};
struct F16Rows {
  const uint16_t* base;
  LLMQ_AVX2 __m256 load(int64_t offset) const { return load8_f16(base + offset); }
  float scalar(int64_t offset) const { return f16_to_f32(base[offset]); }
};

LLMQ_AVX2 inline float reduce(__m256 a0, __m256 a1) {
  __m256 v = _mm256_add_ps(a0, a1);
  __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  return _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
}

// ROWS weight rows (row r starts at w.base + r * K) against one activation row.
template <int ROWS, typename W>
LLMQ_AVX2 inline void dot_tile(const float* x, int64_t K, const W& w, float* out) {
  __m256 a0[ROWS], a1[ROWS];
  for (int r = 0; r < ROWS; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 x0 = load8(x + k), x1 = load8(x + k + 8);
    for (int r = 0; r < ROWS; ++r) {
      a0[r] = _mm256_fmadd_ps(x0, w.load(r * K + k), a0[r]);
      a1[r] = _mm256_fmadd_ps(x1, w.load(r * K + k + 8), a1[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    float sum = reduce(a0[r], a1[r]);
    for (int64_t t = k; t < K; ++t) sum = std::fma(x[t], w.scalar(r * K + t), sum);
    out[r] = sum;
  }
}

template <typename W>
LLMQ_AVX2 void tile_all_m(const float* x, int64_t m_begin, int64_t m_end, int64_t K, const W& w, int rows, int64_t N,
                          int64_t n, float* out) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    float* o = out + m * N + n;
    if (rows == kTileRows) {
      dot_tile<kTileRows>(x + m * K, K, w, o);
    } else {
      for (int r = 0; r < rows; ++r) dot_tile<1>(x + m * K, K, W{w.base + r * K}, o + r);
    }
  }
}

template <typename W, typename Elem>
LLMQ_AVX2 void linear_rows_avx2(const float* x, int64_t M, int64_t K, const Elem* w, int64_t N, int64_t n_begin,
                                int64_t n_end, float* out) {
  constexpr bool kConverts = !std::is_same<W, F32Rows>::value;
  if (M <= kTileRows || !kConverts) {
    // Decode: stream the weights once, converting in registers.
    for (int64_t m0 = 0; m0 < M; m0 += kMBlock)
      for (int64_t n = n_begin; n < n_end; n += kTileRows)
        tile_all_m(x, m0, std::min(M, m0 + kMBlock), K, W{w + n * K},
                   int(std::min<int64_t>(kTileRows, n_end - n)), N, n, out);
    return;
  }
  // Prefill: convert each weight tile to fp32 once and reuse it for a block of activation rows.
  // The conversion is exact, so the results equal the in-register path bit for bit.
  thread_local std::vector<float> converted;
  converted.resize(size_t(kTileRows) * size_t(K));
  for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
    for (int64_t n = n_begin; n < n_end; n += kTileRows) {
      int rows = int(std::min<int64_t>(kTileRows, n_end - n));
      W src{w + n * K};
      for (int64_t i = 0; i < rows * K; ++i) converted[size_t(i)] = src.scalar(i);
      tile_all_m(x, m0, std::min(M, m0 + kMBlock), K, F32Rows{converted.data()}, rows, N, n, out);
    }
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
  if (!linear_uses_avx2()) {
    linear_rows_scalar(x, M, K, w, w_dtype, N, n_begin, n_end, out);
    return;
  }
  switch (w_dtype) {
    case DType::F32:
      linear_rows_avx2<F32Rows>(x, M, K, static_cast<const float*>(w), N, n_begin, n_end, out);
      break;
    case DType::BF16:
      linear_rows_avx2<Bf16Rows>(x, M, K, static_cast<const uint16_t*>(w), N, n_begin, n_end, out);
      break;
    case DType::F16:
      linear_rows_avx2<F16Rows>(x, M, K, static_cast<const uint16_t*>(w), N, n_begin, n_end, out);
      break;
    default:
      break;  // callers check the dtype
  }
}

}  // namespace llmq::cpu
