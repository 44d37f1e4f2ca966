// The loader on hostile and unusual model directories: each problem gets a non-zero status and a
// message naming the file and the tensor or field. Also config parsing (architectures, GQA,
// head_dim, rope scaling, EOS lists).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>

#include "engine/engine.h"
#include "engine/error.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "llmq.h"
#include "test_util.h"

namespace {

using namespace llmq;
using nlohmann::json;

// A tiny Llama (2 layers, hidden 8, 2 heads / 1 kv head, vocab 16) written as F32 tensors.
struct TinyModel {
  json config = {{"architectures", {"LlamaForCausalLM"}},
                 {"hidden_size", 8},
                 {"intermediate_size", 12},
                 {"num_hidden_layers", 2},
                 {"num_attention_heads", 2},
                 {"num_key_value_heads", 1},
                 {"vocab_size", 16},
                 {"max_position_embeddings", 64},
                 {"rms_norm_eps", 1e-5},
                 {"tie_word_embeddings", false},
                 {"bos_token_id", 1},
                 {"eos_token_id", 2}};
  std::map<std::string, std::vector<int64_t>> shapes;
  std::map<std::string, DType> dtypes;
  std::vector<std::vector<char>> storage;

  TinyModel() {
    shapes["model.embed_tokens.weight"] = {16, 8};
    for (int l = 0; l < 2; ++l) {
      std::string p = "model.layers." + std::to_string(l) + ".";
      shapes[p + "input_layernorm.weight"] = {8};
      shapes[p + "self_attn.q_proj.weight"] = {8, 8};
      shapes[p + "self_attn.k_proj.weight"] = {4, 8};
      shapes[p + "self_attn.v_proj.weight"] = {4, 8};
      shapes[p + "self_attn.o_proj.weight"] = {8, 8};
      shapes[p + "post_attention_layernorm.weight"] = {8};
      shapes[p + "mlp.gate_proj.weight"] = {12, 8};
      shapes[p + "mlp.up_proj.weight"] = {12, 8};
      shapes[p + "mlp.down_proj.weight"] = {8, 12};
    }
    shapes["model.norm.weight"] = {8};
    shapes["lm_head.weight"] = {16, 8};
  }

  std::vector<TensorToWrite> tensors(const std::vector<std::string>& names) {
    std::vector<TensorToWrite> out;
    for (const std::string& name : names) {
      DType dtype = dtypes.count(name) ? dtypes[name] : DType::F32;
      int64_t numel = 1;
      for (int64_t d : shapes[name]) numel *= d;
      storage.emplace_back(size_t(numel) * dtype_size(dtype));
      for (size_t i = 0; i < storage.back().size(); ++i) storage.back()[i] = char((i * 7 + name.size()) % 61);
      if (dtype == DType::F32) {
        float* values = reinterpret_cast<float*>(storage.back().data());
        for (int64_t i = 0; i < numel; ++i) values[i] = 0.01f * float((i * 13 + int64_t(name.size())) % 17 - 8);
      }
      out.push_back({name, dtype, shapes[name], storage.back().data()});
    }
    return out;
  }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, shape] : shapes) out.push_back(name);
    return out;
  }

  void write(const std::string& dir) {
    test::write_text(dir + "/config.json", config.dump());
    write_safetensors(dir + "/model.safetensors", tensors(names()));
  }
};

// Loads through the C ABI and returns the status, with the message in *message.
llmq_status load_status(const std::string& dir, std::string* message) {
  llmq_model* model = nullptr;
  llmq_status status = llmq_model_load(dir.c_str(), nullptr, &model);
  *message = llmq_last_error();
  llmq_model_destroy(model);
  if (status == LLMQ_OK) {
    EXPECT_NE(model, nullptr);
  }
  return status;
}

void expect_load_error(const std::string& dir, llmq_status expected, std::vector<std::string> needles) {
  std::string message;
  EXPECT_EQ(load_status(dir, &message), expected) << message;
  for (const std::string& needle : needles) EXPECT_NE(message.find(needle), std::string::npos) << message;
}

