// The CUDA backend's kernels. Arithmetic is fp32 throughout, in the order the CPU backend uses
// where it matters for agreement (engine/quant.h's quantize-then-multiply-then-scale).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "engine/error.h"
#include "kernels/cuda/cuda_kernels.h"

namespace llmq::cuda {

namespace {

// ---- Element types ------------------------------------------------------------------------

using bf16 = __nv_bfloat16;
using f16 = __half;
struct fp8 {  // one FP8 E4M3 code
  uint8_t bits;
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(int8_t v) { return float(v); }
__device__ __forceinline__ float fp8_to_f32(uint32_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(code), __NV_E4M3)));
}
__device__ __forceinline__ float to_f32(fp8 v) { return fp8_to_f32(v.bits); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ f16 from_f32<f16>(float v) { return __float2half_rn(v); }

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) for a 16/32-bit float dtype.
template <typename Fn>
void with_float_type(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::F32:
      return fn(Tag<float>{});
    case DType::BF16:
      return fn(Tag<bf16>{});
    case DType::F16:
      return fn(Tag<f16>{});
    default:
      fail(LLMQ_ERR_UNSUPPORTED, "cuda backend: {} of dtype {} is not supported", what, dtype_name(dtype));
  }
}

int blocks_for(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 65536)); }

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

template <typename T>
__global__ void embed_kernel(const T* table, int64_t dim, const int32_t* tokens, float* out) {
  const int64_t row = blockIdx.x;
  const T* src = table + int64_t(tokens[row]) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[row * dim + i] = to_f32(src[i]);
}

template <typename T>
__global__ void rmsnorm_kernel(float* residual, const float* x, const T* w, float eps, int64_t dim, float* out) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float* rr = residual ? residual + row * dim : nullptr;
  float sum_squares = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = xr[i];
    if (rr) {
      v = rr[i] + v;
      rr[i] = v;
    }
    sum_squares += v * v;
  }
  sum_squares = block_reduce<false>(sum_squares);
  const float inv = 1.0f / sqrtf(sum_squares / float(dim) + eps);
  const float* src = rr ? rr : xr;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[row * dim + i] = __fmul_rn(src[i], inv) * to_f32(w[i]);
}

__global__ void silu_mul_kernel(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

__global__ void gather_rows_kernel(const float* x, int64_t cols, const int32_t* rows, float* out) {
  const int64_t i = blockIdx.x;
  const float* src = x + int64_t(rows[i]) * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = src[c];
}

template <typename T>
__global__ void convert_kernel(const float* x, int64_t n, T* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(x[i]);
}

__global__ void quantize_fp8_rows_kernel(const float* x, int64_t cols, uint8_t* codes, float* row_scales) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * cols;
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(xr[i]));
  amax = block_reduce<true>(amax);
  const float inv = amax > 0.0f ? 448.0f / amax : 0.0f;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
    codes[row * cols + i] = __nv_cvt_float_to_fp8(__fmul_rn(xr[i], inv), __NV_SATFINITE, __NV_E4M3);
  if (threadIdx.x == 0) row_scales[row] = amax / 448.0f;
}

template <typename T>
__global__ void dequantize_i8_kernel(const int8_t* q, int64_t n, T* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(float(q[i]));
}

struct Epilogue {
  const float* row_scale = nullptr;
  const float* w_scale = nullptr;
  bool per_channel = false;
  const void* bias = nullptr;
  DType bias_dtype = DType::F32;

