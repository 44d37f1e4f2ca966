#include "engine/fp8.h"

#include "engine/dtype.h"

namespace llmq {

uint8_t f32_to_fp8_e4m3(float x) {
  const uint32_t u = f32_bits(x);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return 0x7f;                // NaN: CUDA's canonical 0x7f, sign dropped
  if (abs > 0x43e80000u) return uint8_t(sign | 0x7e);  // beyond 464 (448 + half an ulp), inf too
  if (abs >= 0x3c800000u) {                          // normal fp8, 2^-6 up to 464
    // Rebias the exponent (127 -> 7) and drop 20 mantissa bits, rounding to nearest even; a carry
    // out of the mantissa steps the exponent, and 464 itself ties down to 448 (0x7e is even).
    const uint32_t rounded = abs + 0x7ffffu + ((abs >> 20) & 1u);
    return uint8_t(sign | ((rounded - (120u << 23)) >> 20));
  }
  if (abs <= 0x3a800000u) return sign;  // up to 2^-10, half the smallest subnormal: ties to zero
  // Subnormal fp8 (multiples of 2^-9): shift the full significand into place, nearest even.
  const uint32_t significand = (abs & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 141u - (abs >> 23);  // 21..24 for exponents 2^-10..2^-7
  uint32_t m = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (m & 1u))) ++m;
  return uint8_t(sign | m);  // m == 8 is the smallest normal, 2^-6: still the right code
}

// Both go through the exact f32 value, so there is a single rounding (what CUDA's host code does).
uint8_t f16_to_fp8_e4m3(uint16_t h) { return f32_to_fp8_e4m3(f16_to_f32(h)); }
uint8_t bf16_to_fp8_e4m3(uint16_t b) { return f32_to_fp8_e4m3(bf16_to_f32(b)); }

float fp8_e4m3_to_f32(uint8_t v) {
  const uint32_t sign = uint32_t(v & 0x80u) << 24, exponent = (v >> 3) & 0xfu, mantissa = v & 7u;
  if ((v & 0x7fu) == 0x7fu) return f32_from_bits(0x7fffffffu);  // NaN, as CUDA: positive, all ones
  if (exponent == 0) {                                     // zero or subnormal: mantissa * 2^-9
    const float magnitude = float(mantissa) * 0x1p-9f;
    return sign ? -magnitude : magnitude;
  }
  return f32_from_bits(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

uint16_t fp8_e4m3_to_f16(uint8_t v) {
  const uint16_t sign = uint16_t((v & 0x80u) << 8);
  const uint32_t exponent = (v >> 3) & 0xfu, mantissa = v & 7u;
  if ((v & 0x7fu) == 0x7fu) return 0x7fff;  // NaN, as CUDA: positive, all ones
  if (exponent != 0) return uint16_t(sign | ((exponent + 8u) << 10) | (mantissa << 7));
  if (mantissa == 0) return sign;
  // Subnormal fp8 m * 2^-9 is a normal half: renormalize so the leading 1 becomes implicit.
  int exponent_f16 = 1 - 7 + 15;  // that of 2^-6, the scale of fp8 subnormals
  uint32_t m = mantissa;
  while ((m & 8u) == 0) {
    m <<= 1;
    --exponent_f16;
  }
  return uint16_t(sign | (uint32_t(exponent_f16) << 10) | ((m & 7u) << 7));
}

const float* fp8_e4m3_table() {
  struct Table {
    float values[256];
    Table() {
      for (int i = 0; i < 256; ++i) values[i] = fp8_e4m3_to_f32(uint8_t(i));
    }
  };
  static const Table table;  // built once, thread-safely, on first use
  return table.values;
}

}  // namespace llmq
