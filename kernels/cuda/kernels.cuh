// The CUDA backend's elementwise, per-row, GEMV, RoPE + KV write and paged attention kernels
// (cuda_kernels.cu launches them), in a header so that the CPU emulation of tests/emulated/ can run
// them too. Arithmetic is fp32 throughout, in the order the CPU backend uses where it matters for
// agreement (engine/quant.h's quantize-then-multiply-then-scale).
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace llmq::cuda {
namespace {

// ---- Element types ------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ f16 from_f32<f16>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum (or max) over the block; every thread gets the result. blockDim.x is a multiple of 32.
template <bool kMax>
__device__ float block_reduce(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // partial[] may still be read from a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : (kMax ? 0.0f : 0.0f);
  return kMax ? warp_max(v) : warp_sum(v);
}

// ---- Elementwise and per-row kernels --------------------------------------------------------

// A block's walk over a row of n elements, this thread's i = threadIdx.x + k * blockDim.x in
// batches of kRowBatch: load(u, i) for each of a batch's elements (u = 0 .. kRowBatch - 1; past
// the row, the batch's first again: an element this thread owns), then use(u, i) for those in the
// row, in i order. A loop that stores an element before it loads the next keeps one load in flight
// (the compiler cannot tell that store from the next load's address): a decode step's 4096-wide
// row at 512 threads took 8 memory round trips a loop so.
constexpr int kRowBatch = 8;
template <typename Load, typename Use>
__device__ __forceinline__ void for_row_batches(int64_t n, Load&& load, Use&& use) {
  const int64_t stride = blockDim.x;
  for (int64_t i0 = threadIdx.x; i0 < n; i0 += kRowBatch * stride) {
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) load(u, i0 + u * stride < n ? i0 + u * stride : i0);
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u)
      if (i0 + u * stride < n) use(u, i0 + u * stride);
  }
}

template <typename T>
__global__ void embed_kernel(const T* table, int64_t first_id, int64_t table_rows, int64_t dim, const int32_t* tokens,
                             float* out) {
  const int64_t row = blockIdx.x;
  const int64_t id = int64_t(tokens[row]) - first_id;  // outside [0, table_rows): another rank's id
  const bool here = id >= 0 && id < table_rows;
  const T* src = table + (here ? id : 0) * dim;
  float v[kRowBatch];
  for_row_batches(
      dim, [&](int u, int64_t i) { v[u] = here ? to_f32(src[i]) : 0.0f; },
      [&](int u, int64_t i) { out[row * dim + i] = v[u]; });
}

// silu(g) * u as the CPU computes it, g / (1 + exp(-g)) * u, each operation rounded on its own:
// the _rn intrinsics are never contracted into an FMA, so silu_mul and the fused quantization
// below, which inline this in different code, get the same bits.
__device__ __forceinline__ float silu_mul_value(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// Elementwise kernels over n values, by a grid-stride loop: with `vectors` (n a multiple of 4, every
// pointer 16-byte aligned: the launchers check) 4 values a thread a step, from 16-byte loads (one
// value a thread was about half of the H200's bandwidth); else one.
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
template <typename T>
__device__ __forceinline__ void store4(T* p, float a, float b, float c, float d) {  // 16-bit: 8 bytes
  *reinterpret_cast<uint2*>(p) = make_uint2(pack2(a, b, T{}), pack2(c, d, T{}));
}
template <typename Fn>
__device__ __forceinline__ void for_each_value(int64_t n, bool vectors, Fn&& fn) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  if (vectors) {
    for (int64_t i = 4 * first; i < n; i += 4 * stride) fn(i, std::integral_constant<int, 4>{});
  } else {
    for (int64_t i = first; i < n; i += stride) fn(i, std::integral_constant<int, 1>{});
  }
}

// silu(gate) * up by (row, column) of [rows, cols] tensors, with the deferred epilogues of the
// linears that wrote gate and up applied to the values read (identity when none).
struct SiluMulOf {
  const float *gate, *up;
  int64_t cols;
  Epilogue gate_scales{}, up_scales{};
  // The product of gate value g and up value u read at (row, col).
  __device__ __forceinline__ float value(float g, float u, int64_t row, int64_t col) const {
    return silu_mul_value(gate_scales.apply(g, row, col), up_scales.apply(u, row, col));
  }
  __device__ __forceinline__ float operator()(int64_t row, int64_t col) const {
    const int64_t i = row * cols + col;
    return value(gate[i], up[i], row, col);
  }
};

// T = float: the product; a 16-bit T: the product rounded to it (the copy a 16-bit linear reads).
// With `vectors`, cols is a multiple of 4 as well: a thread's 4 values are in one row.
template <typename T>
__global__ void silu_mul_kernel(SiluMulOf src, int64_t n, T* out, bool vectors) {
  const bool scaled = !src.gate_scales.none() || !src.up_scales.none();
  for_each_value(n, vectors, [&](int64_t i, auto width) {
    const int64_t row = scaled ? i / src.cols : 0, col = i - row * src.cols;  // (row, col) read only when scaled
    if constexpr (decltype(width)::value == 4) {
      const float4 g = *reinterpret_cast<const float4*>(src.gate + i), u = *reinterpret_cast<const float4*>(src.up + i);
      if (scaled)
        store4(out + i, src.value(g.x, u.x, row, col), src.value(g.y, u.y, row, col + 1),
               src.value(g.z, u.z, row, col + 2), src.value(g.w, u.w, row, col + 3));
      else
        store4(out + i, silu_mul_value(g.x, u.x), silu_mul_value(g.y, u.y), silu_mul_value(g.z, u.z),
               silu_mul_value(g.w, u.w));
    } else {
      out[i] = from_f32<T>(scaled ? src(row, col) : silu_mul_value(src.gate[i], src.up[i]));
    }
  });
}

