#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/error.h"
#include "engine/sampling_rule.h"
#include "sampling_cases.h"

namespace llmq {
namespace {

constexpr int kDraws = 20000;
const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

// The test distribution: 8 tokens with distinct logits.
const std::vector<float> kLogits = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, -1.5f, -2.0f, -3.0f};

SamplingParams params_with(float temperature, uint64_t seed = 1234) {
  SamplingParams p;
  p.temperature = temperature;
  p.seed = seed;
  return p;
}

int32_t sample_once(Sampler& sampler, std::vector<float> logits, const std::vector<int32_t>& history = {}) {
  return sampler.sample(logits.data(), int32_t(logits.size()), history);
}

// Draw frequencies over kDraws samples (the logits are copied each time: sample() modifies them).
std::vector<double> frequencies(const SamplingParams& params, const std::vector<float>& logits,
                                const std::vector<int32_t>& history = {}) {
  Sampler sampler(params);
  std::vector<double> freq(logits.size(), 0.0);
  for (int i = 0; i < kDraws; ++i) freq[size_t(sample_once(sampler, logits, history))] += 1.0;
  for (double& f : freq) f /= kDraws;
  return freq;
}

// softmax(logits / temperature) restricted to `keep` (all tokens if empty), in double.
std::vector<double> expected_probs(const std::vector<float>& logits, double temperature,
                                   const std::vector<int32_t>& keep = {}) {
  std::vector<double> p(logits.size(), 0.0);
  double sum = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    bool kept = keep.empty();
    for (int32_t k : keep) kept = kept || size_t(k) == i;
    if (kept) sum += p[i] = std::exp(double(logits[i]) / temperature);
  }
  for (double& x : p) x /= sum;
  return p;
}

// Tokens of probability 0 must never be drawn; the others within 5 standard deviations of a binomial
// frequency, a bound that a correct sampler would miss about once in 3 million checks.
void expect_frequencies(const std::vector<double>& freq, const std::vector<double>& expected) {
  ASSERT_EQ(freq.size(), expected.size());
  for (size_t i = 0; i < freq.size(); ++i) {
    if (expected[i] == 0.0) {
      EXPECT_EQ(freq[i], 0.0) << "token " << i << " must never be drawn";
    } else {
      const double sd = std::sqrt(expected[i] * (1.0 - expected[i]) / kDraws);
      EXPECT_NEAR(freq[i], expected[i], 5.0 * sd + 1e-12) << "token " << i;
    }
  }
}

TEST(SamplerGreedy, PicksArgmax) {
  Sampler sampler(params_with(0.0f));
  EXPECT_EQ(sample_once(sampler, kLogits), 0);
  EXPECT_EQ(sample_once(sampler, {-5.0f, -1.0f, 3.5f, 3.25f}), 2);
  EXPECT_EQ(sample_once(sampler, {-5.0f}), 0);
}

TEST(SamplerGreedy, LowestIdWinsTies) {
  Sampler sampler(params_with(0.0f));
  EXPECT_EQ(sample_once(sampler, {1.0f, 3.0f, 2.0f, 3.0f, 3.0f}), 1);
  EXPECT_EQ(sample_once(sampler, {0.0f, 0.0f, 0.0f}), 0);
}

TEST(SamplerGreedy, NaNCountsAsNegativeInfinity) {
  Sampler greedy(params_with(0.0f));
  EXPECT_EQ(sample_once(greedy, {kNaN, 1.0f, kNaN, 2.0f}), 3);
  EXPECT_EQ(sample_once(greedy, {kNaN, kNaN, kNaN}), 0);
  EXPECT_EQ(sample_once(greedy, {-kInf, kNaN, -kInf}), 0);

  // Sampling: a NaN token is never drawn; with nothing finite the answer is the lowest id.
  Sampler sampler(params_with(1.0f));
  for (int i = 0; i < 200; ++i) EXPECT_EQ(sample_once(sampler, {kNaN, 0.5f, kNaN, -kInf}), 1);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_once(sampler, {kNaN, kNaN, -kInf}), 0);
  // An infinite logit wins outright rather than turning the softmax into NaN.
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_once(sampler, {1.0f, kInf, 2.0f, kInf}), 1);
}

