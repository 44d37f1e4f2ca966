// The op interface between the model (written once) and the hardware. The CPU backend
// (kernels/cpu) implements it; the CUDA backend implements the same ops on the GPU.
// Activations are F32 [tokens, features]; weights keep their stored dtype and are converted
// inside the kernels.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "engine/quant.h"
#include "engine/sampler.h"
#include "engine/tensor.h"

namespace llmq {

// Device memory owned by a backend.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;
  virtual uint64_t size() const = 0;
};

// One forward step over a flattened batch: tokens of several sequences, each at its own position.
struct BatchPlan {
  std::vector<int32_t> tokens;     // [n_tokens]
  std::vector<int32_t> positions;  // [n_tokens] position of each token in its sequence
  std::vector<int32_t> token_seq;  // [n_tokens] index of the token's sequence
  std::vector<int32_t> slots;      // [n_tokens] KV slot the token's K/V go to: block * block_size + offset
  // Block tables, flattened: sequence s owns block_ids[block_offsets[s] .. block_offsets[s + 1]).
  std::vector<int32_t> block_offsets;
  std::vector<int32_t> block_ids;
  std::vector<int32_t> logit_rows;  // tokens whose logits are computed, in output order

  int32_t n_tokens() const { return int32_t(tokens.size()); }
  void clear() {
    tokens.clear();
    positions.clear();
    token_seq.clear();
    slots.clear();
    block_offsets.assign(1, 0);
    block_ids.clear();
    logit_rows.clear();
  }
};

// One layer of the paged KV cache: K and V each [num_blocks, num_kv_heads, block_size, head_dim].
// 8-bit caches hold codes; the value is code * scale (dequantized before any product):
//   I8:      k_scale / v_scale F32 [num_blocks, num_kv_heads * block_size], one per token and head
//            (element offset / head_dim), set when the token is written: amax / 127, codes
//            rne(x * 127 / amax) (engine/quant.h's int8 rule).
//   F8_E4M3: k_scale / v_scale F32 [1, 1] per layer, static; codes fp8(x * (1 / scale)).
struct KvLayer {
  Tensor k;  // rows = num_blocks, cols = num_kv_heads * block_size * head_dim
  Tensor v;
  Tensor k_scale, v_scale;  // empty for 16/32-bit caches
  int32_t block_size = 16;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t layer = -1;  // for the saturation counters
};

struct AttentionParams {
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  float scale = 1.0f;           // 1/sqrt(head_dim)
  int32_t sliding_window = 0;   // 0 = attend to the whole prefix
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Whether FP8 weights and activations can run here; else the reason in *why.
  virtual bool supports_fp8(std::string* why) const { return true; }
  // The memory bandwidth (bytes/s) its weights and KV cache are read at, measured now with a large
  // streaming read or copy: 100% model bandwidth utilization. Takes a fraction of a second; smaller
  // buffers when memory is short (a GPU full of KV cache), and 0 when none can be allocated.
  virtual double measure_peak_bandwidth() = 0;

  virtual std::unique_ptr<Buffer> allocate(uint64_t bytes) = 0;
  // Makes a host tensor (e.g. a memory-mapped weight) usable by the kernels. The CPU backend uses
  // it in place; a device backend copies it into memory it keeps alive until destruction.
  virtual Tensor upload(const Tensor& host) = 0;

  // Called once per step, before any op: the batch metadata the ops below refer to.
  virtual void begin_step(const BatchPlan& plan) = 0;
  // Recorded steps (CUDA graphs). After begin_step, replay_step() returns true when the backend
  // has replayed a recording of an earlier step of the same shape (same batch layout, same
  // buffers): the engine then skips the ops. Else the engine runs the ops, which the backend may
  // be recording, then calls end_step(). drop_recordings() forgets them all (a buffer they use
  // changed).
  virtual bool replay_step() { return false; }
  virtual void end_step() {}
  virtual void drop_recordings() {}

