// Pre-quantized checkpoints: vLLM's FP8 layout and compressed-tensors INT8, written by
// llmq-quantize or by hand here, loaded back and checked against quantize-on-load.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "engine/error.h"
#include "engine/quant.h"
#include "engine/safetensors.h"
#include "test_util.h"

namespace llmq {
namespace {

std::shared_ptr<const Model> stories() {
  static std::shared_ptr<const Model> model = Model::load(test::stories_dir());
  return model;
}

const std::vector<int32_t> kIds = {1, 403, 407, 261, 378, 261, 429, 261, 266, 443, 269, 275, 284, 283, 288, 422};

std::vector<float> score(const std::shared_ptr<const Model>& model, QuantMode quant, llmq_kv_dtype kv = LLMQ_KV_DTYPE_AUTO) {
  EngineOptions o;
  o.n_threads = 2;
  o.quant = quant;
  o.kv_dtype = kv;
  Engine engine(model, o);
  std::vector<float> logits(kIds.size() * size_t(engine.vocab_size()));
  engine.score(kIds, logits.data());
  return logits;
}

// llmq-quantize's output loads back and computes exactly what quantize-on-load computes.
TEST(Checkpoint, SavedByLlmqQuantizeLoadsBitIdentical) {
  for (const char* mode : {"int8wo", "fp8"}) {
    test::TempDir dir;
    auto r = test::run_command(test::bin_dir() + "/llmq-quantize --model " + test::stories_dir() + " --out " +
                               dir / "q" + " --mode " + mode + " 2>&1");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    auto model = Model::load(dir / "q");
    const QuantMode quant = std::string(mode) == "fp8" ? QuantMode::Fp8 : QuantMode::Int8WeightOnly;
    EXPECT_EQ(model->config().checkpoint_quant, quant);
    EngineOptions o;
    EXPECT_EQ(Engine(model, o).quant(), quant);  // no option needed: the checkpoint says
    const std::vector<float> loaded = score(model, QuantMode::None), on_load = score(stories(), quant);
    ASSERT_EQ(loaded.size(), on_load.size());
    EXPECT_EQ(0, std::memcmp(loaded.data(), on_load.data(), loaded.size() * sizeof(float))) << mode;
    // Asking for the same mode again is fine; another one is an error naming both.
    EXPECT_EQ(score(model, quant), loaded);
    try {
      score(model, quant == QuantMode::Fp8 ? QuantMode::Int8WeightOnly : QuantMode::Fp8);
      FAIL() << "a second quantization was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), LLMQ_ERR_INVALID_ARGUMENT);
      EXPECT_NE(std::string(e.what()).find("already quantized as"), std::string::npos) << e.what();
    }
  }
}

// A vLLM-style FP8 checkpoint written by hand: static activation scales, per-layer KV scales.
struct Fp8Fixture {
  bool static_activations = true;
  float input_scale = 16.0f / 448.0f;
  std::string drop;         // a tensor to leave out
  std::string poison;       // a scale to make NaN
  bool bf16_weights = false;
  bool per_channel = false;  // weight_scale [N, 1] instead of one per tensor
};

Fp8Fixture fixture(bool static_activations, std::string drop = "", std::string poison = "", bool bf16 = false) {
  Fp8Fixture f;
  f.static_activations = static_activations;
  f.drop = std::move(drop);
  f.poison = std::move(poison);
  f.bf16_weights = bf16;
  return f;
}

void write_vllm_fp8(const std::string& dir, const Fp8Fixture& f) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  const Model& m = *stories();
  const ModelWeights& w = m.weights();
  std::vector<QuantizedWeight> quantized;
  std::vector<std::vector<float>> scalars;
  quantized.reserve(64);
  scalars.reserve(256);
  std::vector<TensorToWrite> tensors;
  auto scalar = [&](const std::string& name, float value, std::vector<int64_t> shape) {
    scalars.push_back({name == f.poison ? std::numeric_limits<float>::quiet_NaN() : value});
    tensors.push_back({name, DType::F32, std::move(shape), scalars.back().data()});
  };
  tensors.push_back({"model.embed_tokens.weight", w.embed.dtype, {w.embed.rows, w.embed.cols}, w.embed.data});
  tensors.push_back({"model.norm.weight", w.final_norm.dtype, {w.final_norm.cols}, w.final_norm.data});
  const char* names[kNumLinears] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& lw = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    tensors.push_back({p + "input_layernorm.weight", lw.attn_norm.dtype, {lw.attn_norm.cols}, lw.attn_norm.data});
    tensors.push_back({p + "post_attention_layernorm.weight", lw.mlp_norm.dtype, {lw.mlp_norm.cols}, lw.mlp_norm.data});
    const Tensor* linears[kNumLinears] = {&lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.w_gate, &lw.w_up, &lw.w_down};
    for (int i = 0; i < kNumLinears; ++i) {
      quantized.push_back(quantize_weight(*linears[i], QuantMode::Fp8, 1));
      QuantizedWeight& q = quantized.back();
      if (f.per_channel) {  // the same codes, with the tensor's scale repeated per channel
        q.scale.assign(size_t(q.rows), q.scale[0]);
        tensors.push_back({p + names[i] + ".weight_scale", DType::F32, {q.rows, 1}, q.scale.data()});
      }
      const std::string base = p + names[i] + ".";
      tensors.push_back({base + "weight", f.bf16_weights ? DType::BF16 : DType::F8_E4M3, {q.rows, q.cols / (f.bf16_weights ? 2 : 1)},
                         q.data.data()});
      if (!f.per_channel) scalar(base + "weight_scale", q.scale[0], {1});  // vLLM writes [1] or []: both load
      if (f.static_activations) scalar(base + "input_scale", f.input_scale, {});
    }
    scalar(p + "self_attn.k_scale", 32.0f / 448.0f, {});
    scalar(p + "self_attn.v_scale", 4.0f / 448.0f, {});
  }
  tensors.erase(std::remove_if(tensors.begin(), tensors.end(), [&](const TensorToWrite& t) { return t.name == f.drop; }),
                tensors.end());
  write_safetensors(dir + "/model.safetensors", tensors);
  nlohmann::json config = test::read_json(test::stories_dir() + "/config.json");
  config["quantization_config"] = {{"quant_method", "fp8"},
                                   {"activation_scheme", f.static_activations ? "static" : "dynamic"}};
  std::ofstream(dir + "/config.json") << config.dump(2);
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
    fs::copy_file(test::stories_dir() + "/" + name, dir + "/" + name);
}

