// What the CUDA backend's begin_step and attention() hand the attention kernels, built in host
// memory for the emulated kernels: the plan's arrays, its query tiles, the attention arguments.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "kernels/cuda/cuda_kernels.h"

namespace llmq::test {

struct HostDevicePlan {
  HostDevicePlan(const HostDevicePlan&) = delete;  // device points into its own vectors
  explicit HostDevicePlan(const BatchPlan& plan) {
    // Query tiles: runs of consecutive tokens of one sequence, up to 16 (CUDA-core kernel) or 64
    // (tensor-core kernel) long, as CudaBackend::begin_step makes them.
    for (int32_t t = 0; t < plan.n_tokens(); ++t) {
      const bool continues = t > 0 && plan.token_seq[size_t(t)] == plan.token_seq[size_t(t - 1)] &&
                             plan.positions[size_t(t)] == plan.positions[size_t(t - 1)] + 1;
      for (auto [tiles, limit] : {std::pair<Tiles*, int>{&small, cuda::kAttentionTileQ},
                                  {&large, cuda::kAttentionTileQLarge}}) {
        if (continues && tiles->count.back() < limit) {
          ++tiles->count.back();
        } else {
          tiles->first.push_back(t);
          tiles->count.push_back(1);
        }
      }
    }
    device.tokens = plan.tokens.data();
    device.positions = plan.positions.data();
    device.token_seq = plan.token_seq.data();
    device.slots = plan.slots.data();
    device.block_offsets = plan.block_offsets.data();
    device.block_ids = plan.block_ids.data();
    device.small = cuda::Tiles{small.first.data(), small.count.data(), int32_t(small.first.size())};
    device.large = cuda::Tiles{large.first.data(), large.count.data(), int32_t(large.first.size())};
  }
  struct Tiles {
    std::vector<int32_t> first, count;
  };
  Tiles small, large;
  cuda::DevicePlan device;
};

inline cuda::AttentionArgs attention_args(const AttentionParams& p, int32_t block_size, DType kv_dtype,
                                          const float* k_scale, const float* v_scale) {
  cuda::AttentionArgs a;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = p.head_dim;
  a.block_size = block_size;
  a.sliding_window = p.sliding_window;
  a.scale = p.scale;
  a.k_scale = k_scale;
  a.v_scale = v_scale;
  a.scale_per_token = kv_dtype == DType::I8;
  return a;
}

}  // namespace llmq::test
