#include "engine/model.h"

#include <cstdint>
#include <cmath>
#include <cstring>
#include <set>
#include <unordered_map>

#include "engine/error.h"
#include "engine/json_file.h"

namespace llmq {

namespace {

using nlohmann::json;

constexpr size_t kMaxShards = 4096;

// A shard named by the index must be a plain file name inside the model directory.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name.size() < 256 && name.find('/') == std::string::npos && name != "." && name != ".." &&
         name.find('\0') == std::string::npos;
}

bool is_float_dtype(DType dtype) { return dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16; }

}  // namespace

std::shared_ptr<const Model> Model::load(const std::string& model_dir) {
  std::shared_ptr<Model> model(new Model());
  model->dir_ = model_dir;
  model->config_ = load_model_config(model_dir);

  const std::string index_path = model_dir + "/model.safetensors.index.json";
  const std::string single_path = model_dir + "/model.safetensors";
  if (file_exists(index_path)) {
    json index = parse_json(read_text_file(index_path, 64 << 20), index_path);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: expected an object with a 'weight_map' object", index_path);
    std::map<std::string, size_t> shard_of_file;
    std::unordered_map<std::string, size_t> shard_of_tensor;
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      if (!file.is_string())
        fail(LLMQ_ERR_MODEL_FORMAT, "{}: weight_map entry for tensor '{}' must be a file name", index_path, tensor);
      std::string name = file.get<std::string>();
      if (!is_plain_file_name(name))
        fail(LLMQ_ERR_MODEL_FORMAT, "{}: shard '{}' for tensor '{}' is not a plain file name in the model directory",
             index_path, name, tensor);
      auto it = shard_of_file.find(name);
      if (it == shard_of_file.end()) {
        if (shard_of_file.size() >= kMaxShards) fail(LLMQ_ERR_MODEL_FORMAT, "{}: more than {} shards", index_path, kMaxShards);
        it = shard_of_file.emplace(name, model->files_.size()).first;
        model->files_.push_back(SafetensorsFile::open(model_dir + "/" + name));
      }
      shard_of_tensor[tensor] = it->second;
    }
    // Each tensor must sit in the shard the index names, and each shard tensor must be indexed.
    for (const auto& [tensor, shard] : shard_of_tensor)
      if (!model->files_[shard]->find(tensor))
        fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}' is listed in shard '{}' but that file does not contain it",
             index_path, tensor, model->files_[shard]->path());
    for (size_t shard = 0; shard < model->files_.size(); ++shard)
      for (const TensorInfo& info : model->files_[shard]->tensors()) {
        auto it = shard_of_tensor.find(info.name);
        if (it == shard_of_tensor.end() || it->second != shard)
          fail(LLMQ_ERR_MODEL_FORMAT, "{}: unexpected tensor '{}': not listed for this file in {}",
               model->files_[shard]->path(), info.name, index_path);
      }
  } else if (file_exists(single_path)) {
    model->files_.push_back(SafetensorsFile::open(single_path));
  } else {
    fail(LLMQ_ERR_IO, "{}: no model.safetensors or model.safetensors.index.json", model_dir);
  }

  model->bind_weights();

  if (file_exists(model_dir + "/tokenizer.json")) model->tokenizer_ = Tokenizer::load(model_dir);
  return model;
}

