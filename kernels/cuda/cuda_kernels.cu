// The CUDA backend's kernel launchers (the kernels: kernels.cuh, attention_mma.cuh).
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <type_traits>

#include "engine/error.h"
#include "kernels/cuda/attention_mma.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/kernels.cuh"

namespace llmq::cuda {

namespace {

// Calls fn(Tag<T>{}) for a KV cache dtype: the float types, INT8 codes or FP8 codes.
template <typename Fn>
void with_kv_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::I8:
      return fn(Tag<int8_t>{});
    case DType::F8_E4M3:
      return fn(Tag<fp8>{});
    default:
      return with_float_type(dtype, "KV cache", fn);
  }
}

int blocks_for(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 65536)); }

// Whether an elementwise kernel may take 4 values a step (for_each_value): n a multiple of 4 and
// every pointer 16-byte aligned.
bool vectors_fit(int64_t n, std::initializer_list<const void*> pointers) {
  if (n % 4 != 0) return false;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

// ---- Launchers ------------------------------------------------------------------------------

void allow_shared_memory(const void* kernel, int bytes) {
  // Without the opt-in a block gets 48 KiB of shared memory in all: dynamic bytes plus the
  // kernel's static __shared__ variables (so 48 KiB of dynamic memory alone may not launch).
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes
  int device = 0;
  cudaGetDevice(&device);
  std::lock_guard<std::mutex> lock(mutex);
  int& done = allowed[{kernel, device}];
  if (done >= bytes) return;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it for the next launch's check
    fail(LLMQ_ERR_DEVICE, "cuda backend: a kernel cannot have {} bytes of dynamic shared memory: {} ({})", bytes,
         cudaGetErrorString(e), cudaGetErrorName(e));
  }
  done = bytes;
}

void embed(const void* table, DType dtype, int64_t first_id, int64_t table_rows, int64_t dim, const DevicePlan& plan,
           int64_t rows, float* out, cudaStream_t stream) {
  with_float_type(dtype, "embedding table", [&](auto tag) {
    using T = typename decltype(tag)::type;
    embed_kernel<T><<<unsigned(rows), 256, 0, stream>>>(static_cast<const T*>(table), first_id, table_rows, dim,
                                                        plan.tokens, out);
  });
}

void rmsnorm(float* residual, const float* x, const void* weight, DType w_dtype, float eps, int64_t rows,
             int64_t dim, float* out, RoundedCopy rounded, uint8_t* fp8_codes, float* fp8_row_scales,
             cudaStream_t stream) {
  with_float_type(w_dtype, "norm weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = dim >= 1024 ? 512 : dim >= 256 ? 256 : 64;
    rmsnorm_kernel<T><<<unsigned(rows), threads, 0, stream>>>(residual, x, static_cast<const T*>(weight), eps, dim, out,
                                                              NormCopy{rounded, fp8_codes, fp8_row_scales});
  });
}

void silu_mul(const float* gate, const float* up, int64_t rows, int64_t cols, void* out, DType out_dtype,
              cudaStream_t stream, const LinearScales& gate_scales, const LinearScales& up_scales) {
  with_float_type(out_dtype, "silu_mul output", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t n = rows * cols;
    const bool scaled = !gate_scales.none() || !up_scales.none();
    const bool vectors = vectors_fit(n, {gate, up, out}) && (!scaled || cols % 4 == 0);
    silu_mul_kernel<T><<<blocks_for(vectors ? n / 4 : n, 256), 256, 0, stream>>>(
        SiluMulOf{gate, up, cols, {gate_scales}, {up_scales}}, n, static_cast<T*>(out), vectors);
  });
}

void gather_rows(const float* x, int64_t cols, const DevicePlan& plan, int64_t rows, float* out, cudaStream_t stream) {
  gather_rows_kernel<<<unsigned(rows), 256, 0, stream>>>(x, cols, plan.logit_rows, out);
}

void convert_activations(const float* x, int64_t n, DType dtype, void* out, cudaStream_t stream) {
  with_float_type(dtype, "activation", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vectors = vectors_fit(n, {x, out});
    convert_kernel<T><<<blocks_for(vectors ? n / 4 : n, 256), 256, 0, stream>>>(x, n, static_cast<T*>(out), vectors);
  });
}

void quantize_fp8_rows(const float* x, int64_t rows, int64_t cols, const float* static_scale, const float* row_amax,
                       uint8_t* codes, float* row_scales, unsigned long long* counters, cudaStream_t stream) {
  quantize_fp8_rows_kernel<<<unsigned(rows), 256, 0, stream>>>(ActivationsOf{x, cols}, cols, static_scale, row_amax, codes,
                                                               row_scales, counters);
}

