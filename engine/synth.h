// Synthetic checkpoints: random-weight models in the Hugging Face layout (config.json,
// generation_config.json, model.safetensors or shards + model.safetensors.index.json) that
// Model::load accepts. They let tests and benchmarks run real shapes without downloading weights.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/dtype.h"

namespace llmq {

struct SynthSpec {
  std::string architecture = "LlamaForCausalLM";  // or MistralForCausalLM, Qwen2ForCausalLM
  int64_t hidden_size = 64, intermediate_size = 172, num_layers = 2, num_heads = 8, num_kv_heads = 4;
  int64_t head_dim = 0;  // 0: hidden_size / num_heads, not written to config; else written explicitly
  int64_t vocab_size = 512, max_position = 2048;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-5;
  nlohmann::json rope_scaling;    // null, or e.g. {"rope_type":"llama3", ...}
  bool tie_word_embeddings = false;
  bool attention_bias = false;    // Llama only: biases on q/k/v/o
  int64_t sliding_window = 0;     // Mistral only: written when > 0 (else null)
  DType dtype = DType::BF16;      // F32, F16 or BF16
  int shards = 1;                 // > 1: model-0000i-of-0000n.safetensors + model.safetensors.index.json
  uint64_t seed = 1;
  std::vector<int32_t> eos_ids = {2};
  int32_t bos_id = 1;
  int threads = 0;                // generation threads, 0 = one per core; the bytes do not depend on it
};

// What write_synthetic_model wrote.
struct SynthSummary {
  std::vector<std::string> files;  // paths, weights first
  int64_t tensors = 0;
  int64_t parameters = 0;
  uint64_t tensor_bytes = 0;  // weight data only
  uint64_t file_bytes = 0;    // all files written, headers and JSON included
};

// Named shapes: "tiny" (the SynthSpec defaults), "llama2-7b", "llama3-8b" (with Llama 3.1 rope
// scaling), "llama2-70b-tp8-shard" (one tensor-parallel rank of Llama-2-70B at tp=8), "cpu-2048"
// (the CPU decode benchmark shape). Unknown names are LLMQ_ERR_INVALID_ARGUMENT.
SynthSpec synth_preset(const std::string& name);
std::vector<std::string> synth_preset_names();

// Checks the spec (LLMQ_ERR_INVALID_ARGUMENT naming the field), creates `dir` if needed and writes
// the model. Weights are normal(0, 0.02) with ~0.5% of the input channels of every linear layer
// scaled x10 (outlier features), norm weights 1 + 0.02 * noise, biases normal(0, 0.01). Each tensor's
// values depend only on the seed and its name, so sharding and thread count do not change them.
// Tensors are generated and written in chunks, never the whole model in memory. Files are written
// as NAME.tmp and renamed; a stale entry file of the other layout (model.safetensors vs the index)
// is removed so that the directory loads as written. LLMQ_ERR_IO for file system failures.
SynthSummary write_synthetic_model(const std::string& dir, const SynthSpec& spec);

}  // namespace llmq
