// Launchers of the CUDA backend's kernels (cuda_kernels.cu). All run on `stream`; activations are
// fp32 [rows, cols] row-major, as in the CPU backend; the element type of weights and of the KV
// cache is a DType. Errors of a launch are reported by the caller's check after it.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "engine/dtype.h"
#include "kernels/cuda/sample_args.h"

namespace llmq::cuda {

// Attention's query tiles: runs of consecutive tokens of one sequence.
struct Tiles {
  const int32_t* first = nullptr;  // first token of each tile
  const int32_t* count = nullptr;  // tokens in each tile
  int32_t n = 0;
};

// The step's batch metadata on the device (BatchPlan's arrays), plus attention's query tiles.
struct DevicePlan {
  const int32_t* tokens = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* token_seq = nullptr;
  const int32_t* slots = nullptr;
  const int32_t* block_offsets = nullptr;
  const int32_t* block_ids = nullptr;
  const int32_t* logit_rows = nullptr;
  Tiles small;  // up to kAttentionTileQ tokens: the CUDA-core kernel
  Tiles large;  // up to kAttentionTileQLarge tokens: the tensor-core kernel
};

constexpr int kAttentionTileQ = 16;
constexpr int kAttentionTileQLarge = 128;

// The query tiles of a step in host memory (CudaBackend::begin_step copies them into DevicePlan;
// the emulated tests use them as they are): runs of consecutive tokens of one sequence (the same
// sequence, consecutive positions), at most kAttentionTileQ long (small) or kAttentionTileQLarge
// long (large).
struct QueryTiles {
  std::vector<int32_t> small_first, small_count, large_first, large_count;
  int32_t longest_run = 0;  // tokens in the step's longest run
};
inline void make_query_tiles(const int32_t* token_seq, const int32_t* positions, int32_t n_tokens, QueryTiles* tiles) {
  for (std::vector<int32_t>* v : {&tiles->small_first, &tiles->small_count, &tiles->large_first, &tiles->large_count})
    v->clear();
  tiles->longest_run = 0;
  int32_t run = 0;
  for (int32_t t = 0; t < n_tokens; ++t) {
    const bool continues = t > 0 && token_seq[t] == token_seq[t - 1] && positions[t] == positions[t - 1] + 1;
    run = continues ? run + 1 : 1;
    tiles->longest_run = std::max(tiles->longest_run, run);
    for (auto [first, count, limit] : {std::tuple{&tiles->small_first, &tiles->small_count, kAttentionTileQ},
                                       std::tuple{&tiles->large_first, &tiles->large_count, kAttentionTileQLarge}}) {
      if (continues && count->back() < limit) {
        ++count->back();
      } else {
        first->push_back(t);
        count->push_back(1);
      }
    }
  }
}

// An output's 16-bit copy, the input a following 16-bit linear reads: BF16 or F16 at p (none when
// p is null), written beside the fp32 output.
struct RoundedCopy {
  void* p = nullptr;
  bool bf16 = true;
};

// A linear's epilogue: what turns its fp32 sums into its output, out[m, n] = acc[m, n] *
// (row_scale ? row_scale[m] : 1) * w_scale[per_channel ? n : 0] (when w_scale), + bias[n] (when
// bias), the multiplication rounded before the addition. None when both are null. Applied by the
// GEMM kernels themselves, by linear_epilogue's pass after cuBLASLt, or deferred: left to the kernel
// that reads the output next (silu_mul, silu_mul_quantize_fp8, rope_kv_write), which applies it to
// each value it reads, with the same bits as the pass and without the pass's trip through memory.
struct LinearScales {
  const float* row_scale = nullptr;
  const float* w_scale = nullptr;
  bool per_channel = false;
  const void* bias = nullptr;
  DType bias_dtype = DType::F32;
  __host__ __device__ bool none() const { return !w_scale && !bias; }
};

// out[t] = table[plan.tokens[t] - first_id], zero when outside the table's table_rows rows.
void embed(const void* table, DType dtype, int64_t first_id, int64_t table_rows, int64_t dim, const DevicePlan& plan,
           int64_t rows, float* out, cudaStream_t stream);
// residual == nullptr: out = rmsnorm(x) * w. Else residual += x, out = rmsnorm(residual) * w.
// As well, when set: `rounded`, out's 16-bit copy (the bits convert_activations would give from
// out); fp8_codes and fp8_row_scales, out quantized with a dynamic per-row scale (those
// quantize_fp8_rows would give from out).
void rmsnorm(float* residual, const float* x, const void* weight, DType w_dtype, float eps, int64_t rows,
             int64_t dim, float* out, RoundedCopy rounded, uint8_t* fp8_codes, float* fp8_row_scales,
             cudaStream_t stream);
// out = silu(gate) * up ([rows, cols] each) in out_dtype: F32, or BF16 / F16 (the fp32 product
// rounded: the bits silu_mul then convert_activations would give). gate_scales and up_scales: the
// deferred epilogues of the linears that wrote gate and up (none: gate and up are final).
void silu_mul(const float* gate, const float* up, int64_t rows, int64_t cols, void* out, DType out_dtype,
              cudaStream_t stream, const LinearScales& gate_scales = {}, const LinearScales& up_scales = {});
void gather_rows(const float* x, int64_t cols, const DevicePlan& plan, int64_t rows, float* out, cudaStream_t stream);

// Rounds x to `dtype` (F16 / BF16 / F32 copy) into out.
void convert_activations(const float* x, int64_t n, DType dtype, void* out, cudaStream_t stream);
// FP8 E4M3 quantization of activations (engine/quant.h): codes [rows, cols] and row scales,
// dynamic per row (from row_amax [rows] when given, else each row's own amax), or with
// static_scale (a device F32) when given.
// With a static scale, `counters` (when given) gets the values clipped and the values quantized
// added at [0] and [1] (engine/quant.h's kActivationsClipped, kActivationsStatic).
void quantize_fp8_rows(const float* x, int64_t rows, int64_t cols, const float* static_scale, const float* row_amax,
                       uint8_t* codes, float* row_scales, unsigned long long* counters, cudaStream_t stream);
// quantize_fp8_rows of silu(gate) * up ([rows, cols] each), computed in the kernel: the codes, scales
// and counts that silu_mul followed by quantize_fp8_rows gives, bit for bit, without the fp32
// product in memory. Dynamic scales use each row's own amax (no row_amax: tensor parallelism needs
// the product itself).
// gate_scales and up_scales as silu_mul's; their row scales may be row_scales itself (the codes of
// the norm that gate and up read): each row's are read before they are replaced.
void silu_mul_quantize_fp8(const float* gate, const float* up, int64_t rows, int64_t cols, const float* static_scale,
                           uint8_t* codes, float* row_scales, unsigned long long* counters, cudaStream_t stream,
                           const LinearScales& gate_scales = {}, const LinearScales& up_scales = {});
// out[r] = max |x[r, :]|.
void row_absmax(const float* x, int64_t rows, int64_t cols, float* out, cudaStream_t stream);
// INT8 codes to BF16 or F16 (exact), n elements.
void dequantize_i8(const int8_t* q, int64_t n, DType dtype, void* out, cudaStream_t stream);

// How far a linear path's output y is from a reference path's output ref, n elements (the
// autotuner's check of a path before it may be chosen), over the elements finite in ref.
struct OutputDistance {
  double diff2 = 0, ref2 = 0;                      // sums of (y - ref)^2 and ref^2
  unsigned max_diff_bits = 0, max_ref_bits = 0;    // the largest |y - ref| and |ref|, as float bits
  unsigned long long not_finite = 0;               // elements where y is not finite (ref is)