TEST(SamplerTemperature, FrequenciesMatchSoftmaxAtT1) {
  expect_frequencies(frequencies(params_with(1.0f), kLogits), expected_probs(kLogits, 1.0));
}

TEST(SamplerTemperature, FrequenciesMatchSoftmaxAtTHalf) {
  expect_frequencies(frequencies(params_with(0.5f), kLogits), expected_probs(kLogits, 0.5));
}

TEST(SamplerTemperature, HighTemperatureFlattens) {
  expect_frequencies(frequencies(params_with(4.0f), kLogits), expected_probs(kLogits, 4.0));
}

TEST(SamplerTopK, OnlyTopKDrawnWithRenormalizedProbs) {
  SamplingParams p = params_with(1.0f);
  p.top_k = 3;
  // Shuffled so that the top 3 are not simply the first ids.
  const std::vector<float> logits = {-1.0f, 0.5f, -3.0f, 2.0f, 0.0f, 1.0f, -2.0f, -1.5f};
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {3, 5, 1}));
}

TEST(SamplerTopK, EdgeCases) {
  SamplingParams p = params_with(1.0f);
  p.top_k = 1;  // greedy
  Sampler one(p);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(sample_once(one, {0.0f, 1.0f, 0.999f}), 1);

  p.top_k = 2;  // a tie at the cut keeps the lowest ids
  expect_frequencies(frequencies(p, {1.0f, 1.0f, 1.0f, 1.0f}), {0.5, 0.5, 0.0, 0.0});

  p.top_k = 100;  // larger than the vocab: off
  expect_frequencies(frequencies(p, kLogits), expected_probs(kLogits, 1.0));
}

TEST(SamplerTopP, OnlyNucleusDrawn) {
  // Probabilities 0.4, 0.3, 0.15, 0.1, 0.05: cumulative 0.4, 0.7, 0.85, 0.95, 1.
  const std::vector<float> logits = {std::log(0.1f), std::log(0.4f), std::log(0.05f), std::log(0.3f),
                                     std::log(0.15f)};
  SamplingParams p = params_with(1.0f);
  p.top_p = 0.8f;  // 0.7 falls short, so the nucleus is {1, 3, 4}
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {1, 3, 4}));
  p.top_p = 0.5f;  // {1, 3}
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {1, 3}));
  p.top_p = 0.9f;  // {1, 3, 4, 0}
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {1, 3, 4, 0}));
}

TEST(SamplerTopP, EdgeCases) {
  SamplingParams p = params_with(1.0f);
  p.top_p = 1e-6f;  // always keeps at least the top token
  Sampler tiny(p);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(sample_once(tiny, kLogits), 0);

  p.top_p = 1.0f;  // off: even the least likely token is drawn
  expect_frequencies(frequencies(p, kLogits), expected_probs(kLogits, 1.0));

  p.top_p = 0.3f;  // the top token alone already reaches it (it has 0.54)
  expect_frequencies(frequencies(p, kLogits), expected_probs(kLogits, 1.0, {0}));

  // Combined with top-k: top-k {0, 1, 2} first, renormalized probs 0.63, 0.23, 0.14, then top-p 0.8
  // keeps {0, 1}.
  p.top_k = 3;
  p.top_p = 0.8f;
  expect_frequencies(frequencies(p, kLogits), expected_probs(kLogits, 1.0, {0, 1}));
}

