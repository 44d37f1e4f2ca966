// Megatron-style tensor parallelism: which part of the model each rank holds, the checks on the
// shapes, the sharding of the loaded (unsharded) weights, and the threads the ranks run on.
//
//   q, k, v         column-parallel by heads (rows of the weight); KV heads are replicated when
//                   the ranks outnumber them (rank r then holds KV head r / (size / num_kv_heads))
//   o               row-parallel (columns of the weight), then an all-reduce of the output
//   gate, up        column-parallel by the intermediate size (split as evenly as it goes: the
//                   parts may differ by one feature)
//   down            row-parallel, then an all-reduce
//   embed, lm_head  vocab-parallel: rank r holds rows [first_vocab, first_vocab + vocab) (split
//                   as evenly as it goes). Embedding
//                   rows of other ranks' ids come out zero and an all-reduce sums them (exact: one
//                   term is nonzero); the logits are all-gathered.
//   norms, RoPE     replicated
//   scales          per-channel ones go with their channels (sliced for q/k/v/gate/up/lm_head,
//                   whole for o/down, whose channels are not split); per-tensor weight scales,
//                   static activation scales and KV scales are replicated. Quantize-on-load takes
//                   the amax over the ranks, so every shard is a slice of the tp = 1 weights.
//   biases          q/k/v with their columns; o on rank 0 only, so it is added once by the sum.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "engine/config.h"
#include "engine/model.h"

namespace llmq {

constexpr int kMaxTensorParallel = 8;

// One rank's part of the model.
struct TpShard {
  int rank = 0, size = 1;
  int64_t first_head = 0, heads = 0;  // query heads
  int64_t first_kv_head = 0, kv_heads = 0;
  bool kv_replica = false;  // another rank holds the same KV heads and counts their saturation
  int64_t first_inter = 0, inter = 0;  // intermediate features
  int64_t first_vocab = 0, vocab = 0;
  int64_t vocab_stride = 0;  // ceil(vocab_size / size), the widest part: each rank's width in the logits all-gather
};

// Checks that `size` ranks can split the model: heads (a divisor of num_attention_heads), KV heads
// (a divisor of num_key_value_heads, or a multiple when larger), and at least one intermediate
// feature and vocabulary entry each. LLMQ_ERR_INVALID_ARGUMENT naming the fields.
void check_tensor_parallel(const ModelConfig& c, int size);
TpShard tp_shard(const ModelConfig& c, int rank, int size);

// The rank's part of the weights, read from the loaded model: row slices are views into its
// mapping; column slices (o, down) are copied into *storage, reading only their bytes.
ModelWeights shard_weights(const ModelWeights& w, const ModelConfig& c, const TpShard& s,
                           std::vector<std::vector<char>>* storage);

// Runs a function for every rank at once: rank 0 on the calling thread, each other rank on a
// thread of its own that lives as long as this object (a CUDA device made current on a rank's
// thread stays current there).
class RankThreads {
 public:
  explicit RankThreads(int n);
  ~RankThreads();
  RankThreads(const RankThreads&) = delete;
  RankThreads& operator=(const RankThreads&) = delete;

  int size() const { return n_; }
  // Calls fn(r) for every r in [0, size()) and returns when all have. At the first failure,
  // on_error(error) is called (to abort the communicators, so that ranks waiting for the failed
  // one in a collective return too); that first error is rethrown once all have returned.
  void run(const std::function<void(int)>& fn, const std::function<void(llmq_status, const std::string&)>& on_error);

 private:
  struct Worker;
  int n_;
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace llmq