  double relative_error() const { return ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2); }  // of the whole output
  float max_diff() const { return f32_from_bits(max_diff_bits); }
  float max_ref() const { return f32_from_bits(max_ref_bits); }
};
// *distance (device memory) = the distance of y from ref.
void output_distance(const float* y, const float* ref, int64_t n, OutputDistance* distance, cudaStream_t stream);
// Whether y agrees with ref as two right paths of one linear do. They take the same products and
// differ in the order of the fp32 sums: a relative error of the whole output (L2) near 1e-6, FP8
// tensor cores' narrower accumulation near 1e-4. A wrong tile, row or layout, or an unwritten or
// doubled element, lies far outside: the whole output's relative error at most kAgreeRel (FP8:
// kAgreeRelFp8), every element within kAgreeMax (FP8: kAgreeMaxFp8) of the largest |ref|, and no
// element left not finite.
constexpr double kAgreeRel = 1e-4, kAgreeMax = 1e-3, kAgreeRelFp8 = 2e-3, kAgreeMaxFp8 = 2e-2;
inline bool outputs_agree(const OutputDistance& d, bool fp8) {
  // Written so that NaN fails every test.
  return d.not_finite == 0 && d.relative_error() <= (fp8 ? kAgreeRelFp8 : kAgreeRel) &&
         double(d.max_diff()) <= (fp8 ? kAgreeMaxFp8 : kAgreeMax) * double(d.max_ref());
}

