// Code shared by the CUDA kernel files (cuda_kernels.cu, w8a16_gemm.cu): the 16-bit types, the
// host's dispatch on them, the linear layers' epilogue and the tensor-core MMA. Included by .cu
// files only; everything is in an unnamed namespace, as each file's own kernels are.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include "engine/dtype.h"
#include "engine/error.h"
#include "kernels/cuda/cuda_kernels.h"

namespace llmq::cuda {
namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
struct fp8 {  // one FP8 E4M3 code
  uint8_t bits;
};

// ---- Host side: dispatch on an element type -----------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) for a 16-bit float dtype (BF16, F16), and for F32 unless !kWithF32.
template <bool kWithF32 = true, typename Fn>
void with_float_type(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::F32:
      if constexpr (kWithF32) return fn(Tag<float>{});
      break;
    case DType::BF16:
      return fn(Tag<bf16>{});
    case DType::F16:
      return fn(Tag<f16>{});
    default:
      break;
  }
  fail(LLMQ_ERR_UNSUPPORTED, "cuda backend: {} of dtype {} is not supported", what, dtype_name(dtype));
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }

// A linear layer's output element from its fp32 accumulator: times the row scale (FP8 activations)
// and the weight scale, then plus the bias; the multiplication is rounded before the addition, as
// the CPU backend computes it (engine/quant.h). Identity when none().
struct Epilogue : LinearScales {
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

// Two values rounded to 16 bits in one register, lo in the lower half.
__device__ __forceinline__ uint32_t pack2(float lo, float hi, bf16) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof r);
  return r;
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, f16) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof r);
  return r;
}

// Element i of an output's 16-bit copy (cuda_kernels.h's RoundedCopy; none when r.p is null): v
// rounded to nearest even.
__device__ __forceinline__ void store_rounded(const RoundedCopy& r, int64_t i, float v) {
  if (!r.p) return;
  if (r.bf16)
    static_cast<__nv_bfloat16*>(r.p)[i] = __float2bfloat16_rn(v);
  else
    static_cast<__half*>(r.p)[i] = __float2half_rn(v);
}

