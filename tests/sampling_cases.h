// Random sampling rows for the sampler tests (CPU reference and the CUDA kernel against the CPU):
// logits with ties, NaN, infinities and long tails, at odd vocabulary sizes, with every
// combination of temperature, top-k, top-p, min-p and repetition penalty.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "engine/rng.h"
#include "engine/sampler.h"

namespace llmq::test {

struct SamplingCase {
  std::vector<float> logits;
  std::vector<int32_t> penalized;  // distinct ids
  SampleRow row;                   // row.penalized is set by with_penalized()
  SampleRow with_penalized() const {
    SampleRow r = row;
    r.penalized = penalized.data();
    r.n_penalized = int32_t(penalized.size());
    return r;
  }
};

inline std::vector<SamplingCase> random_sampling_cases(uint64_t seed, int n, const std::vector<int32_t>& vocabs) {
  Rng rng(seed);
  auto uniform = [&] { return float(rng.uniform()); };
  auto pick = [&](int n_choices) { return int32_t(rng.next() % uint64_t(n_choices)); };
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<SamplingCase> cases;
  for (int c = 0; c < n; ++c) {
    SamplingCase s;
    const int32_t vocab = vocabs[size_t(c) % vocabs.size()];
    const float spread = std::vector<float>{0.5f, 4.0f, 20.0f, 60.0f}[size_t(pick(4))];
    s.logits.resize(size_t(vocab));
    for (float& l : s.logits) l = (uniform() - 0.5f) * spread;
    // Coarse values make exact ties; a few special values where the vocabulary allows.
    if (pick(3) == 0)
      for (float& l : s.logits) l = std::round(l);
    for (int k = 0; k < vocab / 50; ++k) s.logits[size_t(pick(vocab))] = std::vector<float>{
        std::numeric_limits<float>::quiet_NaN(), -inf, -0.0f, 0.0f}[size_t(pick(4))];
    if (pick(20) == 0) s.logits[size_t(pick(vocab))] = inf;
    if (pick(30) == 0) s.logits.assign(size_t(vocab), -inf);

    SampleRow& r = s.row;
    r.temperature = std::vector<float>{0.0f, 0.3f, 0.7f, 1.0f, 1.5f, 1e-4f}[size_t(pick(6))];
    r.top_k = std::vector<int32_t>{0, 0, 1, 2, 5, 40, vocab, vocab + 3}[size_t(pick(8))];
    r.top_p = std::vector<float>{1.0f, 1.0f, 0.9f, 0.5f, 0.99f, 1e-3f}[size_t(pick(6))];
    r.min_p = std::vector<float>{0.0f, 0.0f, 0.05f, 0.3f, 1.0f}[size_t(pick(5))];
    r.draw = rng.next() >> 11;
    if (pick(3) == 0) {
      r.repetition_penalty = std::vector<float>{1.3f, 0.7f, 2.0f}[size_t(pick(3))];
      std::vector<uint8_t> seen(size_t(vocab), 0);
      for (int k = 0; k < 1 + vocab / 10; ++k) {
        const int32_t id = pick(vocab);
        if (!seen[size_t(id)]) seen[size_t(id)] = 1, s.penalized.push_back(id);
      }
    }
    cases.push_back(std::move(s));
  }
  return cases;
}

// Each case again with `n` draws: the lowest and the highest point (the first and the last survivor
// in id order), then random ones, so that a wrong cut shows in the tokens drawn.
inline std::vector<SamplingCase> with_draws(const std::vector<SamplingCase>& cases, int n, uint64_t seed) {
  Rng rng(seed);
  std::vector<SamplingCase> out;
  for (const SamplingCase& c : cases)
    for (int d = 0; d < n; ++d) {
      out.push_back(c);
      out.back().row.draw = d == 0 ? 0 : d == 1 ? (uint64_t(1) << 53) - 1 : rng.next() >> 11;
    }
  return out;
}

}  // namespace llmq::test
