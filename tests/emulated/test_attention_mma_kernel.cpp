// The tensor-core attention kernel (kernels/cuda/attention_mma.cuh) run on the CPU through
// tests/emulated/cuda_emulation.h, against the CPU backend's attention over the same paged cache:
// 16-bit caches (V read with ldmatrix.trans), INT8 and FP8 caches (dequantized to F16 while
// loading), head_dim 64 and 128, GQA, a sliding window, runs of query tokens split into tiles.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "engine/backend.h"
#include "engine/rng.h"

#include "emulated/cuda_emulation.h"  // before the kernel: it stands in for CUDA
#include "kernels/cuda/attention_mma.cuh"

namespace llmq {
namespace {

struct Case {
  int32_t heads, kv_heads, head_dim, window;
  DType kv;
  double max_relative;  // of the whole output (root of the summed squares)
};

// Sequences as (cached tokens, new tokens): the new tokens are the step's queries.
void check(const Case& c, const std::vector<std::pair<int32_t, int32_t>>& seqs) {
  SCOPED_TRACE(testing::Message() << "heads " << c.heads << "/" << c.kv_heads << " D " << c.head_dim << " window "
                                  << c.window << " kv " << dtype_name(c.kv));
  const int32_t block_size = 16, D = c.head_dim;
  Rng rng(uint64_t(c.heads * 131 + D + c.window + int(c.kv)));
  auto uniform = [&] { return float(rng.uniform() * 2.0 - 1.0); };

  // The cache: every sequence's blocks scattered over it, every element random.
  int32_t total_blocks = 0;
  for (auto [cached, fresh] : seqs) total_blocks += (cached + fresh + block_size - 1) / block_size;
  std::vector<int32_t> order(static_cast<size_t>(total_blocks));
  std::iota(order.begin(), order.end(), 0);
  for (int32_t i = total_blocks - 1; i > 0; --i) std::swap(order[size_t(i)], order[rng.next() % uint64_t(i + 1)]);
  const int64_t per_block = int64_t(c.kv_heads) * block_size * D;
  const size_t elements = size_t(total_blocks * per_block);
  std::vector<uint8_t> k_bytes(elements * dtype_size(c.kv)), v_bytes(k_bytes.size());
  std::vector<float> k_scale, v_scale;
  for (std::vector<uint8_t>* bytes : {&k_bytes, &v_bytes})
    for (size_t i = 0; i < elements; ++i) {
      if (c.kv == DType::BF16 || c.kv == DType::F16) {
        uint16_t u;
        if (c.kv == DType::BF16) {
          const __nv_bfloat16 b = __float2bfloat16_rn(uniform());
          std::memcpy(&u, &b, 2);
        } else {
          const __half h = __float2half_rn(uniform());
          std::memcpy(&u, &h, 2);
        }
        std::memcpy(&(*bytes)[2 * i], &u, 2);
      } else if (c.kv == DType::I8) {
        (*bytes)[i] = uint8_t(int8_t(int(rng.next() % 255) - 127));
      } else {  // E4M3 codes of values in [-2, 2]
        (*bytes)[i] = __nv_cvt_float_to_fp8(2.0f * uniform(), __NV_SATFINITE, __NV_E4M3);
      }
    }
  if (c.kv == DType::I8) {  // per token and head
    for (std::vector<float>* s : {&k_scale, &v_scale}) {
      s->resize(size_t(total_blocks) * size_t(c.kv_heads * block_size));
      for (float& x : *s) x = 0.004f + 0.004f * (uniform() + 1.0f);
    }
  } else if (c.kv == DType::F8_E4M3) {  // per layer
    k_scale = {0.37f};
    v_scale = {0.61f};
  }

  // The step: every sequence's new tokens.
  BatchPlan plan;
  plan.clear();
  int32_t first_block = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto [cached, fresh] = seqs[s];
    for (int32_t p = cached; p < cached + fresh; ++p) {
      plan.tokens.push_back(0);
      plan.positions.push_back(p);
      plan.token_seq.push_back(int32_t(s));
      plan.slots.push_back(order[size_t(first_block + p / block_size)] * block_size + p % block_size);
    }
    const int32_t blocks = (cached + fresh + block_size - 1) / block_size;
    for (int32_t b = 0; b < blocks; ++b) plan.block_ids.push_back(order[size_t(first_block + b)]);
    plan.block_offsets.push_back(int32_t(plan.block_ids.size()));
    first_block += blocks;
  }
  const int64_t T = plan.n_tokens(), q_cols = int64_t(c.heads) * D;
  std::vector<float> q(size_t(T * q_cols));
  for (float& x : q) x = 2.0f * uniform();