// ---- PTX instructions. A CPU emulation for tests (tests/emulated/cuda_emulation.h) defines
// LLMQ_CUDA_EMULATION and gives its own definitions of these, of the same names and meaning.
#ifndef LLMQ_CUDA_EMULATION

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
// mma.sync m16n8k32 of FP8 E4M3 codes (compute capability 8.9 and newer; traps when compiled for
// older ones, where FP8 linears never launch). Four codes a register, the lowest k in the lowest
// byte: A registers hold A[g][4t..4t+3], A[g+8][4t..], A[g][16+4t..], A[g+8][16+4t..]; B registers
// B[4t..4t+3][g] and B[16+4t..][g]; C as mma16816's.
__device__ __forceinline__ void mma16832(float* c, const uint32_t* a, const uint32_t* b, fp8) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// ldmatrix .x4: four 8x8 16-bit matrices, each read from 8 rows of 16 bytes (row r of matrix m
// addressed by lane 8m + r), so that register m of lane l holds M_m[l / 4][2 (l % 4)] and
// M_m[l / 4][2 (l % 4) + 1]: with the rows being keys and the columns dims, that is an mma B
// fragment (B[k][n] = K[key n][dim k]) of a row-major K tile.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* row) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// ldmatrix .x4 .trans: four 8x8 16-bit matrices, each read from 8 rows of 16 bytes (row r of
// matrix m addressed by lane 8m + r) and transposed, so that register m of lane l holds
// M_m[2 (l % 4)][l / 4] and M_m[2 (l % 4) + 1][l / 4]: with the rows being keys and the columns
// dims, that is an mma B fragment (B[k][n] = V[key k][dim n]) of a row-major V tile.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* row) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (src is not read then, but stays a valid address).
__device__ __forceinline__ void cp_async16(void* smem, const void* src, bool valid) {
  const unsigned dst = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
// 4 bytes global -> shared (cp.async.ca: .cg copies only 16), or 4 zero bytes when !valid.
__device__ __forceinline__ void cp_async4(void* smem, const void* src, bool valid) {
  const unsigned dst = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}


// Shared-memory address of a pointer into shared memory, as PTX and wgmma descriptors take it.
__device__ __forceinline__ uint32_t smem_address(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// ---- Hopper's warpgroup MMA (sm_90a only; kernels using it are launched on compute capability 9.0
// only, and trap if compiled for anything else). wgmma_m64n128(d, a, b, T): D[64 x 128] (fp32,
// accumulated) += A[64 x k] . B[k x 128] of one warpgroup (4 warps) over one 32-byte slice of K (k =
// 16 values of a 16-bit T, 32 FP8 codes), both operands in shared memory given by descriptors, both
// K-major: A's rows and B's columns each hold the slice's k consecutive values. D's fragment:
// thread (warp w of the warpgroup, g = lane / 4, t = lane % 4) holds d[4j + 2h + e] = D[16w + g +
// 8h][8j + 2t + e]. It runs asynchronously: the accumulators are neither read nor written until
// wgmma_wait says its group is done; wgmma_fence orders the accumulators' earlier register uses
// before it.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LLMQ_WGMMA 1
#endif
__device__ __forceinline__ void wgmma_fence() {
#ifdef LLMQ_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef LLMQ_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef LLMQ_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// One wgmma m64n128 of `types` ("k16.f32.bf16.bf16", ...) into this thread's 64 accumulators d,
// then `operands` (A's descriptor or registers, B's descriptor) from the asm inputs after d, then
// `flags` (scale and transpose immediates).
#define LLMQ_WGMMA_M64N128(types, operands, flags, ...)                                                   \
  asm volatile("{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, 1, 0;\n"                              \
               "wgmma.mma_async.sync.aligned.m64n128" types " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, " operands ", accumulate" flags ";\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
               : __VA_ARGS__)
__device__ __forceinline__ void wgmma_m64n128(float* d, uint64_t a, uint64_t b, bf16) {
#ifdef LLMQ_WGMMA
  LLMQ_WGMMA_M64N128("k16.f32.bf16.bf16", "%64, %65", ", 1, 1, 0, 0", "l"(a), "l"(b));
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_m64n128(float* d, uint64_t a, uint64_t b, f16) {
#ifdef LLMQ_WGMMA
  LLMQ_WGMMA_M64N128("k16.f32.f16.f16", "%64, %65", ", 1, 1, 0, 0", "l"(a), "l"(b));
#else
  __trap();
#endif
}
// (FP8 operands are K-major only: the instruction has no transpose flags.)
__device__ __forceinline__ void wgmma_m64n128(float* d, uint64_t a, uint64_t b, fp8) {
#ifdef LLMQ_WGMMA
  LLMQ_WGMMA_M64N128("k32.f32.e4m3.e4m3", "%64, %65", ", 1, 1", "l"(a), "l"(b));
#else
  __trap();
#endif
}
// The same with A (64 x 16 16-bit values) from registers: warp w of the warpgroup holds rows 16w ..
// 16w + 15 as mma.sync m16n8k16's A fragment (a[0]: row g, k 2t and 2t + 1; a[1]: row g + 8; a[2]
// and a[3]: the same rows at k 2t + 8 and 2t + 9), and must leave them unchanged until the wgmma's
// group is waited for.
__device__ __forceinline__ void wgmma_m64n128(float* d, const uint32_t* a, uint64_t b, bf16) {
#ifdef LLMQ_WGMMA
  LLMQ_WGMMA_M64N128("k16.f32.bf16.bf16", "{%64, %65, %66, %67}, %68", ", 1, 1, 0", "r"(a[0]), "r"(a[1]), "r"(a[2]),
                     "r"(a[3]), "l"(b));
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_m64n128(float* d, const uint32_t* a, uint64_t b, f16) {
#ifdef LLMQ_WGMMA
  LLMQ_WGMMA_M64N128("k16.f32.f16.f16", "{%64, %65, %66, %67}, %68", ", 1, 1, 0", "r"(a[0]), "r"(a[1]), "r"(a[2]),
                     "r"(a[3]), "l"(b));
#else
  __trap();
#endif
}
#undef LLMQ_WGMMA_M64N128

// mbarriers in shared memory (sm_90a kernels only): mbarrier_init(bar, n) before a block barrier,
// then each phase completes when n arrivals have come: mbarrier_arrive (this thread, now),
// cp_async_mbarrier_arrive (this thread, once its cp.async copies issued so far have landed).
// mbarrier_wait(bar, parity) returns once the phase of that parity has completed (on a fresh
// barrier, parity 1 counts as completed); it traps rather than hang after about 2^28 tries.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
#ifdef LLMQ_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count) : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#ifdef LLMQ_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_mbarrier_arrive(uint64_t* bar) {
#ifdef LLMQ_WGMMA
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
#ifdef LLMQ_WGMMA
  for (unsigned tries = 0;; ++tries) {
    unsigned done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
    if (done) return;
    if (tries == (1u << 28)) __trap();
  }
#endif
}

// Keeps the compiler from moving register uses of the accumulators across this point (after
// wgmma_wait: the asynchronous MMA's results are only there from now on).
__device__ __forceinline__ void wgmma_hold(float* d, int n) {
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The kernel's dynamic shared memory, as an array of `type` (16-byte aligned for uint4).
#define LLMQ_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

#endif  // LLMQ_CUDA_EMULATION

// ---- KV cache elements -------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(int8_t v) { return float(v); }
__device__ __forceinline__ float fp8_to_f32(uint32_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(code), __NV_E4M3)));
}
__device__ __forceinline__ float to_f32(fp8 v) { return fp8_to_f32(v.bits); }

// 16 one-byte codes or 8 two-byte values of a 16-byte vector, as fp32 (exact).
__device__ __forceinline__ void unpack16(uint4 v, int8_t, float* out) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) out[i] = float(int8_t(words[i / 4] >> (8 * (i % 4))));
}
__device__ __forceinline__ void unpack16(uint4 v, fp8, float* out) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  // Two codes per conversion (the lower byte is the first value); E4M3 -> F16 -> F32 is exact.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const __half2_raw pair = __nv_cvt_fp8x2_to_halfraw2(
        __nv_fp8x2_storage_t((words[i / 2] >> (16 * (i % 2))) & 0xffffu), __NV_E4M3);
    const float2 f = __half22float2(__half2(pair));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack8(uint4 v, bf16, float* out) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack8(uint4 v, f16, float* out) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(uint16_t(words[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(uint16_t(words[i] >> 16)));
  }
}