// The epilogue `scales` over out [M, N] (a linear's fp32 sums), in place.
void linear_epilogue(float* out, int64_t M, int64_t N, const LinearScales& scales, cudaStream_t stream);

// GEMV for M <= kGemvMaxM, one warp per output channel streaming its weight row: F32 weights with
// F32 activations, BF16/F16 with activations of the same type, I8 with BF16/F16 activations, or
// F8_E4M3 with F8_E4M3 codes (activations already in the product's form); the epilogue is fused.
constexpr int64_t kGemvMaxM = 8;
void gemv(const void* x, DType x_dtype, const void* w, DType w_dtype, int64_t M, int64_t N, int64_t K,
                    const float* row_scale, const float* w_scale, bool per_channel, const void* bias,
                    DType bias_dtype, float* out, cudaStream_t stream);

// INT8 weight-only GEMM on tensor cores (w8a16_gemm.cu), for M > kGemvMaxM: out[M, N] = (x[M, K]
// in BF16/F16 . w[N, K]^T in INT8 codes, fp32 accumulation) * w_scale[per_channel ? n : 0] + bias[n].
// It takes K a multiple of kW8A16KMultiple and 16-byte aligned x and w (any M, N); callers use
// dequantize_i8 + a 16-bit GEMM for the rest.
constexpr int64_t kW8A16KMultiple = 64;
bool w8a16_supported(int64_t M, int64_t N, int64_t K, const void* x, const void* w);
// How a GEMM kernel splits K over blocks on a GPU of num_sms multiprocessors, and the scratch it
// then needs: partial_floats fp32 values, and `counters` uint32 tile counters that are zero before
// the first launch (each launch leaves them zero again).
struct SplitKPlan {
  int splits = 1;
  int k_steps_per_split = 0;  // in the kernel's K steps
  int64_t partial_floats = 0;
  int64_t counters = 0;
};
SplitKPlan w8a16_plan(int64_t M, int64_t N, int64_t K, int num_sms);
void w8a16_gemm(const void* x, DType x_dtype, const int8_t* w, int64_t M, int64_t N, int64_t K, const float* w_scale,
                bool per_channel, const void* bias, DType bias_dtype, float* out, const SplitKPlan& plan,
                float* partial, unsigned* counters, cudaStream_t stream);

// Linears with 8-bit weights for decode batches (M <= kStreamMaxM; w8a16_kernel.cuh's stream
// kernel), the weights streamed once into registers, no scratch: INT8 codes with BF16/F16
// activations (the same result as w8a16_gemm), or FP8 codes with FP8 activation codes and their
// row_scale (the FP8 linear's; compute capability 8.9 and newer: the caller checks). K a multiple
// of 64, x and w 16-byte aligned. The layout of its blocks above 16 rows (the same sums, a
// different speed): all rows a block (Whole); blocks of 16 rows, which read the weights from L2
// but for the first (Rows16); blocks of 16 rows and 128 channels, which read the activations from
// L2 once for 128 channels (Wide).
constexpr int64_t kStreamMaxM = 64;
enum class StreamLayout { Whole, Rows16, Wide };
bool stream_supported(DType x_dtype, int64_t M, int64_t N, int64_t K, const void* x, const void* w);
void stream_linear(const void* x, DType x_dtype, const void* w, int64_t M, int64_t N, int64_t K, const float* row_scale,
                   const float* w_scale, bool per_channel, const void* bias, DType bias_dtype, StreamLayout layout,
                   float* out, cudaStream_t stream);
// Up to kMaxStreamJobs linears of one input in one stream launch (q/k/v, gate/up of a decode
// step): their blocks side by side, each linear's output as stream_linear's. Fewer launches, and
// one stream of weights in place of several short ones.
constexpr int kMaxStreamJobs = 3;
struct StreamJob {
  const void* w = nullptr;
  int64_t N = 0;
  LinearScales scales;  // row_scale: the FP8 activations' (the same for every job)
  float* out = nullptr;
};
void stream_linears(const void* x, DType x_dtype, int64_t M, int64_t K, const StreamJob* jobs, int count,
                    StreamLayout layout, cudaStream_t stream);

