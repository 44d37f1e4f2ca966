// The engine: a backend, the model's weights on it, the paged KV cache and the forward pass
// (written once over the backend's ops). step() runs one forward pass over a flattened batch of
// tokens from several sequences, each at its own position, which is what continuous batching
// needs; generate() and score() are built on it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "engine/backend.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "llmq.h"

namespace llmq {

struct EngineOptions {
  llmq_backend backend = LLMQ_BACKEND_CPU;
  int32_t n_threads = 0;         // CPU threads; 0 = one per core
  uint64_t kv_cache_bytes = 0;   // 0 = one full context, at most kDefaultKvCacheBytes
  int32_t kv_block_size = 16;
  int32_t max_batch_tokens = 512;
  llmq_kv_dtype kv_dtype = LLMQ_KV_DTYPE_AUTO;
  QuantMode quant = QuantMode::None;  // quantize the layers' linear weights on load
  bool quantize_lm_head = false;       // and lm_head (the embedding table itself always stays as loaded)
};

constexpr uint64_t kDefaultKvCacheBytes = uint64_t(2) << 30;

// One sequence's part of a step: append `tokens` to the sequence and compute logits for all of
// them or only for the last one.
struct SequenceStep {
  SequenceKv* kv = nullptr;
  const int32_t* tokens = nullptr;
  int32_t n_tokens = 0;
  bool all_logits = false;
  bool want_logits = true;  // false for the leading chunks of a chunked prefill
};

// In the order of llmq_finish_reason.
enum class FinishReason { Length, Stop, Cancelled, Context, Error };

struct GenerateOptions {
  SamplingParams sampling;
  int32_t max_new_tokens = 256;
  std::vector<int32_t> stop_ids;
  bool ignore_eos = false;
  std::function<bool(int32_t token)> on_token;  // return false to stop
};

struct GenerateResult {
  std::vector<int32_t> tokens;
  FinishReason finish_reason = FinishReason::Length;
  double time_to_first_token_s = 0;
  double decode_time_s = 0;
};

class Engine {
 public:
  Engine(std::shared_ptr<const Model> model, const EngineOptions& options);
  ~Engine();

  const Model& model() const { return *model_; }
  const char* backend_name() const { return backend_->name(); }
  int32_t vocab_size() const { return int32_t(model_->config().vocab_size); }
  int32_t max_batch_tokens() const { return options_.max_batch_tokens; }
  int32_t block_size() const { return options_.kv_block_size; }
  BlockAllocator& allocator() { return allocator_; }
  DType kv_dtype() const { return kv_dtype_; }
  // The weight quantization in use: the one asked for, or a pre-quantized checkpoint's.
  QuantMode quant() const { return quant_; }
  // Weight bytes one decode step reads on the backend (quantized where quantized; the embedding
  // table is gathered by rows and not counted unless it is also the lm_head).
  uint64_t weight_bytes_per_step() const { return weight_bytes_per_step_; }
  // Bytes of all the weights the engine holds, as stored on its backend (quantized where quantized).
  uint64_t weight_bytes() const { return weight_bytes_; }
  // Bytes of KV cache one token takes, over all layers.
  uint64_t kv_bytes_per_token() const;
  // The backend's memory bandwidth in bytes/s, measured now (Backend::measure_peak_bandwidth).
  double measure_peak_bandwidth() { return backend_->measure_peak_bandwidth(); }
  std::unique_ptr<SequenceKv> new_sequence() { return std::make_unique<SequenceKv>(allocator_, block_size()); }

  // Runs one forward step. Reserves KV blocks first (LLMQ_ERR_KV_CACHE_FULL, with nothing changed,
  // when they are not available); positions past the context are LLMQ_ERR_CONTEXT_OVERFLOW.
  // The total number of tokens must not exceed max_batch_tokens(). Writes the logits rows in
  // sequence order ([rows, vocab]) into *logits.
  void step(const std::vector<SequenceStep>& batch, std::vector<float>* logits);

  // Validates the prompt and options, prefills in chunks of max_batch_tokens(), then decodes.
  GenerateResult generate(const std::vector<int32_t>& prompt, const GenerateOptions& options);

  // Logits of every position of `ids` (one sequence from position 0): n_ids * vocab floats.
  void score(const std::vector<int32_t>& ids, float* logits);

  // Saturation counters per layer (kSaturationCounters values each, engine/quant.h), accumulated
  // since creation or the last reset.
  std::vector<uint64_t> saturation(bool reset);

  // Calibration: during each forward step, called with the input of each layer's linear layers
  // ("attn_in" for q/k/v, "o_in", "mlp_in" for gate/up, "down_in") and the K and V rows written to
  // the cache ("k" after RoPE, "v"). CPU backend only: the tensors are in host memory.
  using Observer = std::function<void(int32_t layer, const char* site, const Tensor& values)>;
  void set_observer(Observer observer);

  // Checks that every id is in the vocabulary; `what` names the argument in the message.
  void check_token_ids(const int32_t* ids, size_t n, const char* what) const;

 private:
  void forward(int32_t n_tokens, int32_t n_logit_rows);
  void upload_weights();

  // A layer's weights as the backend uses them.
  struct Layer {
    Tensor attn_norm, mlp_norm;
    LinearWeight wq, wk, wv, wo, w_gate, w_up, w_down;
    Tensor bq, bk, bv, bo;  // empty unless the architecture has them
  };

  std::shared_ptr<const Model> model_;
  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  std::vector<QuantizedWeight> quantized_;  // host copies of quantized weights (before upload)
  Tensor embed_, final_norm_;
  LinearWeight lm_head_;
  std::vector<Layer> layers_;
  uint64_t weight_bytes_per_step_ = 0, weight_bytes_ = 0;
  DType kv_dtype_;
  QuantMode quant_ = QuantMode::None;
  std::vector<float> inv_freq_host_;
  Tensor inv_freq_;
  BlockAllocator allocator_;
  std::vector<KvLayer> kv_layers_;
  std::vector<std::unique_ptr<Buffer>> buffers_;  // KV storage and activations
  Tensor x_, h_, q_, k_, v_, attn_, proj_, gate_, up_, last_hidden_;
  std::unique_ptr<Buffer> logits_buffer_;
  BatchPlan plan_;
  Observer observer_;
};

// Bytes of KV cache one token takes over all layers, for a cache of `kv_dtype` (with the
// per-token scales of an INT8 cache).
uint64_t kv_bytes_per_token(const ModelConfig& config, DType kv_dtype);

// The KV cache element type an engine uses for `requested` on this model.
DType resolve_kv_dtype(const Model& model, llmq_kv_dtype requested);

// RoPE inverse frequencies [head_dim / 2], with linear or Llama 3 scaling applied.
std::vector<float> rope_inv_freq(const ModelConfig& config);

}  // namespace llmq
