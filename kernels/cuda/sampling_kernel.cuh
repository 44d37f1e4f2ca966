// The sampling kernel (engine/sampler.h's rule, one block of kSampleThreads per logits row), in a
// header of its own so that tests/cuda_emulation.h can also run it on the CPU; sampling.cu
// launches it. The host sampler (engine/sampler.cpp) sorts; this kernel finds the same top-k and
// top-p cuts by radix selection over the probabilities' float bits (8 bits a pass), counting
// tokens for top-k and summing their integer masses for top-p. Masses are integers
// (engine/sampling_rule.h), so every sum is exact and the result does not depend on the order of
// the atomics or of the reductions: the kernel draws the token the host would.
//
// CUDA used here, and all that the emulation provides: threadIdx.x, blockIdx.x, blockDim.x,
// __syncthreads, __shfl_down_sync / __shfl_up_sync over full warps, atomicAdd on shared unsigned
// long long.
#pragma once

#include <climits>
#include <cstdint>

#include "engine/sampling_rule.h"
#include "kernels/cuda/sample_args.h"

namespace llmq::cuda {
namespace {

constexpr int kMaxWarps = 32;  // the block is kSampleThreads on the GPU, any multiple of 32 up to 1024
using u64 = unsigned long long;

struct SampleShared {
  u64 mass[256];  // per digit: token counts (top-k) or masses (top-p)
  unsigned int warp_key[kMaxWarps];
  int warp_id[kMaxWarps];
  u64 warp_sum[kMaxWarps];
  unsigned int prefix;
  u64 remaining;
  u64 above;
  int cut_id;
};

// The block's highest (key, lowest id); every thread gets it.
__device__ void block_argmax(SampleShared& sh, unsigned int& key, int& id) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned int k = __shfl_down_sync(0xffffffffu, key, offset);
    const int i = __shfl_down_sync(0xffffffffu, id, offset);
    if (k > key || (k == key && i < id)) key = k, id = i;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh.warp_key[warp] = key, sh.warp_id[warp] = id;
  __syncthreads();
  key = sh.warp_key[0];
  id = sh.warp_id[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w)
    if (sh.warp_key[w] > key || (sh.warp_key[w] == key && sh.warp_id[w] < id)) key = sh.warp_key[w], id = sh.warp_id[w];
  __syncthreads();
}

// The sum over the block of every thread's v, and the sum over the threads before this one.
__device__ u64 block_scan(SampleShared& sh, u64 v, u64* total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  u64 inclusive = v;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const u64 before = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += before;
  }
  if (lane == 31) sh.warp_sum[warp] = inclusive;
  __syncthreads();
  u64 warps_before = 0, sum = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) {
    if (w < warp) warps_before += sh.warp_sum[w];
    sum += sh.warp_sum[w];
  }
  __syncthreads();
  *total = sum;
  return warps_before + inclusive - v;
}

__device__ u64 block_sum(SampleShared& sh, u64 v) {
  u64 total;
  block_scan(sh, v, &total);
  return total;
}

// Radix selection over the 32-bit keys of the row's ranked tokens, highest first, 8 bits a pass.
// weigh(i, key) is a token's weight in the walk (0: not ranked here). Each pass sums the weights per
// digit; one thread then walks the buckets from the highest down, asking stop(weight above the
// bucket, the bucket's weight): true selects it. Returns the selected key; sh.above ends as the
// weight of the tokens with a higher key.
template <typename Key, typename Weigh, typename Stop>
__device__ unsigned int radix_select(SampleShared& sh, int vocab, Key key, Weigh weigh, Stop stop) {
  unsigned int prefix = 0, mask = 0;
  if (threadIdx.x == 0) sh.above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.mass[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const unsigned int k = key(i);
      const u64 w = weigh(i, k);
      if (w != 0 && (k & mask) == prefix) atomicAdd(&sh.mass[(k >> shift) & 255u], w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int selected = 0;  // unreachable fallback: the walk always stops
      for (int b = 255; b >= 0; --b) {
        if (stop(sh.above, sh.mass[b])) {
          selected = b;
          break;
        }
        sh.above += sh.mass[b];
      }
      sh.prefix = prefix | (unsigned int)selected << shift;
    }
    __syncthreads();
    prefix = sh.prefix;
    mask |= 255u << shift;
  }
  return prefix;
}

// The id of the n-th (from 1) token in id order whose key is `key`; INT_MAX when fewer have it.
template <typename Key>
__device__ int nth_with_key(SampleShared& sh, int vocab, Key key_of, unsigned int key, u64 n) {
  const int chunk = (vocab + int(blockDim.x) - 1) / int(blockDim.x);
  const int begin = min(vocab, int(threadIdx.x) * chunk), end = min(vocab, begin + chunk);
  u64 mine = 0;
  for (int i = begin; i < end; ++i) mine += key_of(i) == key;
  u64 total;
  const u64 before = block_scan(sh, mine, &total);
  if (threadIdx.x == 0) sh.cut_id = INT_MAX;
  __syncthreads();
  if (total > n && before < n && n <= before + mine) {
    u64 seen = before;
    for (int i = begin; i < end; ++i)
      if (key_of(i) == key && ++seen == n) {
        sh.cut_id = i;
        break;
      }
  }
  __syncthreads();
  return sh.cut_id;
}