TEST(SamplerTopP, LargeVocabNucleusBeyondSortedPrefix) {
  // 128K equal logits: the nucleus for top_p = 0.5 is exactly the lowest 64K ids (ties by id), far
  // more than the prefix the sampler sorts first.
  const int32_t vocab = 131072;
  SamplingParams p = params_with(1.0f);
  p.top_p = 0.5f;
  Sampler sampler(p);
  std::vector<float> logits;
  double mean = 0.0;
  const int n = 150;
  for (int i = 0; i < n; ++i) {
    logits.assign(size_t(vocab), 0.0f);
    int32_t id = sampler.sample(logits.data(), vocab, {});
    ASSERT_GE(id, 0);
    ASSERT_LT(id, vocab / 2);
    mean += id;
  }
  // Uniform on [0, 65536): mean 32768, sd of the mean 65536 / sqrt(12 n).
  EXPECT_NEAR(mean / n, 32767.5, 5.0 * 65536.0 / std::sqrt(12.0 * n));
}

TEST(SamplerTopP, LargeVocabSmallNucleus) {
  // One dominant token and a long tail weighing 3e-4 in all: the nucleus for 0.9 is that token alone.
  const int32_t vocab = 131072;
  SamplingParams p = params_with(1.0f);
  p.top_p = 0.9f;
  Sampler sampler(p);
  for (int i = 0; i < 50; ++i) {
    std::vector<float> logits(static_cast<size_t>(vocab), -20.0f);
    logits[77777] = 0.0f;
    EXPECT_EQ(sampler.sample(logits.data(), vocab, {}), 77777);
  }
}

TEST(SamplerTopK, LargeVocab) {
  const int32_t vocab = 131072;
  std::vector<float> base(static_cast<size_t>(vocab));
  for (int32_t i = 0; i < vocab; ++i) base[size_t(i)] = float((i * 7919) % vocab) / 1000.0f;  // a permutation
  // The top 5 logits are the ids whose (i * 7919) % vocab is vocab-1 .. vocab-5.
  std::vector<int32_t> top;
  for (int32_t i = 0; i < vocab; ++i)
    if ((i * int64_t(7919)) % vocab >= vocab - 5) top.push_back(i);
  ASSERT_EQ(top.size(), 5u);
  SamplingParams p = params_with(1.0f);
  p.top_k = 5;  // a small k: selected with a heap
  Sampler sampler(p);
  for (int i = 0; i < 200; ++i) {
    std::vector<float> logits = base;
    int32_t id = sampler.sample(logits.data(), vocab, {});
    EXPECT_NE(std::find(top.begin(), top.end(), id), top.end()) << id;
  }

  p.top_k = 50000;  // a large k: selected with nth_element; the kept have rank < 50000
  Sampler large(p);
  for (int i = 0; i < 50; ++i) {
    std::vector<float> logits = base;
    int32_t id = large.sample(logits.data(), vocab, {});
    EXPECT_GE((id * int64_t(7919)) % vocab, vocab - 50000) << id;
  }
}

TEST(SamplerMinP, TokensBelowThresholdNeverDrawn) {
  // Probabilities 0.4, 0.3, 0.15, 0.1, 0.05; min_p 0.3 -> threshold 0.12 keeps {0, 1, 2}.
  const std::vector<float> logits = {std::log(0.4f), std::log(0.3f), std::log(0.15f), std::log(0.1f),
                                     std::log(0.05f)};
  SamplingParams p = params_with(1.0f);
  p.min_p = 0.3f;
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {0, 1, 2}));
  p.min_p = 0.5f;  // threshold 0.2: {0, 1}
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {0, 1}));
  p.min_p = 1.0f;  // only the max
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {0}));
  p.min_p = 0.0f;  // off
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0));
}

