// FP8 E4M3 conversions (engine/fp8.h): against a float64 reference written from the OCP spec, and,
// when the CUDA toolkit's headers are reachable, bit for bit against cuda_fp8.h's host functions.
#include "engine/fp8.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "engine/dtype.h"
#include "engine/rng.h"

#if defined(__has_include)
#if __has_include(<cuda_fp8.h>)
#include <cuda_fp8.h>
#define LLMQ_TEST_CUDA_FP8 1
#endif
#endif

namespace llmq {
namespace {

// The OCP spec formula: sign * 2^(e-7) * (1 + m/8), subnormals sign * 2^-6 * m/8, 0x7f/0xff NaN.
double spec_value(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  if ((v & 0x7f) == 0x7f) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return (v & 0x80) ? -magnitude : magnitude;
}

// The reference encoder: the nearest of the 127 non-negative finite values (all differences are
// exact in double for float inputs), ties to the even code, |x| >= 448 saturating to 448 (the
// would-be next value 480 has the odd code 0x7f, so even the tie at 464 goes to 448); NaN -> 0x7f.
uint8_t reference_fp8(double x) {
  static const std::vector<double> values = [] {
    std::vector<double> v(0x7f);
    for (int c = 0; c < 0x7f; ++c) v[c] = spec_value(uint8_t(c));
    return v;
  }();
  if (std::isnan(x)) return 0x7f;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  const double a = std::fabs(x);
  if (a >= 448.0) return sign | 0x7e;
  int lo = 0, hi = 0x7e;  // values[lo] <= a < values[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    (values[mid] <= a ? lo : hi) = mid;
  }
  const double below = a - values[lo], above = values[hi] - a;
  const int code = below < above ? lo : above < below ? hi : (lo % 2 == 0 ? lo : hi);
  return uint8_t(sign | code);
}

// Counts a wrong code for `input`, reporting the first few.
void count_mismatch(int64_t& bad, const char* what, uint32_t input, int got, int want) {
  if (got != want && ++bad <= 5)
    ADD_FAILURE() << std::hex << what << " 0x" << input << " -> 0x" << got << ", expected 0x" << want;
}

// Floats at and around every place where the rounding or the special-casing changes.
std::vector<float> edge_values() {
  std::vector<float> v = {0.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(),
                          f32_from_bits(0x007fffffu), f32_from_bits(0x00400000u), f32_from_bits(0x00000003u),
                          // saturation: max, the midpoint to the would-be 480, 480, and beyond
                          448.0f, 464.0f, 480.0f, 512.0f, 1e6f, 0x1p-6f, 0x1p-9f, 0x1p-10f, 0x1p-11f, 0x1p-20f};
  // Every fp8 value and every midpoint between neighbours (0x7e..0x7f: 448..480, midpoint 464).
  for (int c = 0; c < 0x7f; ++c) {
    const double lo = spec_value(uint8_t(c)), hi = c < 0x7e ? spec_value(uint8_t(c + 1)) : 480.0;
    v.push_back(float(lo));
    v.push_back(float((lo + hi) / 2));  // exact: fp8 values are short
  }
  const size_t n = v.size();
  for (size_t i = 0; i < n; ++i) {  // the neighbouring floats on both sides
    v.push_back(std::nextafter(v[i], 0.0f));
    v.push_back(std::nextafter(v[i], std::numeric_limits<float>::infinity()));
  }
  for (size_t i = 0, m = v.size(); i < m; ++i) v.push_back(-v[i]);
  for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0xffffffffu, 0x7fa00000u})
    v.push_back(f32_from_bits(nan));
  return v;
}

// The CUDA toolkit's host implementations, when its headers are reachable.
#ifdef LLMQ_TEST_CUDA_FP8
constexpr bool kHaveCudaFp8 = true;
uint8_t cuda_from_f32(float x) { return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3); }
uint8_t cuda_from_f16(uint16_t h) {
  __half_raw r;
  r.x = h;
  return __nv_cvt_halfraw_to_fp8(r, __NV_SATFINITE, __NV_E4M3);
}
uint8_t cuda_from_bf16(uint16_t b) {
  __nv_bfloat16_raw r;
  r.x = b;
  return __nv_cvt_bfloat16raw_to_fp8(r, __NV_SATFINITE, __NV_E4M3);
}
uint16_t cuda_to_f16(uint8_t v) { return __nv_cvt_fp8_to_halfraw(v, __NV_E4M3).x; }
float cuda_to_f32(uint8_t v) {
  __nv_fp8_e4m3 f;
  f.__x = v;
  return float(f);
}
#else
constexpr bool kHaveCudaFp8 = false;
uint8_t cuda_from_f32(float) { return 0; }
uint8_t cuda_from_f16(uint16_t) { return 0; }
uint8_t cuda_from_bf16(uint16_t) { return 0; }
uint16_t cuda_to_f16(uint8_t) { return 0; }
float cuda_to_f32(uint8_t) { return 0; }
#endif