// Linears with 8-bit weights on Hopper's warpgroup MMA (w8a16_kernel.cuh's wgmma kernel; for
// prefill), on compute capability 9.0 only (the caller checks): INT8 codes with BF16/F16
// activations (the same result as w8a16_gemm), or FP8 codes with FP8 activation codes and their
// row_scale (the FP8 linear's: (sum * row_scale[m] * w_scale) + bias). K a multiple of 64 (16-bit
// x) or 128 (FP8), x and w 16-byte aligned; its own split-K plan (scratch as w8a16_gemm's).
// copier_group (INT8 only): the form with a warpgroup that only copies (mbarriers, no block barrier a
// step).
bool wgmma_supported(DType x_dtype, int64_t M, int64_t N, int64_t K, const void* x, const void* w);
SplitKPlan wgmma_plan(DType x_dtype, bool copier_group, int64_t M, int64_t N, int64_t K, int num_sms);
void wgmma_linear(const void* x, DType x_dtype, const void* w, int64_t M, int64_t N, int64_t K, const float* row_scale,
                  const float* w_scale, bool per_channel, const void* bias, DType bias_dtype, bool copier_group,
                  float* out, const SplitKPlan& plan, float* partial, unsigned* counters, cudaStream_t stream);

// RoPE on q [T, Hq*D] and k [T, Hkv*D] in place, then K/V written into the paged cache (8-bit
// caches: codes and scales as engine/backend.h's KvLayer defines). qkv_scales: the deferred
// epilogues of the linears that wrote q, k and v, applied as they are read (q and k are written
// back final; v is left as it is).
struct QkvScales {
  LinearScales q, k, v;
};
void rope_kv_write(float* q, int64_t q_cols, float* k, const float* v, int64_t kv_cols, const float* inv_freq,
                   int32_t head_dim, int32_t num_kv_heads, int32_t block_size, void* k_cache, void* v_cache,
                   float* k_scale, float* v_scale, DType kv_dtype, const DevicePlan& plan, int64_t n_tokens,
                   unsigned long long* counters, cudaStream_t stream, const QkvScales& qkv_scales = {});
// `counters` (FP8 caches, when given): the layer's kSaturationCounters values (engine/quant.h).

struct AttentionArgs {
  int32_t num_heads = 0, num_kv_heads = 0, head_dim = 0, block_size = 0, sliding_window = 0;
  float scale = 1.0f;
  int32_t n_splits = 1;  // key-range splits per (tile, head); > 1 needs the partial buffers
  bool tensor_cores = false;  // the tensor-core kernel over plan.large (no splits)
  bool one_token_tiles = false;  // every tile of plan.small is one token (decode): the decode kernel
  RoundedCopy rounded;  // when set: out rounded to 16 bits there as well (the next linear's input)
  // 8-bit caches: value = code * scale, the scale per token and head (INT8) or per layer (FP8).
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  bool scale_per_token = false;
};
// Whether the tensor-core (mma) kernel handles this cache: 16-bit or 8-bit KV, head_dim 64 or 128.
bool attention_has_tensor_core_kernel(DType kv_dtype, int32_t head_dim);
// Paged causal attention for every query tile; partial_o [T * H * n_splits * D] and
// partial_ml [T * H * n_splits * 2] are scratch when n_splits > 1.
void attention(const float* q, int64_t q_cols, const void* k_cache, const void* v_cache, DType kv_dtype,
               const AttentionArgs& args, const DevicePlan& plan, int64_t n_tokens, float* partial_o,
               float* partial_ml, float* out, cudaStream_t stream);

// tokens[r] = the token engine/sampler.h's rule draws from logits row r ([rows, vocab], scratch:
// it ends holding probabilities) with args[r]; all pointers are device memory.
void sample(float* logits, int64_t rows, int64_t vocab, const SampleArgs* args, const int32_t* penalized,
            int32_t* tokens, cudaStream_t stream);

// Lets `kernel` use `bytes` of dynamic shared memory (the default allows 48 KB less the kernel's
// static shared memory), or fails with LLMQ_ERR_DEVICE: once per kernel and device (a kernel's first launch on a device comes from an eager step, never from a
// step being recorded).
void allow_shared_memory(const void* kernel, int bytes);

}  // namespace llmq::cuda
