// Plans and launches the W8A16 kernels of w8a16_kernel.cuh: the tiled GEMM, the decode stream and
// the Hopper (wgmma) kernel.
#include <cuda_runtime.h>

#include <algorithm>

#include "engine/error.h"
#include "kernels/cuda/w8a16_kernel.cuh"

namespace llmq::cuda {

namespace {

template <typename T>
void launch_for_rows(const void* x, const int8_t* w, int64_t M, int64_t N, int64_t K, const W8A16Plan& plan,
                     const Epilogue& e, float* out, float* partial, unsigned* counters, cudaStream_t stream) {
  w8a16_for_rows<T>(M, N, plan, [&](auto kernel, dim3 grid, int threads, int smem) {
    allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, threads, smem, stream>>>(static_cast<const T*>(x), w, int(M), int(N), int(K),
                                            plan.k_tiles_per_split, e, out, partial, counters);
  });
}

template <typename T>
void launch_stream(const void* x, const int8_t* w, int64_t M, int64_t N, int64_t K, const Epilogue& e, float* out,
                   cudaStream_t stream) {
  w8a16_stream_for_rows<T>(M, N, [&](auto kernel, dim3 grid, int threads, int smem) {
    allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, threads, smem, stream>>>(static_cast<const T*>(x), w, int(M), int(N), int(K), e, out);
  });
}

template <typename T>
void launch_wgmma(const void* x, const int8_t* w, int64_t M, int64_t N, int64_t K, const W8A16Plan& plan,
                  const Epilogue& e, float* out, float* partial, unsigned* counters, cudaStream_t stream) {
  const auto kernel = w8a16_wgmma_kernel<T>;
  allow_shared_memory(reinterpret_cast<const void*>(kernel), kWgSmemBytes);
  kernel<<<w8a16_wgmma_grid(M, N, plan), kWgThreads, kWgSmemBytes, stream>>>(
      static_cast<const T*>(x), w, int(M), int(N), int(K), plan.k_tiles_per_split, e, out, partial, counters);
}

}  // namespace

bool w8a16_supported(int64_t M, int64_t N, int64_t K, const void* x, const void* w) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return M > 0 && N > 0 && K > 0 && K % kBK == 0 && M <= INT32_MAX / 2 && N <= INT32_MAX / 2 && K <= INT32_MAX / 2 &&
         aligned(x) && aligned(w);  // cp.async copies 16 aligned bytes; rows are 128 (x) and 64 (W) bytes apart
}

namespace {

// A plan of `splits` (>= 1) K splits over `tiles` output tiles and K / 64 steps: no split empty.
W8A16Plan split_plan(int64_t M, int64_t N, int64_t K, int64_t tiles, int64_t splits) {
  W8A16Plan plan;
  const int64_t k_tiles = K / kBK;
  plan.k_tiles_per_split = int((k_tiles + splits - 1) / splits);
  plan.splits = int((k_tiles + plan.k_tiles_per_split - 1) / plan.k_tiles_per_split);
  if (plan.splits > 1) {
    plan.partial_floats = plan.splits * M * N;
    plan.counters = tiles;
  }
  return plan;
}

}  // namespace

W8A16Plan w8a16_plan(int64_t M, int64_t N, int64_t K, int num_sms) {
  const int64_t tiles = ((N + kBN - 1) / kBN) * ((M + block_m(M) - 1) / block_m(M));
  int64_t splits = 1;
  // Fewer tiles than multiprocessors (decode batches, short prefills of narrow layers): split K so
  // that about two blocks run per multiprocessor, each over at least 4 K tiles, and the last block
  // of a tile sums at most 512 x 128 partial values (256 KB).
  // (A first choice, made without a GPU: to be tuned with LLMQ_PROFILE.)
  if (tiles < num_sms)
    splits = std::max<int64_t>(
        1, std::min<int64_t>({(2 * num_sms + tiles - 1) / tiles, K / kBK / 4, 512 / block_m(M), 16}));
  return split_plan(M, N, K, tiles, splits);
}

