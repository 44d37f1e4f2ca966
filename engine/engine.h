// The engine: a backend, the model's weights on it, the paged KV cache and the forward pass
// (written once over the backend's ops). step() runs one forward pass over a flattened batch of
// tokens from several sequences, each at its own position, which is what continuous batching
// needs; generate() and score() are built on it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/communicator.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "llmq.h"

namespace llmq {

class RankThreads;

struct EngineOptions {
  llmq_backend backend = LLMQ_BACKEND_CPU;
  int32_t n_threads = 0;         // CPU threads; 0 = one per core
  uint64_t kv_cache_bytes = 0;   // 0 = one full context, at most kDefaultKvCacheBytes
  int32_t kv_block_size = 16;
  int32_t max_batch_tokens = 512;
  llmq_kv_dtype kv_dtype = LLMQ_KV_DTYPE_AUTO;
  QuantMode quant = QuantMode::None;  // quantize the layers' linear weights on load
  bool quantize_lm_head = false;       // and lm_head (the embedding table itself always stays as loaded)
  // Tensor parallelism (engine/tensor_parallel.h): ranks in this process, one thread each. The CPU
  // backend gives each rank n_threads / tensor_parallel threads (at least 1); CUDA puts rank r on
  // devices[r] (default: device r) and needs NCCL.
  int32_t tensor_parallel = 1;
  std::vector<int32_t> devices;
  int32_t tp_timeout_ms = 0;  // how long a rank waits for its peers at start-up and at a collective (0: 60 s)
  // Multi-process: this engine is rank communicator->rank() of communicator->size(), the other
  // ranks being engines in other processes (or threads) that make the same calls in the same
  // order. tensor_parallel stays 1; a CUDA engine runs on the communicator's device.
  std::shared_ptr<Communicator> communicator;
};

constexpr uint64_t kDefaultKvCacheBytes = uint64_t(2) << 30;
constexpr int32_t kDefaultTpTimeoutMs = 60000;

// One sequence's part of a step: append `tokens` to the sequence and compute logits for all of
// them or only for the last one.
struct SequenceStep {
  SequenceKv* kv = nullptr;
  const int32_t* tokens = nullptr;
  int32_t n_tokens = 0;
  bool all_logits = false;
  bool want_logits = true;  // false for the leading chunks of a chunked prefill
};

// The number of logits rows a step over `batch` gives.
size_t logit_rows(const std::vector<SequenceStep>& batch);

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
  const char* backend_name() const;
  // Ranks of the tensor-parallel group (1 without tensor parallelism).
  int32_t tensor_parallel() const { return tp_size_; }
  int32_t vocab_size() const { return int32_t(model_->config().vocab_size); }
  int32_t max_batch_tokens() const { return options_.max_batch_tokens; }
  int32_t block_size() const { return options_.kv_block_size; }
  BlockAllocator& allocator() { return allocator_; }
  DType kv_dtype() const { return kv_dtype_; }
  // The weight quantization in use: the one asked for, or a pre-quantized checkpoint's.
  QuantMode quant() const { return quant_; }
  // Weight bytes one decode step reads on the backend (quantized where quantized; the embedding
  // table is gathered by rows and not counted unless it is also the lm_head); summed over the ranks.
  uint64_t weight_bytes_per_step() const { return weight_bytes_per_step_; }
  // Bytes of all the weights the engine holds, as stored on its backend (quantized where
  // quantized); summed over the ranks.
  uint64_t weight_bytes() const { return weight_bytes_; }
  // Bytes of KV cache one token takes, over all layers, unsharded (kv_cache_bytes counts the same
  // way: with tensor parallelism each rank holds its KV heads' part of every block).
  uint64_t kv_bytes_per_token() const;
  // The backend's memory bandwidth in bytes/s, measured now (Backend::measure_peak_bandwidth).
  double measure_peak_bandwidth();
  std::unique_ptr<SequenceKv> new_sequence() { return std::make_unique<SequenceKv>(allocator_, block_size()); }