  __device__ __forceinline__ float apply(float acc, int64_t m, int64_t n) const {
    if (w_scale) {
      const float ws = w_scale[per_channel ? n : 0];
      acc *= row_scale ? row_scale[m] * ws : ws;
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

__global__ void epilogue_kernel(float* out, int64_t M, int64_t N, Epilogue e) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = e.apply(out[i], i / N, i % N);
}

// ---- Quantized GEMV: one warp per output channel, all M (<= 8) tokens at once ---------------

// 16 one-byte codes or 8 two-byte values of a 16-byte vector, as fp32 (exact).
__device__ __forceinline__ void unpack16(uint4 v, int8_t, float* out) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) out[i] = float(int8_t(words[i / 4] >> (8 * (i % 4))));
}
__device__ __forceinline__ void unpack16(uint4 v, fp8, float* out) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) out[i] = fp8_to_f32((words[i / 4] >> (8 * (i % 4))) & 0xffu);
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
template <typename X>
__device__ __forceinline__ void load_x16(const X* p, float* out) {
  if constexpr (sizeof(X) == 1) {
    unpack16(*reinterpret_cast<const uint4*>(p), X{}, out);
  } else {
    unpack8(*reinterpret_cast<const uint4*>(p), X{}, out);
    unpack8(*reinterpret_cast<const uint4*>(p + 8), X{}, out + 8);
  }
}

constexpr int kGemvWarps = 8;

