// Plans and launches the 8-bit weight kernels of w8a16_kernel.cuh: the tiled W8A16 GEMM, and for
// INT8 and FP8 weights the decode stream kernel and the Hopper (wgmma) kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>

#include "engine/error.h"
#include "kernels/cuda/w8a16_kernel.cuh"

namespace llmq::cuda {

namespace {

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A plan of `splits` (>= 1) K splits over `tiles` output tiles and k_steps steps: no split empty.
SplitKPlan split_plan(int64_t M, int64_t N, int64_t k_steps, int64_t tiles, int64_t splits) {
  SplitKPlan plan;
  plan.k_steps_per_split = int((k_steps + splits - 1) / splits);
  plan.splits = int((k_steps + plan.k_steps_per_split - 1) / plan.k_steps_per_split);
  if (plan.splits > 1) {
    plan.partial_floats = plan.splits * M * N;
    plan.counters = tiles;
  }
  return plan;
}

// The checks every launcher makes: the shape and alignment it takes, its split-K scratch.
void check_launch(bool supported, const SplitKPlan& plan, const float* partial, const unsigned* counters,
                  const char* kernel, int64_t M, int64_t N, int64_t K) {
  if (!supported)
    fail(LLMQ_ERR_INTERNAL, "cuda backend: {} of [{}, {}] x [{}, {}]^T is not supported", kernel, M, K, N, K);
  if (plan.splits > 1 && (!partial || !counters))
    fail(LLMQ_ERR_INTERNAL, "cuda backend: {} split over K without its scratch buffers", kernel);
}

template <typename T>
void launch_for_rows(const void* x, const int8_t* w, int64_t M, int64_t N, int64_t K, const SplitKPlan& plan,
                     const Epilogue& e, float* out, float* partial, unsigned* counters, cudaStream_t stream) {
  w8a16_for_rows<T>(M, N, plan, [&](auto kernel, dim3 grid, int threads, int smem) {
    allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, threads, smem, stream>>>(static_cast<const T*>(x), w, int(M), int(N), int(K),
                                            plan.k_steps_per_split, e, out, partial, counters);
  });
}

template <typename T>
void launch_stream(const void* x, int64_t M, int64_t K, const StreamJob* jobs, int count, StreamLayout layout,
                   cudaStream_t stream) {
  stream_for_rows<T>(M, layout, [&](auto kernel, int row_blocks, int block_channels, int threads, int smem) {
    int blocks = 0;
    const StreamJobs all = stream_jobs(jobs, count, block_channels, &blocks);
    allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<dim3(unsigned(row_blocks), unsigned(blocks)), threads, smem, stream>>>(static_cast<const T*>(x), all,
                                                                                    int(M), int(K));
  });
}

template <typename T, bool kCopiers>
void launch_wgmma(const void* x, const void* w, int64_t M, int64_t N, int64_t K, const SplitKPlan& plan,
                  const Epilogue& e, float* out, float* partial, unsigned* counters, cudaStream_t stream) {
  const auto kernel = wgmma_kernel<T, kCopiers>();
  constexpr int smem = WgmmaTiles<T, kCopiers>::kSmemBytes;
  allow_shared_memory(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<wgmma_grid<T, kCopiers>(M, N, plan), wgmma_threads<T, kCopiers>(), smem, stream>>>(
      static_cast<const T*>(x), static_cast<const uint8_t*>(w), int(M), int(N), int(K), plan.k_steps_per_split, e, out,
      partial, counters);
}

// The activations the 8-bit kernels take with the weights' codes: 16-bit (INT8 weights) or FP8 codes
// (FP8 weights); and fn(Tag<T>{}) called for them.
bool eight_bit_linear_activations(DType x_dtype) {
  return x_dtype == DType::BF16 || x_dtype == DType::F16 || x_dtype == DType::F8_E4M3;
}
template <typename Fn>
void with_activation_type(DType x_dtype, const char* what, Fn&& fn) {
  if (x_dtype == DType::F8_E4M3) return fn(Tag<fp8>{});
  with_float_type<false>(x_dtype, what, fn);
}

// The wgmma kernels' K step (128 bytes of a row) and tile (tokens x channels) for x_dtype.
template <typename Fn>
auto with_wgmma_tiles(DType x_dtype, bool copier_group, Fn&& fn) {
  return x_dtype == DType::F8_E4M3 ? fn(WgmmaTiles<fp8>{})
         : copier_group            ? fn(WgmmaTiles<bf16, true>{})
                                   : fn(WgmmaTiles<bf16>{});
}

}  // namespace

bool w8a16_supported(int64_t M, int64_t N, int64_t K, const void* x, const void* w) {
  return M > 0 && N > 0 && K > 0 && K % kBK == 0 && M <= INT32_MAX / 2 && N <= INT32_MAX / 2 && K <= INT32_MAX / 2 &&
         aligned(x) && aligned(w);  // cp.async copies 16 aligned bytes; rows are 128 (x) and 64 (W) bytes apart
}

SplitKPlan w8a16_plan(int64_t M, int64_t N, int64_t K, int num_sms) {
  const int64_t tiles = ((N + kBN - 1) / kBN) * ((M + block_m(M) - 1) / block_m(M));
  int64_t splits = 1;
  // Fewer tiles than multiprocessors (decode batches, short prefills of narrow layers): split K so
  // that about two blocks run per multiprocessor, each over at least 4 K tiles, and the last block
  // of a tile sums at most 512 x 128 partial values (256 KB).
  // (A first choice, made without a GPU: to be tuned with LLMQ_PROFILE.)
  if (tiles < num_sms)
    splits = std::max<int64_t>(
        1, std::min<int64_t>({(2 * num_sms + tiles - 1) / tiles, K / kBK / 4, 512 / block_m(M), 16}));
  return split_plan(M, N, K / kBK, tiles, splits);
}

void w8a16_gemm(const void* x, DType x_dtype, const int8_t* w, int64_t M, int64_t N, int64_t K, const float* w_scale,
                bool per_channel, const void* bias, DType bias_dtype, float* out, const SplitKPlan& plan,
                float* partial, unsigned* counters, cudaStream_t stream) {
  check_launch(w8a16_supported(M, N, K, x, w), plan, partial, counters, "W8A16 GEMM", M, N, K);
  const Epilogue e{nullptr, w_scale, per_channel, bias, bias_dtype};
  with_float_type<false>(x_dtype, "W8A16 activations", [&](auto tag) {
    launch_for_rows<typename decltype(tag)::type>(x, w, M, N, K, plan, e, out, partial, counters, stream);
  });
}

bool stream_supported(DType x_dtype, int64_t M, int64_t N, int64_t K, const void* x, const void* w) {
  // The same 16-byte loads of x and W rows as the tiled kernel.
  return eight_bit_linear_activations(x_dtype) && M <= kStreamMaxM && w8a16_supported(M, N, K, x, w);
}

void stream_linear(const void* x, DType x_dtype, const void* w, int64_t M, int64_t N, int64_t K, const float* row_scale,
                   const float* w_scale, bool per_channel, const void* bias, DType bias_dtype, StreamLayout layout,
                   float* out, cudaStream_t stream) {
  const StreamJob job{w, N, LinearScales{row_scale, w_scale, per_channel, bias, bias_dtype}, out};
  stream_linears(x, x_dtype, M, K, &job, 1, layout, stream);
}

void stream_linears(const void* x, DType x_dtype, int64_t M, int64_t K, const StreamJob* jobs, int count,
                    StreamLayout layout, cudaStream_t stream) {
  if (count < 1 || count > kMaxStreamJobs)
    fail(LLMQ_ERR_INTERNAL, "cuda backend: {} linears in one stream launch (1 to {})", count, kMaxStreamJobs);
  for (int j = 0; j < count; ++j)
    check_launch(stream_supported(x_dtype, M, jobs[j].N, K, x, jobs[j].w), SplitKPlan{}, nullptr, nullptr,
                 "stream kernel", M, jobs[j].N, K);
  with_activation_type(x_dtype, "stream kernel activations", [&](auto tag) {
    launch_stream<typename decltype(tag)::type>(x, M, K, jobs, count, layout, stream);
  });
}

bool wgmma_supported(DType x_dtype, int64_t M, int64_t N, int64_t K, const void* x, const void* w) {
  // The tiled kernel's limits (K a multiple of 64), and whole K steps.
  return eight_bit_linear_activations(x_dtype) && w8a16_supported(M, N, K, x, w) &&
         K % with_wgmma_tiles(x_dtype, false, [](auto tiles) { return decltype(tiles)::kStepK; }) == 0;
}

SplitKPlan wgmma_plan(DType x_dtype, bool copier_group, int64_t M, int64_t N, int64_t K, int num_sms) {
  const auto [tokens, channels, step_k] = with_wgmma_tiles(x_dtype, copier_group, [](auto tiles) {
    using Tiles = decltype(tiles);
    return std::array<int64_t, 3>{Tiles::kTokens, Tiles::kChannels, Tiles::kStepK};
  });
  const int64_t tiles = ((N + channels - 1) / channels) * ((M + tokens - 1) / tokens);
  const int64_t k_steps = K / step_k;
  // One block per multiprocessor (the pipeline's shared memory): split K so that the tiles' splits
  // fill at most one wave, each split at least 8 K steps (the pipeline's depth is 3). Not tuned on
  // a GPU.
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({num_sms / tiles, k_steps / 8, 16}));
  return split_plan(M, N, k_steps, tiles, splits);
}

void wgmma_linear(const void* x, DType x_dtype, const void* w, int64_t M, int64_t N, int64_t K, const float* row_scale,
                  const float* w_scale, bool per_channel, const void* bias, DType bias_dtype, bool copier_group,
                  float* out, const SplitKPlan& plan, float* partial, unsigned* counters, cudaStream_t stream) {
  check_launch(wgmma_supported(x_dtype, M, N, K, x, w) && !(copier_group && x_dtype == DType::F8_E4M3), plan, partial,
               counters, "wgmma kernel", M, N, K);
  const Epilogue e{row_scale, w_scale, per_channel, bias, bias_dtype};
  with_activation_type(x_dtype, "wgmma activations", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (copier_group)
      launch_wgmma<T, true>(x, w, M, N, K, plan, e, out, partial, counters, stream);
    else
      launch_wgmma<T, false>(x, w, M, N, K, plan, e, out, partial, counters, stream);
  });
}

}  // namespace llmq::cuda
