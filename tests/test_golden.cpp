// Golden tests against ../shared/models/stories260K/reference, computed by llama2.c's run.c (an
// implementation outside this project): greedy tokens through llmq-generate, and logits through
// the C ABI's llmq_score within 1e-4.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "llmq.h"
#include "test_util.h"

namespace {

using llmq::test::read_json;
using llmq::test::run_command;
using llmq::test::stories_dir;
using nlohmann::json;

constexpr double kLogitTolerance = 1e-4;

json reference_cases() { return read_json(stories_dir() + "/reference/reference_cases.json")["cases"]; }

std::string join_ids(const std::vector<int32_t>& ids) {
  std::string text;
  for (int32_t id : ids) text += (text.empty() ? "" : " ") + std::to_string(id);
  return text;
}

std::string generate_command(const std::string& prompt_flag, int max_tokens, int threads) {
  return llmq::test::bin_dir() + "/llmq-generate --model " + stories_dir() + " " + prompt_flag +
         " --temperature 0 --max-tokens " + std::to_string(max_tokens) + " --threads " + std::to_string(threads) +
         " --print-ids 2>/dev/null";
}

// The generated ids from the "ids: ..." line, and the streamed text before it.
void parse_output(const std::string& out, std::vector<int32_t>* ids, std::string* text) {
  size_t at = out.rfind("ids:");
  ASSERT_NE(at, std::string::npos) << out;
  *text = out.substr(0, at);
  std::istringstream in(out.substr(at + 4));
  int32_t id;
  while (in >> id) ids->push_back(id);
}

TEST(Golden, GreedyTokensMatchRunC) {
  for (const json& c : reference_cases()) {
    std::vector<int32_t> prompt = c["prompt_token_ids"].get<std::vector<int32_t>>();
    std::vector<int32_t> expected = c["greedy"]["token_ids"].get<std::vector<int32_t>>();
    for (int threads : {1, 2}) {
      auto result = run_command(generate_command("--prompt-ids \"" + join_ids(prompt) + "\"",
                                                 int(expected.size()), threads));
      ASSERT_EQ(result.exit_code, 0) << c["name"];
      std::vector<int32_t> ids;
      std::string text;
      parse_output(result.out, &ids, &text);
      EXPECT_EQ(ids, expected) << c["name"] << " threads " << threads;
      // The streamed text is the reference's decoded continuation.
      EXPECT_EQ(text, c["greedy"]["text_continuation"].get<std::string>() + "\n") << c["name"];
    }
  }
}

TEST(Golden, EmptyPromptStoryStopsAtBos) {
  // The model ends a story by predicting BOS = 1, which generation_config.json lists as an EOS id.
  for (const json& c : reference_cases()) {
    if (!c.contains("greedy_until_bos")) continue;
    std::vector<int32_t> expected = c["greedy_until_bos"]["token_ids"].get<std::vector<int32_t>>();
    ASSERT_EQ(c["greedy_until_bos"]["next_token_after_these"].get<int>(), 1);
    auto result = run_command(generate_command("--prompt-ids 1", 500, 2));
    ASSERT_EQ(result.exit_code, 0);
    std::vector<int32_t> ids;
    std::string text;
    parse_output(result.out, &ids, &text);
    EXPECT_EQ(ids, expected);
  }
}

TEST(Golden, PromptTextTokenizesLikeTheReference) {
  for (const json& c : reference_cases()) {
    std::string prompt = c["prompt"].get<std::string>();
    std::vector<int32_t> expected = c["greedy"]["token_ids"].get<std::vector<int32_t>>();
    auto result = run_command(generate_command("--prompt \"" + prompt + "\"", int(expected.size()), 2));
    ASSERT_EQ(result.exit_code, 0) << c["name"];
    std::vector<int32_t> ids;
    std::string text;
    parse_output(result.out, &ids, &text);
    EXPECT_EQ(ids, expected) << c["name"];
  }
}

class GoldenLogits : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(llmq_model_load(stories_dir().c_str(), nullptr, &model_), LLMQ_OK) << llmq_last_error();
    llmq_engine_params params;
    llmq_engine_params_default(&params);
    params.max_batch_tokens = 16;  // several prefill chunks over the 69 positions
    ASSERT_EQ(llmq_engine_create(model_, &params, &engine_), LLMQ_OK) << llmq_last_error();
  }
  void TearDown() override {
    llmq_engine_destroy(engine_);
    llmq_model_destroy(model_);
  }
  llmq_model* model_ = nullptr;
  llmq_engine* engine_ = nullptr;
};

