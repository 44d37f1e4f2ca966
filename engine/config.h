// Model configuration read from a Hugging Face config.json (+ generation_config.json).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/quant.h"

namespace llmq {

enum class Architecture { Llama, Mistral, Qwen2 };

struct RopeConfig {
  double theta = 10000.0;
  // rope_scaling: "none", "linear" or "llama3" (Llama 3.1 frequency-dependent scaling).
  std::string type = "none";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position = 8192;
};

struct ModelConfig {
  std::string architecture_name;  // as in config.json, e.g. "LlamaForCausalLM"
  Architecture architecture = Architecture::Llama;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;       // Qwen2 always; Llama with attention_bias
  bool o_bias = false;         // Llama attention_bias also biases o_proj
  int64_t sliding_window = 0;  // 0 = full attention (Mistral v0.1 uses 4096)
  int32_t bos_id = -1;
  std::vector<int32_t> eos_ids;  // generation_config.json's list wins over config.json's
  // A pre-quantized checkpoint ("quantization_config"): vLLM's fp8, or compressed-tensors INT8
  // weights with per-channel scales (int8wo). static_activations: fp8 with "activation_scheme":
  // "static" (an input_scale per linear).
  QuantMode checkpoint_quant = QuantMode::None;
  bool static_activations = false;

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
};

// Parses DIR/config.json and, if present, DIR/generation_config.json. Throws llmq::Error naming the
// file and field for bad JSON, missing or ill-typed fields, values out of range, an unknown
// architecture or an unsupported feature (activation, rope scaling type).
ModelConfig load_model_config(const std::string& model_dir);

// Parses a config from JSON text; `source` names it in error messages.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);

}  // namespace llmq