  // out[t] = table[plan.tokens[t] - first_id] in F32; zero for ids outside the table's rows (a
  // vocab-parallel shard holds ids [first_id, first_id + table.rows)).
  virtual void embed(const Tensor& table, int64_t first_id, Tensor& out) = 0;
  // out = rmsnorm(x) * weight, per row.
  virtual void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;
  // residual += x; out = rmsnorm(residual) * weight.
  virtual void add_rmsnorm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;
  // out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]); weight is [N, K] in its stored dtype,
  // or quantized as engine/quant.h defines. row_amax (F32 [M, 1], FP8 weights with dynamic
  // activation scales only): the per-token amax to quantize x with instead of each row's own
  // (tensor parallelism: the max over the ranks' slices of the row).
  virtual void linear(const Tensor& x, const LinearWeight& weight, const Tensor* bias, Tensor& out,
                      const Tensor* row_amax = nullptr) = 0;
  // One input through several weights (q/k/v; gate/up): linear(x, *job.weight, job.bias,
  // *job.out) for each job, in order, with the same bits. A backend may prepare x once for all of
  // them (the CUDA backend rounds it to the weights' 16-bit type once).
  struct LinearJob {
    const LinearWeight* weight;
    const Tensor* bias;
    Tensor* out;
  };
  virtual void linears(const Tensor& x, std::initializer_list<LinearJob> jobs) {
    for (const LinearJob& job : jobs) linear(x, *job.weight, job.bias, *job.out);
  }
  // A layer's norm and the projections that read it: rmsnorm(x) (residual null) or
  // add_rmsnorm(*residual, x) into out, then linears(out, jobs), with the same bits. A backend may
  // round out for the linears in the norm's own kernel (the CUDA backend does for 16-bit and INT8
  // weights: no conversion pass of its own).
  virtual void rmsnorm_linears(Tensor* residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                               std::initializer_list<LinearJob> jobs) {
    if (residual)
      add_rmsnorm(*residual, x, weight, eps, out);
    else
      rmsnorm(x, weight, eps, out);
    linears(out, jobs);
  }
  // out[m] = max_k |x[m, k]| (out F32 [M, 1]).
  virtual void row_absmax(const Tensor& x, Tensor& out) = 0;
  // Rotates q [T, Hq*D] in place and k [T, Hkv*D] in place (rotate-half RoPE at each token's
  // position with inv_freq [D/2]), then writes k and v into the cache at each token's slot.
  virtual void rope_kv_write(Tensor& q, Tensor& k, const Tensor& v, const Tensor& inv_freq, const KvLayer& cache) = 0;
  // Causal attention of every token of the step over its sequence's cached K/V (positions up to
  // and including its own), read through the block table. out is [T, Hq*D].
  virtual void attention(const Tensor& q, const KvLayer& cache, const AttentionParams& params, Tensor& out) = 0;
  // out = linear(attention(q), weight) (+ bias): the attention and the o projection, with the bits
  // of the two ops. attn gets the attention output as attention() writes it; a backend may write
  // the linear's input beside it (the CUDA backend: the 16-bit copy for 16-bit and INT8 weights).
  virtual void attention_linear(const Tensor& q, const KvLayer& cache, const AttentionParams& params, Tensor& attn,
                                const LinearWeight& weight, const Tensor* bias, Tensor& out) {
    attention(q, cache, params, attn);
    linear(attn, weight, bias, out);
  }
  // out = silu(gate) * up, elementwise.
  virtual void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // out = linear(silu(gate) * up, weight) (+ bias): the MLP's down projection. act (F32, gate's
  // shape; may be gate itself) is scratch: afterwards it holds silu(gate) * up, unless the backend
  // fused the product into the linear's input (CUDA: FP8 weights' activation quantization, or the
  // 16-bit copy that 16-bit and INT8 weights read), and then its contents are unspecified. Either
  // way out has exactly the bits of silu_mul then linear.
  virtual void silu_mul_linear(const Tensor& gate, const Tensor& up, Tensor& act, const LinearWeight& weight,
                               const Tensor* bias, Tensor& out) {
    silu_mul(gate, up, act);
    linear(act, weight, bias, out);
  }

  // A layer's two blocks as single ops, each with the bits of the ops it stands for, so that a
  // backend may leave the q/k/v and gate/up linears' scales and bias to the kernel that reads their
  // outputs next (the CUDA backend, where cuBLASLt's sums would otherwise take a pass of their own).
  // Not for steps whose intermediate tensors are observed.
  //
  // The attention block's inputs: rmsnorm_linears(residual, x, weight, eps, out, {q, k, v}), then
  // rope_kv_write(q, k, v, inv_freq, cache). Afterwards v's contents are unspecified (the cache
  // holds its values).
  virtual void attention_inputs(Tensor* residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                                const LinearJob& q, const LinearJob& k, const LinearJob& v, const Tensor& inv_freq,
                                const KvLayer& cache) {
    rmsnorm_linears(residual, x, weight, eps, out, {q, k, v});
    rope_kv_write(*q.out, *k.out, *v.out, inv_freq, cache);
  }
  // The MLP: rmsnorm_linears(residual, x, weight, eps, out, {gate, up}), then
  // silu_mul_linear(gate, up, gate, down, nullptr, down_out). Afterwards gate's and up's contents
  // are unspecified.
  virtual void mlp(Tensor* residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                   const LinearJob& gate, const LinearJob& up, const LinearWeight& down, Tensor& down_out) {
    rmsnorm_linears(residual, x, weight, eps, out, {gate, up});
    silu_mul_linear(*gate.out, *up.out, *gate.out, down, nullptr, down_out);
  }
  // out[i] = x[plan.logit_rows[i]].
  virtual void gather_rows(const Tensor& x, Tensor& out) = 0;
  // tokens[i] (host memory) = the token engine/sampler.h's rule draws from row i of logits (F32
  // [rows.size(), vocab]) with rows[i]; logits is scratch. Only the tokens leave the backend.
  virtual void sample(Tensor& logits, const std::vector<SampleRow>& rows, int32_t* tokens) = 0;
  // Copies an F32 tensor to host memory, and host memory into an F32 tensor.
  virtual void to_host(const Tensor& x, float* host) = 0;
  virtual void from_host(const float* host, Tensor& x) = 0;
  // The CUDA stream the ops run on (collectives on this backend's memory are ordered on it);
  // nullptr for host memory.
  virtual void* stream() { return nullptr; }
  // The saturation counters (engine/quant.h) of layers [0, layers), kSaturationCounters per layer,
  // accumulated since creation or the last reset.
  virtual std::vector<uint64_t> saturation(int32_t layers, bool reset) = 0;
};

struct CpuBackendOptions {
  int32_t n_threads = 0;  // 0 = one per core
};
std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options);

struct CudaBackendOptions {
  int32_t device = 0;
};
// The CUDA backend (kernels/cuda); LLMQ_ERR_BACKEND_UNAVAILABLE when not built in.
std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options);

}  // namespace llmq
