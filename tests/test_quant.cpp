// Weight and activation quantization (engine/quant.h) and the CPU backend's quantized linear,
// against independent float64 computations of the formats' definitions.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "engine/backend.h"
#include "engine/engine.h"
#include "engine/synth.h"
#include "engine/dtype.h"
#include "engine/fp8.h"
#include "engine/quant.h"
#include "engine/rng.h"
#include "test_util.h"

namespace llmq {
namespace {

std::vector<uint16_t> random_bf16(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng rng(seed);
  std::vector<uint16_t> v(n);
  for (auto& b : v) b = f32_to_bf16(float((rng.uniform() * 2.0 - 1.0) * scale));
  return v;
}

TEST(Quant, Int8PerChannelMatchesDefinition) {
  const int64_t N = 7, K = 37;
  std::vector<uint16_t> w = random_bf16(size_t(N * K), 1, 3.0f);
  for (int64_t k = 0; k < K; ++k) w[size_t(2 * K + k)] = 0;  // an all-zero row
  QuantizedWeight q = quantize_weight(Tensor{w.data(), DType::BF16, N, K}, QuantMode::Int8WeightOnly, 2);
  ASSERT_EQ(q.dtype, DType::I8);
  ASSERT_EQ(q.scale.size(), size_t(N));
  for (int64_t n = 0; n < N; ++n) {
    double amax = 0;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(double(bf16_to_f32(w[size_t(n * K + k)]))));
    EXPECT_FLOAT_EQ(q.scale[size_t(n)], float(amax / 127.0)) << n;
    for (int64_t k = 0; k < K; ++k) {
      const int code = int8_t(q.data[size_t(n * K + k)]);
      const double exact = amax > 0 ? double(bf16_to_f32(w[size_t(n * K + k)])) * 127.0 / amax : 0.0;
      EXPECT_LE(std::fabs(code - exact), 0.5 + 1e-5) << n << "," << k;
      EXPECT_LE(std::abs(code), 127);
    }
  }
  EXPECT_EQ(q.scale[2], 0.0f);
}

TEST(Quant, Fp8PerTensorMatchesDefinition) {
  const int64_t N = 5, K = 64;
  std::vector<uint16_t> w = random_bf16(size_t(N * K), 2, 0.05f);
  QuantizedWeight q = quantize_weight(Tensor{w.data(), DType::BF16, N, K}, QuantMode::Fp8, 2);
  ASSERT_EQ(q.dtype, DType::F8_E4M3);
  ASSERT_EQ(q.scale.size(), 1u);
  float amax = 0;
  for (uint16_t b : w) amax = std::max(amax, std::fabs(bf16_to_f32(b)));
  EXPECT_EQ(q.scale[0], amax / 448.0f);
  bool saw_max = false;
  for (size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(q.data[i], f32_to_fp8_e4m3(bf16_to_f32(w[i]) * (448.0f / amax))) << i;
    saw_max |= (q.data[i] & 0x7f) == 0x7e;  // +-448
  }
  EXPECT_TRUE(saw_max);
}

TEST(Quant, RowFp8ScaleAndZeroRow) {
  std::vector<float> x = {0.5f, -2.0f, 0.001f, 1.0f}, out(4);
  EXPECT_EQ(quantize_row_fp8(x.data(), 4, out.data()), 2.0f / 448.0f);
  EXPECT_EQ(out[1], -448.0f);
  EXPECT_EQ(out[0], 112.0f);
  std::vector<float> zeros(3, 0.0f), zout(3, 1.0f);
  EXPECT_EQ(quantize_row_fp8(zeros.data(), 3, zout.data()), 0.0f);
  EXPECT_EQ(zout, std::vector<float>(3, 0.0f));
}

// out[m, n] by the definitions in engine/quant.h, in float64.
std::vector<double> reference_linear(const std::vector<float>& x, int64_t M, int64_t K, const QuantizedWeight& q,
                                     QuantMode mode) {
  const int64_t N = q.rows;
  std::vector<double> out(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m) {
    double x_scale = 1.0;
    std::vector<double> xq(static_cast<size_t>(K));
    if (mode == QuantMode::Fp8) {
      float amax = 0;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[size_t(m * K + k)]));
      x_scale = double(amax / 448.0f);
      for (int64_t k = 0; k < K; ++k)
        xq[size_t(k)] = fp8_e4m3_to_f32(f32_to_fp8_e4m3(x[size_t(m * K + k)] * (448.0f / amax)));
    } else {
      for (int64_t k = 0; k < K; ++k) xq[size_t(k)] = bf16_to_f32(f32_to_bf16(x[size_t(m * K + k)]));
    }
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t code = q.data[size_t(n * K + k)];
        acc += xq[size_t(k)] * (mode == QuantMode::Fp8 ? double(fp8_e4m3_to_f32(code)) : double(int8_t(code)));
      }
      out[size_t(m * N + n)] = acc * x_scale * double(q.scale[q.scale.size() == 1 ? 0 : size_t(n)]);
    }
  }
  return out;
}

