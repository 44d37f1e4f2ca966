// llmq-quantize: writes a pre-quantized checkpoint in the conventions vLLM reads, from a 16/32-bit
// one. The weights are quantized exactly as the engine's quantize-on-load does (engine/quant.h), so
// the saved checkpoint generates bit-identically to quantizing at load time.
//
//   fp8     "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"|"static"}
//           *.weight F8_E4M3, *.weight_scale F32 [] (per tensor); with --calib also *.input_scale
//           F32 [] (static activations) and self_attn.k_scale / v_scale F32 [] (FP8 KV cache).
//   int8wo  compressed-tensors, "int-quantized": *.weight I8 with *.weight_scale F32 [N, 1]; with
//           --calib also the k_scale / v_scale of an FP8 KV cache.
// Calibration runs text through the unquantized model (CPU backend) and sets each scale from the
// amax over the calibration tokens: input_scale = amax / 448, k_scale / v_scale = amax / 448.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "engine/error.h"
#include "tools/tool_main.h"
#include "engine/fp8.h"
#include "engine/json_file.h"
#include "engine/quant.h"
#include "engine/safetensors.h"
#include "engine/text_data.h"

namespace {

using namespace llmq;

const char* kUsage =
    "usage: llmq-quantize --model IN --out OUT --mode fp8|int8wo [--calib FILE] [--tokens N] [--threads T]\n"
    "  --calib FILE   text (UTF-8, documents separated by blank lines) to set static activation\n"
    "                 scales (fp8) and FP8 KV-cache scales from; without it fp8 activations are dynamic\n"
    "  --tokens N     calibration tokens to use at most (default 8192)\n"
    "  --threads T    CPU threads (default one per core)\n";

// amax per (layer, site) over the calibration tokens.
using Amax = std::map<std::pair<int32_t, std::string>, float>;

Amax calibrate(const std::shared_ptr<const Model>& model, const std::string& path, int64_t max_tokens, int threads) {
  const std::string text = read_corpus(path, "calibration file");
  const Tokenizer* tokenizer = model->tokenizer();
  if (!tokenizer) fail(LLMQ_ERR_UNSUPPORTED, "{}: calibration needs the model's tokenizer.json", model->dir());
  EngineOptions options;
  options.n_threads = threads;
  options.max_batch_tokens = 512;
  Engine engine(model, options);
  Amax amax;
  engine.set_observer([&](int32_t layer, const char* site, const Tensor& t) {
    float& a = amax[{layer, site}];
    for (int64_t i = 0; i < t.numel(); ++i) a = std::max(a, std::fabs(t.as<float>()[i]));
  });
  const int32_t bos = tokenizer->bos_id() >= 0 ? tokenizer->bos_id() : model->config().bos_id;
  int64_t used = 0, docs = 0;
  std::vector<float> logits(size_t(engine.max_batch_tokens()) * size_t(engine.vocab_size()));
  for (std::string_view doc : split_documents(text)) {
    if (used >= max_tokens) break;
    std::vector<int32_t> ids;
    if (bos >= 0) ids.push_back(bos);
    const std::vector<int32_t> encoded = tokenizer->encode(doc, false);
    ids.insert(ids.end(), encoded.begin(), encoded.end());
    ids.resize(size_t(std::min<int64_t>({int64_t(ids.size()), max_tokens - used, model->config().max_position})));
    if (ids.empty()) continue;
    logits.resize(ids.size() * size_t(engine.vocab_size()));
    engine.score(ids, logits.data());
    used += int64_t(ids.size());
    ++docs;
    std::fprintf(stderr, "\rcalibration: %lld tokens from %lld documents", (long long)used, (long long)docs);
  }
  std::fprintf(stderr, "\n");
  if (used == 0) fail(LLMQ_ERR_INVALID_ARGUMENT, "calibration file '{}' gives no tokens", path);
  return amax;
}

void copy_if_present(const std::string& from_dir, const std::string& to_dir, const char* name) {
  namespace fs = std::filesystem;
  const fs::path from = fs::path(from_dir) / name;
  if (fs::exists(from)) fs::copy_file(from, fs::path(to_dir) / name, fs::copy_options::overwrite_existing);
}

int run(int argc, char** argv) {
  std::string in_dir, out_dir, mode_name, calib;
  int64_t max_tokens = 8192;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) fail(LLMQ_ERR_INVALID_ARGUMENT, "{}: unknown flag or missing value\n{}", flag, kUsage);
    const std::string value = argv[++i];
    if (flag == "--model") in_dir = value;
    else if (flag == "--out") out_dir = value;
    else if (flag == "--mode") mode_name = value;
    else if (flag == "--calib") calib = value;
    else if (flag == "--tokens") max_tokens = tool::parse_int(flag, value, 1, int64_t(1) << 30);
    else if (flag == "--threads") threads = int(tool::parse_int(flag, value, 0, 1024));
    else fail(LLMQ_ERR_INVALID_ARGUMENT, "unknown flag '{}'\n{}", flag, kUsage);
  }
  if (in_dir.empty() || out_dir.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "--model and --out are required\n{}", kUsage);
  const QuantMode mode = mode_name == "fp8" ? QuantMode::Fp8 : mode_name == "int8wo" ? QuantMode::Int8WeightOnly
                                                                                      : QuantMode::None;
  if (mode == QuantMode::None) fail(LLMQ_ERR_INVALID_ARGUMENT, "--mode must be fp8 or int8wo, got '{}'", mode_name);

  auto model = Model::load(in_dir);
  const ModelConfig& c = model->config();
  if (c.checkpoint_quant != QuantMode::None)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "{} is already quantized ({}); quantize a 16/32-bit checkpoint", in_dir,
         quant_mode_name(c.checkpoint_quant));
  Amax amax;
  if (!calib.empty()) amax = calibrate(model, calib, max_tokens, threads);
  const bool calibrated = !calib.empty();

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
  const ModelWeights& w = model->weights();
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
          const float a = amax[{l, sites[i]}];
          add_scalar(base + "input_scale", a > 0.0f ? a / kFp8E4M3Max : 1.0f);
        }
      } else {
        tensors.push_back(TensorToWrite{base + "weight_scale", DType::F32, {t.rows, 1}, q.scale.data()});
      }
    }
    const Tensor* biases[4] = {&lw.bq, &lw.bk, &lw.bv, &lw.bo};
    for (int i = 0; i < 4; ++i) add(p + names[i] + ".bias", *biases[i], {biases[i]->cols});
    if (calibrated) {
      const float ka = amax[{l, "k"}], va = amax[{l, "v"}];
      add_scalar(p + "self_attn.k_scale", ka > 0.0f ? ka / kFp8E4M3Max : 1.0f);
      add_scalar(p + "self_attn.v_scale", va > 0.0f ? va / kFp8E4M3Max : 1.0f);
      summary += fmt::format("  layer {}: amax attn_in {:.4g} o_in {:.4g} mlp_in {:.4g} down_in {:.4g} k {:.4g} v {:.4g}\n", l,
                             amax[{l, "attn_in"}], amax[{l, "o_in"}], amax[{l, "mlp_in"}], amax[{l, "down_in"}], ka, va);
    }
  }
  add("model.norm.weight", w.final_norm, {w.final_norm.cols});
  if (!c.tie_word_embeddings) add("lm_head.weight", w.lm_head, {w.lm_head.rows, w.lm_head.cols});

  std::filesystem::create_directories(out_dir);
  write_safetensors(out_dir + "/model.safetensors", tensors, {{"format", "pt"}});
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
  std::ofstream(out_dir + "/config.json") << config.dump(2) << "\n";
  for (const char* name : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
    copy_if_present(in_dir, out_dir, name);

  std::printf("wrote %s: %s, %zu tensors%s\n", out_dir.c_str(), quant_mode_name(mode), tensors.size(),
              calibrated ? ", static activation and KV scales from calibration" : "");
  if (calibrated) {
    // The scales are the calibration amax, so nothing clips on the calibration text itself; text
    // beyond it can, and is reported by the engine's counters (not yet in the C API).
    std::printf("calibration amax per layer (scale = amax / 448); saturation on the calibration text: 0 values\n%s",
                summary.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return llmq::tool::run_main("llmq-quantize", run, argc, argv); }