TEST(Loader, TinyModelLoadsAndRuns) {
  test::TempDir dir;
  TinyModel tiny;
  tiny.write(dir.path());
  auto model = Model::load(dir.path());
  EXPECT_EQ(model->config().num_kv_heads, 1);
  EXPECT_EQ(model->config().head_dim, 4);
  EXPECT_EQ(model->tokenizer(), nullptr);
  Engine engine(model, EngineOptions());
  std::vector<float> logits(3 * 16);
  engine.score({1, 5, 9}, logits.data());
  for (float v : logits) EXPECT_TRUE(std::isfinite(v));
  // Without tokenizer.json, text calls fail clearly.
  llmq_model* handle = nullptr;
  ASSERT_EQ(llmq_model_load(dir.path().c_str(), nullptr, &handle), LLMQ_OK);
  size_t n = 0;
  EXPECT_EQ(llmq_tokenize(handle, "hi", 2, 1, nullptr, 0, &n), LLMQ_ERR_UNSUPPORTED);
  EXPECT_NE(std::string(llmq_last_error()).find("tokenizer.json"), std::string::npos);
  llmq_model_destroy(handle);
}

TEST(Loader, MissingTensor) {
  test::TempDir dir;
  TinyModel tiny;
  tiny.write(dir.path());
  std::vector<std::string> names = tiny.names();
  names.erase(std::find(names.begin(), names.end(), "model.layers.1.mlp.up_proj.weight"));
  write_safetensors(dir / "model.safetensors", tiny.tensors(names));
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"missing tensor", "model.layers.1.mlp.up_proj.weight"});
}

TEST(Loader, UnexpectedTensor) {
  test::TempDir dir;
  TinyModel tiny;
  tiny.shapes["model.layers.0.self_attn.extra.weight"] = {2, 2};
  tiny.write(dir.path());
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT,
                    {"unexpected tensor", "model.layers.0.self_attn.extra.weight", "model.safetensors"});
}

TEST(Loader, WrongShape) {
  test::TempDir dir;
  TinyModel tiny;
  tiny.shapes["model.layers.0.self_attn.k_proj.weight"] = {8, 8};  // GQA says 1 kv head of 4
  tiny.write(dir.path());
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT,
                    {"model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[8, 8]", "[4, 8]"});
}

TEST(Loader, WrongDtype) {
  test::TempDir dir;
  TinyModel tiny;
  tiny.dtypes["model.norm.weight"] = DType::I32;
  tiny.write(dir.path());
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"model.safetensors", "model.norm.weight", "I32"});
}

TEST(Loader, BadJsonAndConfigFields) {
  test::TempDir dir;
  TinyModel tiny;
  tiny.write(dir.path());
  test::write_text(dir / "config.json", "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 8,");
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"config.json", "invalid JSON"});

  auto with = [&](const char* key, json value) {
    json config = tiny.config;
    if (value.is_discarded())
      config.erase(key);
    else
      config[key] = value;
    test::write_text(dir / "config.json", config.dump());
  };
  with("architectures", json::array({"GPT2LMHeadModel"}));
  expect_load_error(dir.path(), LLMQ_ERR_UNSUPPORTED, {"config.json", "GPT2LMHeadModel"});
  with("hidden_size", json(json::value_t::discarded));
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"config.json", "missing field 'hidden_size'"});
  with("hidden_size", "8");
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"'hidden_size' must be an integer"});
  with("num_hidden_layers", 1000000000);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"'num_hidden_layers' must be in"});
  with("vocab_size", -5);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"'vocab_size' must be in"});
  with("num_key_value_heads", 3);  // 2 heads cannot be grouped over 3
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"num_key_value_heads"});
  with("hidden_act", "gelu");
  expect_load_error(dir.path(), LLMQ_ERR_UNSUPPORTED, {"hidden_act 'gelu'"});
  with("rope_scaling", json{{"rope_type", "yarn"}, {"factor", 4.0}});
  expect_load_error(dir.path(), LLMQ_ERR_UNSUPPORTED, {"rope_scaling type 'yarn'"});
  with("eos_token_id", 99);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"eos_token_id 99"});
  test::write_text(dir / "config.json", "[1, 2]");
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"config.json", "expected a JSON object"});
}

TEST(Loader, MissingFiles) {
  test::TempDir dir;
  expect_load_error(dir.path(), LLMQ_ERR_IO, {"config.json", "cannot open"});
  TinyModel tiny;
  test::write_text(dir / "config.json", tiny.config.dump());
  expect_load_error(dir.path(), LLMQ_ERR_IO, {"no model.safetensors"});
}

