// A loaded model: config, memory-mapped weights checked against the config, and the tokenizer.
// Immutable after load(), so engines on several threads can share it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/config.h"
#include "engine/safetensors.h"
#include "engine/tensor.h"
#include "engine/tokenizer.h"

namespace llmq {

// The linear layers of a block, in the order of LayerWeights::scales.
enum LinearIndex { kQ, kK, kV, kO, kGate, kUp, kDown, kNumLinears };

struct LayerWeights {
  Tensor attn_norm;
  Tensor wq, wk, wv, wo;
  Tensor bq, bk, bv, bo;  // empty unless the architecture has them
  Tensor mlp_norm;
  Tensor w_gate, w_up, w_down;
  // Pre-quantized checkpoints only (config.checkpoint_quant): the weights above are I8 or F8_E4M3
  // codes; weight_scale F32 [1, N] (per channel) or [1, 1] (per tensor); input_scale F32 [1, 1]
  // (static FP8 activations); k_scale / v_scale F32 [1, 1] for an FP8 KV cache, when given.
  Tensor weight_scale[kNumLinears], input_scale[kNumLinears];
  Tensor k_scale, v_scale;
};

struct ModelWeights {
  Tensor embed;       // [vocab, hidden]
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // [1, hidden]
  Tensor lm_head;     // [vocab, hidden]; the embedding table when tied
};

class Model {
 public:
  // Loads DIR (config.json, model.safetensors or model.safetensors.index.json + shards,
  // tokenizer.json if present). Throws llmq::Error naming the file and the tensor or field.
  static std::shared_ptr<const Model> load(const std::string& model_dir);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  // nullptr when the directory has no tokenizer.json.
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  // Bytes of all weight tensors as stored (each read once per decode step).
  uint64_t weight_bytes() const { return weight_bytes_; }

 private:
  Model() = default;
  void bind_weights();

  std::string dir_;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::vector<char>> realigned_;  // copies of tensors whose mapped data is misaligned
  std::vector<std::vector<float>> scales_;    // quantization scales, converted to F32
  ModelWeights weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  uint64_t weight_bytes_ = 0;
};

}  // namespace llmq
