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
#include "engine/dtype.h"
#include "engine/rng.h"
#include "paged_plan.h"

#include "emulated/cuda_emulation.h"  // before the kernel: it stands in for CUDA
#include "kernels/cuda/attention_mma.cuh"
#include "emulated/device_plan.h"

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
  const std::vector<int32_t> order = test::scattered_blocks(seqs, block_size, rng);
  const int32_t total_blocks = int32_t(order.size());
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
  const BatchPlan plan = test::paged_step(seqs, order, block_size, 1);
  const int64_t T = plan.n_tokens(), q_cols = int64_t(c.heads) * D;
  std::vector<float> q(size_t(T * q_cols));
  for (float& x : q) x = 2.0f * uniform();

  // The CPU backend's attention: the reference.
  // One thread: the library is not built with ThreadSanitizer, which would not see its pool's
  // synchronization (and would report its threads' writes as races with this test's reads).
  std::unique_ptr<Backend> cpu = make_cpu_backend(CpuBackendOptions{1});
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

  // The kernel, over the tiles of up to 128 tokens.
  const test::HostDevicePlan device(plan);
  cuda::AttentionArgs args = test::attention_args(params, block_size, c.kv, k_scale.empty() ? nullptr : k_scale.data(),
                                                  v_scale.empty() ? nullptr : v_scale.data());
  args.tensor_cores = true;
  // The output's 16-bit copy too (the o projection's input): F16 for 16-bit BF16 caches, else BF16.
  std::vector<uint16_t> copy(q.size(), uint16_t(0xffff));  // poisoned
  args.rounded = cuda::RoundedCopy{copy.data(), c.kv != DType::BF16};
  std::vector<float> got(q.size(), std::numeric_limits<float>::quiet_NaN());  // poisoned
  emulation::eager_copies = false;  // cp.async copies land only when waited for
  auto run = [&](auto kv_tag, auto dim) {
    using KvT = typename decltype(kv_tag)::type;
    emulation::launch(dim3(unsigned(device.device.large.n), unsigned(c.heads)), 128,
                      size_t(cuda::attention_mma_smem_bytes(decltype(dim)::value)), [&] {
      cuda::attention_mma_kernel<KvT, decltype(dim)::value>(q.data(), q_cols, reinterpret_cast<const KvT*>(k_bytes.data()),
                                                            reinterpret_cast<const KvT*>(v_bytes.data()), args, device.device,
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
  size_t copies_differ = 0;
  for (size_t i = 0; i < got.size(); ++i)
    copies_differ += copy[i] != (args.rounded.bf16 ? f32_to_bf16(got[i]) : f32_to_f16(got[i]));
  EXPECT_EQ(copies_differ, 0u) << "16-bit copy";
}

TEST(AttentionMmaKernelEmulated, MatchesCpuBackend) {
  // Q, P and (for 8-bit caches) the dequantized K/V are rounded to 16 bits: BF16 keeps 8 bits, F16 11.
  const Case cases[] = {
      {4, 2, 64, 0, DType::BF16, 8e-3},  {2, 1, 128, 0, DType::F16, 2e-3},      {2, 2, 64, 20, DType::F16, 2e-3},
      {4, 2, 64, 0, DType::I8, 4e-3},    {2, 1, 128, 0, DType::F8_E4M3, 4e-3},
  };
  // A prefill from scratch crossing a 128-query tile, a chunk after a cached prefix (one active
  // warp), and a longer one whose warps meet key tiles wholly below their rows (no mask), and tiles
  // that end 1-8 keys past a warp's first row (masked).
  for (const Case& c : cases) check(c, {{0, 140}, {37, 21}, {40, 200}});
}

}  // namespace
}  // namespace llmq
