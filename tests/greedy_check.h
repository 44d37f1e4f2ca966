// Greedy decoding judged by an engine's scores: for each generated token, how far its logit lies
// below the best logit of its step, by scorer.score(prompt + tokens). Two backends that sum in
// different orders may pick differently where the top two logits nearly tie, and their sequences
// part there; the gaps say whether each pick was still a best one up to such a tie.
#pragma once

#include <algorithm>
#include <vector>

#include "engine/engine.h"

namespace llmq::test {

inline std::vector<float> greedy_gaps(Engine& scorer, const std::vector<int32_t>& prompt,
                                      const std::vector<int32_t>& tokens) {
  const int32_t vocab = scorer.vocab_size();
  std::vector<int32_t> ids = prompt;
  ids.insert(ids.end(), tokens.begin(), tokens.end());
  std::vector<float> logits(ids.size() * size_t(vocab));
  scorer.score(ids, logits.data());
  std::vector<float> gaps;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const float* row = logits.data() + (prompt.size() - 1 + i) * size_t(vocab);  // predicts tokens[i]
    gaps.push_back(*std::max_element(row, row + vocab) - row[tokens[i]]);
  }
  return gaps;
}

}  // namespace llmq::test