TEST_F(GoldenLogits, MatchRunCWithin1e4) {
  const int vocab = 512;
  for (const json& c : reference_cases()) {
    std::vector<int32_t> sequence = c["prompt_token_ids"].get<std::vector<int32_t>>();
    for (int32_t id : c["greedy"]["token_ids"]) sequence.push_back(id);
    std::vector<float> logits(sequence.size() * vocab);
    ASSERT_EQ(llmq_score(engine_, sequence.data(), sequence.size(), logits.data(), logits.size()), LLMQ_OK)
        << llmq_last_error();
    auto at = [&](size_t position, int token) { return double(logits[position * vocab + size_t(token)]); };

    // Every logit at the first 8 positions.
    const json& full = c["full_logits_first_positions"];
    double worst = 0;
    for (size_t i = 0; i < full["positions"].size(); ++i) {
      size_t position = full["positions"][i].get<size_t>();
      for (int token = 0; token < vocab; ++token)
        worst = std::max(worst, std::fabs(at(position, token) - full["logits"][i][size_t(token)].get<double>()));
    }
    EXPECT_LT(worst, kLogitTolerance) << c["name"] << ": full logits";

    // Top-5 at the first 16 positions.
    for (const json& row : c["top5_first_positions"]) {
      size_t position = row["pos"].get<size_t>();
      for (const json& pair : row["top5"])
        EXPECT_NEAR(at(position, pair[0].get<int>()), pair[1].get<double>(), kLogitTolerance)
            << c["name"] << " position " << position;
    }

    // Argmax, max logit and logsumexp at every position of prompt + 64 tokens.
    const json& summary = c["per_position_summary"];
    ASSERT_EQ(summary["rows"].size(), sequence.size());
    for (const json& row : summary["rows"]) {
      size_t position = row[0].get<size_t>();
      int argmax = 0;
      double max_logit = -INFINITY;
      for (int token = 0; token < vocab; ++token)
        if (at(position, token) > max_logit) max_logit = at(position, argmax = token);
      double sum = 0;
      for (int token = 0; token < vocab; ++token) sum += std::exp(at(position, token) - max_logit);
      EXPECT_EQ(argmax, row[2].get<int>()) << c["name"] << " position " << position;
      EXPECT_NEAR(max_logit, row[3].get<double>(), kLogitTolerance) << c["name"] << " position " << position;
      EXPECT_NEAR(max_logit + std::log(sum), row[4].get<double>(), kLogitTolerance)
          << c["name"] << " position " << position;
    }
  }
}

TEST_F(GoldenLogits, TokenizeThroughTheCApi) {
  for (const json& c : reference_cases()) {
    std::string prompt = c["prompt"].get<std::string>();
    std::vector<int32_t> expected = c["prompt_token_ids"].get<std::vector<int32_t>>();
    size_t n = 0;
    // Size query first, then the real call.
    llmq_status status = llmq_tokenize(model_, prompt.data(), prompt.size(), 1, nullptr, 0, &n);
    EXPECT_EQ(status, LLMQ_ERR_BUFFER_TOO_SMALL);
    ASSERT_EQ(n, expected.size());
    std::vector<int32_t> ids(n);
    ASSERT_EQ(llmq_tokenize(model_, prompt.data(), prompt.size(), 1, ids.data(), ids.size(), &n), LLMQ_OK);
    EXPECT_EQ(ids, expected);

    std::vector<int32_t> continuation = c["greedy"]["token_ids"].get<std::vector<int32_t>>();
    std::vector<int32_t> all = expected;
    all.insert(all.end(), continuation.begin(), continuation.end());
    std::string text(4096, '\0');
    size_t len = 0;
    ASSERT_EQ(llmq_detokenize(model_, all.data(), all.size(), 1, text.data(), text.size(), &len), LLMQ_OK);
    text.resize(len);
    EXPECT_EQ(text, c["greedy"]["text_full"].get<std::string>());
  }
}

}  // namespace
