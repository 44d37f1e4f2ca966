// Steps over a paged KV cache for the attention tests (CPU backend against the GPU, or against the
// emulated kernels): sequences given as (cached tokens, new tokens), their blocks scattered over
// the cache in a random order.
#pragma once

#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/rng.h"

namespace llmq::test {

using PagedSequences = std::vector<std::pair<int32_t, int32_t>>;

// Every sequence's blocks, in turn, as a random order of all the cache's blocks.
inline std::vector<int32_t> scattered_blocks(const PagedSequences& seqs, int32_t block_size, Rng& rng) {
  int32_t total = 0;
  for (auto [cached, fresh] : seqs) total += (cached + fresh + block_size - 1) / block_size;
  std::vector<int32_t> order(static_cast<size_t>(total));
  std::iota(order.begin(), order.end(), 0);
  for (int32_t i = total - 1; i > 0; --i) std::swap(order[size_t(i)], order[rng.next() % uint64_t(i + 1)]);
  return order;
}

// The step writing the cached prefixes (phase 0) or the new tokens (phase 1) of every sequence.
inline BatchPlan paged_step(const PagedSequences& seqs, const std::vector<int32_t>& blocks, int32_t block_size,
                            int phase) {
  BatchPlan plan;
  plan.clear();
  int32_t first_block = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto [cached, fresh] = seqs[s];
    const int32_t begin = phase == 0 ? 0 : cached, end = phase == 0 ? cached : cached + fresh;
    for (int32_t p = begin; p < end; ++p) {
      plan.tokens.push_back(0);
      plan.positions.push_back(p);
      plan.token_seq.push_back(int32_t(s));
      plan.slots.push_back(blocks[size_t(first_block + p / block_size)] * block_size + p % block_size);
    }
    const int32_t n_blocks = (cached + fresh + block_size - 1) / block_size;
    for (int32_t b = 0; b < n_blocks; ++b) plan.block_ids.push_back(blocks[size_t(first_block + b)]);
    plan.block_offsets.push_back(int32_t(plan.block_ids.size()));
    first_block += n_blocks;
  }
  return plan;
}

}  // namespace llmq::test
