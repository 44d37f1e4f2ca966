// What the CUDA backend's begin_step and attention() hand the attention kernels, built in host
// memory for the emulated kernels: the plan's arrays, its query tiles (cuda::make_query_tiles, as
// the backend makes them), the attention arguments.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "kernels/cuda/cuda_kernels.h"

namespace llmq::test {

struct HostDevicePlan {
  HostDevicePlan(const HostDevicePlan&) = delete;  // device points into its own vectors
  explicit HostDevicePlan(const BatchPlan& plan) {
    cuda::make_query_tiles(plan.token_seq.data(), plan.positions.data(), plan.n_tokens(), &tiles);
    device.tokens = plan.tokens.data();
    device.positions = plan.positions.data();
    device.token_seq = plan.token_seq.data();
    device.slots = plan.slots.data();
    device.block_offsets = plan.block_offsets.data();
    device.block_ids = plan.block_ids.data();
    device.small = cuda::Tiles{tiles.small_first.data(), tiles.small_count.data(), int32_t(tiles.small_first.size())};
    device.large = cuda::Tiles{tiles.large_first.data(), tiles.large_count.data(), int32_t(tiles.large_first.size())};
  }
  cuda::QueryTiles tiles;
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