TEST(Checkpoint, HandMadeVllmFp8Loads) {
  test::TempDir dir;
  // Dynamic activations: the same codes and scales as quantize-on-load, so the same logits, with
  // the scales stored per tensor or repeated per channel.
  write_vllm_fp8(dir / "dynamic", fixture(false));
  EXPECT_EQ(score(Model::load(dir / "dynamic"), QuantMode::None), score(stories(), QuantMode::Fp8));
  Fp8Fixture channel = fixture(false);
  channel.per_channel = true;
  write_vllm_fp8(dir / "channel", channel);
  auto per_channel = Model::load(dir / "channel");
  EXPECT_EQ(per_channel->weights().layers[0].weight_scale[kGate].cols, 172);
  EXPECT_EQ(score(per_channel, QuantMode::None), score(stories(), QuantMode::Fp8));
  // Static activations and KV scales: used as stored; the model still predicts as the original.
  write_vllm_fp8(dir / "static", fixture(true));
  auto model = Model::load(dir / "static");
  EXPECT_TRUE(model->config().static_activations);
  EXPECT_FLOAT_EQ(model->weights().layers[0].input_scale[kQ].as<float>()[0], 16.0f / 448.0f);
  EXPECT_FLOAT_EQ(model->weights().layers[4].k_scale.as<float>()[0], 32.0f / 448.0f);
  const std::vector<float> reference = score(stories(), QuantMode::None);
  for (llmq_kv_dtype kv : {LLMQ_KV_DTYPE_AUTO, LLMQ_KV_DTYPE_FP8}) {
    const std::vector<float> logits = score(model, QuantMode::None, kv);
    EXPECT_NE(logits, score(stories(), QuantMode::Fp8, kv));  // the static scales make a difference
    size_t agree = 0;
    const size_t vocab = size_t(stories()->config().vocab_size);
    for (size_t t = 0; t < kIds.size(); ++t) {
      auto top = [&](const std::vector<float>& l) {
        return std::max_element(l.begin() + long(t * vocab), l.begin() + long((t + 1) * vocab)) - l.begin();
      };
      agree += top(logits) == top(reference);
    }
    EXPECT_GE(agree, kIds.size() * 3 / 4) << "kv " << int(kv);
    std::printf("static fp8 fixture, kv %d: next token as the unquantized model at %zu of %zu positions\n", int(kv), agree, kIds.size());
  }
}