// Raw safetensors damage through the whole loader (the file layer has its own detailed tests).
TEST(Loader, HostileSafetensors) {
  test::TempDir dir;
  TinyModel tiny;
  tiny.write(dir.path());
  const std::string path = dir / "model.safetensors";
  std::string good;
  {
    std::ifstream in(path, std::ios::binary);
    good.assign(std::istreambuf_iterator<char>(in), {});
  }
  uint64_t header_len;
  std::memcpy(&header_len, good.data(), 8);
  std::string header = good.substr(8, header_len);

  // Truncated: the last tensor's bytes are cut off.
  test::write_text(path, good.substr(0, good.size() - 10));
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"model.safetensors"});
  // Absurd header length.
  std::string absurd = good;
  uint64_t huge = uint64_t(1) << 62;
  std::memcpy(absurd.data(), &huge, 8);
  test::write_text(path, absurd);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"model.safetensors", "header"});
  // Offsets out of range and overlapping: rewrite the header's offsets of one tensor.
  auto with_offsets = [&](const std::string& name, uint64_t begin, uint64_t end) {
    json h = json::parse(header);
    h[name]["data_offsets"] = {begin, end};
    std::string text = h.dump();
    text.resize(header.size(), ' ');  // keep the data section where it was
    std::string file = good;
    std::memcpy(file.data() + 8, text.data(), text.size());
    test::write_text(path, file);
  };
  json h = json::parse(header);
  uint64_t data_size = good.size() - 8 - header_len;
  with_offsets("model.norm.weight", data_size - 16, data_size + 16);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"model.safetensors", "model.norm.weight"});
  uint64_t embed_begin = h["model.embed_tokens.weight"]["data_offsets"][0].get<uint64_t>();
  with_offsets("model.norm.weight", embed_begin, embed_begin + 32);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"model.safetensors", "overlap", "model.norm.weight"});
  // Not JSON at all.
  std::string garbage = good;
  garbage[8] = '{';
  garbage[9] = '{';
  test::write_text(path, garbage);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"model.safetensors"});
}

TEST(Loader, ShardedIndex) {
  test::TempDir dir;
  TinyModel tiny;
  test::write_text(dir / "config.json", tiny.config.dump());
  std::vector<std::string> names = tiny.names();
  std::vector<std::string> first(names.begin(), names.begin() + 10), second(names.begin() + 10, names.end());
  write_safetensors(dir / "a.safetensors", tiny.tensors(first));
  write_safetensors(dir / "b.safetensors", tiny.tensors(second));
  json map;
  for (const auto& n : first) map[n] = "a.safetensors";
  for (const auto& n : second) map[n] = "b.safetensors";
  auto write_index = [&](const json& weight_map) {
    test::write_text(dir / "model.safetensors.index.json", json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump());
  };
  write_index(map);
  std::string message;
  ASSERT_EQ(load_status(dir.path(), &message), LLMQ_OK) << message;

  json wrong = map;
  wrong[second[0]] = "a.safetensors";
  write_index(wrong);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {second[0], "a.safetensors"});
  json escape = map;
  escape[first[0]] = "../a.safetensors";
  write_index(escape);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"../a.safetensors", "not a plain file name"});
  json missing = map;
  missing[first[0]] = "c.safetensors";
  write_index(missing);
  expect_load_error(dir.path(), LLMQ_ERR_IO, {"c.safetensors"});
  json partial = map;
  partial.erase(second[1]);
  write_index(partial);
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {second[1], "unexpected tensor"});
  test::write_text(dir / "model.safetensors.index.json", "{\"weight_map\": 3}");
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"model.safetensors.index.json", "weight_map"});
}

TEST(Loader, TiedEmbeddingsAndQwenBiases) {
  test::TempDir dir;
  TinyModel tiny;
  tiny.config["tie_word_embeddings"] = true;
  tiny.shapes.erase("lm_head.weight");
  tiny.write(dir.path());
  auto model = Model::load(dir.path());
  EXPECT_EQ(model->weights().lm_head.data, model->weights().embed.data);

  TinyModel qwen;
  qwen.config["architectures"] = {"Qwen2ForCausalLM"};
  qwen.write(dir.path());
  expect_load_error(dir.path(), LLMQ_ERR_MODEL_FORMAT, {"missing tensor", "self_attn.q_proj.bias"});
  for (int l = 0; l < 2; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    qwen.shapes[p + "q_proj.bias"] = {8};
    qwen.shapes[p + "k_proj.bias"] = {4};
    qwen.shapes[p + "v_proj.bias"] = {4};
  }
  qwen.write(dir.path());
  EXPECT_TRUE(Model::load(dir.path())->config().qkv_bias);
}