  // Runs one forward step. Reserves KV blocks first (LLMQ_ERR_KV_CACHE_FULL, with nothing changed,
  // when they are not available); positions past the context are LLMQ_ERR_CONTEXT_OVERFLOW.
  // The total number of tokens must not exceed max_batch_tokens(). Writes the logits rows in
  // sequence order ([rows, vocab]) into *logits.
  void step(const std::vector<SequenceStep>& batch, std::vector<float>* logits);
  // The same step, then one token per logits row (in the same order) drawn with sample_rows[i]
  // (engine/sampler.h's rule) on the backend, so that only the tokens leave it; with tensor
  // parallelism the gathered logits are sampled on the host. A serving step.
  void step(const std::vector<SequenceStep>& batch, const std::vector<SampleRow>& sample_rows,
            std::vector<int32_t>* tokens);

  // Validates the prompt and options, prefills in chunks of max_batch_tokens(), then decodes.
  GenerateResult generate(const std::vector<int32_t>& prompt, const GenerateOptions& options);

  // Logits of every position of `ids` (one sequence from position 0): n_ids * vocab floats.
  void score(const std::vector<int32_t>& ids, float* logits);

  // Saturation counters per layer (kSaturationCounters values each, engine/quant.h), accumulated
  // since creation or the last reset; summed over this process's ranks, each value counted once.
  std::vector<uint64_t> saturation(bool reset);

  // Calibration: during each forward step, called with the input of each layer's linear layers
  // ("attn_in" for q/k/v, "o_in", "mlp_in" for gate/up, "down_in") and the K and V rows written to
  // the cache ("k" after RoPE, "v"). CPU backend without tensor parallelism only: the tensors are
  // in host memory, whole.
  using Observer = std::function<void(int32_t layer, const char* site, const Tensor& values)>;
  void set_observer(Observer observer);

  // Checks that every id is in the vocabulary; `what` names the argument in the message.
  void check_token_ids(const int32_t* ids, size_t n, const char* what) const;

 private:
  struct Rank;  // one rank's backend, weights, KV heads and activations (engine.cpp)
  void check_parallel_options();
  // Reserves the batch's KV blocks and builds plan_; returns the step's token count.
  int32_t prepare_step(const std::vector<SequenceStep>& batch);
  void init_rank(Rank& r);
  void upload_weights(Rank& r, const ModelWeights& w);
  void forward(Rank& r, int32_t n_tokens, int32_t n_logit_rows);
  // Calls fn on every rank of this process at once (each on its own thread).
  void for_each_rank(const std::function<void(Rank&)>& fn);

  // A layer's weights as the backend uses them.
  struct Layer {
    Tensor attn_norm, mlp_norm;
    LinearWeight wq, wk, wv, wo, w_gate, w_up, w_down;
    Tensor bq, bk, bv, bo;  // empty unless the architecture has them
  };

  std::shared_ptr<const Model> model_;
  EngineOptions options_;
  int32_t tp_size_ = 1;
  uint64_t weight_bytes_per_step_ = 0, weight_bytes_ = 0;
  DType kv_dtype_;
  QuantMode quant_ = QuantMode::None;
  BlockAllocator allocator_;
  BatchPlan plan_;
  Observer observer_;
  std::vector<std::unique_ptr<Communicator>> communicators_;  // this process's group, one per rank
  std::unique_ptr<RankThreads> threads_;
  std::vector<std::unique_ptr<Rank>> ranks_;  // local ranks; ranks_[0] returns the logits
  std::vector<float> gathered_;  // the ranks' logits as all-gathered: [rank][row][their vocab]
  std::vector<float> host_logits_;  // tensor parallelism: the logits sampled on the host
  SampleScratch host_sample_scratch_;
  // A rank failed while the group ran: the communicators are aborted and the engine is unusable.
  llmq_status failed_status_ = LLMQ_OK;
  std::string failed_;
};

// Bytes of KV cache one token takes over all layers, for a cache of `kv_dtype` (with the
// per-token scales of an INT8 cache).
uint64_t kv_bytes_per_token(const ModelConfig& config, DType kv_dtype);

// The KV cache element type an engine uses for `requested` on this model.
DType resolve_kv_dtype(const Model& model, llmq_kv_dtype requested);

// RoPE inverse frequencies [head_dim / 2], with linear or Llama 3 scaling applied.
std::vector<float> rope_inv_freq(const ModelConfig& config);

}  // namespace llmq