TEST(Quant, CpuLinearMatchesDefinition) {
  auto backend = make_cpu_backend(CpuBackendOptions{2});
  for (QuantMode mode : {QuantMode::Int8WeightOnly, QuantMode::Fp8})
    for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 19, 733}, {7, 64, 64}, {33, 17, 100}}) {
      std::vector<uint16_t> w = random_bf16(size_t(N * K), uint64_t(M + N + K));
      QuantizedWeight q = quantize_weight(Tensor{w.data(), DType::BF16, N, K}, mode, 1);
      Rng rng(uint64_t(M * K));
      std::vector<float> x(static_cast<size_t>(M * K)), out(static_cast<size_t>(M * N), std::nanf(""));
      for (float& v : x) v = float(rng.uniform() * 8.0 - 4.0);
      Tensor xt{x.data(), DType::F32, M, K}, ot{out.data(), DType::F32, M, N};
      backend->linear(xt, q.view(DType::BF16), nullptr, ot);
      const std::vector<double> ref = reference_linear(x, M, K, q, mode);
      double err2 = 0, ref2 = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        ASSERT_TRUE(std::isfinite(out[i])) << i;
        err2 += (out[i] - ref[i]) * (out[i] - ref[i]);
        ref2 += ref[i] * ref[i];
      }
      // The products are exact in fp32; what remains is fp32 accumulation.
      EXPECT_LE(std::sqrt(err2 / ref2), 1e-6) << quant_mode_name(mode) << " M=" << M << " N=" << N << " K=" << K;
    }
}

}  // namespace
}  // namespace llmq

namespace llmq {
namespace {

// ---- 8-bit KV caches ---------------------------------------------------------------------------

// The CPU backend writes INT8 codes with a per-token, per-head scale, and FP8 codes with the
// layer's scale, as KvLayer (engine/backend.h) defines.
TEST(QuantKv, WrittenCodesMatchDefinition) {
  auto backend = make_cpu_backend(CpuBackendOptions{1});
  const int32_t Hq = 2, Hkv = 2, D = 16, bs = 4, blocks = 2;
  BatchPlan plan;
  plan.clear();
  for (int32_t t = 0; t < 3; ++t) {
    plan.tokens.push_back(0);
    plan.positions.push_back(t);
    plan.token_seq.push_back(0);
    plan.slots.push_back(4 + t);  // block 1
  }
  plan.block_ids = {1};
  plan.block_offsets.push_back(1);
  std::vector<float> inv_freq(D / 2, 0.0f);  // no rotation: the written rows are k and v as given
  for (DType dtype : {DType::I8, DType::F8_E4M3}) {
    Rng rng{uint64_t(dtype)};
    std::vector<float> q(3 * Hq * D), k(3 * Hkv * D), v(3 * Hkv * D);
    for (auto* a : {&q, &k, &v})
      for (float& x : *a) x = float(rng.uniform() * 6.0 - 3.0);
    std::vector<uint8_t> kc(size_t(blocks * Hkv * bs * D)), vc(kc.size());
    std::vector<float> ks(size_t(blocks * Hkv * bs), -1.0f), vs(ks.size(), -1.0f);
    float layer_k = 0.01f, layer_v = 0.02f;
    KvLayer layer;
    layer.k = Tensor{kc.data(), dtype, blocks, Hkv * bs * D};
    layer.v = Tensor{vc.data(), dtype, blocks, Hkv * bs * D};
    layer.k_scale = dtype == DType::I8 ? Tensor{ks.data(), DType::F32, blocks, Hkv * bs} : Tensor{&layer_k, DType::F32, 1, 1};
    layer.v_scale = dtype == DType::I8 ? Tensor{vs.data(), DType::F32, blocks, Hkv * bs} : Tensor{&layer_v, DType::F32, 1, 1};
    layer.block_size = bs;
    layer.num_kv_heads = Hkv;
    layer.head_dim = D;
    backend->begin_step(plan);
    Tensor qt{q.data(), DType::F32, 3, Hq * D}, kt{k.data(), DType::F32, 3, Hkv * D}, vt{v.data(), DType::F32, 3, Hkv * D};
    Tensor ft{inv_freq.data(), DType::F32, 1, D / 2};
    backend->rope_kv_write(qt, kt, vt, ft, layer);
    for (int32_t t = 0; t < 3; ++t)
      for (int32_t h = 0; h < Hkv; ++h) {
        const int64_t head = (1 * Hkv + h) * bs + t;  // block 1, offset t
        for (int which = 0; which < 2; ++which) {
          const float* src = (which ? v : k).data() + (t * Hkv + h) * D;
          const uint8_t* codes = (which ? vc : kc).data() + head * D;
          if (dtype == DType::I8) {
            float amax = 0;
            for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(src[d]));
            EXPECT_EQ((which ? vs : ks)[size_t(head)], amax / 127.0f);
            for (int d = 0; d < D; ++d)
              EXPECT_EQ(int8_t(codes[d]), int8_t(std::nearbyint(src[d] * (127.0f / amax)))) << t << h << d;
          } else {
            const float inv = 1.0f / (which ? layer_v : layer_k);
            for (int d = 0; d < D; ++d) EXPECT_EQ(codes[d], f32_to_fp8_e4m3(src[d] * inv)) << t << h << d;
          }
        }
      }
    // Attention reads code * scale: one query over the three tokens, against float64.
    std::vector<float> out(size_t(3 * Hq * D), std::nanf(""));
    Tensor ot{out.data(), DType::F32, 3, Hq * D};
    AttentionParams params{Hq, Hkv, D, 0.25f, 0};
    backend->attention(qt, layer, params, ot);
    for (int32_t h = 0; h < Hq; ++h) {  // the last token attends to all three
      const int32_t kvh = h / (Hq / Hkv);
      std::vector<double> scores(3);
      double mx = -1e300, sum = 0;
      auto value = [&](bool is_v, int32_t t, int d) {
        const int64_t head = (1 * Hkv + kvh) * bs + t;
        const uint8_t code = (is_v ? vc : kc)[size_t(head * D + d)];
        const double scale = dtype == DType::I8 ? (is_v ? vs : ks)[size_t(head)] : (is_v ? layer_v : layer_k);
        return (dtype == DType::I8 ? double(int8_t(code)) : double(fp8_e4m3_to_f32(code))) * scale;
      };
      for (int32_t t = 0; t < 3; ++t) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += double(q[size_t((2 * Hq + h) * D + d)]) * value(false, t, d);
        scores[size_t(t)] = dot * 0.25;
        mx = std::max(mx, scores[size_t(t)]);
      }
      for (double& sc : scores) sum += (sc = std::exp(sc - mx));
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int32_t t = 0; t < 3; ++t) o += scores[size_t(t)] / sum * value(true, t, d);
        EXPECT_NEAR(out[size_t((2 * Hq + h) * D + d)], o, 1e-5 * (1 + std::fabs(o))) << dtype_name(dtype) << h << d;
      }
    }
  }
}

}  // namespace
}  // namespace llmq

