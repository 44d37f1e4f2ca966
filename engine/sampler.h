// Token sampling on the CPU: repetition penalty, temperature, top-k, top-p, min-p, then a draw from
// a seeded RNG of our own, so that a seed gives the same tokens with every standard library.
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


class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);  // validates; seeds its RNG from params.seed

  // Picks the next token from logits[0..vocab). history holds the token ids seen so far (prompt +
  // generated), for the repetition penalty; each must be in [0, vocab). logits is scratch and is
  // modified. NaN logits count as -inf; if no token has a finite logit (or one is +inf), the
  // argmax (lowest id) is returned. Greedy sampling does not advance the RNG.
  int32_t sample(float* logits, int32_t vocab, const std::vector<int32_t>& history);

  const SamplingParams& params() const { return params_; }

 private:
  struct Candidate {
    float value;  // logit, then unnormalized probability
    int32_t id;
  };

  SamplingParams params_;
  Rng rng_;
  // Kept across calls so that sampling a 128K vocab does not allocate every token.
  std::vector<Candidate> candidates_;
  std::vector<uint8_t> seen_;
};

}  // namespace llmq