__global__ void gather_rows_kernel(const float* x, int64_t cols, const int32_t* rows, float* out) {
  const int64_t i = blockIdx.x;
  const float* src = x + int64_t(rows[i]) * cols;
  float v[kRowBatch];
  for_row_batches(
      cols, [&](int u, int64_t c) { v[u] = src[c]; }, [&](int u, int64_t c) { out[i * cols + c] = v[u]; });
}

template <typename T>
__global__ void convert_kernel(const float* x, int64_t n, T* out, bool vectors) {
  for_each_value(n, vectors, [&](int64_t i, auto width) {
    if constexpr (decltype(width)::value == 4) {
      const float4 v = *reinterpret_cast<const float4*>(x + i);
      store4(out + i, v.x, v.y, v.z, v.w);
    } else {
      out[i] = from_f32<T>(x[i]);
    }
  });
}

// The activations quantize_fp8_rows_kernel reads, by (row, column): a tensor, or silu(gate) * up
// computed on the fly (SiluMulOf: the fused SiLU-mul + quantization; nothing fp32 is written).
struct ActivationsOf {
  const float* x;
  int64_t cols;
  __device__ __forceinline__ float operator()(int64_t row, int64_t col) const { return x[row * cols + col]; }
};

// Quantizes row `row` of src to FP8 codes and its row scale, by the block. The dynamic scale's amax
// takes a first pass over the row; the second pass reads (or recomputes, for SiluMulOf: the same
// bits) each value again to quantize it.
template <typename Src>
__device__ void quantize_fp8_row(Src src, int64_t row, int64_t cols, const float* static_scale, const float* row_amax,
                                 uint8_t* codes, float* row_scales, unsigned long long* counters) {
  const int64_t base = row * cols;
  float inv, scale;
  if (static_scale) {
    scale = static_scale[0];
    inv = 1.0f / scale;
  } else {
    float amax = 0.0f;
    if (row_amax) {
      amax = row_amax[row];  // given: the whole row's, over the tensor-parallel ranks
    } else {
      float a[kRowBatch];
      for_row_batches(
          cols, [&](int u, int64_t i) { a[u] = fabsf(src(row, i)); },
          [&](int u, int64_t) { amax = fmaxf(amax, a[u]); });
      amax = block_reduce<true>(amax);
    }
    inv = amax > 0.0f ? 448.0f / amax : 0.0f;
    scale = amax / 448.0f;
  }
  unsigned clipped = 0;
  float v[kRowBatch];
  for_row_batches(
      cols, [&](int u, int64_t i) { v[u] = __fmul_rn(src(row, i), inv); },
      [&](int u, int64_t i) {
        clipped += fabsf(v[u]) > 448.0f;
        codes[base + i] = __nv_cvt_float_to_fp8(v[u], __NV_SATFINITE, __NV_E4M3);
      });
  // Every thread has read the row: src may read the row scales this replaces (a deferred epilogue's
  // row scales: the codes of gate and up's input, in the same buffer).
  __syncthreads();
  if (threadIdx.x == 0) row_scales[row] = scale;
  if (static_scale && counters) {
    const float total = block_reduce<false>(float(clipped));  // exact: far below 2^24 per row
    if (threadIdx.x == 0) {
      if (total > 0.0f) atomicAdd(&counters[0], (unsigned long long)total);
      atomicAdd(&counters[1], (unsigned long long)cols);
    }
  }
}

// One block per row.
template <typename Src>
__global__ void __launch_bounds__(1024, 1)
    quantize_fp8_rows_kernel(Src src, int64_t cols, const float* static_scale, const float* row_amax, uint8_t* codes,
                             float* row_scales, unsigned long long* counters) {
  quantize_fp8_row(src, blockIdx.x, cols, static_scale, row_amax, codes, row_scales, counters);
}

// The input a following linear reads, written by the norm's kernel instead of a pass of its own:
// with `rounded`, out's 16-bit copy (the bits convert_kernel gives from out); with `codes`, out
// quantized to FP8 with a dynamic per-row scale (the codes and scales quantize_fp8_rows_kernel
// gives from out).
struct NormCopy {
  RoundedCopy rounded;
  uint8_t* codes = nullptr;
  float* row_scales = nullptr;
};

template <typename T>
__global__ void rmsnorm_kernel(float* residual, const float* x, const T* w, float eps, int64_t dim, float* out,
                               NormCopy copy) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float* rr = residual ? residual + row * dim : nullptr;
  float sum_squares = 0.0f;
  float v[kRowBatch], r[kRowBatch];
  for_row_batches(
      dim,
      [&](int u, int64_t i) {
        v[u] = xr[i];
        r[u] = rr ? rr[i] : 0.0f;
      },
      [&](int u, int64_t i) {
        if (rr) {
          v[u] = r[u] + v[u];
          rr[i] = v[u];
        }
        sum_squares += v[u] * v[u];
      });
  sum_squares = block_reduce<false>(sum_squares);
  const float inv = 1.0f / sqrtf(sum_squares / float(dim) + eps);
  const float* src = rr ? rr : xr;  // rr: this thread's own writes above
  for_row_batches(
      dim,
      [&](int u, int64_t i) {
        v[u] = src[i];
        r[u] = to_f32(w[i]);
      },
      [&](int u, int64_t i) {
        const float y = __fmul_rn(v[u], inv) * r[u];
        out[row * dim + i] = y;
        store_rounded(copy.rounded, row * dim + i, y);
      });
  // Each thread reads back only the elements it wrote: no barrier needed before.
  if (copy.codes)
    quantize_fp8_row(ActivationsOf{out, dim}, row, dim, nullptr, nullptr, copy.codes, copy.row_scales, nullptr);
}

