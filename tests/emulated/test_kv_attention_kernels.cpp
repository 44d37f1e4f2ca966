// The RoPE + paged KV write kernel and the CUDA-core attention kernel (with its key splits and their
// merge), from kernels/cuda/kernels.cuh, run on the CPU through tests/emulated/cuda_emulation.h
// against the CPU backend: the same rotated q and k, the same cache bytes (codes and scales) and
// saturation counts in every KV dtype, and attention outputs within fp32 rounding. Prefixes are
// written in a first step; the step compared mixes prefill chunks and decode tokens.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "engine/backend.h"
#include "engine/quant.h"
#include "engine/rng.h"

#include "emulated/cuda_emulation.h"  // before the kernels: it stands in for CUDA
#include "kernels/cuda/kernels.cuh"

namespace llmq {
namespace {

struct Case {
  int32_t heads, kv_heads, head_dim, window;
  DType kv;
  int32_t n_splits;
  double max_relative;  // attention output, root of the summed squares
};

template <typename Fn>
void with_kv(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32:
      return fn(float{});
    case DType::BF16:
      return fn(cuda::bf16{});
    case DType::F16:
      return fn(cuda::f16{});
    case DType::I8:
      return fn(int8_t{});
    default:
      return fn(cuda::fp8{});
  }
}

// Query tiles as the CUDA backend makes them: runs of up to `limit` consecutive tokens of a sequence.
void make_tiles(const BatchPlan& plan, int limit, std::vector<int32_t>* first, std::vector<int32_t>* count) {
  for (int32_t t = 0; t < plan.n_tokens(); ++t) {
    const bool continues = t > 0 && plan.token_seq[size_t(t)] == plan.token_seq[size_t(t - 1)] &&
                           plan.positions[size_t(t)] == plan.positions[size_t(t - 1)] + 1;
    if (continues && count->back() < limit) {
      ++count->back();
    } else {
      first->push_back(t);
      count->push_back(1);
    }
  }
}

void check(const Case& c, const std::vector<std::pair<int32_t, int32_t>>& seqs) {
  SCOPED_TRACE(testing::Message() << "heads " << c.heads << "/" << c.kv_heads << " D " << c.head_dim << " window "
                                  << c.window << " kv " << dtype_name(c.kv) << " splits " << c.n_splits);
  const int32_t block_size = 16, D = c.head_dim;
  Rng rng(uint64_t(c.heads * 31 + D * 7 + c.window + int(c.kv) + c.n_splits));
  auto floats = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = float(rng.uniform() * 4.0 - 2.0);
    return v;
  };
  int32_t total_blocks = 0;
  std::vector<int32_t> n_blocks;
  for (auto [cached, fresh] : seqs) total_blocks += n_blocks.emplace_back((cached + fresh + block_size - 1) / block_size);
  std::vector<int32_t> order(static_cast<size_t>(total_blocks));
  std::iota(order.begin(), order.end(), 0);
  for (int32_t i = total_blocks - 1; i > 0; --i) std::swap(order[size_t(i)], order[rng.next() % uint64_t(i + 1)]);
  const int64_t per_block = int64_t(c.kv_heads) * block_size * D;
  const size_t cache_bytes = size_t(total_blocks * per_block) * dtype_size(c.kv);
  // Two caches (CPU backend, emulated kernels), zeroed alike.
  struct Cache {
    std::vector<uint8_t> k, v;
    std::vector<float> k_scale, v_scale;
  } cpu_cache, emu_cache;
  for (Cache* cache : {&cpu_cache, &emu_cache}) {
    cache->k.assign(cache_bytes, 0);
    cache->v.assign(cache_bytes, 0);
    const size_t scales = c.kv == DType::I8 ? size_t(total_blocks) * size_t(c.kv_heads * block_size)
                          : c.kv == DType::F8_E4M3 ? 1 : 0;
    cache->k_scale.assign(scales, c.kv == DType::F8_E4M3 ? 1.0f / 64 : 0.0f);
    cache->v_scale.assign(scales, c.kv == DType::F8_E4M3 ? 1.0f / 128 : 0.0f);
  }
  KvLayer layer;
  layer.k = Tensor{cpu_cache.k.data(), c.kv, total_blocks, per_block};
  layer.v = Tensor{cpu_cache.v.data(), c.kv, total_blocks, per_block};
  if (!cpu_cache.k_scale.empty()) {
    const int64_t cols = c.kv == DType::I8 ? int64_t(c.kv_heads) * block_size : 1;
    layer.k_scale = Tensor{cpu_cache.k_scale.data(), DType::F32, int64_t(cpu_cache.k_scale.size()) / cols, cols};
    layer.v_scale = Tensor{cpu_cache.v_scale.data(), DType::F32, int64_t(cpu_cache.v_scale.size()) / cols, cols};
  }
  layer.block_size = block_size;
  layer.num_kv_heads = c.kv_heads;
  layer.head_dim = D;
  layer.layer = 0;
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = float(std::pow(10000.0, -2.0 * double(i) / D));
  const AttentionParams params{c.heads, c.kv_heads, D, float(1.0 / std::sqrt(double(D))), c.window};
  std::unique_ptr<Backend> cpu = make_cpu_backend(CpuBackendOptions{2});
  std::vector<unsigned long long> counters(kSaturationCounters, 0);
  emulation::eager_copies = false;