// Static scales that clip are counted per layer, never silent.
TEST(Checkpoint, StaticScalesThatClipAreCounted) {
  test::TempDir dir;
  Fp8Fixture f = fixture(true);
  f.input_scale = 0.25f / 448.0f;  // anything beyond 0.25 clips
  write_vllm_fp8(dir / "tight", f);
  auto model = Model::load(dir / "tight");
  EngineOptions o;
  o.n_threads = 2;
  o.kv_dtype = LLMQ_KV_DTYPE_FP8;
  Engine engine(model, o);
  std::vector<float> logits(kIds.size() * size_t(engine.vocab_size()));
  engine.score(kIds, logits.data());
  const std::vector<uint64_t> counts = engine.saturation(/*reset=*/true);
  ASSERT_EQ(counts.size(), size_t(model->config().num_layers) * kSaturationCounters);
  for (size_t l = 0; l < size_t(model->config().num_layers); ++l) {
    const uint64_t* c = &counts[l * kSaturationCounters];
    // q, k, v share one input and gate, up another; each linear quantizes its input itself.
    EXPECT_EQ(c[kActivationsStatic], kIds.size() * uint64_t(3 * 64 + 64 + 2 * 64 + 172)) << l;
    EXPECT_GT(c[kActivationsClipped], 0u) << l;
    EXPECT_LE(c[kActivationsClipped], c[kActivationsStatic]) << l;
    EXPECT_EQ(c[kKvStatic], kIds.size() * uint64_t(model->config().kv_size())) << l;
    EXPECT_LE(c[kKClipped], c[kKvStatic]) << l;
  }
  for (uint64_t c : engine.saturation(false)) EXPECT_EQ(c, 0u);  // reset
  // The quantize-on-load modes use dynamic scales: nothing to count.
  EngineOptions d;
  d.quant = QuantMode::Fp8;
  Engine dynamic(stories(), d);
  dynamic.score(kIds, logits.data());
  for (uint64_t c : dynamic.saturation(false)) EXPECT_EQ(c, 0u);
}