TEST(SamplerMinP, CombinedWithTopP) {
  // Probabilities 0.4, 0.3, 0.15, 0.1, 0.05. Both filters apply; the result is what both keep.
  const std::vector<float> logits = {std::log(0.4f), std::log(0.3f), std::log(0.15f), std::log(0.1f),
                                     std::log(0.05f)};
  SamplingParams p = params_with(1.0f);
  p.top_p = 0.9f;  // {0, 1, 2, 3}
  p.min_p = 0.3f;  // {0, 1, 2}
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {0, 1, 2}));
  p.top_p = 0.5f;  // {0, 1}
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {0, 1}));
  p.top_k = 4;  // {0, 1, 2, 3}, renormalized 0.42, 0.32, 0.16, 0.11: top-p 0.8 keeps {0, 1, 2}
  p.top_p = 0.8f;
  p.min_p = 0.5f;  // threshold 0.21 (of the top-k distribution): {0, 1}
  expect_frequencies(frequencies(p, logits), expected_probs(logits, 1.0, {0, 1}));
}

TEST(SamplerRepetitionPenalty, DividesPositiveMultipliesNegative) {
  SamplingParams p = params_with(0.0f);
  p.repetition_penalty = 2.0f;
  Sampler sampler(p);
  // Positive: 2.0 / 2 = 1.0 < 1.5, so the argmax moves from 0 to 1.
  EXPECT_EQ(sample_once(sampler, {2.0f, 1.5f}, {0}), 1);
  EXPECT_EQ(sample_once(sampler, {2.0f, 1.5f}, {}), 0);
  // Negative: -1 * 2 = -2 < -1.5 (dividing would have raised it to -0.5 and kept token 0).
  EXPECT_EQ(sample_once(sampler, {-1.0f, -1.5f}, {0}), 1);
  // Penalizing every token keeps their order.
  EXPECT_EQ(sample_once(sampler, {-1.0f, -1.5f}, {1, 0}), 0);

  // A penalty below 1 boosts repeated tokens.
  p.repetition_penalty = 0.5f;
  Sampler boost(p);
  EXPECT_EQ(sample_once(boost, {2.0f, 1.5f}, {1}), 1);
}

TEST(SamplerRepetitionPenalty, ShiftsFrequencies) {
  SamplingParams p = params_with(1.0f);
  p.repetition_penalty = 2.0f;
  const std::vector<float> logits = {1.0f, 1.0f, 0.0f, -1.0f};
  // Token 0: 1 -> 0.5. Token 3: -1 -> -2, once although it repeats. Token 2 (logit 0) is unchanged.
  const std::vector<int32_t> history = {0, 3, 3, 2, 3};
  const std::vector<float> penalized = {0.5f, 1.0f, 0.0f, -2.0f};
  expect_frequencies(frequencies(p, logits, history), expected_probs(penalized, 1.0));
}

TEST(SamplerSeed, SameSeedSameSequence) {
  auto sequence = [](uint64_t seed) {
    Sampler sampler(params_with(1.0f, seed));
    std::vector<int32_t> tokens;
    for (int i = 0; i < 100; ++i) tokens.push_back(sample_once(sampler, kLogits));
    return tokens;
  };
  EXPECT_EQ(sequence(42), sequence(42));
  EXPECT_EQ(sequence(0), sequence(0));
  EXPECT_NE(sequence(42), sequence(43));
  EXPECT_NE(sequence(0), sequence(1));
}

TEST(SamplerSeed, PinnedSequence) {
  // 16 equal logits make each probability exactly 1/16, so this depends on the RNG alone: it pins
  // the generator, which must give the same tokens on every platform. The expected tokens are the top
  // 4 bits of the reference xoshiro256** seeded with splitmix64(42), computed independently.
  Sampler sampler(params_with(1.0f, 42));
  std::vector<int32_t> tokens;
  for (int i = 0; i < 16; ++i) tokens.push_back(sample_once(sampler, std::vector<float>(16, 0.0f)));
  const std::vector<int32_t> pinned = {1, 6, 10, 14, 15, 12, 11, 13, 12, 9, 10, 4, 12, 5, 11, 14};
  EXPECT_EQ(tokens, pinned);
}

TEST(SamplerRng, UniformInUnitInterval) {
  Rng rng(7);
  double sum = 0.0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) {
    double u = rng.uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  // Mean 0.5, sd of the mean 1 / sqrt(12 n).
  EXPECT_NEAR(sum / n, 0.5, 5.0 / std::sqrt(12.0 * n));
}

