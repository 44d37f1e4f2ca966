// Device code shared by the CUDA kernel files (cuda_kernels.cu, w8a16_gemm.cu): the 16-bit types,
// the linear layers' epilogue and the tensor-core MMA. Included by .cu files only; everything is
// in an unnamed namespace, as each file's own kernels are.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "engine/dtype.h"

namespace llmq::cuda {
namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }

// A linear layer's output element from its fp32 accumulator: times the row scale (FP8 activations)
// and the weight scale, then plus the bias; the multiplication is rounded before the addition, as
// the CPU backend computes it (engine/quant.h).
struct Epilogue {
  const float* row_scale = nullptr;
  const float* w_scale = nullptr;
  bool per_channel = false;
  const void* bias = nullptr;
  DType bias_dtype = DType::F32;

  __device__ __forceinline__ float apply(float acc, int64_t m, int64_t n) const {
    if (w_scale) {
      const float ws = w_scale[per_channel ? n : 0];
      acc = __fmul_rn(acc, row_scale ? row_scale[m] * ws : ws);
    }
    if (bias) {
      switch (bias_dtype) {
        case DType::BF16:
          acc += to_f32(static_cast<const bf16*>(bias)[n]);
          break;
        case DType::F16:
          acc += to_f32(static_cast<const f16*>(bias)[n]);
          break;
        default:
          acc += static_cast<const float*>(bias)[n];
      }
    }
    return acc;
  }
};

// ---- Tensor cores: mma.sync m16n8k16, 16-bit inputs, fp32 accumulation ----------------------
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .row.col): with g = lane / 4 and t = lane % 4,
// A (16 x 16, row-major) registers hold A[g][2t..2t+1], A[g+8][2t..2t+1], A[g][2t+8..], A[g+8][2t+8..];
// B (16 x 8, "col") holds B[2t..2t+1][g] and B[2t+8..2t+9][g]; C (16 x 8, fp32) holds C[g][2t],
// C[g][2t+1], C[g+8][2t], C[g+8][2t+1]. Two 16-bit values share a register, lower column first.
// (Checked on an H200 by the tensor-core attention kernel.)

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, bf16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, f16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace
}  // namespace llmq::cuda
