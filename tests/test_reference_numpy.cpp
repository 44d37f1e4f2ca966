// The forward pass on synthetic checkpoints (BF16 / F16 weights, GQA, an explicit head_dim that
// differs from hidden/heads, tied and untied embeddings) against ref_llama_numpy.py from
// ../shared/models/stories260K/tools: an independent float64 numpy implementation of the Hugging
// Face Llama forward. Needs Debian's python3-numpy (scripts/setup.sh installs it).
#include <gtest/gtest.h>

#include <cmath>

#include "engine/engine.h"
#include "engine/synth.h"
#include "test_util.h"

namespace {

using namespace llmq;

// Logits may differ from float64 by fp32 rounding of the activations only: the weights are
// converted exactly. Synthetic logits are O(1), so 1e-4 absolute is tight.
constexpr double kTolerance = 1e-4;
const char* kPython = "/usr/bin/python3";

void compare_with_numpy(const SynthSpec& spec, const std::vector<int32_t>& ids) {
  test::TempDir dir;
  write_synthetic_model(dir.path(), spec);
  std::string id_list;
  for (int32_t id : ids) id_list += std::to_string(id) + ",";
  std::string json_path = dir / "reference.json";
  auto result = test::run_command(std::string(kPython) + " " + test::stories_dir() + "/tools/ref_llama_numpy.py " +
                                  dir.path() + " --ids " + id_list + " --json " + json_path + " > /dev/null 2>&1");
  ASSERT_EQ(result.exit_code, 0) << "ref_llama_numpy.py failed (is python3-numpy installed?)";
  nlohmann::json reference = test::read_json(json_path);

  EngineOptions options;
  options.max_batch_tokens = 5;  // chunked prefill
  options.kv_dtype = LLMQ_KV_DTYPE_F32;  // the reference keeps K and V in float64
  Engine engine(Model::load(dir.path()), options);
  const size_t vocab = size_t(spec.vocab_size);
  std::vector<float> logits(ids.size() * vocab);
  engine.score(ids, logits.data());

  double worst = 0, largest = 0;
  for (size_t p = 0; p < ids.size(); ++p) {
    const nlohmann::json& row = reference["positions"][p]["logits"];
    for (size_t v = 0; v < vocab; ++v) {
      double expected = row[v].get<double>();
      worst = std::max(worst, std::fabs(double(logits[p * vocab + v]) - expected));
      largest = std::max(largest, std::fabs(expected));
    }
  }
  EXPECT_LT(worst, kTolerance) << "largest |logit| " << largest;
  EXPECT_GT(largest, 0.05) << "the synthetic model should produce non-trivial logits";
}

SynthSpec gqa_spec(DType dtype, bool tied) {
  SynthSpec spec;
  spec.hidden_size = 64;
  spec.intermediate_size = 96;
  spec.num_layers = 3;
  spec.num_heads = 4;
  spec.num_kv_heads = 2;
  spec.head_dim = 32;  // q_size 128 != hidden 64
  spec.vocab_size = 300;
  spec.max_position = 256;
  spec.rope_theta = 500000.0;
  spec.dtype = dtype;
  spec.tie_word_embeddings = tied;
  spec.seed = 11;
  return spec;
}

const std::vector<int32_t> kIds = {1, 17, 250, 3, 99, 42, 42, 7, 180, 5, 64, 2, 11};

TEST(ReferenceNumpy, Bf16GqaExplicitHeadDimUntied) { compare_with_numpy(gqa_spec(DType::BF16, false), kIds); }

TEST(ReferenceNumpy, F16Tied) { compare_with_numpy(gqa_spec(DType::F16, true), kIds); }

TEST(ReferenceNumpy, F32MultiQuery) {
  SynthSpec spec = gqa_spec(DType::F32, false);
  spec.num_kv_heads = 1;
  spec.head_dim = 0;  // hidden / heads = 16
  compare_with_numpy(spec, kIds);
}

}  // namespace
