// Token sampling: repetition penalty, temperature, top-k, top-p, min-p, then a draw from a seeded
// RNG of our own, so that a seed gives the same tokens with every standard library. The rule is
// exact integer arithmetic over the probabilities that engine/sampling_rule.h defines, so the
// host (sample_row) and the CUDA backend draw the same token from the same logits and seed.
//
// The rule, for one row of logits (NaN counting as -inf):
//  1. repetition penalty, once per distinct history token: l > 0 ? l / penalty : l * penalty;
//  2. temperature 0, or a max logit that is not finite: the argmax (lowest id on ties);
//  3. else rank the tokens of nonzero mass by probability (lowest id first on ties): ranking by
//     the computed probability rather than the logit keeps mass and min-p monotone in the rank;
//     top-k keeps the first k; top-p keeps the shortest prefix of those whose mass reaches top_p
//     times theirs; min-p then drops the tokens whose probability is below min_p (the max's is 1);
//  4. the survivors, in id order, are drawn from by inverse CDF at the point
//     floor(draw * their mass / 2^53) of 53 random bits.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/rng.h"

namespace llmq {

struct SamplingParams {
  float temperature = 1.0f;         // 0 = greedy (argmax, lowest id wins exact ties)
  int32_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // 1 = off; must be in (0, 1]
  float min_p = 0.0f;               // 0 = off; in [0, 1]
  float repetition_penalty = 1.0f;  // 1 = off; > 0 (HF/CTRL: per distinct history token, l>0 ? l/p : l*p)
  uint64_t seed = 0;
};

// Throws LLMQ_ERR_INVALID_ARGUMENT naming the field for NaN or infinite floats, temperature < 0,
// top_k < 0, top_p outside (0, 1], min_p outside [0, 1], repetition_penalty <= 0.
void validate_sampling(const SamplingParams& params);

// One row of a sampling step: the parameters, the random bits and the tokens to penalize.
struct SampleRow {
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  uint64_t draw = 0;                  // 53 random bits; unused when greedy
  const int32_t* penalized = nullptr;  // distinct token ids, each in [0, vocab)
  int32_t n_penalized = 0;
};

// Scratch the host sampler keeps across rows, so that sampling a 128K vocab does not allocate.
struct SampleScratch {
  struct Candidate {
    float probability;
    int32_t id;
    uint64_t mass;
  };
  std::vector<Candidate> candidates;
  std::vector<uint64_t> masses;
};

// The rule above on the host. logits[0..vocab) is scratch and is modified.
int32_t sample_row(float* logits, int32_t vocab, const SampleRow& row, SampleScratch& scratch);

// A request's sampler: its parameters and its RNG.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);  // validates; seeds its RNG from params.seed

  // The row to draw this sampler's next token with, for a sequence whose tokens so far are
  // `history` (each in [0, vocab)). Draws 53 bits from the RNG unless greedy. The penalized ids
  // point into the sampler, valid until its next call.
  SampleRow next_row(const std::vector<int32_t>& history, int32_t vocab);
  // Takes back the last next_row's draw (its step failed before sampling).
  void rewind() { rng_ = before_draw_; }

  // next_row, then sample_row on the host: the next token from logits[0..vocab), which is scratch.
  // Validates its arguments (LLMQ_ERR_INVALID_ARGUMENT).
  int32_t sample(float* logits, int32_t vocab, const std::vector<int32_t>& history);

  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  Rng rng_, before_draw_;
  std::vector<int32_t> penalized_;
  std::vector<uint8_t> seen_;
  SampleScratch scratch_;
};

}  // namespace llmq