template <typename W, typename X, bool kVector>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(const X* x, const W* w, int M, int64_t N, int64_t K, Epilogue e, float* out) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (n >= N) return;
  const W* row = w + n * K;
  float acc[kGemvMaxM];
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = 0.0f;
  if constexpr (kVector) {
    // Each lane streams 16 weights per step: one 16-byte load, dequantized in registers.
    for (int64_t k = int64_t(lane) * 16; k < K; k += 32 * 16) {
      float wf[16];
      unpack16(__ldg(reinterpret_cast<const uint4*>(row + k)), W{}, wf);
#pragma unroll
      for (int m = 0; m < kGemvMaxM; ++m) {
        if (m < M) {
          float xf[16];
          load_x16(x + m * K + k, xf);
#pragma unroll
          for (int i = 0; i < 16; ++i) acc[m] = fmaf(xf[i], wf[i], acc[m]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wf = to_f32(row[k]);
#pragma unroll
      for (int m = 0; m < kGemvMaxM; ++m)
        if (m < M) acc[m] = fmaf(to_f32(x[m * K + k]), wf, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) {
    if (m < M) {
      const float sum = warp_sum(acc[m]);
      if (lane == 0) out[m * N + n] = e.apply(sum, m, n);
    }
  }
}

// ---- RoPE + KV write ------------------------------------------------------------------------

template <typename KvT>
__global__ void rope_kv_kernel(float* q, int64_t q_cols, float* k, const float* v, int64_t kv_cols,
                               const float* inv_freq, int head_dim, int num_kv_heads, int block_size, KvT* k_cache,
                               KvT* v_cache, const int32_t* positions, const int32_t* slots) {
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int num_q_heads = int(q_cols / head_dim);
  const float position = float(positions[t]);
  const int64_t slot = slots[t];
  const int64_t block = slot / block_size, offset = slot % block_size;
  auto cache_index = [&](int h, int d) { return ((block * num_kv_heads + h) * block_size + offset) * head_dim + d; };
  // As the CPU backend (and Hugging Face): angle = position * inv_freq in fp32, then cos and sin.
  for (int i = threadIdx.x; i < (num_q_heads + num_kv_heads) * half; i += blockDim.x) {
    const int h = i / half, j = i % half;
    const bool is_q = h < num_q_heads;
    float* head = is_q ? q + t * q_cols + int64_t(h) * head_dim : k + t * kv_cols + int64_t(h - num_q_heads) * head_dim;
    const float angle = __fmul_rn(position, inv_freq[j]);
    const float c = cosf(angle), s = sinf(angle);
    const float x0 = head[j], x1 = head[j + half];
    const float y0 = __fmul_rn(x0, c) - __fmul_rn(x1, s);
    const float y1 = __fmul_rn(x1, c) + __fmul_rn(x0, s);
    head[j] = y0;
    head[j + half] = y1;
    if (!is_q) {
      k_cache[cache_index(h - num_q_heads, j)] = from_f32<KvT>(y0);
      k_cache[cache_index(h - num_q_heads, j + half)] = from_f32<KvT>(y1);
    }
  }
  for (int i = threadIdx.x; i < num_kv_heads * head_dim; i += blockDim.x)
    v_cache[cache_index(i / head_dim, i % head_dim)] = from_f32<KvT>(v[t * kv_cols + i]);
}

// ---- Paged attention --------------------------------------------------------------------------
//
// One block per (query tile, head, key split). A tile is up to kAttentionTileQ consecutive tokens
// of one sequence; keys are visited in tiles of kTileK through the block table with an online
// softmax in fp32 (running max m, running sum l, output rescaled by exp(m_old - m_new)), so long
// contexts accumulate P.V without overflow or loss. With several splits, each writes its
// unnormalized output with (m, l) and attention_combine_kernel merges them (FlashDecoding).

constexpr int kTileQ = kAttentionTileQ;
constexpr int kTileK = 64;
constexpr int kAttentionThreads = 128;

size_t attention_smem_bytes(int head_dim) {
  return sizeof(float) * size_t(2 * kTileQ * head_dim + kTileK * (head_dim + 1) + kTileQ * kTileK + 3 * kTileQ);
}

template <typename KvT>
__global__ void __launch_bounds__(kAttentionThreads)
    attention_kernel(const float* q, int64_t q_cols, const KvT* k_cache, const KvT* v_cache, AttentionArgs a,
                     DevicePlan plan, float* partial_o, float* partial_ml, float* out) {
  extern __shared__ float smem[];
  const int D = a.head_dim, Dp = D + 1;
  float* q_s = smem;                 // [kTileQ][D], pre-scaled
  float* o_s = q_s + kTileQ * D;     // [kTileQ][D]
  float* kv_s = o_s + kTileQ * D;    // [kTileK][D + 1]: K, then V of the key tile
  float* p_s = kv_s + kTileK * Dp;   // [kTileQ][kTileK]: scores, then probabilities
  float* m_s = p_s + kTileQ * kTileK;
  float* l_s = m_s + kTileQ;
  float* c_s = l_s + kTileQ;
  __shared__ int pos_s[kTileQ];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tile = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int t0 = plan.tile_first[tile], count = plan.tile_count[tile];
  const int32_t* blocks = plan.block_ids + plan.block_offsets[plan.token_seq[t0]];
  const int kv_head = h / (a.num_heads / a.num_kv_heads);

  int lo = INT_MAX, hi = -1;
  for (int r = 0; r < count; ++r) {
    const int p = plan.positions[t0 + r];
    hi = max(hi, p);
    lo = min(lo, a.sliding_window > 0 ? max(0, p - a.sliding_window + 1) : 0);
  }
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
  auto load_tile = [&](const KvT* cache, int key0) {
    for (int i = tid; i < kTileK * D; i += kAttentionThreads) {
      const int j = i / D, d = i % D, key = key0 + j;
      float value = 0.0f;
      if (key < key_end) {
        const int64_t block = blocks[key / a.block_size];
        value = to_f32(cache[((block * a.num_kv_heads + kv_head) * a.block_size + key % a.block_size) * D + d]);
      }
      kv_s[j * Dp + d] = value;
    }
  };
  __syncthreads();

  for (int key0 = key_begin; key0 < key_end; key0 += kTileK) {
    load_tile(k_cache, key0);
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
    load_tile(v_cache, key0);  // K is no longer read after the barrier above
    __syncthreads();
    for (int i = tid; i < count * D; i += kAttentionThreads) {
      const int r = i / D, d = i % D;
      float o = o_s[i] * c_s[r];
      for (int j = 0; j < kTileK; ++j) o = fmaf(p_s[r * kTileK + j], kv_s[j * Dp + d], o);
      o_s[i] = o;
    }
    __syncthreads();
  }

  for (int i = tid; i < count * D; i += kAttentionThreads) {
    const int r = i / D, d = i % D;
    const int64_t t = t0 + r;
    if (a.n_splits == 1) {
      const float l = l_s[r];
      out[t * q_cols + int64_t(h) * D + d] = l > 0.0f ? o_s[i] / l : 0.0f;
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

__global__ void attention_combine_kernel(const float* partial_o, const float* partial_ml, int num_heads, int n_splits,
                                         int head_dim, int64_t out_cols, float* out) {
  const int64_t t = blockIdx.x / num_heads;
  const int h = blockIdx.x % num_heads;
  const int64_t first = int64_t(blockIdx.x) * n_splits;
  float m = -INFINITY;
  for (int s = 0; s < n_splits; ++s) m = fmaxf(m, partial_ml[(first + s) * 2]);
  float l = 0.0f;
  for (int s = 0; s < n_splits; ++s) {
    const float ms = partial_ml[(first + s) * 2];
    if (ms != -INFINITY) l += partial_ml[(first + s) * 2 + 1] * expf(ms - m);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
      const float ms = partial_ml[(first + s) * 2];
      if (ms != -INFINITY) o += partial_o[(first + s) * head_dim + d] * expf(ms - m);
    }
    out[t * out_cols + int64_t(h) * head_dim + d] = l > 0.0f ? o / l : 0.0f;
  }
}

}  // namespace

// ---- Launchers ------------------------------------------------------------------------------

void embed(const void* table, DType dtype, int64_t dim, const DevicePlan& plan, int64_t rows, float* out,
           cudaStream_t stream) {
  with_float_type(dtype, "embedding table", [&](auto tag) {
    using T = typename decltype(tag)::type;
    embed_kernel<T><<<unsigned(rows), 256, 0, stream>>>(static_cast<const T*>(table), dim, plan.tokens, out);
  });
}

void rmsnorm(float* residual, const float* x, const void* weight, DType w_dtype, float eps, int64_t rows,
             int64_t dim, float* out, cudaStream_t stream) {
  with_float_type(w_dtype, "norm weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = dim >= 1024 ? 512 : dim >= 256 ? 256 : 64;
    rmsnorm_kernel<T><<<unsigned(rows), threads, 0, stream>>>(residual, x, static_cast<const T*>(weight), eps, dim, out);
  });
}

void silu_mul(const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream) {
  silu_mul_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(gate, up, n, out);
}

void gather_rows(const float* x, int64_t cols, const DevicePlan& plan, int64_t rows, float* out, cudaStream_t stream) {
  gather_rows_kernel<<<unsigned(rows), 256, 0, stream>>>(x, cols, plan.logit_rows, out);
}

void convert_activations(const float* x, int64_t n, DType dtype, void* out, cudaStream_t stream) {
  with_float_type(dtype, "activation", [&](auto tag) {
    using T = typename decltype(tag)::type;
    convert_kernel<T><<<blocks_for(n, 256), 256, 0, stream>>>(x, n, static_cast<T*>(out));
  });
}

void quantize_fp8_rows(const float* x, int64_t rows, int64_t cols, uint8_t* codes, float* row_scales,
                       cudaStream_t stream) {
  quantize_fp8_rows_kernel<<<unsigned(rows), 256, 0, stream>>>(x, cols, codes, row_scales);
}

void dequantize_i8(const int8_t* q, int64_t n, DType dtype, void* out, cudaStream_t stream) {
  with_float_type(dtype, "dequantized weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dequantize_i8_kernel<T><<<blocks_for(n, 256), 256, 0, stream>>>(q, n, static_cast<T*>(out));
  });
}

void linear_epilogue(float* out, int64_t M, int64_t N, const float* row_scale, const float* w_scale,
                     bool per_channel, const void* bias, DType bias_dtype, cudaStream_t stream) {
  if (!w_scale && !bias) return;
  Epilogue e{row_scale, w_scale, per_channel, bias, bias_dtype};
  epilogue_kernel<<<blocks_for(M * N, 256), 256, 0, stream>>>(out, M, N, e);
}

void quantized_gemv(const void* x, DType x_dtype, const void* w, DType w_dtype, int64_t M, int64_t N, int64_t K,
                    const float* row_scale, const float* w_scale, bool per_channel, const void* bias,
                    DType bias_dtype, float* out, cudaStream_t stream) {
  if (M < 1 || M > kGemvMaxM) fail(LLMQ_ERR_INTERNAL, "cuda backend: GEMV for {} rows", M);
  Epilogue e{row_scale, w_scale, per_channel, bias, bias_dtype};
  const bool vector = K % 16 == 0;
  const unsigned grid = unsigned((N + kGemvWarps - 1) / kGemvWarps);
  auto launch = [&](auto w_tag, auto x_tag) {
    using W = typename decltype(w_tag)::type;
    using X = typename decltype(x_tag)::type;
    if (vector)
      gemv_kernel<W, X, true><<<grid, kGemvWarps * 32, 0, stream>>>(static_cast<const X*>(x), static_cast<const W*>(w),
                                                                    int(M), N, K, e, out);
    else
      gemv_kernel<W, X, false><<<grid, kGemvWarps * 32, 0, stream>>>(static_cast<const X*>(x), static_cast<const W*>(w),
                                                                     int(M), N, K, e, out);
  };
  if (w_dtype == DType::I8 && x_dtype == DType::BF16)
    launch(Tag<int8_t>{}, Tag<bf16>{});
  else if (w_dtype == DType::I8 && x_dtype == DType::F16)
    launch(Tag<int8_t>{}, Tag<f16>{});
  else if (w_dtype == DType::F8_E4M3 && x_dtype == DType::F8_E4M3)
    launch(Tag<fp8>{}, Tag<fp8>{});
  else
    fail(LLMQ_ERR_INTERNAL, "cuda backend: no GEMV for {} weights and {} activations", dtype_name(w_dtype),
         dtype_name(x_dtype));
}

void rope_kv_write(float* q, int64_t q_cols, float* k, const float* v, int64_t kv_cols, const float* inv_freq,
                   int32_t head_dim, int32_t num_kv_heads, int32_t block_size, void* k_cache, void* v_cache,
                   DType kv_dtype, const DevicePlan& plan, int64_t n_tokens, cudaStream_t stream) {
  with_float_type(kv_dtype, "KV cache", [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope_kv_kernel<T><<<unsigned(n_tokens), 128, 0, stream>>>(q, q_cols, k, v, kv_cols, inv_freq, head_dim,
                                                              num_kv_heads, block_size, static_cast<T*>(k_cache),
                                                              static_cast<T*>(v_cache), plan.positions, plan.slots);
  });
}

void attention(const float* q, int64_t q_cols, const void* k_cache, const void* v_cache, DType kv_dtype,
               const AttentionArgs& args, const DevicePlan& plan, int64_t n_tokens, float* partial_o,
               float* partial_ml, float* out, cudaStream_t stream) {
  if (args.head_dim < 2 || args.head_dim > 256)
    fail(LLMQ_ERR_UNSUPPORTED, "cuda backend: head_dim {} is outside [2, 256]", args.head_dim);
  const size_t smem = attention_smem_bytes(args.head_dim);
  with_float_type(kv_dtype, "KV cache", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = attention_kernel<T>;
    static size_t configured = 48 * 1024;  // per instantiation: the dynamic shared memory allowed so far
    if (smem > configured) {
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      configured = smem;
    }
    dim3 grid(unsigned(plan.n_tiles), unsigned(args.num_heads), unsigned(args.n_splits));
    kernel<<<grid, kAttentionThreads, smem, stream>>>(q, q_cols, static_cast<const T*>(k_cache),
                                                      static_cast<const T*>(v_cache), args, plan, partial_o,
                                                      partial_ml, out);
  });
  if (args.n_splits > 1)
    attention_combine_kernel<<<unsigned(n_tokens * args.num_heads), 128, 0, stream>>>(
        partial_o, partial_ml, args.num_heads, args.n_splits, args.head_dim, q_cols, out);
}

}  // namespace llmq::cuda
