// FP8 E4M3 (OCP "e4m3fn"): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, NaN is
// 0x7f / 0xff, largest finite 448. The conversions match the CUDA toolkit's (cuda_fp8.h) bit for
// bit, so weights quantized here and by CUDA kernels agree:
//   to fp8:   round to nearest even of the exact value, saturating: |x| beyond 448 (infinities
//             too) gives +-448; every NaN gives 0x7f (sign dropped); zero and underflow keep sign.
//   from fp8: exact; 0x7f / 0xff give a positive NaN (f16 0x7fff, f32 0x7fffffff).
#pragma once

#include <cstdint>

namespace llmq {

constexpr float kFp8E4M3Max = 448.0f;

// As __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3).
uint8_t f32_to_fp8_e4m3(float x);
// As __nv_cvt_halfraw_to_fp8(h, __NV_SATFINITE, __NV_E4M3): one rounding of the exact half value.
uint8_t f16_to_fp8_e4m3(uint16_t h);
// As __nv_cvt_bfloat16raw_to_fp8(b, __NV_SATFINITE, __NV_E4M3): one rounding of the exact value.
uint8_t bf16_to_fp8_e4m3(uint16_t b);

// Exact; as float(__nv_fp8_e4m3) on the host.
float fp8_e4m3_to_f32(uint8_t v);
// Exact (every E4M3 value is a normal half); as __nv_cvt_fp8_to_halfraw(v, __NV_E4M3).
uint16_t fp8_e4m3_to_f16(uint8_t v);

// fp8_e4m3_to_f32 of all 256 codes, for bulk dequantization by lookup.
const float* fp8_e4m3_table();

}  // namespace llmq
