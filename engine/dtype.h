// Element types of stored tensors and their scalar conversions to and from fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace llmq {

enum class DType : uint8_t { F32, F16, BF16, F8_E4M3, I8, I32, I64, F64, U8, BOOL };

// Bytes per element.
size_t dtype_size(DType dtype);
// The safetensors spelling: "F32", "BF16", "F8_E4M3", ...
const char* dtype_name(DType dtype);
// Parses a safetensors dtype string; returns false for an unknown one.
bool parse_dtype(std::string_view name, DType* out);

// The IEEE bit pattern of a float, and back.
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t bits) { return f32_from_bits(uint32_t(bits) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE binary16 <-> binary32, exact for every half value; f32 -> f16 rounds to nearest even.
float f16_to_f32(uint16_t bits);
uint16_t f32_to_f16(float f);

}  // namespace llmq
