#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "engine/error.h"
#include "engine/sampling_rule.h"

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

namespace {

using Candidate = SampleScratch::Candidate;

// Higher probability first, lowest id on ties: a strict total order, so every selection and sort
// below has one result whatever the standard library.
bool ranks_higher(const Candidate& a, const Candidate& b) {
  return a.probability > b.probability || (a.probability == b.probability && a.id < b.id);
}

// Inverse CDF at `target` over the masses of the survivors, in id order.
template <typename MassOf>
int32_t draw(size_t n, uint64_t total, uint64_t draw53, MassOf mass_of, int32_t fallback) {
  const uint64_t target = sampling::draw_target(draw53, total);
  uint64_t cum = 0;
  for (size_t i = 0; i < n; ++i) {
    cum += mass_of(i);
    if (cum > target) return int32_t(i);
  }
  return fallback;  // unreachable: target < total
}

}  // namespace

int32_t sample_row(float* logits, int32_t vocab, const SampleRow& row, SampleScratch& scratch) {
  using namespace sampling;
  const float penalty = row.repetition_penalty;
  if (penalty != 1.0f)
    for (int32_t j = 0; j < row.n_penalized; ++j) {
      float& l = logits[row.penalized[j]];
      l = l > 0.0f ? div(l, penalty) : mul(l, penalty);
    }
  int32_t best = 0;
  uint32_t best_key = 0;
  for (int32_t i = 0; i < vocab; ++i) {
    logits[i] = canonical_logit(logits[i]);
    const uint32_t key = logit_key(logits[i]);
    if (key > best_key || i == 0) best_key = key, best = i;
  }
  const float max_logit = logits[best];
  const float temperature = row.temperature;
  if (temperature == 0.0f || !std::isfinite(max_logit)) return best;
  auto probability_of = [&](int32_t i) { return probability(logits[i], max_logit, temperature); };
  const float min_p = row.min_p;

  if (row.top_k == 0 && row.top_p >= 1.0f) {
    // No ranking: min-p alone, drawn from in id order.
    std::vector<uint64_t>& masses = scratch.masses;
    masses.resize(size_t(vocab));
    uint64_t total = 0;
    for (int32_t i = 0; i < vocab; ++i) {
      const float p = probability_of(i);
      total += masses[size_t(i)] = p >= min_p ? mass(p) : 0;
    }
    return draw(size_t(vocab), total, row.draw, [&](size_t i) { return masses[i]; }, best);
  }

  // The ranked tokens: those of nonzero mass (branch-free; push_back here was 3x slower).
  std::vector<Candidate>& cand = scratch.candidates;
  cand.resize(size_t(vocab));
  size_t n = 0;
  for (int32_t i = 0; i < vocab; ++i) {
    const float p = probability_of(i);
    cand[n] = {p, i, mass(p)};
    n += cand[n].mass != 0;
  }
  cand.resize(n);  // the max has mass 2^40: n >= 1

  size_t sorted = 0;  // cand[0, sorted) is in final rank order and holds the highest ranks
  const size_t top_k = size_t(row.top_k);
  if (top_k > 0 && top_k < cand.size()) {
    // A small k is a heap scan that rarely touches the heap; a large one selects first.
    if (top_k <= cand.size() / 16) {
      std::partial_sort(cand.begin(), cand.begin() + top_k, cand.end(), ranks_higher);
    } else {
      std::nth_element(cand.begin(), cand.begin() + top_k, cand.end(), ranks_higher);
      std::sort(cand.begin(), cand.begin() + top_k, ranks_higher);
    }
    cand.resize(top_k);
    sorted = top_k;
  }

  if (row.top_p < 1.0f) {
    uint64_t total = 0;
    for (const Candidate& c : cand) total += c.mass;
    const double target = top_p_target(row.top_p, total);
    if (sorted < cand.size()) {
      // Mass and probability fall with the rank, so both filters below remove a tail of the
      // ranking. Tokens under (1 - top_p) / (2 n) of the mass weigh less than (1 - top_p) / 2
      // together: the nucleus ends before any of them. Tokens under min_p go after it anyway.
      // Removing both first leaves far less to sort.
      const uint64_t small = uint64_t(0.5 * (1.0 - double(row.top_p)) * double(total) / double(cand.size()));
      cand.erase(std::partition(cand.begin(), cand.end(),
                                [&](const Candidate& c) { return c.mass >= small && c.probability >= min_p; }),
                 cand.end());
    }
    // The nucleus is usually small: rank a prefix, growing it only while the nucleus runs past it.
    uint64_t prefix = 0;
    for (size_t i = 0; i < cand.size(); ++i) {
      if (i == sorted) {
        sorted = std::min(cand.size(), std::max<size_t>(1024, 8 * sorted));
        std::nth_element(cand.begin() + i, cand.begin() + sorted - 1, cand.end(), ranks_higher);
        std::sort(cand.begin() + i, cand.begin() + sorted, ranks_higher);
      }
      prefix += cand[i].mass;
      if (reaches(prefix, target)) {
        cand.resize(i + 1);
        break;
      }
    }
  }

  if (min_p > 0.0f)
    cand.erase(std::remove_if(cand.begin(), cand.end(), [&](const Candidate& c) { return c.probability < min_p; }),
               cand.end());
  std::sort(cand.begin(), cand.end(), [](const Candidate& a, const Candidate& b) { return a.id < b.id; });
  uint64_t total = 0;
  for (const Candidate& c : cand) total += c.mass;
  const size_t at = size_t(draw(cand.size(), total, row.draw, [&](size_t i) { return cand[i].mass; }, 0));
  return at < cand.size() ? cand[at].id : best;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed), before_draw_(rng_) {
  validate_sampling(params);
}

SampleRow Sampler::next_row(const std::vector<int32_t>& history, int32_t vocab) {
  SampleRow row;
  row.temperature = params_.temperature;
  row.top_k = params_.top_k;
  row.top_p = params_.top_p;
  row.min_p = params_.min_p;
  row.repetition_penalty = params_.repetition_penalty;
  before_draw_ = rng_;
  if (row.temperature > 0.0f) row.draw = rng_.next() >> 11;
  penalized_.clear();
  if (row.repetition_penalty != 1.0f && !history.empty()) {
    seen_.assign(size_t(vocab), 0);
    for (int32_t id : history) {
      if (seen_[size_t(id)]) continue;
      seen_[size_t(id)] = 1;
      penalized_.push_back(id);
    }
  }
  row.penalized = penalized_.data();
  row.n_penalized = int32_t(penalized_.size());
  return row;
}

int32_t Sampler::sample(float* logits, int32_t vocab, const std::vector<int32_t>& history) {
  if (logits == nullptr) fail(LLMQ_ERR_INVALID_ARGUMENT, "sampler: logits is null");
  if (vocab <= 0) fail(LLMQ_ERR_INVALID_ARGUMENT, "sampler: vocab must be > 0, got {}", vocab);
  for (int32_t id : history)
    if (id < 0 || id >= vocab)
      fail(LLMQ_ERR_INVALID_ARGUMENT, "sampler: history token {} is outside the vocab [0, {})", id, vocab);
  return sample_row(logits, vocab, next_row(history, vocab), scratch_);
}

}  // namespace llmq