void silu_mul_quantize_fp8(const float* gate, const float* up, int64_t rows, int64_t cols, const float* static_scale,
                           uint8_t* codes, float* row_scales, unsigned long long* counters, cudaStream_t stream,
                           const LinearScales& gate_scales, const LinearScales& up_scales) {
  // A decode step has a row or a few, each computed by one block: wide rows get more threads, so
  // that each thread's share of the exp work stays small.
  const int threads = cols >= 4096 ? 1024 : cols >= 1024 ? 512 : 256;
  quantize_fp8_rows_kernel<<<unsigned(rows), threads, 0, stream>>>(
      SiluMulOf{gate, up, cols, {gate_scales}, {up_scales}}, cols, static_scale, nullptr, codes, row_scales, counters);
}

void row_absmax(const float* x, int64_t rows, int64_t cols, float* out, cudaStream_t stream) {
  row_absmax_kernel<<<unsigned(rows), 256, 0, stream>>>(x, cols, out);
}

void dequantize_i8(const int8_t* q, int64_t n, DType dtype, void* out, cudaStream_t stream) {
  with_float_type(dtype, "dequantized weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (n % 16 == 0)
      dequantize_i8_kernel<T><<<blocks_for(n / 16, 256), 256, 0, stream>>>(q, n, static_cast<T*>(out));
    else
      dequantize_i8_scalar_kernel<T><<<blocks_for(n, 256), 256, 0, stream>>>(q, n, static_cast<T*>(out));
  });
}

void output_distance(const float* y, const float* ref, int64_t n, OutputDistance* distance, cudaStream_t stream) {
  cudaMemsetAsync(distance, 0, sizeof(OutputDistance), stream);
  if (n > 0) output_distance_kernel<<<std::min(blocks_for(n, 256), 1024), 256, 0, stream>>>(y, ref, n, distance);
}

void linear_epilogue(float* out, int64_t M, int64_t N, const LinearScales& scales, cudaStream_t stream) {
  if (scales.none()) return;
  const dim3 grid(unsigned((N + 4 * 256 - 1) / (4 * 256)), unsigned(std::min<int64_t>(M, 65535)));
  epilogue_kernel<<<grid, 256, 0, stream>>>(out, M, N, Epilogue{scales});
}

void gemv(const void* x, DType x_dtype, const void* w, DType w_dtype, int64_t M, int64_t N, int64_t K,
          const float* row_scale, const float* w_scale, bool per_channel, const void* bias, DType bias_dtype,
          float* out, cudaStream_t stream) {
  if (M < 1 || M > kGemvMaxM) fail(LLMQ_ERR_INTERNAL, "cuda backend: GEMV for {} rows", M);
  Epilogue e{row_scale, w_scale, per_channel, bias, bias_dtype};
  const bool vector = K % 16 == 0;
  // Long rows of few channels: 4 warps per row (a first choice, made without a GPU: rows of 4096
  // and fewer weights, where one warp per row was measured faster than cuBLASLt, keep one).
  const int row_warps = vector && K >= 8192 && N < 16384 ? 4 : 1;
  const unsigned grid = unsigned((N + kGemvWarps / row_warps - 1) / (kGemvWarps / row_warps));
  auto launch = [&](auto w_tag, auto x_tag) {
    using W = typename decltype(w_tag)::type;
    using X = typename decltype(x_tag)::type;
    const X* xs = static_cast<const X*>(x);
    const W* ws = static_cast<const W*>(w);
    if (!vector)
      gemv_kernel<W, X, false><<<grid, kGemvWarps * 32, 0, stream>>>(xs, ws, int(M), N, K, e, out);
    else if (row_warps == 4)
      gemv_kernel<W, X, true, 4><<<grid, kGemvWarps * 32, 0, stream>>>(xs, ws, int(M), N, K, e, out);
    else
      gemv_kernel<W, X, true><<<grid, kGemvWarps * 32, 0, stream>>>(xs, ws, int(M), N, K, e, out);
  };
  if (w_dtype == DType::I8 && x_dtype == DType::BF16)
    launch(Tag<int8_t>{}, Tag<bf16>{});
  else if (w_dtype == DType::I8 && x_dtype == DType::F16)
    launch(Tag<int8_t>{}, Tag<f16>{});
  else if (w_dtype == DType::F8_E4M3 && x_dtype == DType::F8_E4M3)
    launch(Tag<fp8>{}, Tag<fp8>{});
  else if (w_dtype == DType::BF16 && x_dtype == DType::BF16)
    launch(Tag<bf16>{}, Tag<bf16>{});
  else if (w_dtype == DType::F16 && x_dtype == DType::F16)
    launch(Tag<f16>{}, Tag<f16>{});
  else if (w_dtype == DType::F32 && x_dtype == DType::F32)
    launch(Tag<float>{}, Tag<float>{});
  else
    fail(LLMQ_ERR_INTERNAL, "cuda backend: no GEMV for {} weights and {} activations", dtype_name(w_dtype),
         dtype_name(x_dtype));
}

