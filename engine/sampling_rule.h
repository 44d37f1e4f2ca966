// The arithmetic of the sampling rule (engine/sampler.h), shared by the host sampler and the CUDA
// sampling kernel so that both draw the same token from the same logits and random bits:
//  - tokens are ranked by an integer key of their logit (ties: lowest id first);
//  - a token's probability is exp_nonpositive((logit - max) / temperature), computed with
//    separately rounded float operations (no fused multiply-add, no library exp), which IEEE
//    arithmetic makes identical on both;
//  - masses are that probability in 2^-40 units (uint64), so sums are exact in any order.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LLMQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LLMQ_HOST_DEVICE inline
#endif

namespace llmq::sampling {

// Separately rounded float and double operations: nvcc would otherwise contract a * b + c into an
// FMA on the device (the host build is compiled with -ffp-contract=off, see CMakeLists.txt).
LLMQ_HOST_DEVICE float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LLMQ_HOST_DEVICE float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LLMQ_HOST_DEVICE float sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LLMQ_HOST_DEVICE float div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LLMQ_HOST_DEVICE double dmul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

LLMQ_HOST_DEVICE uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}
LLMQ_HOST_DEVICE float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

// The logit as the sampler sees it: NaN counts as -inf, and -0 as +0 (they compare equal).
LLMQ_HOST_DEVICE float canonical_logit(float x) {
  if (x != x) return bits_float(0xff800000u);  // -inf
  return x == 0.0f ? 0.0f : x;
}

// An order-preserving key of a canonical logit: a > b exactly when key(a) > key(b).
LLMQ_HOST_DEVICE uint32_t logit_key(float canonical) {
  const uint32_t u = float_bits(canonical);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
LLMQ_HOST_DEVICE float key_logit(uint32_t key) {
  return bits_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// exp(x) for x <= 0 (x may be -inf), within about 2e-7 relative; 0 below -30, where the mass is 0
// anyway (exp(-30) < 2^-43).
LLMQ_HOST_DEVICE float exp_nonpositive(float x) {
  if (!(x >= -30.0f)) return 0.0f;
  // x = n ln2 + r, |r| <= ln2 / 2; ln2 split in two so that n * kLn2Hi is exact.
  const float kLog2e = 1.44269504f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860677e-06f;
  float n = mul(x, kLog2e);
  n = static_cast<float>(static_cast<int>(n < 0.0f ? sub(n, 0.5f) : add(n, 0.5f)));  // round half away
  const float r = sub(sub(x, mul(n, kLn2Hi)), mul(n, kLn2Lo));
  // Taylor series of exp(r) to r^7 (truncation error below 6e-9 on |r| <= 0.35), Horner's rule.
  float p = 1.0f / 5040.0f;
  p = add(mul(p, r), 1.0f / 720.0f);
  p = add(mul(p, r), 1.0f / 120.0f);
  p = add(mul(p, r), 1.0f / 24.0f);
  p = add(mul(p, r), 1.0f / 6.0f);
  p = add(mul(p, r), 0.5f);
  p = add(mul(p, r), 1.0f);
  p = add(mul(p, r), 1.0f);
  // 2^n for n in [-44, 0] is a normal float: scaling by it is exact.
  return mul(p, bits_float(uint32_t(static_cast<int>(n) + 127) << 23));
}

// The unnormalized probability of a canonical logit: 1 for the max, 0 for -inf.
LLMQ_HOST_DEVICE float probability(float logit, float max_logit, float temperature) {
  return exp_nonpositive(div(sub(logit, max_logit), temperature));
}

// The probability in units of 2^-40, truncated: a vocabulary of up to 2^23 tokens sums below 2^64.
LLMQ_HOST_DEVICE uint64_t mass(float probability) {
  return static_cast<uint64_t>(mul(probability, float(uint64_t(1) << 40)));  // an exact scaling
}

// Top-p: a prefix of the ranking whose mass is `prefix` ends the nucleus once it reaches
// top_p * (the mass top-k left).
LLMQ_HOST_DEVICE double top_p_target(float top_p, uint64_t total) { return dmul(double(top_p), double(total)); }
LLMQ_HOST_DEVICE bool reaches(uint64_t prefix, double target) { return double(prefix) >= target; }

// The draw's point in [0, total): floor(draw * total / 2^53) for 53 random bits.
LLMQ_HOST_DEVICE uint64_t draw_target(uint64_t draw53, uint64_t total) {
#ifdef __CUDA_ARCH__
  return __umul64hi(draw53 << 11, total);
#else
  return uint64_t((static_cast<unsigned __int128>(draw53 << 11) * total) >> 64);
#endif
}

}  // namespace llmq::sampling