__global__ void row_absmax_kernel(const float* x, int64_t cols, float* out) {
  const float* xr = x + int64_t(blockIdx.x) * cols;
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(xr[i]));
  amax = block_reduce<true>(amax);
  if (threadIdx.x == 0) out[blockIdx.x] = amax;
}

// 16 codes per thread per step: one 16-byte load, two 16-byte stores (n is a multiple of 16).
template <typename T>
__global__ void dequantize_i8_kernel(const int8_t* q, int64_t n, T* out) {
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * 16; i < n; i += int64_t(gridDim.x) * blockDim.x * 16) {
    float f[16];
    unpack16(__ldg(reinterpret_cast<const uint4*>(q + i)), int8_t{}, f);
    T converted[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) converted[j] = from_f32<T>(f[j]);
    reinterpret_cast<uint4*>(out + i)[0] = reinterpret_cast<const uint4*>(converted)[0];
    reinterpret_cast<uint4*>(out + i)[1] = reinterpret_cast<const uint4*>(converted)[1];
  }
}
template <typename T>
__global__ void dequantize_i8_scalar_kernel(const int8_t* q, int64_t n, T* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(float(q[i]));
}

// OutputDistance of y from ref: each thread's share in registers, summed over its warp, one set
// of atomics a warp. Maxima of non-negative floats compare as their bits (NaN above infinity).
__global__ void output_distance_kernel(const float* y, const float* ref, int64_t n, OutputDistance* d) {
  double diff2 = 0, ref2 = 0;
  float max_diff = 0, max_ref = 0;
  unsigned long long not_finite = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float r = ref[i], v = y[i];
    if (!isfinite(r)) continue;
    if (!isfinite(v)) {
      ++not_finite;
      continue;
    }
    const double diff = double(v) - double(r);
    diff2 += diff * diff;
    ref2 += double(r) * double(r);
    max_diff = fmaxf(max_diff, float(fabs(diff)));
    max_ref = fmaxf(max_ref, fabsf(r));
  }
  for (int o = 16; o > 0; o >>= 1) {
    diff2 += __shfl_xor_sync(0xffffffffu, diff2, o);
    ref2 += __shfl_xor_sync(0xffffffffu, ref2, o);
    max_diff = fmaxf(max_diff, __shfl_xor_sync(0xffffffffu, max_diff, o));
    max_ref = fmaxf(max_ref, __shfl_xor_sync(0xffffffffu, max_ref, o));
    not_finite += __shfl_xor_sync(0xffffffffu, not_finite, o);
  }
  if (threadIdx.x % 32 != 0) return;
  atomicAdd(&d->diff2, diff2);
  atomicAdd(&d->ref2, ref2);
  atomicMax(&d->max_diff_bits, __float_as_uint(max_diff));
  atomicMax(&d->max_ref_bits, __float_as_uint(max_ref));
  atomicAdd(&d->not_finite, not_finite);
}

// Rows by blockIdx.y (strided past 65535), 4 columns per thread: one 16-byte load and store when
// N is a multiple of 4 (rows then stay 16-byte aligned), else one value at a time.
// (Before: one element per thread with a 64-bit division for its row and column, 2.3 TB/s on an H200.)
__global__ void epilogue_kernel(float* out, int64_t M, int64_t N, Epilogue e) {
  const int64_t n = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (n >= N) return;
  const bool vector = N % 4 == 0;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    float* row = out + m * N;
    if (vector) {
      float4 v = *reinterpret_cast<const float4*>(row + n);
      v.x = e.apply(v.x, m, n);
      v.y = e.apply(v.y, m, n + 1);
      v.z = e.apply(v.z, m, n + 2);
      v.w = e.apply(v.w, m, n + 3);
      *reinterpret_cast<float4*>(row + n) = v;
    } else {
      for (int64_t c = n; c < n + 4 && c < N; ++c) row[c] = e.apply(row[c], m, c);
    }
  }
}

// ---- GEMV: one warp per output channel, all M (<= 8) tokens at once ---------------------------

// n consecutive values of T (n * sizeof(T) a multiple of 16, p 16-byte aligned) as fp32.
template <int n, typename T>
__device__ __forceinline__ void load_values(const T* p, float* out) {
#pragma unroll
  for (int i = 0; i < n / kPerVector<T>; ++i)
    unpack_vector(__ldg(reinterpret_cast<const uint4*>(p) + i), T{}, out + i * kPerVector<T>);
}

// kRowWarps warps per output channel, 8 warps per block. A warp reads its weight row 16 bytes per
// lane and load, lane l taking the l-th 16 bytes of each 512 (so each load instruction reads 512
// consecutive bytes), kGemvLoads loads in flight per lane; the activations for the same k come in
// the same pattern (16-bit weights read 16-bit activations: 16 bytes per lane again). With
// kRowWarps > 1 the warps of a row take turns by kGemvLoads * 512 bytes and their sums are added
// in warp order (deterministic): for long rows of few channels, whose single warps would each
// stream a long row alone (on an H200, 4096 x 11008 BF16 ran at 2.0 TB/s against 2.6 TB/s for
// 4096 x 4096 and 3.5 TB/s for 32000 x 4096).
constexpr int kGemvWarps = 8;
constexpr int kGemvLoads = 4;