  for (int phase = 0; phase < 2; ++phase) {
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
        plan.slots.push_back(order[size_t(first_block + p / block_size)] * block_size + p % block_size);
      }
      for (int32_t b = 0; b < n_blocks[s]; ++b) plan.block_ids.push_back(order[size_t(first_block + b)]);
      plan.block_offsets.push_back(int32_t(plan.block_ids.size()));
      first_block += n_blocks[s];
    }
    const int64_t T = plan.n_tokens();
    if (T == 0) continue;
    const int64_t q_cols = int64_t(c.heads) * D, kv_cols = int64_t(c.kv_heads) * D;
    std::vector<float> q = floats(size_t(T * q_cols)), k = floats(size_t(T * kv_cols)), v = floats(size_t(T * kv_cols));
    std::vector<float> q_emu = q, k_emu = k;
    cpu->begin_step(plan);
    Tensor qt{q.data(), DType::F32, T, q_cols}, kt{k.data(), DType::F32, T, kv_cols}, vt{v.data(), DType::F32, T, kv_cols};
    Tensor ft{inv_freq.data(), DType::F32, 1, int64_t(inv_freq.size())};
    cpu->rope_kv_write(qt, kt, vt, ft, layer);

    std::vector<int32_t> small_first, small_count;
    make_tiles(plan, cuda::kAttentionTileQ, &small_first, &small_count);
    cuda::DevicePlan device;
    device.tokens = plan.tokens.data();
    device.positions = plan.positions.data();
    device.token_seq = plan.token_seq.data();
    device.slots = plan.slots.data();
    device.block_offsets = plan.block_offsets.data();
    device.block_ids = plan.block_ids.data();
    device.small = cuda::Tiles{small_first.data(), small_count.data(), int32_t(small_first.size())};
    with_kv(c.kv, [&](auto tag) {
      using KvT = decltype(tag);
      emulation::launch(dim3(unsigned(T)), 128, 0, [&] {
        cuda::rope_kv_kernel<KvT>(q_emu.data(), q_cols, k_emu.data(), v.data(), kv_cols, inv_freq.data(), D,
                                  c.kv_heads, block_size, reinterpret_cast<KvT*>(emu_cache.k.data()),
                                  reinterpret_cast<KvT*>(emu_cache.v.data()),
                                  emu_cache.k_scale.empty() ? nullptr : emu_cache.k_scale.data(),
                                  emu_cache.v_scale.empty() ? nullptr : emu_cache.v_scale.data(), device.positions,
                                  device.slots, c.kv == DType::F8_E4M3 ? counters.data() : nullptr);
      });
    });
    ASSERT_EQ(q, q_emu) << "rotated q, phase " << phase;
    ASSERT_EQ(k, k_emu) << "rotated k, phase " << phase;
    ASSERT_EQ(cpu_cache.k, emu_cache.k) << "K cache bytes, phase " << phase;
    ASSERT_EQ(cpu_cache.v, emu_cache.v) << "V cache bytes, phase " << phase;
    ASSERT_EQ(cpu_cache.k_scale, emu_cache.k_scale) << "K scales, phase " << phase;
    ASSERT_EQ(cpu_cache.v_scale, emu_cache.v_scale) << "V scales, phase " << phase;
    if (phase == 0) continue;

    std::vector<float> expected(q.size());
    Tensor et{expected.data(), DType::F32, T, q_cols};
    cpu->attention(qt, layer, params, et);
    cuda::AttentionArgs args;
    args.num_heads = c.heads;
    args.num_kv_heads = c.kv_heads;
    args.head_dim = D;
    args.block_size = block_size;
    args.sliding_window = c.window;
    args.scale = params.scale;
    args.n_splits = c.n_splits;
    args.k_scale = emu_cache.k_scale.empty() ? nullptr : emu_cache.k_scale.data();
    args.v_scale = emu_cache.v_scale.empty() ? nullptr : emu_cache.v_scale.data();
    args.scale_per_token = c.kv == DType::I8;
    std::vector<float> got(q.size(), std::numeric_limits<float>::quiet_NaN());  // poisoned
    std::vector<float> partial_o(size_t(T * c.heads * c.n_splits * D), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> partial_ml(size_t(T * c.heads * c.n_splits * 2), std::numeric_limits<float>::quiet_NaN());
    with_kv(c.kv, [&](auto tag) {
      using KvT = decltype(tag);
      emulation::launch(dim3(unsigned(small_first.size()), unsigned(c.heads), unsigned(c.n_splits)),
                        cuda::kAttentionThreads, cuda::attention_smem_bytes(D), [&] {
                          cuda::attention_kernel<KvT>(q_emu.data(), q_cols, reinterpret_cast<const KvT*>(emu_cache.k.data()),
                                                      reinterpret_cast<const KvT*>(emu_cache.v.data()), args, device,
                                                      partial_o.data(), partial_ml.data(), got.data());
                        });
    });
    if (c.n_splits > 1)
      emulation::launch(dim3(unsigned(T * c.heads)), 128, 0, [&] {
        cuda::attention_combine_kernel(partial_o.data(), partial_ml.data(), c.heads, c.n_splits, D, q_cols, got.data());
      });
    double diff2 = 0, ref2 = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(std::isfinite(got[i])) << "output element " << i << " not written";
      diff2 += (double(got[i]) - expected[i]) * (double(got[i]) - expected[i]);
      ref2 += double(expected[i]) * expected[i];
    }
    EXPECT_LE(std::sqrt(diff2 / ref2), c.max_relative);
  }
  if (c.kv == DType::F8_E4M3) {  // the saturation counts of the one layer
    const std::vector<uint64_t> cpu_counts = cpu->saturation(1, false);
    for (int i = 0; i < kSaturationCounters; ++i) EXPECT_EQ(counters[size_t(i)], cpu_counts[size_t(i)]) << "counter " << i;
  }
}

TEST(KvAttentionKernelsEmulated, RopeKvWriteAndAttentionMatchCpuBackend) {
  const Case cases[] = {
      {4, 2, 64, 0, DType::F32, 1, 1e-5},      {4, 2, 64, 0, DType::BF16, 3, 1e-5},
      {2, 1, 128, 16, DType::F16, 1, 1e-5},   {4, 2, 64, 0, DType::I8, 3, 1e-5},
      {4, 4, 8, 0, DType::F8_E4M3, 2, 1e-5},  {2, 1, 128, 0, DType::F8_E4M3, 1, 1e-5},
  };
  // A prefix written first, then: a prefill chunk, a decode token after a long prefix, a chunk
  // after a short prefix, a decode token at a block boundary.
  for (const Case& c : cases) check(c, {{0, 21}, {80, 1}, {5, 19}, {16, 1}});
}

}  // namespace
}  // namespace llmq
