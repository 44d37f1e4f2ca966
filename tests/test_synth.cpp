#include "engine/synth.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "engine/engine.h"
#include "engine/error.h"
#include "engine/json_file.h"
#include "engine/model.h"
#include "test_util.h"

namespace llmq {
namespace {

namespace fs = std::filesystem;

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::vector<float> values(const Tensor& t) {
  std::vector<float> out(size_t(t.numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    if (t.dtype == DType::F32) out[i] = t.as<const float>()[i];
    else if (t.dtype == DType::BF16) out[i] = bf16_to_f32(t.as<const uint16_t>()[i]);
    else out[i] = f16_to_f32(t.as<const uint16_t>()[i]);
  }
  return out;
}

struct Moments {
  double mean = 0, std = 0;
};

Moments moments(const std::vector<float>& v) {
  double sum = 0, sq = 0;
  for (float x : v) sum += x;
  const double mean = sum / double(v.size());
  for (float x : v) sq += (x - mean) * (x - mean);
  return {mean, std::sqrt(sq / double(v.size() - 1))};
}

class SynthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "llmq_synth_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { fs::remove_all(root_); }

  // Writes `spec` to a fresh subdirectory and loads it.
  std::shared_ptr<const Model> write_and_load(const SynthSpec& spec, const std::string& name) {
    const std::string dir = root_ + "/" + name;
    write_synthetic_model(dir, spec);
    return Model::load(dir);
  }

  static void expect_shape(const Tensor& t, int64_t rows, int64_t cols, DType dtype) {
    EXPECT_FALSE(t.empty());
    EXPECT_EQ(t.rows, rows);
    EXPECT_EQ(t.cols, cols);
    EXPECT_EQ(t.dtype, dtype);
  }

  static void expect_invalid(const SynthSpec& spec, const std::string& field, const std::string& dir) {
    try {
      write_synthetic_model(dir, spec);
      ADD_FAILURE() << "no error for " << field;
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), LLMQ_ERR_INVALID_ARGUMENT) << e.what();
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  }