namespace llmq {
namespace {

// A fixed KV budget holds twice the tokens with an 8-bit cache: exactly with FP8 (per-layer
// scales), and within the per-token scales' share with INT8 (4 bytes per 128-dim head row).
TEST(QuantKv, CapacityDoublesAgainst16Bit) {
  test::TempDir dir;
  SynthSpec spec;
  spec.hidden_size = 256;
  spec.num_heads = 2;  // head_dim 128, as Llama
  spec.num_kv_heads = 2;
  spec.intermediate_size = 64;
  spec.num_layers = 2;
  spec.vocab_size = 64;
  spec.threads = 1;
  write_synthetic_model(dir.path(), spec);
  auto model = Model::load(dir.path());
  auto capacity = [&](llmq_kv_dtype kv) {
    EngineOptions o;
    o.n_threads = 1;
    o.kv_dtype = kv;
    o.kv_cache_bytes = uint64_t(64) << 20;
    Engine engine(model, o);
    return int64_t(engine.allocator().num_blocks()) * engine.block_size();
  };
  const int64_t bf16 = capacity(LLMQ_KV_DTYPE_BF16), int8 = capacity(LLMQ_KV_DTYPE_INT8),
                fp8 = capacity(LLMQ_KV_DTYPE_FP8);
  EXPECT_EQ(bf16, (int64_t(64) << 20) / (2 * 2 * 2 * 128 * 2) / 16 * 16);
  EXPECT_EQ(fp8, 2 * bf16);
  EXPECT_GE(double(int8), 1.9 * double(bf16));
  EXPECT_EQ(kv_bytes_per_token(model->config(), DType::I8), uint64_t(2 * 2 * 2 * (128 + 4)));
}

}  // namespace
}  // namespace llmq

namespace llmq {
namespace {

// lm_head stays as loaded unless asked for; quantized, it shrinks and stays close.
TEST(Quant, LmHeadIsQuantizedOnlyWhenAsked) {
  auto model = Model::load(test::stories_dir());
  const std::vector<int32_t> ids = {1, 403, 407, 261, 378, 261, 429, 261, 266, 443};
  auto run = [&](bool lm_head, uint64_t* bytes) {
    EngineOptions o;
    o.n_threads = 2;
    o.quant = QuantMode::Int8WeightOnly;
    o.quantize_lm_head = lm_head;
    Engine engine(model, o);
    *bytes = engine.weight_bytes();
    std::vector<float> logits(ids.size() * 512);
    engine.score(ids, logits.data());
    return logits;
  };
  uint64_t kept = 0, quantized = 0;
  const std::vector<float> a = run(false, &kept), b = run(true, &quantized);
  // The tied embedding stays F32 ([512, 64]); the quantized lm_head adds INT8 codes and 512 scales.
  EXPECT_EQ(quantized, kept + 512 * 64 + 512 * 4);
  EXPECT_NE(a, b);
  double diff2 = 0, ref2 = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff2 += double(b[i] - a[i]) * (b[i] - a[i]);
    ref2 += double(a[i]) * a[i];
  }
  EXPECT_LT(std::sqrt(diff2 / ref2), 0.01);
}

}  // namespace
}  // namespace llmq