void Model::bind_weights() {
  const ModelConfig& c = config_;
  std::unordered_map<std::string, const TensorInfo*> by_name;
  std::unordered_map<std::string, const SafetensorsFile*> file_of;
  for (const auto& file : files_)
    for (const TensorInfo& info : file->tensors()) {
      if (!by_name.emplace(info.name, &info).second)
        fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}' also appears in {}", file->path(), info.name,
             file_of[info.name]->path());
      file_of[info.name] = file.get();
    }
  std::set<std::string> used;

  // Finds a tensor, checks its dtype and shape ({rows, cols}, or {cols} for 1-D), and returns a
  // view of it in place (or of an aligned copy when the mapping is misaligned for its dtype).
  auto bind = [&](const std::string& name, int64_t rows, int64_t cols, bool one_d,
                  DType quantized = DType::F32) -> Tensor {
    auto it = by_name.find(name);
    if (it == by_name.end()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: missing tensor '{}'", dir_, name);
    const TensorInfo& info = *it->second;
    const std::string& path = file_of[name]->path();
    if (quantized != DType::F32 && info.dtype != quantized)
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}' has dtype {}; this {} checkpoint needs {}", path, name,
           dtype_name(info.dtype), quant_mode_name(c.checkpoint_quant), dtype_name(quantized));
    if (quantized == DType::F32 && !is_float_dtype(info.dtype))
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}' has dtype {}; expected F32, F16 or BF16", path, name,
           dtype_name(info.dtype));
    std::vector<int64_t> expected = one_d ? std::vector<int64_t>{cols} : std::vector<int64_t>{rows, cols};
    if (info.shape != expected)
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}' has shape [{}]; the config implies [{}]", path, name,
           fmt::join(info.shape, ", "), fmt::join(expected, ", "));
    used.insert(name);
    const void* data = info.data;
    if (reinterpret_cast<uintptr_t>(data) % dtype_size(info.dtype) != 0) {
      realigned_.emplace_back(static_cast<const char*>(data), static_cast<const char*>(data) + info.nbytes);
      data = realigned_.back().data();
    }
    return Tensor{const_cast<void*>(data), info.dtype, rows, cols};
  };

  // A scale tensor of `count` values (shape [], [count] or [count, 1]), as F32, finite and >= 0.
  auto bind_scale = [&](const std::string& name, int64_t count, bool required) -> Tensor {
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      if (required) fail(LLMQ_ERR_MODEL_FORMAT, "{}: missing tensor '{}'", dir_, name);
      return Tensor{};
    }
    const TensorInfo& info = *it->second;
    const std::string& path = file_of[name]->path();
    const bool shape_ok = (count == 1 && (info.shape.empty() || info.shape == std::vector<int64_t>{1})) ||
                          info.shape == std::vector<int64_t>{count} || info.shape == std::vector<int64_t>{count, 1};
    if (!shape_ok || !is_float_dtype(info.dtype))
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: scale '{}' has dtype {} and shape [{}]; expected F32, F16 or BF16 with {} value(s)",
           path, name, dtype_name(info.dtype), fmt::join(info.shape, ", "), count);
    std::vector<float> values(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
      const char* p = static_cast<const char*>(info.data) + uint64_t(i) * dtype_size(info.dtype);
      uint32_t bits32 = 0;
      uint16_t bits16 = 0;
      if (info.dtype == DType::F32) std::memcpy(&bits32, p, 4);
      else std::memcpy(&bits16, p, 2);
      values[size_t(i)] = info.dtype == DType::F32 ? f32_from_bits(bits32)
                          : info.dtype == DType::BF16 ? bf16_to_f32(bits16) : f16_to_f32(bits16);
      if (!std::isfinite(values[size_t(i)]) || values[size_t(i)] < 0.0f)
        fail(LLMQ_ERR_MODEL_FORMAT, "{}: scale '{}' has a non-finite or negative value {} at index {}", path, name,
             values[size_t(i)], i);
    }
    used.insert(name);
    scales_.push_back(std::move(values));
    return Tensor{scales_.back().data(), DType::F32, 1, count};
  };
  // A linear layer's weight: 16/32-bit, or the checkpoint's codes with their scales.
  auto bind_linear = [&](LayerWeights& l, LinearIndex index, const std::string& name, int64_t rows,
                         int64_t cols) -> Tensor {
    if (c.checkpoint_quant == QuantMode::None) return bind(name, rows, cols, false);
    const std::string base = name.substr(0, name.size() - std::string("weight").size());
    if (c.checkpoint_quant == QuantMode::Int8WeightOnly) {
      l.weight_scale[index] = bind_scale(base + "weight_scale", rows, true);
      return bind(name, rows, cols, false, DType::I8);
    }
    // Per tensor ([] or [1]) or per output channel ([N] or [N, 1]).
    auto scale = by_name.find(base + "weight_scale");
    const bool per_channel = scale != by_name.end() && rows > 1 && !scale->second->shape.empty() &&
                             scale->second->shape[0] == rows;
    l.weight_scale[index] = bind_scale(base + "weight_scale", per_channel ? rows : 1, true);
    l.input_scale[index] = bind_scale(base + "input_scale", 1, c.static_activations);
    if (!c.static_activations) l.input_scale[index] = Tensor{};  // dynamic: a stored input_scale is ignored
    else if (l.input_scale[index].as<float>()[0] == 0.0f)
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: scale '{}input_scale' is zero", dir_, base);
    return bind(name, rows, cols, false, DType::F8_E4M3);
  };

  const int64_t D = c.hidden_size, I = c.intermediate_size, Q = c.q_size(), KV = c.kv_size();
  weights_.embed = bind("model.embed_tokens.weight", c.vocab_size, D, false);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    LayerWeights l;
    l.attn_norm = bind(p + "input_layernorm.weight", 1, D, true);
    l.wq = bind_linear(l, kQ, p + "self_attn.q_proj.weight", Q, D);
    l.wk = bind_linear(l, kK, p + "self_attn.k_proj.weight", KV, D);
    l.wv = bind_linear(l, kV, p + "self_attn.v_proj.weight", KV, D);
    l.wo = bind_linear(l, kO, p + "self_attn.o_proj.weight", D, Q);
    // FP8 KV cache scales (vLLM's names), optional.
    l.k_scale = bind_scale(p + "self_attn.k_scale", 1, false);
    l.v_scale = bind_scale(p + "self_attn.v_scale", 1, false);
    if (c.qkv_bias) {
      l.bq = bind(p + "self_attn.q_proj.bias", 1, Q, true);
      l.bk = bind(p + "self_attn.k_proj.bias", 1, KV, true);
      l.bv = bind(p + "self_attn.v_proj.bias", 1, KV, true);
    }
    if (c.o_bias) l.bo = bind(p + "self_attn.o_proj.bias", 1, D, true);
    l.mlp_norm = bind(p + "post_attention_layernorm.weight", 1, D, true);
    l.w_gate = bind_linear(l, kGate, p + "mlp.gate_proj.weight", I, D);
    l.w_up = bind_linear(l, kUp, p + "mlp.up_proj.weight", I, D);
    l.w_down = bind_linear(l, kDown, p + "mlp.down_proj.weight", D, I);
    weights_.layers.push_back(l);
  }
  weights_.final_norm = bind("model.norm.weight", 1, D, true);
  if (c.tie_word_embeddings) {
    // Some tied checkpoints also store lm_head.weight; it is checked and then unused, as in transformers.
    if (by_name.count("lm_head.weight")) bind("lm_head.weight", c.vocab_size, D, false);
    weights_.lm_head = weights_.embed;
  } else {
    weights_.lm_head = bind("lm_head.weight", c.vocab_size, D, false);
  }

  for (const auto& [name, info] : by_name) {
    if (used.count(name)) continue;
    // Older checkpoints carry RoPE frequency buffers; they are derived from the config instead.
    const std::string suffix = "rotary_emb.inv_freq";
    if (name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) continue;
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: unexpected tensor '{}' (not part of a {} with this config)", file_of[name]->path(),
         name, c.architecture_name);
  }
  for (const auto& name : used) weight_bytes_ += by_name[name]->nbytes;
  if (c.checkpoint_quant != QuantMode::None && weights_.layers.empty())
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: a quantized checkpoint with no layers", dir_);
}

}  // namespace llmq