void rope_kv_write(float* q, int64_t q_cols, float* k, const float* v, int64_t kv_cols, const float* inv_freq,
                   int32_t head_dim, int32_t num_kv_heads, int32_t block_size, void* k_cache, void* v_cache,
                   float* k_scale, float* v_scale, DType kv_dtype, const DevicePlan& plan, int64_t n_tokens,
                   unsigned long long* counters, cudaStream_t stream, const QkvScales& qkv_scales) {
  if (head_dim < 2 || head_dim > 32 * kKvLaneValues)  // write_kv_row's values a lane
    fail(LLMQ_ERR_UNSUPPORTED, "cuda backend: head_dim {} is outside [2, {}]", head_dim, 32 * kKvLaneValues);
  with_kv_type(kv_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope_kv_kernel<T><<<rope_kv_grid(n_tokens, int(q_cols / head_dim), num_kv_heads), kRopeWarps * 32, 0, stream>>>(
        q, q_cols, k, v, kv_cols, inv_freq, head_dim, num_kv_heads, block_size, static_cast<T*>(k_cache),
        static_cast<T*>(v_cache), k_scale, v_scale, plan.positions, plan.slots, counters, Epilogue{qkv_scales.q},
        Epilogue{qkv_scales.k}, Epilogue{qkv_scales.v});
  });
}

bool attention_has_tensor_core_kernel(DType kv_dtype, int32_t head_dim) {
  return kv_dtype != DType::F32 && (head_dim == 64 || head_dim == 128);
}

void attention(const float* q, int64_t q_cols, const void* k_cache, const void* v_cache, DType kv_dtype,
               const AttentionArgs& args, const DevicePlan& plan, int64_t n_tokens, float* partial_o,
               float* partial_ml, float* out, cudaStream_t stream) {
  if (args.head_dim < 2 || args.head_dim > 256)
    fail(LLMQ_ERR_UNSUPPORTED, "cuda backend: head_dim {} is outside [2, 256]", args.head_dim);
  if (args.tensor_cores) {
    if (!attention_has_tensor_core_kernel(kv_dtype, args.head_dim))
      fail(LLMQ_ERR_INTERNAL, "cuda backend: no tensor-core attention for {} head_dim {}", dtype_name(kv_dtype),
           args.head_dim);
    // The kernel reads q rows as float4 and writes out as float2.
    if (reinterpret_cast<uintptr_t>(q) % 16 != 0 || reinterpret_cast<uintptr_t>(out) % 8 != 0 || q_cols % 4 != 0)
      fail(LLMQ_ERR_INTERNAL, "cuda backend: tensor-core attention needs 16-byte aligned q rows (q_cols {})", q_cols);
    dim3 grid(unsigned(plan.large.n), unsigned(args.num_heads));
    auto launch = [&](auto tag, auto dim) {
      using T = typename decltype(tag)::type;
      auto kernel = attention_mma_kernel<T, decltype(dim)::value>;
      const int smem = attention_mma_smem_bytes(decltype(dim)::value);
      allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<grid, 128, smem, stream>>>(q, q_cols, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
                                          args, plan, out);
    };
    using D64 = std::integral_constant<int, 64>;
    using D128 = std::integral_constant<int, 128>;
    with_kv_type(kv_dtype, [&](auto tag) {
      if constexpr (!std::is_same_v<typename decltype(tag)::type, float>)
        args.head_dim == 64 ? launch(tag, D64{}) : launch(tag, D128{});
    });
    return;
  }
  const dim3 grid(unsigned(plan.small.n), unsigned(args.num_heads), unsigned(args.n_splits));
  if (args.one_token_tiles && attention_decode_fits(args.head_dim)) {
    with_kv_type(kv_dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      auto kernel = args.head_dim == 64 ? attention_decode_kernel<T, 64> : attention_decode_kernel<T, 128>;
      kernel<<<grid, kDecodeWarps * 32, 0, stream>>>(q, q_cols, static_cast<const T*>(k_cache),
                                                     static_cast<const T*>(v_cache), args, plan, partial_o, partial_ml,
                                                     out);
    });
  } else {
    const size_t smem = attention_smem_bytes(args.head_dim);
    with_kv_type(kv_dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      auto kernel = attention_kernel<T>;
      allow_shared_memory(reinterpret_cast<const void*>(kernel), int(smem));
      kernel<<<grid, kAttentionThreads, smem, stream>>>(q, q_cols, static_cast<const T*>(k_cache),
                                                        static_cast<const T*>(v_cache), args, plan, partial_o,
                                                        partial_ml, out);
    });
  }
  if (args.n_splits > 1)
    attention_combine_kernel<<<unsigned(n_tokens * args.num_heads), 128, 0, stream>>>(
        partial_o, partial_ml, args.num_heads, args.n_splits, args.head_dim, q_cols, out, args.rounded);
}

}  // namespace llmq::cuda
