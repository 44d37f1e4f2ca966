#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/error.h"

namespace llmq {

void validate_sampling(const SamplingParams& p) {
  // Written as !(valid) so that NaN fails every check.
  if (!(std::isfinite(p.temperature) && p.temperature >= 0.0f))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "sampling: temperature must be finite and >= 0, got {}", p.temperature);
  if (p.top_k < 0) fail(LLMQ_ERR_INVALID_ARGUMENT, "sampling: top_k must be >= 0, got {}", p.top_k);
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "sampling: top_p must be in (0, 1], got {}", p.top_p);
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "sampling: min_p must be in [0, 1], got {}", p.min_p);
  if (!(std::isfinite(p.repetition_penalty) && p.repetition_penalty > 0.0f))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "sampling: repetition_penalty must be finite and > 0, got {}",
         p.repetition_penalty);
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {
  validate_sampling(params);
}

int32_t Sampler::sample(float* logits, int32_t vocab, const std::vector<int32_t>& history) {
  if (logits == nullptr) fail(LLMQ_ERR_INVALID_ARGUMENT, "sampler: logits is null");
  if (vocab <= 0) fail(LLMQ_ERR_INVALID_ARGUMENT, "sampler: vocab must be > 0, got {}", vocab);
  for (int32_t id : history)
    if (id < 0 || id >= vocab)
      fail(LLMQ_ERR_INVALID_ARGUMENT, "sampler: history token {} is outside the vocab [0, {})", id, vocab);

  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int32_t i = 0; i < vocab; ++i)
    if (std::isnan(logits[i])) logits[i] = neg_inf;

  // Repetition penalty, once per distinct token however often it repeats.
  const float penalty = params_.repetition_penalty;
  if (penalty != 1.0f && !history.empty()) {
    seen_.assign(size_t(vocab), 0);
    for (int32_t id : history) {
      if (seen_[size_t(id)]) continue;
      seen_[size_t(id)] = 1;
      float& l = logits[id];
      l = l > 0.0f ? l / penalty : l * penalty;
    }
  }

  int32_t best = 0;
  for (int32_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  // Greedy; also the answer when nothing is finite, or when an infinite logit would make softmax NaN.
  const float temperature = params_.temperature;
  const float max_logit = logits[best];
  if (temperature == 0.0f || !std::isfinite(max_logit)) return best;
  // Unnormalized softmax: the max maps to exp(0) = 1 exactly and -inf to 0.
  auto prob = [&](float logit) { return std::exp((logit - max_logit) / temperature); };
  const float min_p = params_.min_p;  // prob < min_p * max prob (which is 1) is dropped

  const size_t top_k = size_t(params_.top_k);
  const bool use_top_p = params_.top_p < 1.0f;
  if (top_k == 0 && !use_top_p) {
    // No ranking needed: sample straight from the logits array, in id order.
    double total = 0.0;
    for (int32_t i = 0; i < vocab; ++i) {
      const float p = prob(logits[i]);
      logits[i] = p < min_p ? 0.0f : p;
      total += logits[i];
    }
    const double u = rng_.uniform() * total;
    double cum = 0.0;
    for (int32_t i = 0; i < vocab; ++i) {
      cum += logits[i];
      if (u < cum) return i;
    }
    return best;  // rounding left u at the very top
  }

  // -inf tokens have probability 0: leave them out (branch-free; push_back here was 3x slower).
  std::vector<Candidate>& cand = candidates_;
  cand.resize(size_t(vocab));
  size_t n = 0;
  for (int32_t i = 0; i < vocab; ++i) {
    cand[n] = {logits[i], i};
    n += logits[i] != neg_inf;
  }
  cand.resize(n);

  // Highest value first, lowest id on ties: a strict total order, so every selection and sort below
  // has one result whatever the standard library, and the draw is reproducible.
  auto higher = [](const Candidate& a, const Candidate& b) {
    return a.value > b.value || (a.value == b.value && a.id < b.id);
  };
  size_t sorted = 0;  // cand[0, sorted) is in final `higher` order and holds the highest values
  if (top_k > 0 && top_k < cand.size()) {  // otherwise top-k keeps everything
    // Ranked by logit. A small k is a heap scan that rarely touches the heap; a large one selects first.
    if (top_k <= cand.size() / 16) {
      std::partial_sort(cand.begin(), cand.begin() + top_k, cand.end(), higher);
    } else {
      std::nth_element(cand.begin(), cand.begin() + top_k, cand.end(), higher);
      std::sort(cand.begin(), cand.begin() + top_k, higher);
    }
    cand.resize(top_k);
    sorted = top_k;
  }

  double total = 0.0;
  for (Candidate& c : cand) {
    c.value = prob(c.value);
    total += c.value;
  }

  if (use_top_p) {
    const double target = double(params_.top_p) * total;
    if (sorted < cand.size()) {
      // Tokens below x = (1 - top_p) / (2 n) of the mass weigh less than (1 - top_p) / 2 together,
      // so the nucleus ends before any of them; tokens below min_p would be dropped after it anyway.
      // Removing both first leaves far less to sort.
      const float x = std::max(min_p, float(0.5 * (1.0 - params_.top_p) * total / double(cand.size())));
      cand.erase(std::partition(cand.begin(), cand.end(), [&](const Candidate& c) { return c.value >= x; }),
                 cand.end());
    }
    // The nucleus is usually small: rank a prefix, growing it only while the nucleus runs past it.
    double cum = 0.0;
    for (size_t i = 0; i < cand.size(); ++i) {
      if (i == sorted) {
        sorted = std::min(cand.size(), std::max<size_t>(1024, 8 * sorted));
        std::nth_element(cand.begin() + i, cand.begin() + sorted - 1, cand.end(), higher);
        std::sort(cand.begin() + i, cand.begin() + sorted, higher);
      }
      cum += cand[i].value;
      if (cum >= target) {
        cand.resize(i + 1);
        break;
      }
    }
  }

  if (min_p > 0.0f) {
    // The max survives top-k and top-p; remove_if keeps the order.
    cand.erase(std::remove_if(cand.begin(), cand.end(), [&](const Candidate& c) { return c.value < min_p; }),
               cand.end());
  }

  // Inverse CDF over the survivors, renormalized by their sum.
  total = 0.0;
  for (const Candidate& c : cand) total += c.value;
  const double u = rng_.uniform() * total;
  double cum = 0.0;
  for (const Candidate& c : cand) {
    cum += c.value;
    if (u < cum) return c.id;
  }
  return cand.front().id;  // rounding left u at the very top: the front is the max
}

}  // namespace llmq