  // The CPU backend's attention: the reference.
  std::unique_ptr<Backend> cpu = make_cpu_backend(CpuBackendOptions{2});
  KvLayer layer;
  layer.k = Tensor{k_bytes.data(), c.kv, total_blocks, per_block};
  layer.v = Tensor{v_bytes.data(), c.kv, total_blocks, per_block};
  if (!k_scale.empty()) {
    const int64_t cols = c.kv == DType::I8 ? int64_t(c.kv_heads) * block_size : 1;
    layer.k_scale = Tensor{k_scale.data(), DType::F32, int64_t(k_scale.size()) / cols, cols};
    layer.v_scale = Tensor{v_scale.data(), DType::F32, int64_t(v_scale.size()) / cols, cols};
  }
  layer.block_size = block_size;
  layer.num_kv_heads = c.kv_heads;
  layer.head_dim = D;
  const AttentionParams params{c.heads, c.kv_heads, D, float(1.0 / std::sqrt(double(D))), c.window};
  std::vector<float> expected(q.size());
  cpu->begin_step(plan);
  Tensor q_tensor{q.data(), DType::F32, T, q_cols}, expected_tensor{expected.data(), DType::F32, T, q_cols};
  cpu->attention(q_tensor, layer, params, expected_tensor);

  // The kernel: query tiles of up to 64 consecutive tokens of one sequence, as the CUDA backend makes them.
  std::vector<int32_t> tile_first, tile_count;
  for (int32_t t = 0; t < T; ++t) {
    const bool continues = t > 0 && plan.token_seq[size_t(t)] == plan.token_seq[size_t(t - 1)] &&
                           plan.positions[size_t(t)] == plan.positions[size_t(t - 1)] + 1;
    if (continues && tile_count.back() < cuda::kAttentionTileQLarge) {
      ++tile_count.back();
    } else {
      tile_first.push_back(t);
      tile_count.push_back(1);
    }
  }
  cuda::DevicePlan device;
  device.tokens = plan.tokens.data();
  device.positions = plan.positions.data();
  device.token_seq = plan.token_seq.data();
  device.slots = plan.slots.data();
  device.block_offsets = plan.block_offsets.data();
  device.block_ids = plan.block_ids.data();
  device.large = cuda::Tiles{tile_first.data(), tile_count.data(), int32_t(tile_first.size())};
  cuda::AttentionArgs args;
  args.num_heads = c.heads;
  args.num_kv_heads = c.kv_heads;
  args.head_dim = D;
  args.block_size = block_size;
  args.sliding_window = c.window;
  args.scale = params.scale;
  args.tensor_cores = true;
  args.k_scale = k_scale.empty() ? nullptr : k_scale.data();
  args.v_scale = v_scale.empty() ? nullptr : v_scale.data();
  args.scale_per_token = c.kv == DType::I8;
  std::vector<float> got(q.size(), std::numeric_limits<float>::quiet_NaN());  // poisoned
  emulation::eager_copies = false;  // cp.async copies land only when waited for
  auto run = [&](auto kv_tag, auto dim) {
    using KvT = typename decltype(kv_tag)::type;
    emulation::launch(dim3(unsigned(tile_first.size()), unsigned(c.heads)), 128,
                      size_t(cuda::attention_mma_smem_bytes(decltype(dim)::value)), [&] {
      cuda::attention_mma_kernel<KvT, decltype(dim)::value>(q.data(), q_cols, reinterpret_cast<const KvT*>(k_bytes.data()),
                                                            reinterpret_cast<const KvT*>(v_bytes.data()), args, device,
                                                            got.data());
    });
  };
  auto run_dim = [&](auto kv_tag) {
    if (D == 64)
      run(kv_tag, std::integral_constant<int, 64>{});
    else
      run(kv_tag, std::integral_constant<int, 128>{});
  };
  switch (c.kv) {
    case DType::BF16:
      run_dim(std::common_type<cuda::bf16>{});
      break;
    case DType::F16:
      run_dim(std::common_type<cuda::f16>{});
      break;
    case DType::I8:
      run_dim(std::common_type<int8_t>{});
      break;
    default:
      run_dim(std::common_type<cuda::fp8>{});
  }

  double diff2 = 0, ref2 = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << "element " << i << " not written";
    diff2 += (double(got[i]) - expected[i]) * (double(got[i]) - expected[i]);
    ref2 += double(expected[i]) * expected[i];
  }
  EXPECT_LE(std::sqrt(diff2 / ref2), c.max_relative);
}

TEST(AttentionMmaKernelEmulated, MatchesCpuBackend) {
  // Q, P and (for 8-bit caches) the dequantized K/V are rounded to 16 bits: BF16 keeps 8 bits, F16 11.
  const Case cases[] = {
      {4, 2, 64, 0, DType::BF16, 8e-3},  {2, 1, 128, 0, DType::F16, 2e-3},      {2, 2, 64, 20, DType::F16, 2e-3},
      {4, 2, 64, 0, DType::I8, 4e-3},    {2, 1, 128, 0, DType::F8_E4M3, 4e-3},
  };
  // A prefill from scratch crossing a 64-query tile, and a chunk after a cached prefix.
  for (const Case& c : cases) check(c, {{0, 70}, {37, 21}});
}

}  // namespace
}  // namespace llmq