template <typename W, typename X, bool kVector, int kRowWarps = 1>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(const X* x, const W* w, int M, int64_t N, int64_t K, Epilogue e, float* out) {
  static_assert(kGemvWarps % kRowWarps == 0 && (kVector || kRowWarps == 1), "whole rows per block");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, slice = warp % kRowWarps;
  const int64_t n = int64_t(blockIdx.x) * (kGemvWarps / kRowWarps) + warp / kRowWarps;
  const bool active = n < N;  // no early return: the row's warps meet at a barrier below
  const W* row = w + (active ? n : 0) * K;
  float acc[kGemvMaxM];
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = 0.0f;
  if constexpr (kVector) {
    // K is a multiple of 16, so a vector is either wholly inside the row or wholly past it.
    constexpr int kE = kPerVector<W>;
    constexpr int64_t kWarpStep = 32 * kE;  // weights per load instruction of the warp
    constexpr int64_t kTurn = kWarpStep * kGemvLoads;
    for (int64_t k0 = slice * kTurn + int64_t(lane) * kE; active && k0 < K; k0 += kTurn * kRowWarps) {
      uint4 raw[kGemvLoads];
#pragma unroll
      for (int u = 0; u < kGemvLoads; ++u)
        if (k0 + u * kWarpStep < K) raw[u] = __ldg(reinterpret_cast<const uint4*>(row + k0 + u * kWarpStep));
#pragma unroll
      for (int u = 0; u < kGemvLoads; ++u) {
        const int64_t k = k0 + u * kWarpStep;
        if (k < K) {
          float wf[kE];
          unpack_vector(raw[u], W{}, wf);
#pragma unroll
          for (int m = 0; m < kGemvMaxM; ++m) {
            if (m < M) {
              float xf[kE];
              load_values<kE>(x + m * K + k, xf);
#pragma unroll
              for (int i = 0; i < kE; ++i) acc[m] = fmaf(xf[i], wf[i], acc[m]);
            }
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; active && k < K; k += 32) {
      const float wf = to_f32(row[k]);
#pragma unroll
      for (int m = 0; m < kGemvMaxM; ++m)
        if (m < M) acc[m] = fmaf(to_f32(x[m * K + k]), wf, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = m < M ? warp_sum(acc[m]) : 0.0f;
  if constexpr (kRowWarps > 1) {
    __shared__ float sums[kGemvWarps][kGemvMaxM];
    if (lane == 0)
#pragma unroll
      for (int m = 0; m < kGemvMaxM; ++m) sums[warp][m] = acc[m];
    __syncthreads();
    if (slice != 0) return;
#pragma unroll
    for (int m = 0; m < kGemvMaxM; ++m)
      for (int r = 1; r < kRowWarps; ++r) acc[m] += sums[warp + r][m];
  }
  if (!active || lane != 0) return;
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m)
    if (m < M) out[m * N + n] = e.apply(acc[m], m, n);
}

// ---- RoPE + KV write ------------------------------------------------------------------------

// One head's K or V row into the cache: converted (float types), or quantized (engine/backend.h's
// KvLayer): INT8 with this token's scale amax / 127 (one warp per row), FP8 with the layer's scale.
// src(d): the row's value d. A lane's values (head_dim <= 32 * kKvLaneValues) are all loaded
// before any is stored (see for_row_batches); past the row, the row's last value again, unused.
constexpr int kKvLaneValues = 8;
template <typename KvT, typename Src>
__device__ void write_kv_row(Src src, int head_dim, KvT* dst, float* scale, int64_t head, int lane,
                             unsigned long long* clipped_counter) {
  float x[kKvLaneValues];
#pragma unroll
  for (int j = 0; j < kKvLaneValues; ++j) x[j] = src(min(lane + 32 * j, head_dim - 1));
  auto in_row = [&](int j) { return lane + 32 * j < head_dim; };
  if constexpr (std::is_same<KvT, int8_t>::value) {
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kKvLaneValues; ++j)
      if (in_row(j)) amax = fmaxf(amax, fabsf(x[j]));
    amax = warp_max(amax);
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    if (lane == 0) scale[head] = amax / 127.0f;
#pragma unroll
    for (int j = 0; j < kKvLaneValues; ++j)
      if (in_row(j)) dst[lane + 32 * j] = int8_t(fminf(fmaxf(rintf(__fmul_rn(x[j], inv)), -127.0f), 127.0f));
  } else if constexpr (std::is_same<KvT, fp8>::value) {
    const float inv = 1.0f / scale[0];
    unsigned clipped = 0;
#pragma unroll
    for (int j = 0; j < kKvLaneValues; ++j) {
      if (!in_row(j)) continue;
      const float v = __fmul_rn(x[j], inv);
      clipped += fabsf(v) > 448.0f;
      dst[lane + 32 * j].bits = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    }
    for (int o = 16; o > 0; o >>= 1) clipped += __shfl_xor_sync(0xffffffffu, clipped, o);
    if (clipped_counter && lane == 0 && clipped) atomicAdd(clipped_counter, (unsigned long long)clipped);
  } else {
#pragma unroll
    for (int j = 0; j < kKvLaneValues; ++j)
      if (in_row(j)) dst[lane + 32 * j] = from_f32<KvT>(x[j]);
  }
}

// rope_kv_kernel's launch: a warp per head of a token (the q heads, then the kv heads), 4 a block;
// blocks (token, group of 4 heads), so that a decode step of one token still spreads over many
// multiprocessors (one block per token took 32 us a layer on an H200).
constexpr int kRopeWarps = 4;
inline dim3 rope_kv_grid(int64_t n_tokens, int num_q_heads, int num_kv_heads) {
  return dim3(unsigned(n_tokens), unsigned((num_q_heads + num_kv_heads + kRopeWarps - 1) / kRopeWarps));
}

template <typename KvT>
__global__ void __launch_bounds__(kRopeWarps * 32)
    rope_kv_kernel(float* q, int64_t q_cols, float* k, const float* v, int64_t kv_cols, const float* inv_freq,
                   int head_dim, int num_kv_heads, int block_size, KvT* k_cache, KvT* v_cache, float* k_scale,
                   float* v_scale, const int32_t* positions, const int32_t* slots, unsigned long long* counters,
                   Epilogue q_scales, Epilogue k_scales, Epilogue v_scales) {
  const int64_t t = blockIdx.x;
  const int num_q_heads = int(q_cols / head_dim), lane = threadIdx.x % 32;
  const int item = int(blockIdx.y) * kRopeWarps + int(threadIdx.x) / 32;
  if (item >= num_q_heads + num_kv_heads) return;  // no block barrier below
  const bool is_k = item >= num_q_heads;
  const int h = is_k ? item - num_q_heads : item, half = head_dim / 2;
  const int64_t col0 = int64_t(h) * head_dim;  // the head's first column in q, k and v
  float* head = is_k ? k + t * kv_cols + col0 : q + t * q_cols + col0;
  const Epilogue scales = is_k ? k_scales : q_scales;  // a copy: a reference to one of two parameters puts both on the stack
  const float position = float(positions[t]);
  // As the CPU backend (and Hugging Face): angle = position * inv_freq in fp32, then cos and sin.
  for (int j = lane; j < half; j += 32) {
    const float angle = __fmul_rn(position, inv_freq[j]);
    const float c = cosf(angle), s = sinf(angle);
    const float x0 = scales.apply(head[j], t, col0 + j), x1 = scales.apply(head[j + half], t, col0 + j + half);
    head[j] = __fmul_rn(x0, c) - __fmul_rn(x1, s);
    head[j + half] = __fmul_rn(x1, c) + __fmul_rn(x0, s);
  }
  if (!is_k) return;
  __syncwarp();  // the rotated k row is read by other lanes below
  const int64_t slot = slots[t];
  const int64_t block = slot / block_size, offset = slot % block_size;
  const int64_t at = (block * num_kv_heads + h) * block_size + offset;  // the scale's index
  write_kv_row<KvT>([&](int d) { return head[d]; }, head_dim, k_cache + at * head_dim, k_scale, at, lane,
                    counters ? counters + 2 : nullptr);  // kKClipped
  const float* v_row = v + t * kv_cols + col0;
  write_kv_row<KvT>([&](int d) { return v_scales.apply(v_row[d], t, col0 + d); }, head_dim, v_cache + at * head_dim,
                    v_scale, at, lane, counters ? counters + 3 : nullptr);  // kVClipped
  if (std::is_same<KvT, fp8>::value && counters && h == 0 && lane == 0)
    atomicAdd(&counters[4], (unsigned long long)(num_kv_heads * head_dim));  // kKvStatic, once a token
}

// ---- Paged attention --------------------------------------------------------------------------
//
// Three kernels read the paged cache through the block table, all with an online softmax in fp32
// (running max m, running sum l, output rescaled by exp(m_old - m_new)), so long contexts
// accumulate P.V without overflow or loss:
//  - attention_kernel, on CUDA cores in fp32: one block per (query tile of up to 16 tokens, head,
//    key split): short runs of tokens. With few (tile, head) blocks the keys are split and each
//    split writes its unnormalized output with (m, l); attention_combine_kernel merges them
//    (FlashDecoding).
//  - attention_decode_kernel (below), on CUDA cores in fp32, the same work when every tile is one
//    token: decode steps (head_dim 64 and 128).
//  - attention_mma_kernel, on tensor cores for 16-bit and 8-bit caches (codes dequantized to F16
//    in shared memory): one block of 4 warps per (query tile of up to 128 tokens, head), each
//    warp 32 query rows, S = Q.K^T and O += P.V with mma.sync (16-bit inputs, fp32
//    accumulation). Prefill uses it.

constexpr int kTileQ = kAttentionTileQ;
constexpr int kAttentionThreads = 128;

constexpr size_t attention_smem_bytes(int head_dim) {
  return sizeof(float) * size_t(2 * kTileQ * head_dim + kTileK * (head_dim + 1) + kTileQ * kTileK + 3 * kTileQ);
}

template <typename KvT>
__global__ void __launch_bounds__(kAttentionThreads)
    attention_kernel(const float* q, int64_t q_cols, const KvT* k_cache, const KvT* v_cache, AttentionArgs a,
                     DevicePlan plan, float* partial_o, float* partial_ml, float* out) {
  LLMQ_DYNAMIC_SHARED(float, smem);
  const int D = a.head_dim, Dp = D + 1;
  float* q_s = smem;                 // [kTileQ][D], pre-scaled
  float* o_s = q_s + kTileQ * D;     // [kTileQ][D]
  float* kv_s = o_s + kTileQ * D;    // [kTileK][D + 1]: K, then V of the key tile
  float* p_s = kv_s + kTileK * Dp;   // [kTileQ][kTileK]: scores, then probabilities
  float* m_s = p_s + kTileQ * kTileK;
  float* l_s = m_s + kTileQ;
  float* c_s = l_s + kTileQ;
  __shared__ int pos_s[kTileQ];
  __shared__ int64_t offset_s[kTileK];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tile = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int t0 = plan.small.first[tile], count = plan.small.count[tile];
  const int32_t* blocks = plan.block_ids + plan.block_offsets[plan.token_seq[t0]];
  const int kv_head = h / (a.num_heads / a.num_kv_heads);

  int lo, hi;
  tile_key_range(plan.positions, t0, count, a.sliding_window, &lo, &hi);
  const int range = hi + 1 - lo;
  const int chunk = ((range + a.n_splits - 1) / a.n_splits + kTileK - 1) / kTileK * kTileK;
  const int key_begin = lo + split * chunk, key_end = min(hi + 1, key_begin + chunk);

  for (int i = tid; i < kTileQ * D; i += kAttentionThreads) {
    const int r = i / D, d = i % D;
    q_s[i] = r < count ? q[int64_t(t0 + r) * q_cols + int64_t(h) * D + d] * a.scale : 0.0f;
    o_s[i] = 0.0f;
  }
  if (tid < kTileQ) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
    pos_s[tid] = tid < count ? plan.positions[t0 + tid] : -1;
  }
  // One key tile of K or V into kv_s as fp32 (8-bit codes times their scale): 16-byte loads when
  // rows allow, all in flight at once.
  const bool vector = (D * int(sizeof(KvT))) % 16 == 0;
  constexpr int per_vector = kPerVector<KvT>;
  auto scale_of = [&](const float* scale, int64_t offset) {
    return scale ? scale[a.scale_per_token ? offset / D : 0] : 1.0f;
  };
  auto load_tile = [&](const KvT* cache, const float* scale) {
    if (vector) {
      const int vectors = D / per_vector;
#pragma unroll 4
      for (int i = tid; i < kTileK * vectors; i += kAttentionThreads) {
        const int j = i / vectors, c = i % vectors;
        const int64_t offset = offset_s[j];
        float values[16];
        uint4 raw = make_uint4(0, 0, 0, 0);
        float s = 0.0f;
        if (offset >= 0) {
          raw = __ldg(reinterpret_cast<const uint4*>(cache + offset + c * per_vector));
          s = scale_of(scale, offset);
        }
        unpack_vector(raw, KvT{}, values);
        for (int e = 0; e < per_vector; ++e) kv_s[j * Dp + c * per_vector + e] = values[e] * s;
      }
    } else {
      for (int i = tid; i < kTileK * D; i += kAttentionThreads) {
        const int j = i / D, d = i % D;
        const int64_t offset = offset_s[j];
        kv_s[j * Dp + d] = offset >= 0 ? to_f32(cache[offset + d]) * scale_of(scale, offset) : 0.0f;
      }
    }
  };

  for (int key0 = key_begin; key0 < key_end; key0 += kTileK) {
    __syncthreads();  // the previous tile's V and offsets are no longer read
    key_offsets(blocks, key0, key_end, a.block_size, a.num_kv_heads, kv_head, D, offset_s);
    __syncthreads();
    load_tile(k_cache, a.k_scale);
    __syncthreads();
    for (int i = tid; i < count * kTileK; i += kAttentionThreads) {
      const int r = i / kTileK, j = i % kTileK, key = key0 + j, p = pos_s[r];
      const int window_lo = a.sliding_window > 0 ? p - a.sliding_window + 1 : 0;
      float s = -INFINITY;
      if (key < key_end && key <= p && key >= window_lo) {
        s = 0.0f;
        for (int d = 0; d < D; ++d) s = fmaf(q_s[r * D + d], kv_s[j * Dp + d], s);
      }
      p_s[i] = s;
    }
    __syncthreads();
    for (int r = warp; r < count; r += kAttentionThreads / 32) {
      const float s0 = p_s[r * kTileK + lane], s1 = p_s[r * kTileK + lane + 32];
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
      const bool none = m_new == -INFINITY;  // every key so far is masked
      const float p0 = none ? 0.0f : expf(s0 - m_new), p1 = none ? 0.0f : expf(s1 - m_new);
      const float correction = none ? 1.0f : expf(m_old - m_new);
      const float sum = warp_sum(p0 + p1);
      p_s[r * kTileK + lane] = p0;
      p_s[r * kTileK + lane + 32] = p1;
      if (lane == 0) {
        m_s[r] = m_new;
        l_s[r] = l_s[r] * correction + sum;
        c_s[r] = correction;
      }
    }
    load_tile(v_cache, a.v_scale);  // K is no longer read after the barrier above
    __syncthreads();
    for (int i = tid; i < count * D; i += kAttentionThreads) {
      const int r = i / D, d = i % D;
      float o = o_s[i] * c_s[r];
      for (int j = 0; j < kTileK; ++j) o = fmaf(p_s[r * kTileK + j], kv_s[j * Dp + d], o);
      o_s[i] = o;
    }
  }
  __syncthreads();

  for (int i = tid; i < count * D; i += kAttentionThreads) {
    const int r = i / D, d = i % D;
    const int64_t t = t0 + r;
    if (a.n_splits == 1) {
      const float l = l_s[r];
      const float value = l > 0.0f ? o_s[i] / l : 0.0f;
      out[t * q_cols + int64_t(h) * D + d] = value;
      store_rounded(a.rounded, t * q_cols + int64_t(h) * D + d, value);
    } else {
      const int64_t part = (t * a.num_heads + h) * a.n_splits + split;
      partial_o[part * D + d] = o_s[i];
      if (d == 0) {
        partial_ml[part * 2] = m_s[r];
        partial_ml[part * 2 + 1] = l_s[r];
      }
    }
  }
}

// ---- Decode attention ---------------------------------------------------------------------------
//
// attention_decode_kernel: attention_kernel's work when every query tile is one token (a decode
// step), with its outputs (out, or a split's unnormalized o with (m, l) for
// attention_combine_kernel). One block of kDecodeWarps warps per (token, head, key split); a warp
// takes 8 keys a round: 4 lanes a key for Q.K (each lane a quarter of the key's 16-byte chunks,
// interleaved so that a load instruction reads whole 64-byte pieces of each row), then every lane
// D / 32 dims of the 8 V rows, with an online softmax in base-2 units (log2 e folded into q's scale:
// exp2f), its own (m, l, o) per warp, and no block barrier until the warps merge at the end. (The
// tiled kernel, one query row of 16 in use, took 145 us a layer for 64 sequences of ~144 tokens on
// an H200: 4x its cache's bandwidth.)
constexpr int kDecodeWarps = 4;

// N values of a cache row from p as fp32 (exact; 8-bit codes unscaled): 16-byte loads, or one
// narrower load below 16 bytes.
template <typename KvT, int N>
__device__ __forceinline__ void load_values(const KvT* p, float* out) {
  constexpr int bytes = N * int(sizeof(KvT));
  if constexpr (bytes >= 16) {
    static_assert(bytes % 16 == 0, "whole 16-byte chunks");
#pragma unroll
    for (int c = 0; c < bytes / 16; ++c)
      unpack_vector(__ldg(reinterpret_cast<const uint4*>(p) + c), KvT{}, out + c * kPerVector<KvT>);
  } else {
    uint4 v = make_uint4(0, 0, 0, 0);
    if constexpr (bytes == 8) {
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(p));
      v.x = w.x;
      v.y = w.y;
    } else if constexpr (bytes == 4) {
      v.x = __ldg(reinterpret_cast<const unsigned*>(p));
    } else {
      static_assert(bytes == 2, "2, 4, 8 or a multiple of 16 bytes");
      v.x = __ldg(reinterpret_cast<const unsigned short*>(p));
    }
    float all[16];
    unpack_vector(v, KvT{}, all);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = all[e];
  }
}

// Whether attention_decode_kernel takes this head_dim (its K chunks split 4 ways, V over 32 lanes).
constexpr bool attention_decode_fits(int head_dim) { return head_dim == 64 || head_dim == 128; }

template <typename KvT, int D>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    attention_decode_kernel(const float* q, int64_t q_cols, const KvT* k_cache, const KvT* v_cache, AttentionArgs a,
                            DevicePlan plan, float* partial_o, float* partial_ml, float* out) {
  constexpr int kPerChunk = kPerVector<KvT>;                  // values in a 16-byte chunk
  constexpr int kChunks = D * int(sizeof(KvT)) / 16 / 4;      // chunks of a key row per lane
  constexpr int kDims = D / 32;                               // dims of V per lane
  static_assert(kChunks >= 1 && D % 32 == 0, "head_dim 64 or 128");
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, sub = lane / 4, part = lane % 4;
  const int t = plan.small.first[blockIdx.x];  // the tile's one token
  const int h = blockIdx.y, split = blockIdx.z;
  const int32_t* blocks = plan.block_ids + plan.block_offsets[plan.token_seq[t]];
  const int kv_head = h / (a.num_heads / a.num_kv_heads);
  int lo, hi;
  tile_key_range(plan.positions, t, 1, a.sliding_window, &lo, &hi);  // keys lo .. hi all count
  const int range = hi + 1 - lo;
  const int chunk = ((range + a.n_splits - 1) / a.n_splits + kTileK - 1) / kTileK * kTileK;  // as attention_kernel
  const int key_begin = lo + split * chunk, key_end = min(hi + 1, key_begin + chunk);

  // This lane's chunks of q (chunk 4c + part of the row), scaled, in base-2 units.
  const float q_scale = a.scale * 1.44269504088896341f;
  float qp[kChunks][kPerChunk];
  const float* qh = q + int64_t(t) * q_cols + int64_t(h) * D;
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
#pragma unroll
    for (int e = 0; e < kPerChunk; ++e) qp[c][e] = qh[(4 * c + part) * kPerChunk + e] * q_scale;
  auto offset_of = [&](int key) {
    return kv_row_offset(blocks[key / a.block_size], key, a.block_size, a.num_kv_heads, kv_head, D);
  };
  auto scale_of = [&](const float* scale, int64_t offset) {
    return scale ? scale[a.scale_per_token ? offset / D : 0] : 1.0f;
  };

  float m = -INFINITY, l = 0.0f, o[kDims];
#pragma unroll
  for (int e = 0; e < kDims; ++e) o[e] = 0.0f;
  for (int key0 = key_begin + 8 * warp; key0 < key_end; key0 += 8 * kDecodeWarps) {
    // Keys past key_end (the last round's) read key0's rows instead (finite values, no branch),
    // and count as score -inf, probability 0.
    const int key = key0 + sub;
    const bool valid = key < key_end;
    const int64_t offset = offset_of(valid ? key : key0);
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      float kv[kPerChunk];
      load_values<KvT, kPerChunk>(k_cache + offset + (4 * c + part) * kPerChunk, kv);
#pragma unroll
      for (int e = 0; e < kPerChunk; ++e) s = fmaf(qp[c][e], kv[e], s);
    }
    s += __shfl_xor_sync(full, s, 1);  // the key's 4 parts
    s += __shfl_xor_sync(full, s, 2);
    s = valid ? s * scale_of(a.k_scale, offset) : -INFINITY;
    float round_max = s;
    for (int x = 4; x < 32; x <<= 1) round_max = fmaxf(round_max, __shfl_xor_sync(full, round_max, x));
    const float m_new = fmaxf(m, round_max);
    const float m_sub = m_new == -INFINITY ? 0.0f : m_new;  // no key yet: exp2(-inf) = 0, never NaN
    const float correction = exp2f(m - m_sub), p = exp2f(s - m_sub);
    float p_sum = p;  // over the round's 8 keys (lanes of one part)
    for (int x = 4; x < 32; x <<= 1) p_sum += __shfl_xor_sync(full, p_sum, x);
    l = l * correction + p_sum;
    m = m_new;
#pragma unroll
    for (int e = 0; e < kDims; ++e) o[e] *= correction;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float pj = __shfl_sync(full, p, 4 * j);
      const int64_t offset_j = __shfl_sync(full, offset, 4 * j);
      float vv[kDims];
      load_values<KvT, kDims>(v_cache + offset_j + lane * kDims, vv);
      const float vs = scale_of(a.v_scale, offset_j);
#pragma unroll
      for (int e = 0; e < kDims; ++e) o[e] = fmaf(pj, vv[e] * vs, o[e]);
    }
  }

  // The warps' (m, l, o) merged: each scaled by exp2(m_w - m).
  __shared__ float m_w[kDecodeWarps], l_w[kDecodeWarps], o_w[kDecodeWarps][D];
  if (lane == 0) {
    m_w[warp] = m;
    l_w[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < kDims; ++e) o_w[warp][lane * kDims + e] = o[e];
  __syncthreads();
  float m_block = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) m_block = fmaxf(m_block, m_w[w]);
  const float m_sub = m_block == -INFINITY ? 0.0f : m_block;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o_block = 0.0f, l_block = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float c = exp2f(m_w[w] - m_sub);
      o_block += o_w[w][d] * c;
      l_block += l_w[w] * c;
    }
    if (a.n_splits == 1) {
      const float value = l_block > 0.0f ? o_block / l_block : 0.0f;
      out[int64_t(t) * q_cols + int64_t(h) * D + d] = value;
      store_rounded(a.rounded, int64_t(t) * q_cols + int64_t(h) * D + d, value);
    } else {
      const int64_t at = (int64_t(t) * a.num_heads + h) * a.n_splits + split;
      partial_o[at * D + d] = o_block;
      if (d == 0) {
        partial_ml[at * 2] = m_block * 0.693147180559945309f;  // natural units, as attention_kernel's
        partial_ml[at * 2 + 1] = l_block;
      }
    }
  }
}