#define SKIP_WITHOUT_CUDA_FP8()                                                                        \
  if (!kHaveCudaFp8)                                                                                   \
  GTEST_SKIP() << "cuda_fp8.h not found (no CUDA toolkit at /usr/local/cuda): the bit-exact comparison " \
                  "with CUDA's conversions is skipped; the spec-reference tests still run"

// 10^7 of each kind of random float: ~0.3 s in Release, ~1.5 s under ASan/UBSan (Debug).
constexpr int64_t kRandomCount = 10000000;

// ---- Toolkit-independent ------------------------------------------------------------------------

TEST(Fp8E4M3, EveryCodeDecodesToTheSpecValue) {
  const float* table = fp8_e4m3_table();
  for (int c = 0; c < 256; ++c) {
    const uint8_t v = uint8_t(c);
    const double want = spec_value(v);
    const float f = fp8_e4m3_to_f32(v);
    const uint16_t h = fp8_e4m3_to_f16(v);
    EXPECT_EQ(f32_bits(table[c]), f32_bits(f)) << "code " << c;
    if (std::isnan(want)) {  // NaN decodes to a positive, all-ones NaN (as CUDA does)
      EXPECT_EQ(f32_bits(f), 0x7fffffffu) << "code " << c;
      EXPECT_EQ(h, 0x7fff) << "code " << c;
      continue;
    }
    EXPECT_EQ(double(f), want) << "code " << c;
    EXPECT_EQ(std::signbit(f), (c & 0x80) != 0) << "code " << c;
    EXPECT_EQ(f32_bits(f16_to_f32(h)), f32_bits(f)) << "code " << c;
    EXPECT_EQ(f32_to_fp8_e4m3(f), v) << "code " << c;  // every value encodes back to itself
    EXPECT_EQ(f16_to_fp8_e4m3(h), v) << "code " << c;
  }
  EXPECT_EQ(fp8_e4m3_to_f32(0x7e), kFp8E4M3Max);
  EXPECT_EQ(kFp8E4M3Max, 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0xfe), -448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), 0x1p-9f);  // smallest subnormal
  EXPECT_EQ(fp8_e4m3_to_f32(0x08), 0x1p-6f);  // smallest normal
  float largest = 0;
  for (int c = 0; c < 256; ++c)
    if (!std::isnan(table[c])) largest = std::max(largest, table[c]);
  EXPECT_EQ(largest, 448.0f);
}

TEST(Fp8E4M3, SpecialValuesSaturateAndNaNIsCanonical) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_fp8_e4m3(inf), 0x7e);  // SATFINITE: infinities saturate, not NaN
  EXPECT_EQ(f32_to_fp8_e4m3(-inf), 0xfe);
  EXPECT_EQ(f32_to_fp8_e4m3(448.0f), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(464.0f), 0x7e);  // tie between 448 (even) and would-be 480
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(464.0f, inf)), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(480.0f), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(-1e30f), 0xfe);
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(448.0f, 0.0f)), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(432.0f), 0x7e);                        // 416..448 midpoint: to even 448
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(432.0f, 0.0f)), 0x7d);  // 416
  for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xffffffffu})  // every NaN: 0x7f, no sign
    EXPECT_EQ(f32_to_fp8_e4m3(f32_from_bits(nan)), 0x7f) << std::hex << nan;
  EXPECT_EQ(f16_to_fp8_e4m3(0xfe00), 0x7f);
  EXPECT_EQ(bf16_to_fp8_e4m3(0xffc0), 0x7f);
  EXPECT_EQ(f16_to_fp8_e4m3(0x7c00), 0x7e);  // half inf
  EXPECT_EQ(bf16_to_fp8_e4m3(0xff80), 0xfe);  // bf16 -inf
  // Zero and underflow keep the sign; 2^-10, half the smallest subnormal, ties to zero.
  EXPECT_EQ(f32_to_fp8_e4m3(0.0f), 0x00);
  EXPECT_EQ(f32_to_fp8_e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_fp8_e4m3(-std::numeric_limits<float>::denorm_min()), 0x80);
  EXPECT_EQ(f32_to_fp8_e4m3(0x1p-10f), 0x00);
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(0x1p-10f, 1.0f)), 0x01);
  EXPECT_EQ(f32_to_fp8_e4m3(-0x1.8p-9f), 0x82);  // 1.5 subnormal ulps: tie to even 2
  EXPECT_EQ(f32_to_fp8_e4m3(0x1.4p-8f), 0x02);   // 2.5 subnormal ulps: tie to even 2
  EXPECT_EQ(f32_to_fp8_e4m3(0x1.ep-7f), 0x08);   // 7.5 ulps: rounds up into the first normal
}