void expect_invalid(const SamplingParams& p, const std::string& field) {
  try {
    validate_sampling(p);
    ADD_FAILURE() << "no error for " << field;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
  }
  EXPECT_THROW(Sampler{p}, Error) << field;
}

TEST(SamplerValidation, RejectsEachInvalidField) {
  SamplingParams ok;
  EXPECT_NO_THROW(validate_sampling(ok));
  SamplingParams edge;
  edge.temperature = 0.0f;
  edge.top_p = 1.0f;
  edge.min_p = 1.0f;
  edge.top_k = 1;
  edge.repetition_penalty = 0.01f;
  EXPECT_NO_THROW(validate_sampling(edge));

  auto with = [](auto set) {
    SamplingParams p;
    set(p);
    return p;
  };
  expect_invalid(with([](SamplingParams& p) { p.temperature = -0.1f; }), "temperature");
  expect_invalid(with([](SamplingParams& p) { p.temperature = kNaN; }), "temperature");
  expect_invalid(with([](SamplingParams& p) { p.temperature = kInf; }), "temperature");
  expect_invalid(with([](SamplingParams& p) { p.top_k = -1; }), "top_k");
  expect_invalid(with([](SamplingParams& p) { p.top_p = 0.0f; }), "top_p");
  expect_invalid(with([](SamplingParams& p) { p.top_p = -0.5f; }), "top_p");
  expect_invalid(with([](SamplingParams& p) { p.top_p = 1.01f; }), "top_p");
  expect_invalid(with([](SamplingParams& p) { p.top_p = kNaN; }), "top_p");
  expect_invalid(with([](SamplingParams& p) { p.min_p = -0.01f; }), "min_p");
  expect_invalid(with([](SamplingParams& p) { p.min_p = 1.5f; }), "min_p");
  expect_invalid(with([](SamplingParams& p) { p.min_p = kNaN; }), "min_p");
  expect_invalid(with([](SamplingParams& p) { p.repetition_penalty = 0.0f; }), "repetition_penalty");
  expect_invalid(with([](SamplingParams& p) { p.repetition_penalty = -1.0f; }), "repetition_penalty");
  expect_invalid(with([](SamplingParams& p) { p.repetition_penalty = kNaN; }), "repetition_penalty");

  try {
    validate_sampling(with([](SamplingParams& p) { p.top_p = 0.0f; }));
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "sampling: top_p must be in (0, 1], got 0");
  }
}