  std::string root_;
};

TEST(SynthPreset, NamedShapes) {
  SynthSpec tiny = synth_preset("tiny");
  EXPECT_EQ(tiny.hidden_size, SynthSpec().hidden_size);
  EXPECT_EQ(tiny.vocab_size, SynthSpec().vocab_size);

  SynthSpec l2 = synth_preset("llama2-7b");
  EXPECT_EQ(l2.hidden_size, 4096);
  EXPECT_EQ(l2.intermediate_size, 11008);
  EXPECT_EQ(l2.num_layers, 32);
  EXPECT_EQ(l2.num_kv_heads, 32);
  EXPECT_EQ(l2.vocab_size, 32000);
  EXPECT_EQ(l2.max_position, 4096);

  SynthSpec l3 = synth_preset("llama3-8b");
  EXPECT_EQ(l3.intermediate_size, 14336);
  EXPECT_EQ(l3.num_kv_heads, 8);
  EXPECT_EQ(l3.vocab_size, 128256);
  EXPECT_EQ(l3.max_position, 131072);
  EXPECT_EQ(l3.rope_theta, 500000.0);
  EXPECT_EQ(l3.rope_scaling.at("rope_type"), "llama3");
  EXPECT_EQ(l3.rope_scaling.at("factor"), 8.0);
  EXPECT_EQ(l3.rope_scaling.at("original_max_position_embeddings"), 8192);

  SynthSpec tp = synth_preset("llama2-70b-tp8-shard");
  EXPECT_EQ(tp.hidden_size, 8192);
  EXPECT_EQ(tp.intermediate_size, 3584);
  EXPECT_EQ(tp.num_layers, 80);
  EXPECT_EQ(tp.num_heads, 8);
  EXPECT_EQ(tp.num_kv_heads, 1);
  EXPECT_EQ(tp.head_dim, 128);

  SynthSpec cpu = synth_preset("cpu-2048");
  EXPECT_EQ(cpu.hidden_size, 2048);
  EXPECT_EQ(cpu.intermediate_size, 5632);
  EXPECT_EQ(cpu.num_layers, 16);
  EXPECT_EQ(cpu.num_kv_heads, 16);
  EXPECT_EQ(cpu.dtype, DType::BF16);
  SynthSpec small = synth_preset("cpu-512");
  EXPECT_EQ(small.hidden_size, 512);
  EXPECT_EQ(small.intermediate_size, 1408);
  EXPECT_EQ(small.num_layers, 8);
  EXPECT_EQ(small.num_kv_heads, 8);
  EXPECT_EQ(small.vocab_size, 32000);

  try {
    synth_preset("llama9");
    ADD_FAILURE() << "unknown preset accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_INVALID_ARGUMENT);
    for (const char* part : {"llama9", "tiny", "llama3-8b", "cpu-2048", "cpu-512", "llama2-70b-tp8-shard"})
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST_F(SynthTest, LlamaUntiedLoadsWithExpectedShapes) {
  SynthSpec spec;
  auto model = write_and_load(spec, "llama");
  const ModelConfig& c = model->config();
  EXPECT_EQ(c.architecture, Architecture::Llama);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_position, 2048);
  EXPECT_EQ(c.rope.type, "none");
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.bos_id, 1);
  EXPECT_EQ(c.eos_ids, std::vector<int32_t>{2});

  const ModelWeights& w = model->weights();
  expect_shape(w.embed, 512, 64, DType::BF16);
  expect_shape(w.lm_head, 512, 64, DType::BF16);
  EXPECT_NE(w.lm_head.data, w.embed.data);
  expect_shape(w.final_norm, 1, 64, DType::BF16);
  ASSERT_EQ(w.layers.size(), 2u);
  for (const LayerWeights& l : w.layers) {
    expect_shape(l.attn_norm, 1, 64, DType::BF16);
    expect_shape(l.wq, 64, 64, DType::BF16);
    expect_shape(l.wk, 32, 64, DType::BF16);
    expect_shape(l.wv, 32, 64, DType::BF16);
    expect_shape(l.wo, 64, 64, DType::BF16);
    expect_shape(l.w_gate, 172, 64, DType::BF16);
    expect_shape(l.w_up, 172, 64, DType::BF16);
    expect_shape(l.w_down, 64, 172, DType::BF16);
    EXPECT_TRUE(l.bq.empty());
    EXPECT_TRUE(l.bo.empty());
  }
  EXPECT_FALSE(fs::exists(root_ + "/llama/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(root_ + "/llama/generation_config.json"));
  // head_dim is implied, so it is not written.
  EXPECT_EQ(read_bytes(root_ + "/llama/config.json").find("head_dim"), std::string::npos);
}

TEST_F(SynthTest, TiedEmbeddingsStoreNoLmHead) {
  SynthSpec spec;
  spec.tie_word_embeddings = true;
  auto model = write_and_load(spec, "tied");
  EXPECT_TRUE(model->config().tie_word_embeddings);
  EXPECT_EQ(model->weights().lm_head.data, model->weights().embed.data);
  EXPECT_EQ(SafetensorsFile::open(root_ + "/tied/model.safetensors")->find("lm_head.weight"), nullptr);
}

TEST_F(SynthTest, MistralSlidingWindow) {
  SynthSpec spec;
  spec.architecture = "MistralForCausalLM";
  spec.sliding_window = 256;
  auto model = write_and_load(spec, "mistral");
  EXPECT_EQ(model->config().architecture, Architecture::Mistral);
  EXPECT_EQ(model->config().sliding_window, 256);

  spec.sliding_window = 0;  // written as null: full attention
  EXPECT_EQ(write_and_load(spec, "mistral-full")->config().sliding_window, 0);
}

TEST_F(SynthTest, Qwen2HasQkvBiases) {
  SynthSpec spec;
  spec.architecture = "Qwen2ForCausalLM";
  spec.dtype = DType::F32;
  auto model = write_and_load(spec, "qwen2");
  const ModelConfig& c = model->config();
  EXPECT_EQ(c.architecture, Architecture::Qwen2);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  std::vector<float> biases;
  for (const LayerWeights& l : model->weights().layers) {
    expect_shape(l.bq, 1, 64, DType::F32);
    expect_shape(l.bk, 1, 32, DType::F32);
    expect_shape(l.bv, 1, 32, DType::F32);
    EXPECT_TRUE(l.bo.empty());
    for (const Tensor* t : {&l.bq, &l.bk, &l.bv})
      for (float v : values(*t)) biases.push_back(v);
  }
  EXPECT_NEAR(moments(biases).std, 0.01, 0.002);  // "small" biases
}

TEST_F(SynthTest, LlamaAttentionBiasAddsOutputBias) {
  SynthSpec spec;
  spec.attention_bias = true;
  auto model = write_and_load(spec, "llama-bias");
  EXPECT_TRUE(model->config().qkv_bias);
  EXPECT_TRUE(model->config().o_bias);
  expect_shape(model->weights().layers[0].bq, 1, 64, DType::BF16);
  expect_shape(model->weights().layers[0].bo, 1, 64, DType::BF16);
}

TEST_F(SynthTest, ShardedIntoThreeFilesWithIndex) {
  SynthSpec spec;
  spec.seed = 5;
  spec.shards = 3;
  auto sharded = write_and_load(spec, "sharded");
  const std::string dir = root_ + "/sharded";
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  for (const char* name : {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                           "model-00003-of-00003.safetensors"})
    EXPECT_TRUE(fs::exists(dir + "/" + name)) << name;
  nlohmann::json index = nlohmann::json::parse(read_bytes(dir + "/model.safetensors.index.json"));
  std::set<std::string> files;
  for (const auto& [tensor, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  EXPECT_EQ(files.size(), 3u);
  EXPECT_EQ(index["weight_map"].size(), 21u);  // embed + 2 x 9 + norm + lm_head
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), sharded->weight_bytes());

  // Each tensor's values depend on the seed and its name only, not on the layout.
  spec.shards = 1;
  auto single = write_and_load(spec, "single");
  EXPECT_EQ(single->weight_bytes(), sharded->weight_bytes());
  const Tensor& a = sharded->weights().layers[1].w_down;
  const Tensor& b = single->weights().layers[1].w_down;
  EXPECT_EQ(std::string(a.as<const char>(), a.nbytes()), std::string(b.as<const char>(), b.nbytes()));

  // Rewriting the sharded directory as one file drops the stale index, which would shadow it.
  write_synthetic_model(dir, spec);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  EXPECT_NO_THROW(Model::load(dir));
}

TEST_F(SynthTest, ExplicitHeadDim) {
  SynthSpec spec;
  spec.num_heads = 4;
  spec.num_kv_heads = 2;
  spec.head_dim = 32;  // != 64 / 4
  auto model = write_and_load(spec, "head-dim");
  EXPECT_EQ(model->config().head_dim, 32);
  const LayerWeights& l = model->weights().layers[0];
  expect_shape(l.wq, 128, 64, DType::BF16);
  expect_shape(l.wk, 64, 64, DType::BF16);
  expect_shape(l.wo, 64, 128, DType::BF16);
}

TEST_F(SynthTest, EveryFloatDtype) {
  for (DType dtype : {DType::F32, DType::F16, DType::BF16}) {
    SynthSpec spec;
    spec.dtype = dtype;
    spec.num_layers = 1;
    const std::string dir = root_ + "/" + dtype_name(dtype);
    const SynthSummary summary = write_synthetic_model(dir, spec);
    auto model = Model::load(dir);
    EXPECT_EQ(model->weights().embed.dtype, dtype);
    EXPECT_EQ(model->weights().layers[0].w_up.dtype, dtype);
    EXPECT_EQ(model->weights().final_norm.dtype, dtype);
    EXPECT_EQ(summary.tensors, 12);  // embed + 9 + norm + lm_head
    EXPECT_EQ(summary.tensor_bytes, uint64_t(summary.parameters) * dtype_size(dtype));
    EXPECT_EQ(model->weight_bytes(), summary.tensor_bytes);
  }
}

TEST_F(SynthTest, Llama3RopeScaling) {
  SynthSpec spec;
  spec.rope_theta = 500000.0;
  spec.rope_scaling = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  spec.eos_ids = {3, 4};
  auto model = write_and_load(spec, "llama3");
  const RopeConfig& rope = model->config().rope;
  EXPECT_EQ(rope.type, "llama3");
  EXPECT_EQ(rope.theta, 500000.0);
  EXPECT_EQ(rope.factor, 8.0);
  EXPECT_EQ(rope.low_freq_factor, 1.0);
  EXPECT_EQ(rope.high_freq_factor, 4.0);
  EXPECT_EQ(rope.original_max_position, 8192);
  EXPECT_EQ(model->config().eos_ids, (std::vector<int32_t>{3, 4}));
}

TEST_F(SynthTest, SameSeedSameBytesOtherSeedOtherBytes) {
  SynthSpec spec;
  spec.seed = 7;
  spec.threads = 1;
  write_synthetic_model(root_ + "/a", spec);
  spec.threads = 3;  // the thread count must not change the bytes
  write_synthetic_model(root_ + "/b", spec);
  spec.seed = 8;
  write_synthetic_model(root_ + "/c", spec);
  const std::string a = read_bytes(root_ + "/a/model.safetensors");
  ASSERT_GT(a.size(), 300000u);
  EXPECT_TRUE(a == read_bytes(root_ + "/b/model.safetensors"));
  EXPECT_EQ(read_bytes(root_ + "/a/config.json"), read_bytes(root_ + "/b/config.json"));
  const std::string c = read_bytes(root_ + "/c/model.safetensors");
  ASSERT_EQ(a.size(), c.size());  // same header, different data
  EXPECT_FALSE(a == c);
}

TEST_F(SynthTest, WeightStatistics) {
  SynthSpec spec;
  spec.dtype = DType::F32;
  auto model = write_and_load(spec, "stats");
  const ModelWeights& w = model->weights();

  Moments embed = moments(values(w.embed));
  EXPECT_NEAR(embed.mean, 0.0, 0.002);
  EXPECT_NEAR(embed.std, 0.02, 0.002);

  // Linear weights: a few input channels (columns) are outliers, x10; the rest are normal(0, 0.02).
  std::vector<float> regular, outliers;
  std::vector<int64_t> hidden_outliers;
  for (const LayerWeights& l : w.layers) {
    for (const Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      const std::vector<float> v = values(*t);
      std::vector<int64_t> outlier_cols;
      for (int64_t col = 0; col < t->cols; ++col) {
        std::vector<float> column;
        for (int64_t row = 0; row < t->rows; ++row) column.push_back(v[size_t(row * t->cols + col)]);
        const bool outlier = moments(column).std > 0.02 * 4;
        if (outlier) outlier_cols.push_back(col);
        (outlier ? outliers : regular).insert((outlier ? outliers : regular).end(), column.begin(), column.end());
      }
      EXPECT_EQ(int64_t(outlier_cols.size()), std::max<int64_t>(1, t->cols / 200));
      // The residual stream's outlier channels are the same for every matrix reading it.
      if (t->cols == 64 && t != &l.wo) {
        if (hidden_outliers.empty()) hidden_outliers = outlier_cols;
        EXPECT_EQ(outlier_cols, hidden_outliers);
      }
    }
  }
  EXPECT_NEAR(moments(regular).std, 0.02, 0.002);
  EXPECT_NEAR(moments(regular).mean, 0.0, 0.001);
  EXPECT_NEAR(moments(outliers).std, 0.2, 0.02);

  std::vector<float> norms;
  for (const LayerWeights& l : w.layers)
    for (const Tensor* t : {&l.attn_norm, &l.mlp_norm})
      for (float v : values(*t)) norms.push_back(v);
  for (float v : values(w.final_norm)) norms.push_back(v);
  EXPECT_NEAR(moments(norms).mean, 1.0, 0.005);
  EXPECT_NEAR(moments(norms).std, 0.02, 0.002);
}

TEST_F(SynthTest, EngineRunsOnSyntheticWeights) {
  auto model = write_and_load(SynthSpec(), "engine");
  Engine engine(model, EngineOptions{});
  const std::vector<int32_t> ids = {1, 17, 300, 42, 5};
  std::vector<float> logits(ids.size() * 512);
  engine.score(ids, logits.data());
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
  Moments m = moments(logits);
  EXPECT_GT(m.std, 1e-3);  // random weights give varied, not constant, logits
}

TEST_F(SynthTest, InvalidSpecsAreNamed) {
  const std::string dir = root_ + "/invalid";
  SynthSpec spec;
  spec.dtype = DType::I8;
  expect_invalid(spec, "dtype", dir);
  spec = SynthSpec();
  spec.num_heads = 6;
  expect_invalid(spec, "num_kv_heads", dir);
  spec = SynthSpec();
  spec.architecture = "GPT2LMHeadModel";
  expect_invalid(spec, "architecture", dir);
  spec = SynthSpec();
  spec.shards = 22;  // more shards than the 21 tensors
  expect_invalid(spec, "shards", dir);
  spec = SynthSpec();
  spec.architecture = "Qwen2ForCausalLM";
  spec.attention_bias = true;
  expect_invalid(spec, "attention_bias", dir);
  spec = SynthSpec();
  spec.sliding_window = 128;
  expect_invalid(spec, "sliding_window", dir);
  spec = SynthSpec();
  spec.eos_ids = {512};
  expect_invalid(spec, "eos_ids", dir);
  EXPECT_FALSE(fs::exists(dir));  // checked before anything is written

  // A directory path that is a regular file: an I/O error naming it.
  std::ofstream(root_ + "/file") << "x";
  try {
    write_synthetic_model(root_ + "/file", SynthSpec());
    ADD_FAILURE() << "wrote into a file path";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_IO) << e.what();
    EXPECT_NE(std::string(e.what()).find(root_ + "/file"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace llmq

namespace llmq {
namespace {

// llmq-synth --quant writes a pre-quantized checkpoint that loads as such and generates exactly
// what quantizing the unquantized synthetic model at load time generates; its scratch folder is gone.
TEST(SynthTool, PreQuantizedCheckpointsEqualQuantizeOnLoad) {
  test::TempDir dir;
  const std::string synth = test::bin_dir() + "/llmq-synth --shape tiny --seed 5 --out ";
  ASSERT_EQ(test::run_command(synth + dir / "plain").exit_code, 0);
  for (const auto& [flag, mode] : {std::pair<const char*, QuantMode>{"int8wo", QuantMode::Int8WeightOnly},
                                   std::pair<const char*, QuantMode>{"fp8", QuantMode::Fp8}}) {
    const auto r = test::run_command(synth + dir / flag + " --quant " + flag);
    ASSERT_EQ(r.exit_code, 0) << r.out;
    EXPECT_FALSE(fs::exists(dir / flag + ".unquantized.tmp"));
    auto saved = Model::load(dir / flag);
    EXPECT_EQ(saved->config().checkpoint_quant, mode);
    EngineOptions o;
    o.n_threads = 1;
    Engine from_file(saved, o);
    o.quant = mode;
    Engine on_load(Model::load(dir / "plain"), o);
    GenerateOptions g;
    g.sampling.temperature = 0;
    g.max_new_tokens = 12;
    g.ignore_eos = true;
    const std::vector<int32_t> prompt = {1, 17, 99, 250};
    EXPECT_EQ(from_file.generate(prompt, g).tokens, on_load.generate(prompt, g).tokens) << flag;
  }
  const auto bad = test::run_command(synth + dir / "x" + " --quant int4 2>&1");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.out.find("--quant: expected fp8 or int8wo, got 'int4'"), std::string::npos) << bad.out;
}

}  // namespace
}  // namespace llmq