W8A16Plan w8a16_wgmma_plan(int64_t M, int64_t N, int64_t K, int num_sms) {
  const int64_t tiles = ((N + kWgChannels - 1) / kWgChannels) * ((M + kWgTokens - 1) / kWgTokens);
  // One block per multiprocessor (the pipeline's shared memory): split K so that the tiles' splits
  // fill at most one wave, each split at least 8 K steps (the pipeline's depth is 3). Without a GPU.
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({num_sms / tiles, K / kBK / 8, 16}));
  return split_plan(M, N, K, tiles, splits);
}

namespace {

// The checks every W8A16 launcher makes: the shape and alignment it takes, its split-K scratch.
void check_launch(bool supported, const W8A16Plan& plan, const float* partial, const unsigned* counters,
                  const char* kernel, int64_t M, int64_t N, int64_t K) {
  if (!supported)
    fail(LLMQ_ERR_INTERNAL, "cuda backend: {} of [{}, {}] x [{}, {}]^T is not supported", kernel, M, K, N, K);
  if (plan.splits > 1 && (!partial || !counters))
    fail(LLMQ_ERR_INTERNAL, "cuda backend: {} split over K without its scratch buffers", kernel);
}

}  // namespace

void w8a16_gemm(const void* x, DType x_dtype, const int8_t* w, int64_t M, int64_t N, int64_t K, const float* w_scale,
                bool per_channel, const void* bias, DType bias_dtype, float* out, const W8A16Plan& plan, float* partial,
                unsigned* counters, cudaStream_t stream) {
  const char* kernel = "W8A16 GEMM";
  check_launch(w8a16_supported(M, N, K, x, w), plan, partial, counters, kernel, M, N, K);
  const Epilogue e{nullptr, w_scale, per_channel, bias, bias_dtype};
  with_float_type<false>(x_dtype, "W8A16 activations", [&](auto tag) {
    launch_for_rows<typename decltype(tag)::type>(x, w, M, N, K, plan, e, out, partial, counters, stream);
  });
}

bool w8a16_stream_supported(int64_t M, int64_t N, int64_t K, const void* x, const void* w) {
  return M <= kW8A16StreamMaxM && w8a16_supported(M, N, K, x, w);  // the same 16-byte loads of x and W rows
}

void w8a16_stream(const void* x, DType x_dtype, const int8_t* w, int64_t M, int64_t N, int64_t K, const float* w_scale,
                  bool per_channel, const void* bias, DType bias_dtype, float* out, cudaStream_t stream) {
  const char* kernel = "W8A16 stream kernel";
  check_launch(w8a16_stream_supported(M, N, K, x, w), W8A16Plan{}, nullptr, nullptr, kernel, M, N, K);
  const Epilogue e{nullptr, w_scale, per_channel, bias, bias_dtype};
  with_float_type<false>(x_dtype, "W8A16 activations", [&](auto tag) {
    launch_stream<typename decltype(tag)::type>(x, w, M, N, K, e, out, stream);
  });
}

void w8a16_wgmma(const void* x, DType x_dtype, const int8_t* w, int64_t M, int64_t N, int64_t K, const float* w_scale,
                 bool per_channel, const void* bias, DType bias_dtype, float* out, const W8A16Plan& plan,
                 float* partial, unsigned* counters, cudaStream_t stream) {
  const char* kernel = "W8A16 wgmma kernel";
  check_launch(w8a16_supported(M, N, K, x, w), plan, partial, counters, kernel, M, N, K);
  const Epilogue e{nullptr, w_scale, per_channel, bias, bias_dtype};
  with_float_type<false>(x_dtype, "W8A16 activations", [&](auto tag) {
    launch_wgmma<typename decltype(tag)::type>(x, w, M, N, K, plan, e, out, partial, counters, stream);
  });
}

}  // namespace llmq::cuda