__global__ void __launch_bounds__(kSampleThreads) sample_kernel(float* logits, int vocab, const SampleArgs* args,
                                                         const int32_t* penalized, int32_t* tokens) {
  using namespace sampling;
  __shared__ SampleShared sh;
  const SampleArgs row = args[blockIdx.x];
  float* l = logits + int64_t(blockIdx.x) * vocab;

  if (row.repetition_penalty != 1.0f) {  // distinct ids: no two threads touch one logit
    for (int j = row.penalized_begin + threadIdx.x; j < row.penalized_end; j += blockDim.x) {
      float& x = l[penalized[j]];
      x = x > 0.0f ? div(x, row.repetition_penalty) : mul(x, row.repetition_penalty);
    }
    __syncthreads();
  }

  unsigned int best_key = 0;
  int best = INT_MAX;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const unsigned int key = logit_key(canonical_logit(l[i]));
    if (key > best_key) best_key = key, best = i;  // i rises: the first of equal keys stays
  }
  block_argmax(sh, best_key, best);
  const float max_logit = key_logit(best_key);
  if (row.temperature == 0.0f || !isfinite(max_logit)) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = best;
    return;
  }
  // From here the row holds probabilities (nonnegative floats, so their bits rank them).
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) l[i] = probability(canonical_logit(l[i]), max_logit, row.temperature);
  __syncthreads();
  auto key_of = [&](int i) { return float_bits(l[i]); };

  // The cut: tokens ranked above cut_key, and those at cut_key up to id cut_id (all by default).
  unsigned int cut_key = 0;
  int cut_id = INT_MAX;
  if (row.top_k > 0 || row.top_p < 1.0f) {
    u64 ranked_mine = 0, mass_mine = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const u64 m = mass(l[i]);
      ranked_mine += m != 0;
      mass_mine += m;
    }
    const u64 ranked = block_sum(sh, ranked_mine);
    u64 kept_mass = block_sum(sh, mass_mine);
    bool k_cut = false;
    u64 k_ties = 0;
    if (row.top_k > 0 && u64(row.top_k) < ranked) {
      // Top-k: the key of the k-th ranked token, counting tokens (of nonzero mass) per digit.
      if (threadIdx.x == 0) sh.remaining = u64(row.top_k);
      cut_key = radix_select(
          sh, vocab, key_of, [&](int i, unsigned int k) -> u64 { return mass(l[i]) != 0; },
          [&](u64, u64 count) {
            if (count >= sh.remaining) return true;
            sh.remaining -= count;
            return false;
          });
      k_ties = sh.remaining;  // how many tokens at cut_key the first k take
      const u64 tie_mass = mass(bits_float(cut_key));
      u64 above_mine = 0;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (key_of(i) > cut_key) above_mine += mass(l[i]);
      kept_mass = block_sum(sh, above_mine) + k_ties * tie_mass;
      k_cut = true;
    }
    u64 ties = k_ties;
    if (row.top_p < 1.0f) {
      // Top-p: the key at which the ranked mass (within top-k) reaches top_p of the kept mass.
      const double target = top_p_target(row.top_p, kept_mass);
      const unsigned int k_key = cut_key;
      const unsigned int p_key = radix_select(
          sh, vocab, key_of, [&](int i, unsigned int k) -> u64 { return !k_cut || k >= k_key ? mass(l[i]) : 0; },
          [&](u64 above, u64 bucket) { return reaches(above + bucket, target); });
      // The tokens at p_key weigh m each: the nucleus takes the fewest of them that reach the target.
      const u64 above = sh.above, m = mass(bits_float(p_key));
      const double need = target - double(above);
      u64 j = need <= double(m) ? 1 : u64(need / double(m));
      while (j > 1 && reaches(above + (j - 1) * m, target)) --j;
      while (!reaches(above + j * m, target)) ++j;
      ties = k_cut && p_key == k_key ? min(j, k_ties) : j;
      cut_key = p_key;
    }
    if (k_cut || row.top_p < 1.0f) cut_id = nth_with_key(sh, vocab, key_of, cut_key, ties);
  }

  // The draw: inverse CDF over the survivors (the cut, then min-p) in id order, each thread
  // walking a contiguous chunk of ids once the scan has told it that the point is in its chunk.
  auto survivor_mass = [&](int i) -> u64 {
    const float p = l[i];
    const unsigned int key = float_bits(p);
    const bool kept = key > cut_key || (key == cut_key && i <= cut_id);
    return kept && p >= row.min_p ? mass(p) : 0;
  };
  const int chunk = (vocab + int(blockDim.x) - 1) / int(blockDim.x);
  const int begin = min(vocab, int(threadIdx.x) * chunk), end = min(vocab, begin + chunk);
  u64 mine = 0;
  for (int i = begin; i < end; ++i) mine += survivor_mass(i);
  if (threadIdx.x == 0) tokens[blockIdx.x] = best;  // unreachable fallback: the max always survives
  u64 total;
  const u64 before = block_scan(sh, mine, &total);  // its barriers order the write above
  if (total == 0) return;
  const u64 target = draw_target(row.draw, total);
  if (before <= target && target < before + mine) {
    u64 cum = before;
    for (int i = begin; i < end; ++i) {
      cum += survivor_mass(i);
      if (cum > target) {
        tokens[blockIdx.x] = i;
        break;
      }
    }
  }
}

}  // namespace
}  // namespace llmq::cuda