TEST(SamplerValidation, RejectsBadSampleArguments) {
  Sampler sampler(params_with(1.0f));
  std::vector<float> logits = {1.0f, 2.0f};
  auto status_of = [&](auto call) {
    try {
      call();
    } catch (const Error& e) {
      return e.status();
    }
    return LLMQ_OK;
  };
  EXPECT_EQ(status_of([&] { sampler.sample(logits.data(), 0, {}); }), LLMQ_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(status_of([&] { sampler.sample(nullptr, 2, {}); }), LLMQ_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(status_of([&] { sampler.sample(logits.data(), 2, {2}); }), LLMQ_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(status_of([&] { sampler.sample(logits.data(), 2, {-1}); }), LLMQ_ERR_INVALID_ARGUMENT);
}

}  // namespace
}  // namespace llmq

// ---- The rule, against a naive implementation of engine/sampler.h's description ------------------

namespace llmq {
namespace {

TEST(SamplingRule, ExpIsAccurateAndExactAtZero) {
  EXPECT_EQ(sampling::exp_nonpositive(0.0f), 1.0f);
  EXPECT_EQ(sampling::exp_nonpositive(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(sampling::exp_nonpositive(-31.0f), 0.0f);
  double worst = 0.0;
  for (float x = -30.0f; x <= 0.0f; x += 1.0f / 4096.0f) {
    const double exact = std::exp(double(x));
    worst = std::max(worst, std::fabs(double(sampling::exp_nonpositive(x)) - exact) / exact);
  }
  EXPECT_LT(worst, 4e-7);
}

TEST(SamplingRule, KeysOrderLogits) {
  const std::vector<float> ordered = {-kInf, -1e30f, -2.0f, -1e-40f, 0.0f, 1e-40f, 0.5f, 3.0f, kInf};
  for (size_t i = 0; i + 1 < ordered.size(); ++i)
    EXPECT_LT(sampling::logit_key(ordered[i]), sampling::logit_key(ordered[i + 1])) << ordered[i];
  EXPECT_EQ(sampling::logit_key(sampling::canonical_logit(-0.0f)), sampling::logit_key(0.0f));
  for (float x : ordered) EXPECT_EQ(sampling::key_logit(sampling::logit_key(x)), x);
}

// The rule as written in engine/sampler.h, with a full sort and no shortcuts.
int32_t naive_rule(std::vector<float> logits, const SampleRow& row) {
  using namespace sampling;
  const int32_t vocab = int32_t(logits.size());
  for (int32_t j = 0; j < row.n_penalized; ++j) {
    float& l = logits[size_t(row.penalized[j])];
    l = l > 0.0f ? div(l, row.repetition_penalty) : mul(l, row.repetition_penalty);
  }
  for (float& l : logits) l = std::isnan(l) ? -kInf : l;
  const int32_t best = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  if (row.temperature == 0.0f || !std::isfinite(logits[size_t(best)])) return best;
  struct Token {
    float p;
    int32_t id;
  };
  std::vector<Token> ranked;
  for (int32_t i = 0; i < vocab; ++i) {
    const float p = probability(logits[size_t(i)], logits[size_t(best)], row.temperature);
    if (mass(p) > 0) ranked.push_back({p, i});
  }
  std::sort(ranked.begin(), ranked.end(),
            [](const Token& a, const Token& b) { return a.p > b.p || (a.p == b.p && a.id < b.id); });
  if (row.top_k > 0 && size_t(row.top_k) < ranked.size()) ranked.resize(size_t(row.top_k));
  uint64_t kept = 0;
  for (const Token& t : ranked) kept += mass(t.p);
  uint64_t prefix = 0;
  for (size_t i = 0; i < ranked.size(); ++i) {
    prefix += mass(ranked[i].p);
    if (reaches(prefix, top_p_target(row.top_p, kept))) {
      ranked.resize(i + 1);
      break;
    }
  }
  std::vector<uint64_t> survivor(size_t(vocab), 0);
  for (const Token& t : ranked)
    if (t.p >= row.min_p) survivor[size_t(t.id)] = mass(t.p);
  uint64_t total = 0;
  for (uint64_t m : survivor) total += m;
  const uint64_t target = draw_target(row.draw, total);
  uint64_t cum = 0;
  for (int32_t i = 0; i < vocab; ++i)
    if ((cum += survivor[size_t(i)]) > target) return i;
  ADD_FAILURE() << "the draw fell off the end";
  return -1;
}

TEST(SamplingRule, HostSamplerEqualsNaiveRule) {
  SampleScratch scratch;
  int sampled = 0;
  for (const test::SamplingCase& c : test::with_draws(
           test::random_sampling_cases(2026, 1500, {1, 2, 3, 7, 19, 64, 733, 4099, 32000}), 4, 1)) {
    const SampleRow row = c.with_penalized();
    std::vector<float> logits = c.logits;
    const int32_t token = sample_row(logits.data(), int32_t(logits.size()), row, scratch);
    ASSERT_EQ(token, naive_rule(c.logits, row))
        << "vocab " << c.logits.size() << " T " << row.temperature << " top_k " << row.top_k << " top_p "
        << row.top_p << " min_p " << row.min_p << " penalty " << row.repetition_penalty;
    sampled += row.temperature > 0.0f;
  }
  EXPECT_GT(sampled, 2000);
}

}  // namespace
}  // namespace llmq