TEST(Config, ArchitecturesAndFields) {
  json base = {{"architectures", {"MistralForCausalLM"}},
               {"hidden_size", 4096},
               {"intermediate_size", 14336},
               {"num_hidden_layers", 32},
               {"num_attention_heads", 32},
               {"num_key_value_heads", 8},
               {"vocab_size", 32000},
               {"max_position_embeddings", 32768},
               {"sliding_window", 4096},
               {"rope_theta", 1000000.0}};
  ModelConfig mistral = parse_model_config(base.dump(), "config.json");
  EXPECT_EQ(mistral.architecture, Architecture::Mistral);
  EXPECT_EQ(mistral.sliding_window, 4096);
  EXPECT_EQ(mistral.head_dim, 128);
  EXPECT_EQ(mistral.kv_size(), 1024);
  EXPECT_FALSE(mistral.qkv_bias);

  json explicit_head_dim = base;
  explicit_head_dim["head_dim"] = 64;
  explicit_head_dim["sliding_window"] = nullptr;
  ModelConfig c = parse_model_config(explicit_head_dim.dump(), "config.json");
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.q_size(), 2048);
  EXPECT_EQ(c.sliding_window, 0);

  json qwen = base;
  qwen["architectures"] = {"Qwen2ForCausalLM"};
  qwen["use_sliding_window"] = false;
  qwen["eos_token_id"] = {151643, 151645};
  qwen["vocab_size"] = 152064;
  ModelConfig q = parse_model_config(qwen.dump(), "config.json");
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  EXPECT_EQ(q.sliding_window, 0);
  EXPECT_EQ(q.eos_ids, (std::vector<int32_t>{151643, 151645}));
}

TEST(Config, Llama3RopeScaling) {
  json llama31 = {{"architectures", {"LlamaForCausalLM"}},
                  {"hidden_size", 4096},
                  {"intermediate_size", 14336},
                  {"num_hidden_layers", 32},
                  {"num_attention_heads", 32},
                  {"num_key_value_heads", 8},
                  {"vocab_size", 128256},
                  {"max_position_embeddings", 131072},
                  {"rope_theta", 500000.0},
                  {"rope_scaling",
                   {{"factor", 8.0},
                    {"low_freq_factor", 1.0},
                    {"high_freq_factor", 4.0},
                    {"original_max_position_embeddings", 8192},
                    {"rope_type", "llama3"}}}};
  ModelConfig c = parse_model_config(llama31.dump(), "config.json");
  EXPECT_EQ(c.rope.type, "llama3");
  std::vector<float> scaled = rope_inv_freq(c);
  c.rope.type = "none";
  std::vector<float> plain = rope_inv_freq(c);
  ASSERT_EQ(scaled.size(), 64u);
  // Wavelengths below 8192/4 = 2048 positions keep their frequency; above 8192 they are divided by
  // 8; the band between is interpolated (values from transformers' _compute_llama3_parameters).
  const double pi = 3.14159265358979323846;
  int kept = 0, divided = 0, smoothed = 0;
  for (size_t i = 0; i < 64; ++i) {
    double wavelength = 2 * pi / plain[i];
    if (wavelength < 2048) {
      EXPECT_EQ(scaled[i], plain[i]);
      ++kept;
    } else if (wavelength > 8192) {
      EXPECT_NEAR(scaled[i], plain[i] / 8, 1e-6 * plain[i]);
      ++divided;
    } else {
      EXPECT_LT(scaled[i], plain[i]);
      EXPECT_GT(scaled[i], plain[i] / 8);
      ++smoothed;
    }
  }
  EXPECT_EQ(kept + divided + smoothed, 64);
  EXPECT_GT(smoothed, 0);
  EXPECT_EQ(plain[0], 1.0f);
  EXPECT_EQ(plain[1], float(std::pow(500000.0, -2.0 / 128)));
}

TEST(Config, GenerationConfigEosListWins) {
  auto model = Model::load(test::stories_dir());
  EXPECT_EQ(model->config().eos_ids, (std::vector<int32_t>{2, 1}));
  EXPECT_EQ(model->config().bos_id, 1);
}

}  // namespace