// The keys [*lo, *hi] that a query tile (tokens t0 .. t0 + count - 1 of one sequence) attends to.
__device__ __forceinline__ void tile_key_range(const int32_t* positions, int t0, int count, int sliding_window, int* lo,
                                               int* hi) {
  *lo = INT_MAX;
  *hi = -1;
  for (int r = 0; r < count; ++r) {
    const int p = positions[t0 + r];
    *hi = max(*hi, p);
    *lo = min(*lo, sliding_window > 0 ? max(0, p - sliding_window + 1) : 0);
  }
}

// Attention's key tiles: kTileK keys at a time.
constexpr int kTileK = 64;

// Element offset of a key's row in a paged cache ([block][kv head][slot][head_dim]), the key being
// in cache block `block` (its sequence's block table at key / block_size).
__device__ __forceinline__ int64_t kv_row_offset(int32_t block, int key, int block_size, int num_kv_heads, int kv_head,
                                                 int head_dim) {
  return ((int64_t(block) * num_kv_heads + kv_head) * block_size + key % block_size) * head_dim;
}

// Element offset of each key of a tile in the cache (-1 past key_end), for kTileK keys from key0.
__device__ __forceinline__ void key_offsets(const int32_t* blocks, int key0, int key_end, int block_size,
                                            int num_kv_heads, int kv_head, int head_dim, int64_t* offsets) {
  for (int j = threadIdx.x; j < kTileK; j += blockDim.x) {
    const int key = key0 + j;
    offsets[j] = key < key_end
                     ? kv_row_offset(blocks[key / block_size], key, block_size, num_kv_heads, kv_head, head_dim)
                     : -1;
  }
}

// 16 bytes of stored elements (weights, activations, KV cache) as fp32, exact: kPerVector<T>
// values (4 F32, 8 16-bit, 16 INT8/FP8 codes).
template <typename T>
constexpr int kPerVector = 16 / int(sizeof(T));
__device__ __forceinline__ void unpack_vector(uint4 v, float, float* out) {
  out[0] = __uint_as_float(v.x);
  out[1] = __uint_as_float(v.y);
  out[2] = __uint_as_float(v.z);
  out[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void unpack_vector(uint4 v, bf16, float* out) {
  unpack8(v, bf16{}, out);
}
__device__ __forceinline__ void unpack_vector(uint4 v, f16, float* out) {
  unpack8(v, f16{}, out);
}
__device__ __forceinline__ void unpack_vector(uint4 v, int8_t, float* out) {
  unpack16(v, int8_t{}, out);
}
__device__ __forceinline__ void unpack_vector(uint4 v, fp8, float* out) {
  unpack16(v, fp8{}, out);
}

}  // namespace
}  // namespace llmq::cuda
