#include "engine/quant_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/error.h"
#include "engine/fp8.h"
#include "engine/json_file.h"
#include "engine/safetensors.h"

namespace llmq {

namespace {

void copy_if_present(const std::string& from_dir, const std::string& to_dir, const char* name) {
  namespace fs = std::filesystem;
  const fs::path from = fs::path(from_dir) / name;
  if (fs::exists(from)) fs::copy_file(from, fs::path(to_dir) / name, fs::copy_options::overwrite_existing);
}

}  // namespace

QuantizedCheckpointSummary write_quantized_checkpoint(const Model& model, const std::string& out_dir, QuantMode mode,
                                                      const CalibrationAmax* amax, int threads) {
  const ModelConfig& c = model.config();
  if (mode == QuantMode::None) fail(LLMQ_ERR_INVALID_ARGUMENT, "quantized checkpoint: the mode must be fp8 or int8wo");
  if (c.checkpoint_quant != QuantMode::None)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "{} is already quantized ({}); quantize a 16/32-bit checkpoint", model.dir(),
         quant_mode_name(c.checkpoint_quant));
  const bool calibrated = amax != nullptr;
  auto amax_of = [&](int32_t layer, const char* site) {  // 0 for a site calibration never saw
    auto it = amax->find({layer, site});
    return it == amax->end() ? 0.0f : it->second;
  };
  // Tensors to write, with storage for the quantized ones kept alive until the write.
  std::vector<TensorToWrite> tensors;
  std::vector<QuantizedWeight> quantized;
  quantized.reserve(size_t(c.num_layers) * kNumLinears);
  std::vector<std::vector<float>> scalars;
  scalars.reserve(size_t(c.num_layers) * (kNumLinears + 2) + 1);
  auto add = [&](const std::string& name, const Tensor& t, std::vector<int64_t> shape) {
    if (!t.empty()) tensors.push_back(TensorToWrite{name, t.dtype, std::move(shape), t.data});
  };
  auto add_scalar = [&](const std::string& name, float value) {
    scalars.push_back({value});
    tensors.push_back(TensorToWrite{name, DType::F32, {}, scalars.back().data()});
  };
  const ModelWeights& w = model.weights();
  add("model.embed_tokens.weight", w.embed, {w.embed.rows, w.embed.cols});
  const char* sites[kNumLinears] = {"attn_in", "attn_in", "attn_in", "o_in", "mlp_in", "mlp_in", "down_in"};
  const char* names[kNumLinears] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
  std::string summary;
  for (int32_t l = 0; l < int32_t(c.num_layers); ++l) {
    const LayerWeights& lw = w.layers[size_t(l)];
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "input_layernorm.weight", lw.attn_norm, {lw.attn_norm.cols});
    add(p + "post_attention_layernorm.weight", lw.mlp_norm, {lw.mlp_norm.cols});
    const Tensor* linears[kNumLinears] = {&lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.w_gate, &lw.w_up, &lw.w_down};
    for (int i = 0; i < kNumLinears; ++i) {
      const Tensor& t = *linears[i];
      quantized.push_back(quantize_weight(t, mode, threads > 0 ? threads : 4));
      const QuantizedWeight& q = quantized.back();
      const std::string base = p + names[i] + ".";
      tensors.push_back(TensorToWrite{base + "weight", q.dtype, {t.rows, t.cols}, q.data.data()});
      if (mode == QuantMode::Fp8) {
        tensors.push_back(TensorToWrite{base + "weight_scale", DType::F32, {}, q.scale.data()});
        if (calibrated) {
          const float a = amax_of(l, sites[i]);
          add_scalar(base + "input_scale", a > 0.0f ? a / kFp8E4M3Max : 1.0f);
        }
      } else {
        tensors.push_back(TensorToWrite{base + "weight_scale", DType::F32, {t.rows, 1}, q.scale.data()});
      }
    }
    const Tensor* biases[4] = {&lw.bq, &lw.bk, &lw.bv, &lw.bo};
    for (int i = 0; i < 4; ++i) add(p + names[i] + ".bias", *biases[i], {biases[i]->cols});
    if (calibrated) {
      const float ka = amax_of(l, "k"), va = amax_of(l, "v");
      add_scalar(p + "self_attn.k_scale", ka > 0.0f ? ka / kFp8E4M3Max : 1.0f);
      add_scalar(p + "self_attn.v_scale", va > 0.0f ? va / kFp8E4M3Max : 1.0f);
      summary += fmt::format("  layer {}: amax attn_in {:.4g} o_in {:.4g} mlp_in {:.4g} down_in {:.4g} k {:.4g} v {:.4g}\n", l,
                             amax_of(l, "attn_in"), amax_of(l, "o_in"), amax_of(l, "mlp_in"), amax_of(l, "down_in"), ka, va);
    }
  }
  add("model.norm.weight", w.final_norm, {w.final_norm.cols});
  if (!c.tie_word_embeddings) add("lm_head.weight", w.lm_head, {w.lm_head.rows, w.lm_head.cols});

  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) fail(LLMQ_ERR_IO, "{}: cannot create the directory: {}", out_dir, ec.message());
  write_safetensors(out_dir + "/model.safetensors", tensors, {{"format", "pt"}});
  const std::string in_dir = model.dir();
  nlohmann::json config = parse_json(read_text_file(in_dir + "/config.json", size_t(1) << 20), in_dir + "/config.json");
  if (mode == QuantMode::Fp8) {
    config["quantization_config"] = {{"quant_method", "fp8"}, {"activation_scheme", calibrated ? "static" : "dynamic"}};
  } else {
    config["quantization_config"] = {
        {"quant_method", "compressed-tensors"},
        {"format", "int-quantized"},
        {"config_groups",
         {{"group_0",
           {{"targets", {"Linear"}},
            {"weights", {{"num_bits", 8}, {"type", "int"}, {"symmetric", true}, {"strategy", "channel"}}},
            {"input_activations", nullptr}}}}},
        {"ignore", {"lm_head"}}};
  }
  std::ofstream config_out(out_dir + "/config.json");
  config_out << config.dump(2) << "\n";
  if (!config_out) fail(LLMQ_ERR_IO, "{}/config.json: cannot write", out_dir);
  for (const char* name : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
    copy_if_present(in_dir, out_dir, name);

  return QuantizedCheckpointSummary{tensors.size(), summary};
}

}  // namespace llmq