TEST(Fp8E4M3, EdgesAndMidpointsMatchTheReference) {
  for (float f : edge_values()) EXPECT_EQ(f32_to_fp8_e4m3(f), reference_fp8(f)) << std::hex << f32_bits(f);
  // Each midpoint goes to the even code; one float either side goes to the nearer neighbour.
  for (int c = 0; c < 0x7e; ++c) {
    const float mid = float((spec_value(uint8_t(c)) + spec_value(uint8_t(c + 1))) / 2);
    const uint8_t even = uint8_t(c % 2 == 0 ? c : c + 1);
    EXPECT_EQ(f32_to_fp8_e4m3(mid), even) << "code " << c;
    EXPECT_EQ(f32_to_fp8_e4m3(-mid), 0x80 | even) << "code " << c;
    EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(mid, 0.0f)), c) << "code " << c;
    EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(mid, 1e9f)), c + 1) << "code " << c;
  }
}

TEST(Fp8E4M3, DenseSweepRoundsToTheNearestValue) {
  // Every 331st f32 bit pattern from 0 to 600 (the stride is odd, so all low-bit patterns occur;
  // neighbours are ~2e-5 apart relatively, 6000 per fp8 step), both signs: 7e6 values.
  int64_t bad = 0;
  for (uint32_t u = 0; u <= 0x44160000u; u += 331) {
    for (uint32_t s : {0u, 0x80000000u}) {
      const float f = f32_from_bits(u | s);
      const uint8_t got = f32_to_fp8_e4m3(f), want = reference_fp8(f);
      count_mismatch(bad, "f32", u | s, got, want);
      // ... and back: the decoded value is the nearest representable one.
      if (fp8_e4m3_to_f32(got) != float(spec_value(want)) && ++bad <= 5)
        ADD_FAILURE() << std::hex << "decode 0x" << int(got);
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(Fp8E4M3, EveryHalfAndBfloat16RoundsOnceToTheNearestValue) {
  int64_t bad = 0;
  for (uint32_t u = 0; u < 65536; ++u) {
    const uint16_t x = uint16_t(u);
    const uint8_t h = f16_to_fp8_e4m3(x), want_h = reference_fp8(f16_to_f32(x));
    const uint8_t b = bf16_to_fp8_e4m3(x), want_b = reference_fp8(bf16_to_f32(x));
    count_mismatch(bad, "half", u, h, want_h);
    count_mismatch(bad, "bf16", u, b, want_b);
  }
  EXPECT_EQ(bad, 0);
}

// ---- Bit for bit against the CUDA toolkit's host functions ---------------------------------------

TEST(Fp8E4M3Cuda, DecodeMatchesForEveryCode) {
  SKIP_WITHOUT_CUDA_FP8();
  for (int c = 0; c < 256; ++c) {
    EXPECT_EQ(fp8_e4m3_to_f16(uint8_t(c)), cuda_to_f16(uint8_t(c))) << "code " << c;
    EXPECT_EQ(f32_bits(fp8_e4m3_to_f32(uint8_t(c))), f32_bits(cuda_to_f32(uint8_t(c)))) << "code " << c;
  }
}

TEST(Fp8E4M3Cuda, EveryHalfAndBfloat16Matches) {
  SKIP_WITHOUT_CUDA_FP8();
  int64_t bad = 0;
  for (uint32_t u = 0; u < 65536; ++u) {
    const uint16_t x = uint16_t(u);
    const uint8_t h = f16_to_fp8_e4m3(x), ch = cuda_from_f16(x);
    const uint8_t b = bf16_to_fp8_e4m3(x), cb = cuda_from_bf16(x);
    count_mismatch(bad, "half", u, h, ch);
    count_mismatch(bad, "bf16", u, b, cb);
  }
  EXPECT_EQ(bad, 0);
}

TEST(Fp8E4M3Cuda, EdgesAndMidpointsMatch) {
  SKIP_WITHOUT_CUDA_FP8();
  for (float f : edge_values()) EXPECT_EQ(f32_to_fp8_e4m3(f), cuda_from_f32(f)) << std::hex << f32_bits(f);
}

TEST(Fp8E4M3Cuda, RandomFloatsMatch) {
  SKIP_WITHOUT_CUDA_FP8();
  Rng rng(0xf8e4);
  const uint32_t lo = f32_bits(0x1p-12f), span = f32_bits(600.0f) - lo + 1;
  int64_t bad = 0;
  for (int64_t i = 0; i < kRandomCount; ++i) {
    // One f32 bit pattern uniform over all 2^32, and one with |x| in [2^-12, 600] (log-uniform-ish
    // over bit patterns, random sign), where the fp8 rounding actually happens.
    const uint64_t r = rng.next(), s = rng.next();
    const float any = f32_from_bits(uint32_t(r >> 32));
    const float near = f32_from_bits((lo + uint32_t((s >> 32) % span)) | (uint32_t(s) & 0x80000000u));
    for (float f : {any, near}) {
      count_mismatch(bad, "f32", f32_bits(f), f32_to_fp8_e4m3(f), cuda_from_f32(f));
    }
  }
  EXPECT_EQ(bad, 0);
}

}  // namespace
}  // namespace llmq
