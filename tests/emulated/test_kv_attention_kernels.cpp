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
#include <tuple>
#include <vector>

#include "engine/backend.h"
#include "engine/dtype.h"
#include "engine/quant.h"
#include "engine/rng.h"
#include "paged_plan.h"

#include "emulated/cuda_emulation.h"  // before the kernels: it stands in for CUDA
#include "kernels/cuda/kernels.cuh"
#include "emulated/device_plan.h"

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

// decode_steps (when given) counts the steps whose attention the decode kernel also computed.
void check(const Case& c, const std::vector<std::pair<int32_t, int32_t>>& seqs, int* decode_steps = nullptr) {
  SCOPED_TRACE(testing::Message() << "heads " << c.heads << "/" << c.kv_heads << " D " << c.head_dim << " window "
                                  << c.window << " kv " << dtype_name(c.kv) << " splits " << c.n_splits);
  const int32_t block_size = 16, D = c.head_dim;
  Rng rng(uint64_t(c.heads * 31 + D * 7 + c.window + int(c.kv) + c.n_splits));
  auto floats = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = float(rng.uniform() * 4.0 - 2.0);
    return v;
  };
  const std::vector<int32_t> order = test::scattered_blocks(seqs, block_size, rng);
  const int32_t total_blocks = int32_t(order.size());
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
  // One thread: the library is not built with ThreadSanitizer, which would not see its pool's
  // synchronization (and would report its threads' writes as races with this test's reads).
  std::unique_ptr<Backend> cpu = make_cpu_backend(CpuBackendOptions{1});
  std::vector<unsigned long long> counters(kSaturationCounters, 0);
  emulation::eager_copies = false;

  for (int phase = 0; phase < 2; ++phase) {
    const BatchPlan plan = test::paged_step(seqs, order, block_size, phase);
    const int64_t T = plan.n_tokens();
    if (T == 0) continue;
    const int64_t q_cols = int64_t(c.heads) * D, kv_cols = int64_t(c.kv_heads) * D;
    std::vector<float> q = floats(size_t(T * q_cols)), k = floats(size_t(T * kv_cols)), v = floats(size_t(T * kv_cols));
    std::vector<float> q_emu = q, k_emu = k;
    cpu->begin_step(plan);
    Tensor qt{q.data(), DType::F32, T, q_cols}, kt{k.data(), DType::F32, T, kv_cols}, vt{v.data(), DType::F32, T, kv_cols};
    Tensor ft{inv_freq.data(), DType::F32, 1, int64_t(inv_freq.size())};
    cpu->rope_kv_write(qt, kt, vt, ft, layer);

    const test::HostDevicePlan device(plan);
    with_kv(c.kv, [&](auto tag) {
      using KvT = decltype(tag);
      emulation::launch(cuda::rope_kv_grid(T, int(q_cols / D), c.kv_heads), cuda::kRopeWarps * 32, 0, [&] {
        cuda::rope_kv_kernel<KvT>(q_emu.data(), q_cols, k_emu.data(), v.data(), kv_cols, inv_freq.data(), D,
                                  c.kv_heads, block_size, reinterpret_cast<KvT*>(emu_cache.k.data()),
                                  reinterpret_cast<KvT*>(emu_cache.v.data()),
                                  emu_cache.k_scale.empty() ? nullptr : emu_cache.k_scale.data(),
                                  emu_cache.v_scale.empty() ? nullptr : emu_cache.v_scale.data(), device.device.positions,
                                  device.device.slots, c.kv == DType::F8_E4M3 ? counters.data() : nullptr, {}, {}, {});
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
    cuda::AttentionArgs args =
        test::attention_args(params, block_size, c.kv, emu_cache.k_scale.empty() ? nullptr : emu_cache.k_scale.data(),
                             emu_cache.v_scale.empty() ? nullptr : emu_cache.v_scale.data());
    args.n_splits = c.n_splits;
    // The output's 16-bit copy (the o projection's input): BF16 from attention_kernel, F16 from
    // the decode kernel, each element the rounding of the fp32 output (poisoned first).
    std::vector<uint16_t> copy(q.size());
    std::fill(copy.begin(), copy.end(), uint16_t(0xffff));
    args.rounded = cuda::RoundedCopy{copy.data(), true};
    std::vector<float> got(q.size(), std::numeric_limits<float>::quiet_NaN());  // poisoned
    std::vector<float> partial_o(size_t(T * c.heads * c.n_splits * D), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> partial_ml(size_t(T * c.heads * c.n_splits * 2), std::numeric_limits<float>::quiet_NaN());
    with_kv(c.kv, [&](auto tag) {
      using KvT = decltype(tag);
      emulation::launch(dim3(unsigned(device.device.small.n), unsigned(c.heads), unsigned(c.n_splits)),
                        cuda::kAttentionThreads, cuda::attention_smem_bytes(D), [&] {
                          cuda::attention_kernel<KvT>(q_emu.data(), q_cols, reinterpret_cast<const KvT*>(emu_cache.k.data()),
                                                      reinterpret_cast<const KvT*>(emu_cache.v.data()), args, device.device,
                                                      partial_o.data(), partial_ml.data(), got.data());
                        });
    });
    auto combine_and_compare = [&](const char* kernel) {
      if (c.n_splits > 1)
        emulation::launch(dim3(unsigned(T * c.heads)), 128, 0, [&] {
          cuda::attention_combine_kernel(partial_o.data(), partial_ml.data(), c.heads, c.n_splits, D, q_cols,
                                         got.data(), args.rounded);
        });
      size_t copies_differ = 0;
      for (size_t i = 0; i < got.size(); ++i)
        copies_differ += copy[i] != (args.rounded.bf16 ? f32_to_bf16(got[i]) : f32_to_f16(got[i]));
      EXPECT_EQ(copies_differ, 0u) << kernel << ": 16-bit copy";
      double diff2 = 0, ref2 = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_TRUE(std::isfinite(got[i])) << kernel << ": output element " << i << " not written";
        diff2 += (double(got[i]) - expected[i]) * (double(got[i]) - expected[i]);
        ref2 += double(expected[i]) * expected[i];
      }
      EXPECT_LE(std::sqrt(diff2 / ref2), c.max_relative) << kernel;
    };
    combine_and_compare("attention_kernel");
    // A decode step (every tile one token): the decode kernel too, on the same cache.
    const bool decode = device.tiles.longest_run == 1 && cuda::attention_decode_fits(D);
    if (!decode) continue;
    std::fill(got.begin(), got.end(), std::numeric_limits<float>::quiet_NaN());
    std::fill(partial_o.begin(), partial_o.end(), std::numeric_limits<float>::quiet_NaN());
    std::fill(partial_ml.begin(), partial_ml.end(), std::numeric_limits<float>::quiet_NaN());
    std::fill(copy.begin(), copy.end(), uint16_t(0xffff));
    args.rounded = cuda::RoundedCopy{copy.data(), false};
    with_kv(c.kv, [&](auto tag) {
      using KvT = decltype(tag);
      auto kernel = D == 64 ? cuda::attention_decode_kernel<KvT, 64> : cuda::attention_decode_kernel<KvT, 128>;
      emulation::launch(dim3(unsigned(device.device.small.n), unsigned(c.heads), unsigned(c.n_splits)),
                        cuda::kDecodeWarps * 32, 0, [&] {
                          kernel(q_emu.data(), q_cols, reinterpret_cast<const KvT*>(emu_cache.k.data()),
                                 reinterpret_cast<const KvT*>(emu_cache.v.data()), args, device.device,
                                 partial_o.data(), partial_ml.data(), got.data());
                        });
    });
    combine_and_compare("attention_decode_kernel");
    if (decode_steps) ++*decode_steps;
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

// Decode steps (one token a sequence) through attention_kernel and attention_decode_kernel: contexts
// of 1 token, a block boundary, a few 8-key rounds of every warp, one past a 64-key split chunk,
// split into 1 and several key ranges (some empty), with a window.
TEST(KvAttentionKernelsEmulated, DecodeKernelMatchesCpuBackend) {
  const Case cases[] = {
      {4, 2, 64, 0, DType::F32, 1, 1e-5},    {4, 2, 64, 0, DType::BF16, 3, 1e-5},  {2, 1, 128, 40, DType::F16, 2, 1e-5},
      {4, 2, 64, 0, DType::I8, 5, 1e-5},     {2, 1, 128, 0, DType::I8, 1, 1e-5},   {2, 1, 128, 0, DType::F8_E4M3, 4, 1e-5},
      {4, 2, 64, 0, DType::BF16, 11, 1e-5},  // more splits than the combine loads at once; some empty
  };
  for (const Case& c : cases) {
    int decode_steps = 0;
    check(c, {{0, 1}, {15, 1}, {100, 1}, {64, 1}, {140, 1}}, &decode_steps);
    EXPECT_EQ(decode_steps, 1);
  }
}

// The epilogues the q, k and v linears leave to rope_kv_kernel (the CUDA backend's
// attention_inputs, where cuBLASLt wrote the sums): applied as the values are read, they give the
// bits of epilogue_kernel's pass followed by the kernel on the final values: q and k written back
// final, the same cache bytes and scales; v left as it was. q: per-channel weight scales and a BF16
// bias; k: a per-tensor scale with FP8-style row scales; v: per-channel scales, row scales and an
// F32 bias.
TEST(KvAttentionKernelsEmulated, RopeKvWriteAppliesDeferredEpilogues) {
  const int32_t heads = 4, kv_heads = 2, D = 64, block_size = 16, T = 5;
  const int64_t q_cols = int64_t(heads) * D, kv_cols = int64_t(kv_heads) * D;
  Rng rng(41);
  auto floats = [&](size_t n, double lo, double hi) {
    std::vector<float> v(n);
    for (float& x : v) x = float(lo + rng.uniform() * (hi - lo));
    return v;
  };
  const std::vector<float> q_sums = floats(size_t(T * q_cols), -300, 300), k_sums = floats(size_t(T * kv_cols), -300, 300),
                           v_sums = floats(size_t(T * kv_cols), -300, 300);
  const std::vector<float> q_w = floats(size_t(q_cols), 1e-3, 2e-2), k_w = floats(1, 1e-3, 2e-2),
                           v_w = floats(size_t(kv_cols), 1e-3, 2e-2), rows = floats(size_t(T), 0.1, 2.0),
                           v_bias = floats(size_t(kv_cols), -1, 1);
  std::vector<cuda::bf16> q_bias(static_cast<size_t>(q_cols));
  for (cuda::bf16& b : q_bias) b = __float2bfloat16_rn(float(rng.uniform() * 2.0 - 1.0));
  const cuda::LinearScales q_s{nullptr, q_w.data(), true, q_bias.data(), DType::BF16},
      k_s{rows.data(), k_w.data(), false, nullptr, DType::F32},
      v_s{rows.data(), v_w.data(), true, v_bias.data(), DType::F32};
  const std::vector<int32_t> positions = {0, 1, 2, 7, 40}, slots = {0, 1, 2, 17, 33};  // three blocks
  std::vector<float> inv_freq(size_t(D / 2));
  for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = float(std::pow(10000.0, -2.0 * double(i) / D));
  emulation::eager_copies = false;

  for (DType kv : {DType::F32, DType::BF16, DType::I8, DType::F8_E4M3}) {
    SCOPED_TRACE(dtype_name(kv));
    const size_t cache_bytes = size_t(3 * kv_heads * block_size * D) * dtype_size(kv);
    const size_t n_scales = kv == DType::I8 ? size_t(3 * kv_heads * block_size) : kv == DType::F8_E4M3 ? 1 : 0;
    struct Run {
      std::vector<float> q, k, v;
      std::vector<uint8_t> k_cache, v_cache;
      std::vector<float> k_scale, v_scale;
      std::vector<unsigned long long> counters;
    } passed, deferred;
    for (Run* r : {&passed, &deferred}) {
      r->q = q_sums;
      r->k = k_sums;
      r->v = v_sums;
      r->k_cache.assign(cache_bytes, 0);
      r->v_cache.assign(cache_bytes, 0);
      r->k_scale.assign(n_scales, kv == DType::F8_E4M3 ? 1.0f / 64 : 0.0f);
      r->v_scale.assign(n_scales, kv == DType::F8_E4M3 ? 1.0f / 16 : 0.0f);
      r->counters.assign(kSaturationCounters, 0);
    }
    // The pass over each output, then the kernel on final values.
    for (auto [out, cols, scales] : {std::tuple{&passed.q, q_cols, q_s}, std::tuple{&passed.k, kv_cols, k_s},
                                     std::tuple{&passed.v, kv_cols, v_s}})
      emulation::launch(dim3(1, unsigned(T)), 256, 0,
                        [&, out = out, cols = cols, scales = scales] { cuda::epilogue_kernel(out->data(), T, cols, cuda::Epilogue{scales}); });
    with_kv(kv, [&](auto tag) {
      using KvT = decltype(tag);
      for (Run* r : {&passed, &deferred}) {
        const bool defer = r == &deferred;
        emulation::launch(cuda::rope_kv_grid(T, heads, kv_heads), cuda::kRopeWarps * 32, 0, [&] {
          cuda::rope_kv_kernel<KvT>(r->q.data(), q_cols, r->k.data(), r->v.data(), kv_cols, inv_freq.data(), D,
                                    kv_heads, block_size, reinterpret_cast<KvT*>(r->k_cache.data()),
                                    reinterpret_cast<KvT*>(r->v_cache.data()), n_scales ? r->k_scale.data() : nullptr,
                                    n_scales ? r->v_scale.data() : nullptr, positions.data(), slots.data(),
                                    kv == DType::F8_E4M3 ? r->counters.data() : nullptr,
                                    defer ? cuda::Epilogue{q_s} : cuda::Epilogue{}, defer ? cuda::Epilogue{k_s} : cuda::Epilogue{},
                                    defer ? cuda::Epilogue{v_s} : cuda::Epilogue{});
        });
      }
    });
    EXPECT_EQ(std::memcmp(deferred.q.data(), passed.q.data(), q_sums.size() * 4), 0) << "q";
    EXPECT_EQ(std::memcmp(deferred.k.data(), passed.k.data(), k_sums.size() * 4), 0) << "k";
    EXPECT_EQ(std::memcmp(deferred.v.data(), v_sums.data(), v_sums.size() * 4), 0) << "v is left as it was";
    EXPECT_NE(passed.v, v_sums);  // the scales did change the values
    EXPECT_EQ(deferred.k_cache, passed.k_cache);
    EXPECT_EQ(deferred.v_cache, passed.v_cache);
    EXPECT_EQ(std::memcmp(deferred.k_scale.data(), passed.k_scale.data(), n_scales * 4), 0);
    EXPECT_EQ(std::memcmp(deferred.v_scale.data(), passed.v_scale.data(), n_scales * 4), 0);
    EXPECT_EQ(deferred.counters, passed.counters);
  }
}

}  // namespace
}  // namespace llmq