__global__ void attention_combine_kernel(const float* partial_o, const float* partial_ml, int num_heads, int n_splits,
                                         int head_dim, int64_t out_cols, float* out, RoundedCopy rounded) {
  const int64_t t = blockIdx.x / num_heads;
  const int h = blockIdx.x % num_heads;
  const int64_t first = int64_t(blockIdx.x) * n_splits;
  float m = -INFINITY;
  for (int s = 0; s < n_splits; ++s) m = fmaxf(m, partial_ml[(first + s) * 2]);
  // The sum over splits of value(split) * exp(m_split - m), empty splits (m = -inf) left out, in
  // split order. kCombineBatch splits at a time, every load of a batch before any add (a load
  // behind each split's test waited for the one before: one L2 round trip a split). Past the last
  // split: the last again, not added.
  constexpr int kCombineBatch = 8;
  auto weighted_sum = [&](auto&& value) {
    float sum = 0.0f;
    for (int s0 = 0; s0 < n_splits; s0 += kCombineBatch) {
      float ms[kCombineBatch], vs[kCombineBatch];
#pragma unroll
      for (int u = 0; u < kCombineBatch; ++u) {
        const int64_t split = first + min(s0 + u, n_splits - 1);
        ms[u] = partial_ml[split * 2];
        vs[u] = value(split);
      }
#pragma unroll
      for (int u = 0; u < kCombineBatch; ++u)
        if (s0 + u < n_splits && ms[u] != -INFINITY) sum += vs[u] * expf(ms[u] - m);
    }
    return sum;
  };
  const float l = weighted_sum([&](int64_t split) { return partial_ml[split * 2 + 1]; });
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    const float o = weighted_sum([&](int64_t split) { return partial_o[split * head_dim + d]; });
    const float value = l > 0.0f ? o / l : 0.0f;
    out[t * out_cols + int64_t(h) * head_dim + d] = value;
    store_rounded(rounded, t * out_cols + int64_t(h) * head_dim + d, value);
  }
}

}  // namespace
}  // namespace llmq::cuda