void expect_load_error(const std::string& dir, llmq_status status, const std::vector<std::string>& parts) {
  try {
    Model::load(dir);
    FAIL() << dir << " loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    for (const std::string& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, BadQuantizedCheckpointsNameTheTensor) {
  test::TempDir dir;
  write_vllm_fp8(dir / "missing", fixture(true, "model.layers.2.mlp.up_proj.weight_scale"));
  expect_load_error(dir / "missing", LLMQ_ERR_MODEL_FORMAT, {"missing tensor", "model.layers.2.mlp.up_proj.weight_scale"});
  write_vllm_fp8(dir / "no_input_scale", fixture(true, "model.layers.0.self_attn.o_proj.input_scale"));
  expect_load_error(dir / "no_input_scale", LLMQ_ERR_MODEL_FORMAT, {"model.layers.0.self_attn.o_proj.input_scale"});
  write_vllm_fp8(dir / "nan", fixture(true, "", "model.layers.1.self_attn.k_proj.weight_scale"));
  expect_load_error(dir / "nan", LLMQ_ERR_MODEL_FORMAT, {"model.layers.1.self_attn.k_proj.weight_scale", "non-finite"});
  write_vllm_fp8(dir / "nan_kv", fixture(true, "", "model.layers.3.self_attn.v_scale"));
  expect_load_error(dir / "nan_kv", LLMQ_ERR_MODEL_FORMAT, {"model.layers.3.self_attn.v_scale"});
  write_vllm_fp8(dir / "bf16", fixture(true, "", "", true));
  expect_load_error(dir / "bf16", LLMQ_ERR_MODEL_FORMAT, {"model.layers.0.self_attn.q_proj.weight", "BF16", "F8_E4M3"});

  // An unknown quantization method, and compressed-tensors with activations quantized.
  write_vllm_fp8(dir / "method", fixture(true));
  nlohmann::json config = test::read_json(dir / "method/config.json");
  config["quantization_config"] = {{"quant_method", "awq"}};
  std::ofstream(dir / "method/config.json") << config.dump();
  expect_load_error(dir / "method", LLMQ_ERR_UNSUPPORTED, {"quant_method 'awq'"});
  config["quantization_config"] = {
      {"quant_method", "compressed-tensors"},
      {"config_groups",
       {{"group_0",
         {{"weights", {{"num_bits", 8}, {"type", "int"}, {"symmetric", true}, {"strategy", "channel"}}},
          {"input_activations", {{"num_bits", 8}}}}}}}};
  std::ofstream(dir / "method/config.json") << config.dump();
  expect_load_error(dir / "method", LLMQ_ERR_UNSUPPORTED, {"group_0.input_activations"});
  config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = "8";
  std::ofstream(dir / "method/config.json") << config.dump();
  expect_load_error(dir / "method", LLMQ_ERR_UNSUPPORTED, {"group_0.weights"});
}

TEST(Checkpoint, LlmqQuantizeRejectsBadInput) {
  test::TempDir dir;
  auto quantize = [&](const std::string& args) {
    return test::run_command(test::bin_dir() + "/llmq-quantize " + args + " 2>&1");
  };
  const std::string base = "--model " + test::stories_dir() + " --out " + dir / "out";
  test::write_text(dir / "empty.txt", "");
  auto r = quantize(base + " --mode fp8 --calib " + dir / "empty.txt");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("calibration file '" + dir / "empty.txt" + "' is empty"), std::string::npos) << r.out;
  test::write_text(dir / "latin1.txt", "caf\xE9 au lait");
  r = quantize(base + " --mode fp8 --calib " + dir / "latin1.txt");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("not valid UTF-8: bad byte 0xE9 at byte offset 3"), std::string::npos) << r.out;
  r = quantize(base + " --mode int4");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("--mode must be fp8 or int8wo"), std::string::npos) << r.out;
  ASSERT_EQ(quantize(base + " --mode int8wo").exit_code, 0);
  r = quantize("--model " + dir / "out" + " --out " + dir / "again --mode fp8");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("is already quantized (int8wo)"), std::string::npos) << r.out;
  // Calibrated fp8: static scales and KV scales are written and used.
  r = quantize(base + "_static --mode fp8 --tokens 1024 --calib " + test::shared_dir() + "/data/tinystories_valid_sample.txt");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("static activation and KV scales from calibration"), std::string::npos) << r.out;
  auto model = Model::load(dir / "out_static");
  EXPECT_TRUE(model->config().static_activations);
  EXPECT_GT(model->weights().layers[0].k_scale.as<float>()[0], 0.0f);
}

}  // namespace
}  // namespace llmq
