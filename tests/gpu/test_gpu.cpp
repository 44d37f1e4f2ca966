// The CUDA backend against the CPU backend (ctest label "gpu"). Every test skips, saying why, on a
// machine without a usable GPU.
//
// Kernel tests run each op on both backends with the same fresh random inputs at odd sizes, the
// GPU output poisoned with NaN beforehand (an element left unwritten fails), and compare with a
// stated tolerance: the relative error of the whole output (L2 norm of the difference over the L2
// norm of the CPU result) and the largest absolute difference.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "engine/backend.h"
#include "engine/communicator.h"
#include "engine/device.h"
#include "engine/engine.h"
#include "engine/error.h"
#include "engine/fp8.h"
#include "engine/quant.h"
#include "engine/rng.h"
#include "greedy_check.h"
#include "paged_plan.h"
#include "sampling_cases.h"
#include "test_util.h"

#ifdef LLMQ_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_kernels.h"
#endif

namespace llmq {
namespace {

#define REQUIRE_GPU()                                                  \
  do {                                                                 \
    std::string why_;                                                  \
    if (cuda_device_count(&why_) == 0) GTEST_SKIP() << "no GPU: " << why_; \
  } while (0)

struct Tolerance {
  double rel;      // of the whole output
  double max_abs;  // of any element
};

void expect_close(const std::vector<float>& ref, const std::vector<float>& got, Tolerance tol, const std::string& what) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  double diff2 = 0, ref2 = 0, max_abs = 0;
  size_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++bad;
      continue;
    }
    const double d = double(got[i]) - double(ref[i]);
    diff2 += d * d;
    ref2 += double(ref[i]) * double(ref[i]);
    max_abs = std::max(max_abs, std::fabs(d));
  }
  EXPECT_EQ(bad, 0u) << what << ": elements not finite (unwritten or overflowed)";
  const double rel = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
  EXPECT_LE(rel, tol.rel) << what;
  EXPECT_LE(max_abs, tol.max_abs) << what;
}

class Random {
 public:
  explicit Random(uint64_t seed) : rng_(seed) {}
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(rng_.uniform()); }
  std::vector<float> floats(size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::vector<float> v(n);
    for (float& f : v) f = uniform(lo, hi);
    return v;
  }
  int32_t below(int32_t n) { return int32_t(rng_.next() % uint64_t(n)); }

 private:
  Rng rng_;
};

// Host bytes of `values` stored as `dtype` (F32, F16 or BF16).
std::vector<uint8_t> encode(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> bytes(values.size() * dtype_size(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::F32) {
      std::memcpy(&bytes[i * 4], &values[i], 4);
    } else {
      uint16_t h = dtype == DType::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
      std::memcpy(&bytes[i * 2], &h, 2);
    }
  }
  return bytes;
}

// The same op on both backends. Host arrays are kept alive here; the CPU backend uses them in place.
class BackendPair : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (cuda_device_count(&why) == 0) GTEST_SKIP() << "no GPU: " << why;
    cpu_ = make_cpu_backend(CpuBackendOptions{0});  // a thread per core: the large reference GEMMs
    gpu_ = make_cuda_backend(CudaBackendOptions{});
  }

  struct Both {
    Tensor cpu, gpu;
  };

  Both tensor(std::vector<uint8_t> bytes, DType dtype, int64_t rows, int64_t cols) {
    host_.push_back(std::move(bytes));
    Tensor h{host_.back().data(), dtype, rows, cols};
    return Both{cpu_->upload(h), gpu_->upload(h)};
  }
  Both floats(const std::vector<float>& v, int64_t rows, int64_t cols, DType dtype = DType::F32) {
    return tensor(encode(v, dtype), dtype, rows, cols);
  }
  // An F32 output: zeros on the CPU, NaN on the GPU (poisoned).
  Both output(int64_t rows, int64_t cols) {
    Both o = floats(std::vector<float>(size_t(rows * cols), 0.0f), rows, cols);
    o.gpu = gpu_->upload(Tensor{nan_host(rows * cols), DType::F32, rows, cols});
    return o;
  }
  float* nan_host(int64_t n) {
    std::vector<float> nan(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN());
    host_.push_back(std::vector<uint8_t>(reinterpret_cast<uint8_t*>(nan.data()),
                                         reinterpret_cast<uint8_t*>(nan.data() + n)));
    return reinterpret_cast<float*>(host_.back().data());
  }
  std::vector<float> read(Backend& b, const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    b.to_host(t, v.data());
    return v;
  }
  void begin(const BatchPlan& plan) {
    cpu_->begin_step(plan);
    gpu_->begin_step(plan);
  }

  std::unique_ptr<Backend> cpu_, gpu_;
  std::vector<std::vector<uint8_t>> host_;
};

// ---- Linear -------------------------------------------------------------------------------------

struct LinearCase {
  DType dtype;           // weights as loaded
  QuantMode quant;
  Tolerance tol;
};

struct LinearOptions {
  bool bias = false;
  DType bias_dtype = DType::BF16;
  DType act_dtype = DType::BF16;  // int8wo: the 16-bit type of the activations
  bool per_tensor = false;        // int8wo: one scale for the whole weight (the first row's)
  bool twice = false;             // run the GPU op a second time: the same bits (split-K leaves its counters reset)
};

class GpuLinear : public BackendPair {
 protected:
  void check(const LinearCase& c, int64_t M, int64_t N, int64_t K, const LinearOptions& o) {
    Random rnd(uint64_t(M * 1000003 + N * 1009 + K));
    const std::string what =
        fmt::format("{} {} M={} N={} K={}{}{}{}", dtype_name(c.dtype), quant_mode_name(c.quant), M, N, K,
                    c.quant == QuantMode::Int8WeightOnly ? fmt::format(" act={}", dtype_name(o.act_dtype)) : "",
                    o.per_tensor ? " per-tensor" : "", o.bias ? fmt::format(" bias={}", dtype_name(o.bias_dtype)) : "");
    Both x = floats(rnd.floats(size_t(M * K)), M, K);
    std::vector<uint8_t> w_bytes = encode(rnd.floats(size_t(N * K)), c.dtype);
    Tensor w_host{w_bytes.data(), c.dtype, N, K};
    LinearWeight w_cpu, w_gpu;
    if (c.quant == QuantMode::None) {
      Both w = tensor(w_bytes, c.dtype, N, K);
      w_cpu.w = w.cpu;
      w_gpu.w = w.gpu;
    } else {
      quantized_.push_back(quantize_weight(w_host, c.quant, 2));
      if (o.per_tensor) quantized_.back().scale.resize(1);
      w_cpu = quantized_.back().view(c.quant == QuantMode::Int8WeightOnly ? o.act_dtype : DType::BF16);
      w_gpu = w_cpu;
      w_gpu.w = gpu_->upload(w_cpu.w);
      w_gpu.scale = gpu_->upload(w_cpu.scale);
    }
    Both bias = floats(rnd.floats(size_t(N)), 1, N, o.bias_dtype);
    Both out = output(M, N);
    cpu_->linear(x.cpu, w_cpu, o.bias ? &bias.cpu : nullptr, out.cpu);
    gpu_->linear(x.gpu, w_gpu, o.bias ? &bias.gpu : nullptr, out.gpu);
    const std::vector<float> got = read(*gpu_, out.gpu);
    expect_close(read(*cpu_, out.cpu), got, c.tol, what);
    if (o.twice) {
      gpu_->linear(x.gpu, w_gpu, o.bias ? &bias.gpu : nullptr, out.gpu);
      EXPECT_EQ(0, std::memcmp(got.data(), read(*gpu_, out.gpu).data(), got.size() * sizeof(float)))
          << what << ": a second run differs";
    }
    quantized_.clear();  // the CPU backend reads them in place until here
  }
  std::vector<QuantizedWeight> quantized_;
};

// Tolerances: F32 differs only in summation order. BF16/F16 weights: the GPU rounds activations to
// the weight type for the tensor cores while the CPU keeps them fp32 (2^-9 / 2^-12 relative per
// product). int8wo: both round activations to the 16-bit type and the products are exact, so only
// the summation differs; the tensor cores add in fp32 truncating (a model that truncates to fp32
// after every 16 products gives 1.7e-6 relative at K = 4096 and 5.7e-6 at K = 11008 on these
// inputs, hence 1e-5). fp8: the same codes on both; Hopper's FP8 tensor cores add in a narrower
// accumulator between promotions, hence the looser bound.
const Tolerance kInt8Tolerance{1e-5, 5e-3};
const LinearCase kLinearCases[] = {
    {DType::F32, QuantMode::None, {2e-6, 2e-3}},
    {DType::BF16, QuantMode::None, {8e-3, 0.2}},
    {DType::F16, QuantMode::None, {1e-3, 0.03}},
    {DType::BF16, QuantMode::Int8WeightOnly, kInt8Tolerance},
    {DType::BF16, QuantMode::Fp8, {5e-4, 0.05}},
};

// FP8 activations with a static scale small enough to clip: the same outputs, and the same
// saturation counts, on both backends (the inputs are the same bits, so the same values clip).
// With the per-tensor weight scale, cuBLASLt applies both scales itself (A/B scale pointers).
TEST_F(GpuLinear, StaticFp8ScaleClipsAndCountsAlike) {
  Random rnd(5);
  const int64_t M = 19, N = 64, K = 128;
  Both x = floats(rnd.floats(size_t(M * K), -2, 2), M, K);
  std::vector<uint8_t> w_bytes = encode(rnd.floats(size_t(N * K)), DType::BF16);
  quantized_.push_back(quantize_weight(Tensor{w_bytes.data(), DType::BF16, N, K}, QuantMode::Fp8, 2));
  LinearWeight w_cpu = quantized_.back().view(DType::BF16), w_gpu = w_cpu;
  Both input_scale = floats({1.0f / 448.0f}, 1, 1);  // |x| > 1 clips
  w_cpu.input_scale = input_scale.cpu;
  w_cpu.layer = w_gpu.layer = 0;
  w_gpu.w = gpu_->upload(w_cpu.w);
  w_gpu.scale = gpu_->upload(w_cpu.scale);
  w_gpu.input_scale = input_scale.gpu;
  for (int64_t rows : {M, int64_t(5)}) {  // cuBLASLt FP8; at 5 rows, the faster of it and the GEMV
    Both out = output(rows, N);
    Tensor xc = x.cpu.row_slice(0, rows), xg = x.gpu.row_slice(0, rows);
    cpu_->linear(xc, w_cpu, nullptr, out.cpu);
    gpu_->linear(xg, w_gpu, nullptr, out.gpu);
    expect_close(read(*cpu_, out.cpu), read(*gpu_, out.gpu), {5e-4, 0.05}, "static fp8 M=" + std::to_string(rows));
  }
  const std::vector<uint64_t> c = cpu_->saturation(1, true), g = gpu_->saturation(1, true);
  EXPECT_EQ(c, g);
  EXPECT_EQ(c[kActivationsStatic], uint64_t((M + 5) * K));
  EXPECT_GT(c[kActivationsClipped], uint64_t((M + 5) * K / 4));  // about half of uniform(-2, 2) clips
}

// Each path forced in turn (where it applies; elsewhere the fastest): the GEMV (up to 16 rows, 8
// per launch), cuBLASLt (INT8 weights dequantized first: whole, and 1024 channels at a time, with a
// last slice of 76 at N = 1100 and 4 slices at N = 4096), the stream kernel (INT8 and FP8 weights,
// up to 64 rows, K a multiple of 64; whole, and in its 16-row layouts above 16), and on compute
// capability 9.0 the wgmma kernel (INT8 weights with K a multiple of 64, FP8 with K a multiple of 128)
// and its INT8 form with a copier warpgroup.
TEST_F(GpuLinear, MatchesCpuAtOddSizes) {
  for (const char* path : {"gemv", "gemm", "gemm-slices", "stream", "stream16", "stream-wide", "wgmma", "wgmma-copiers"}) {
    SCOPED_TRACE(path);
    setenv("LLMQ_LINEAR_PATH", path, 1);
    gpu_ = make_cuda_backend(CudaBackendOptions{});
    unsetenv("LLMQ_LINEAR_PATH");
    for (const LinearCase& c : kLinearCases)
      for (int64_t M : {1, 3, 7, 8, 9, 16, 19, 733})
        for (auto [N, K] : {std::pair<int64_t, int64_t>{19, 733}, {64, 128}, {733, 64}, {48, 4096}, {17, 7},
                            {64, 64}, {32, 64}, {4096, 4096}, {1100, 64}})
          check(c, M, N, K, {/*bias=*/M == 3 || M == 19});
  }
}

// linears() (one input through several weights, as q/k/v and gate/up are) gives each output the
// bits of its own linear(): the CUDA backend rounds the input to 16 bits once for all of them, here
// for a BF16 weight and an INT8 one (BF16 activations) in one call, and quantizes it to FP8 once for
// two FP8 weights with dynamic scales (with one with a static scale between them, whose own codes
// must not be taken for theirs), at decode and prefill sizes.
TEST_F(GpuLinear, SharedInputLinearsEqualSeparateOnes) {
  Random rnd(11);
  const int64_t K = 128;
  std::vector<uint8_t> bf16_bytes = encode(rnd.floats(size_t(64 * K)), DType::BF16);
  Both bf16_w = tensor(bf16_bytes, DType::BF16, 64, K);
  LinearWeight plain;
  plain.w = bf16_w.gpu;
  std::vector<uint8_t> int8_source = encode(rnd.floats(size_t(48 * K)), DType::BF16);
  quantized_.push_back(quantize_weight(Tensor{int8_source.data(), DType::BF16, 48, K}, QuantMode::Int8WeightOnly, 2));
  LinearWeight int8 = quantized_.back().view(DType::BF16);
  int8.w = gpu_->upload(int8.w);
  int8.scale = gpu_->upload(int8.scale);
  LinearWeight fp8[2];
  for (LinearWeight& w : fp8) {
    std::vector<uint8_t> source = encode(rnd.floats(size_t(32 * K)), DType::BF16);
    quantized_.push_back(quantize_weight(Tensor{source.data(), DType::BF16, 32, K}, QuantMode::Fp8, 2));
    w = quantized_.back().view(DType::BF16);
    w.w = gpu_->upload(w.w);
    w.scale = gpu_->upload(w.scale);
  }
  LinearWeight fp8_static = fp8[0];
  Both input_scale = floats({4.0f / 448.0f}, 1, 1);
  fp8_static.input_scale = input_scale.gpu;
  for (int64_t M : {3, 40}) {
    Both x = floats(rnd.floats(size_t(M * K)), M, K);
    Both a = output(M, 64), b = output(M, 48), a_alone = output(M, 64), b_alone = output(M, 48);
    gpu_->linear(x.gpu, plain, nullptr, a_alone.gpu);
    gpu_->linear(x.gpu, int8, nullptr, b_alone.gpu);
    gpu_->linears(x.gpu, {{&plain, nullptr, &a.gpu}, {&int8, nullptr, &b.gpu}});
    const std::vector<float> a1 = read(*gpu_, a.gpu), a2 = read(*gpu_, a_alone.gpu);
    const std::vector<float> b1 = read(*gpu_, b.gpu), b2 = read(*gpu_, b_alone.gpu);
    EXPECT_EQ(0, std::memcmp(a1.data(), a2.data(), a1.size() * sizeof(float))) << "BF16 weight, M=" << M;
    EXPECT_EQ(0, std::memcmp(b1.data(), b2.data(), b1.size() * sizeof(float))) << "INT8 weight, M=" << M;
    Both c = output(M, 32), d = output(M, 32), e = output(M, 32);
    Both c_alone = output(M, 32), d_alone = output(M, 32), e_alone = output(M, 32);
    gpu_->linears(x.gpu, {{&fp8[0], nullptr, &c.gpu}, {&fp8_static, nullptr, &e.gpu}, {&fp8[1], nullptr, &d.gpu}});
    gpu_->linear(x.gpu, fp8[0], nullptr, c_alone.gpu);
    gpu_->linear(x.gpu, fp8_static, nullptr, e_alone.gpu);
    gpu_->linear(x.gpu, fp8[1], nullptr, d_alone.gpu);
    expect_close(read(*gpu_, c_alone.gpu), read(*gpu_, c.gpu), {0, 0}, fmt::format("first FP8 weight, M={}", M));
    expect_close(read(*gpu_, e_alone.gpu), read(*gpu_, e.gpu), {0, 0}, fmt::format("static FP8 weight, M={}", M));
    expect_close(read(*gpu_, d_alone.gpu), read(*gpu_, d.gpu), {0, 0}, fmt::format("second FP8 weight, M={}", M));
  }
  quantized_.clear();
}

// The first GPU's compute capability as major * 10 + minor (0 when unknown).
int compute_capability() {
#ifdef LLMQ_HAVE_CUDA
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) return prop.major * 10 + prop.minor;
#endif
  return 0;
}

// The INT8 weight-only tensor-core kernels (kernels/cuda/w8a16_kernel.cuh), each forced in turn (the
// kernel itself, not whichever path was faster at a shape), where they apply (K a multiple of 64):
// the tiled GEMM from 9 rows: its tile shapes (16/32/64 rows for decode batches, 128 for prefill),
// split-K (few tiles on a large K: M <= 128 with N = 4096 or 11008) and its repeatability; the
// stream kernel up to 64 rows: every token-tile count (16 channels a block up to 32 rows, 32 above),
// and in its 16-row layouts (16 and 128 channels a block), its repeatability; the Hopper (wgmma)
// kernels (with and without a copier warpgroup), on compute capability 9.0 only. N and M not tile multiples, both activation types,
// per-channel and per-tensor scales, BF16 and F32 biases; and a shape all leave to dequantize +
// cuBLASLt (K = 96).
TEST_F(GpuLinear, Int8TensorCoreKernels) {
  struct Kernel {
    const char* path;
    std::vector<int64_t> rows;
  };
  const Kernel kernels[] = {{"w8a16", {9, 16, 17, 33, 64, 65, 128, 733, 2048}},
                            {"stream", {1, 2, 7, 8, 9, 16, 17, 33, 64}},
                            {"stream16", {17, 33, 64}},
                            {"stream-wide", {17, 33, 64}},
                            {"wgmma", {1, 9, 64, 65, 128, 733, 2048}},
                            {"wgmma-copiers", {1, 9, 64, 65, 128, 733, 2048}}};
  const LinearCase c{DType::BF16, QuantMode::Int8WeightOnly, kInt8Tolerance};
  for (const Kernel& kernel : kernels) {
    SCOPED_TRACE(kernel.path);
    if (std::string(kernel.path).rfind("wgmma", 0) == 0 && compute_capability() != 90) {
      std::printf("the wgmma kernel needs compute capability 9.0; this GPU has %d: not checked\n", compute_capability());
      continue;
    }
    setenv("LLMQ_LINEAR_PATH", kernel.path, 1);
    gpu_ = make_cuda_backend(CudaBackendOptions{});
    unsetenv("LLMQ_LINEAR_PATH");
    int i = 0;
    for (DType act : {DType::BF16, DType::F16})
      for (int64_t M : kernel.rows)
        for (auto [N, K] : {std::pair<int64_t, int64_t>{64, 128}, {19, 64}, {733, 64}, {48, 96}, {4096, 4096},
                            {11008, 4096}, {4096, 11008}}) {
          // The CPU reference's time: the widest layers at decode-batch and 128-row sizes, BF16 only.
          const bool wide = N * K > 4096 * 4096;
          if (wide && (act == DType::F16 || (M != 1 && M != 16 && M != 64 && M != 65 && M != 128))) continue;
          if (M == 2048 && (act == DType::F16 || N * K < 4096 * 4096)) continue;
          LinearOptions o;
          o.act_dtype = act;
          o.bias = i % 2 == 1;
          o.bias_dtype = i % 4 == 3 ? DType::F32 : DType::BF16;
          o.per_tensor = (i / 2) % 3 == 2;
          o.twice = N * K >= 4096 * 4096 && M <= 128;
          ++i;
          check(c, M, N, K, o);
        }
  }
}

// ---- SiLU-mul fused with the FP8 quantization of the down projection's input --------------------

#ifdef LLMQ_HAVE_CUDA
// The fused kernel (cuda::silu_mul_quantize_fp8) called directly, so that its codes, row scales and
// saturation counts can be read:
//  - against the GPU's own silu_mul then quantize_fp8_rows: bit for bit (codes, scales, counts);
//  - against the CPU's silu_mul then engine/quant.h's row quantization: the same up to silu's exp,
//    which differs by an ulp or two between the backends (see EmbedSiluGather): a code may then be
//    its neighbour (one E4M3 step apart) when the value sat at a rounding boundary, rarely; a row's
//    dynamic scale (amax / 448) within 1e-6 relative; a clip count by a value at the boundary.
// Outputs are poisoned first (codes 0x7f, an E4M3 NaN; scales NaN).
TEST_F(BackendPair, SiluMulQuantizeFp8EqualsSiluMulThenQuantize) {
  Random rnd(13);
  cudaStream_t stream = static_cast<cudaStream_t>(gpu_->stream());
  auto device = [&](uint64_t bytes) { return gpu_->allocate(bytes); };
  auto fetch = [&](Buffer& b, void* host, size_t bytes) {
    ASSERT_EQ(cudaMemcpy(host, b.data(), bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  };
  for (int64_t rows : {1, 3, 7, 19, 733})
    for (int64_t cols : {7, 733, 4096, 11008}) {
      const size_t n = size_t(rows * cols);
      Both gate = floats(rnd.floats(n, -6, 6), rows, cols), up = floats(rnd.floats(n, -3, 3), rows, cols);
      std::vector<float> product(n);
      Tensor product_t{product.data(), DType::F32, rows, cols};
      cpu_->silu_mul(gate.cpu, up.cpu, product_t);
      float amax = 0.0f;
      for (float v : product) amax = std::max(amax, std::fabs(v));
      // Dynamic per-token scales; a static scale that nothing reaches; one that clips (|x| > 1).
      for (int mode = 0; mode < 3; ++mode) {
        const float static_scale = mode == 0 ? 0.0f : mode == 1 ? 2.0f * amax / 448.0f : 1.0f / 448.0f;
        const std::string what = fmt::format("rows={} cols={} {}", rows, cols,
                                             mode == 0 ? "dynamic" : mode == 1 ? "static, no clipping" : "static, clipping");
        Both scale = floats({static_scale}, 1, 1);
        const float* scale_gpu = static_scale == 0.0f ? nullptr : scale.gpu.as<float>();
        std::unique_ptr<Buffer> codes[2] = {device(n), device(n)};
        std::unique_ptr<Buffer> row_scales[2] = {device(uint64_t(rows) * 4), device(uint64_t(rows) * 4)};
        std::unique_ptr<Buffer> counters = device(4 * sizeof(unsigned long long)), act = device(n * 4);
        for (int i = 0; i < 2; ++i) {
          ASSERT_EQ(cudaMemset(codes[i]->data(), 0x7f, n), cudaSuccess);
          ASSERT_EQ(cudaMemset(row_scales[i]->data(), 0xff, uint64_t(rows) * 4), cudaSuccess);
        }
        ASSERT_EQ(cudaMemset(counters->data(), 0, counters->size()), cudaSuccess);
        auto* counts = static_cast<unsigned long long*>(counters->data());
        cuda::silu_mul_quantize_fp8(gate.gpu.as<float>(), up.gpu.as<float>(), rows, cols, scale_gpu,
                                    static_cast<uint8_t*>(codes[0]->data()), static_cast<float*>(row_scales[0]->data()),
                                    counts, stream);
        cuda::silu_mul(gate.gpu.as<float>(), up.gpu.as<float>(), rows, cols, act->data(), DType::F32, stream);
        cuda::quantize_fp8_rows(static_cast<float*>(act->data()), rows, cols, scale_gpu, nullptr,
                                static_cast<uint8_t*>(codes[1]->data()), static_cast<float*>(row_scales[1]->data()),
                                counts + 2, stream);
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess) << what;
        ASSERT_EQ(cudaGetLastError(), cudaSuccess) << what;
        std::vector<uint8_t> fused(n), unfused(n);
        std::vector<float> fused_scales(static_cast<size_t>(rows)), unfused_scales(static_cast<size_t>(rows));
        unsigned long long count[4] = {};
        fetch(*codes[0], fused.data(), n);
        fetch(*codes[1], unfused.data(), n);
        fetch(*row_scales[0], fused_scales.data(), size_t(rows) * 4);
        fetch(*row_scales[1], unfused_scales.data(), size_t(rows) * 4);
        fetch(*counters, count, sizeof count);

        // Fused = unfused on the GPU, bit for bit.
        EXPECT_EQ(fused, unfused) << what << ": codes";
        EXPECT_EQ(std::memcmp(fused_scales.data(), unfused_scales.data(), size_t(rows) * 4), 0) << what << ": scales";
        EXPECT_EQ(count[0], count[2]) << what << ": clipped";
        EXPECT_EQ(count[1], count[3]) << what << ": counted";

        // Against the CPU's quantization of its own silu * up.
        std::vector<float> ref(n);
        int64_t ref_clipped = 0;
        size_t mismatched = 0, far = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const float* x = product.data() + r * cols;
          float* q = ref.data() + r * cols;
          if (static_scale == 0.0f) {
            const float ref_scale = quantize_row_fp8(x, cols, q);
            EXPECT_NEAR(fused_scales[size_t(r)], ref_scale, 1e-6 * ref_scale) << what << " row " << r;
          } else {
            ref_clipped += quantize_row_fp8_static(x, cols, static_scale, q);
            EXPECT_EQ(fused_scales[size_t(r)], static_scale) << what << " row " << r;
          }
        }
        for (size_t i = 0; i < n; ++i) {
          const float got = fp8_e4m3_to_f32(fused[i]);
          if (f32_bits(got) == f32_bits(ref[i])) continue;
          ++mismatched;
          // One E4M3 step: an eighth of the value, or 2^-9 among the subnormals.
          if (!(std::fabs(got - ref[i]) <= std::max(std::fabs(got), std::fabs(ref[i])) / 8 + 0x1p-9f)) ++far;
        }
        EXPECT_EQ(far, 0u) << what << ": codes further than one step from the CPU's";
        EXPECT_LE(double(mismatched), 1e-4 * double(n) + 2) << what << ": codes unlike the CPU's";
        if (static_scale != 0.0f) {
          EXPECT_EQ(count[1], uint64_t(n)) << what;
          EXPECT_LE(std::llabs((long long)count[0] - (long long)ref_clipped), 2) << what << ": clipped vs the CPU";
          if (mode == 1) {
            EXPECT_EQ(count[0], 0u) << what;
          } else if (n >= 733) {
            EXPECT_GT(count[0], uint64_t(n / 8)) << what << ": the scale should clip";
          }
        } else {
          EXPECT_EQ(count[0] + count[1], 0u) << what << ": dynamic scales count nothing";
        }
      }
    }
}
#endif

// Backend::silu_mul_linear on the GPU: for FP8 weights (fused) exactly the output of the GPU's
// silu_mul then linear (the same codes and scales into the same GEMM / GEMV plan) and the same
// saturation counts; against the CPU's silu_mul_linear within the FP8 linear tolerance (kLinearCases).
// BF16 and INT8 weights (fused too: the product rounded to 16 bits by the SiLU-mul kernel, as the
// linear's input) exactly the output of silu_mul then linear; F32 weights take the default, act
// holding the product.
TEST_F(GpuLinear, SiluMulLinearEqualsSiluMulThenLinear) {
  Random rnd(17);
  const char* names[] = {"fp8 dynamic", "fp8 static", "bf16", "int8wo", "f32"};
  for (auto [N, K] : {std::pair<int64_t, int64_t>{64, 733}, {48, 4096}})
    for (int64_t M : {1, 7, 19, 200})
      for (int variant = 0; variant < 5; ++variant) {
        const std::string what = fmt::format("{} M={} N={} K={}", names[variant], M, N, K);
        // |silu(g) * u| < 2, smaller than kLinearCases' uniform(-1, 1) inputs on average, so that their
        // tolerances hold; the static scale 1/448 clips the few values beyond 1.
        Both gate = floats(rnd.floats(size_t(M * K), -4, 4), M, K), up = floats(rnd.floats(size_t(M * K), -0.5f, 0.5f), M, K);
        std::vector<uint8_t> w_bytes = encode(rnd.floats(size_t(N * K)), DType::BF16);
        LinearWeight w_cpu, w_gpu;
        Both input_scale = floats({1.0f / 448.0f}, 1, 1);
        if (variant < 2) {
          quantized_.push_back(quantize_weight(Tensor{w_bytes.data(), DType::BF16, N, K}, QuantMode::Fp8, 2));
          w_cpu = quantized_.back().view(DType::BF16);
          w_gpu = w_cpu;
          w_gpu.w = gpu_->upload(w_cpu.w);
          w_gpu.scale = gpu_->upload(w_cpu.scale);
          if (variant == 1) {
            w_cpu.input_scale = input_scale.cpu;
            w_gpu.input_scale = input_scale.gpu;
          }
        } else if (variant == 3) {
          quantized_.push_back(quantize_weight(Tensor{w_bytes.data(), DType::BF16, N, K}, QuantMode::Int8WeightOnly, 2));
          w_cpu = quantized_.back().view(DType::BF16);
          w_gpu = w_cpu;
          w_gpu.w = gpu_->upload(w_cpu.w);
          w_gpu.scale = gpu_->upload(w_cpu.scale);
        } else {
          const DType dtype = variant == 2 ? DType::BF16 : DType::F32;
          if (dtype == DType::F32) w_bytes = encode(rnd.floats(size_t(N * K)), DType::F32);
          Both w = tensor(w_bytes, dtype, N, K);
          w_cpu.w = w.cpu;
          w_gpu.w = w.gpu;
        }
        w_cpu.layer = w_gpu.layer = 0;
        Both bias = floats(rnd.floats(size_t(N)), 1, N, DType::BF16);
        const bool with_bias = M == 7;
        Both act = output(M, K), out = output(M, N), act_ref = output(M, K), out_ref = output(M, N);
        cpu_->saturation(1, true);
        gpu_->saturation(1, true);
        cpu_->silu_mul_linear(gate.cpu, up.cpu, act.cpu, w_cpu, with_bias ? &bias.cpu : nullptr, out.cpu);
        gpu_->silu_mul_linear(gate.gpu, up.gpu, act.gpu, w_gpu, with_bias ? &bias.gpu : nullptr, out.gpu);
        const std::vector<uint64_t> cpu_counts = cpu_->saturation(1, true), fused_counts = gpu_->saturation(1, true);
        gpu_->silu_mul(gate.gpu, up.gpu, act_ref.gpu);
        gpu_->linear(act_ref.gpu, w_gpu, with_bias ? &bias.gpu : nullptr, out_ref.gpu);
        const std::vector<uint64_t> unfused_counts = gpu_->saturation(1, true);
        expect_close(read(*gpu_, out_ref.gpu), read(*gpu_, out.gpu), {0, 0}, what + ": fused vs unfused on the GPU");
        EXPECT_EQ(fused_counts, unfused_counts) << what;
        const Tolerance tol = variant < 2 ? Tolerance{5e-4, 0.05} : variant == 2 ? Tolerance{8e-3, 0.2}
                              : variant == 3 ? kInt8Tolerance : Tolerance{2e-6, 2e-3};
        expect_close(read(*cpu_, out.cpu), read(*gpu_, out.gpu), tol, what + ": GPU vs CPU");
        if (variant == 1) {
          EXPECT_EQ(fused_counts[kActivationsStatic], uint64_t(M * K)) << what;
          EXPECT_GT(cpu_counts[kActivationsClipped], 0u) << what;
          EXPECT_LE(std::llabs((long long)fused_counts[kActivationsClipped] - (long long)cpu_counts[kActivationsClipped]), 2)
              << what;
        }
        if (variant == 4)  // the default keeps the product in act
          expect_close(read(*cpu_, act.cpu), read(*gpu_, act.gpu), {1e-6, 1e-5}, what + ": act");
        quantized_.clear();
      }
}

// Backend::rmsnorm_linears on the GPU: when the linears read one 16-bit input (BF16 weights; INT8
// with BF16 activations; both at once) or FP8 codes with dynamic scales, the norm's kernel writes
// it; otherwise (an F16 weight beside a BF16 one; an FP8 weight with a static scale beside one with
// dynamic scales) the default. Either way, exactly the bits of the norm then each linear alone: the
// norm's output, the residual and every linear's output; and the CPU's within kLinearCases.
TEST_F(GpuLinear, RmsNormLinearsEqualNormThenLinears) {
  Random rnd(19);
  const int64_t K = 512;
  Both input_scale = floats({8.0f / 448.0f}, 1, 1);  // the norm gives |x| < 8 here: no clipping
  auto weight = [&](DType dtype, QuantMode quant, bool static_scale, int64_t N, LinearWeight* cpu, LinearWeight* gpu) {
    std::vector<uint8_t> bytes = encode(rnd.floats(size_t(N * K)), dtype);
    if (quant == QuantMode::None) {
      Both w = tensor(bytes, dtype, N, K);
      cpu->w = w.cpu;
      gpu->w = w.gpu;
      return;
    }
    quantized_.push_back(quantize_weight(Tensor{bytes.data(), dtype, N, K}, quant, 2));
    *cpu = quantized_.back().view(DType::BF16);
    *gpu = *cpu;
    gpu->w = gpu_->upload(cpu->w);
    gpu->scale = gpu_->upload(cpu->scale);
    cpu->layer = gpu->layer = 0;
    if (static_scale) {
      cpu->input_scale = input_scale.cpu;
      gpu->input_scale = input_scale.gpu;
    }
  };
  struct Pair {
    const char* name;
    DType a_dtype;
    QuantMode a_quant;
    bool a_static;
    DType b_dtype;
    QuantMode b_quant;
  };
  const Pair pairs[] = {{"bf16 + bf16", DType::BF16, QuantMode::None, false, DType::BF16, QuantMode::None},
                        {"int8wo + bf16", DType::BF16, QuantMode::Int8WeightOnly, false, DType::BF16, QuantMode::None},
                        {"f16 + bf16", DType::F16, QuantMode::None, false, DType::BF16, QuantMode::None},
                        {"fp8 + fp8", DType::BF16, QuantMode::Fp8, false, DType::BF16, QuantMode::Fp8},
                        {"fp8 static + fp8", DType::BF16, QuantMode::Fp8, true, DType::BF16, QuantMode::Fp8}};
  for (const Pair& pair : pairs)
    for (int64_t M : {1, 19, 733})
      for (bool residual : {false, true}) {
        const std::string what = fmt::format("{} M={}{}", pair.name, M, residual ? " add_rmsnorm" : " rmsnorm");
        LinearWeight a_cpu, a_gpu, b_cpu, b_gpu;
        weight(pair.a_dtype, pair.a_quant, pair.a_static, 64, &a_cpu, &a_gpu);
        weight(pair.b_dtype, pair.b_quant, false, 40, &b_cpu, &b_gpu);
        Both x = floats(rnd.floats(size_t(M * K), -3, 3), M, K), norm_w = floats(rnd.floats(size_t(K), 0.5f, 1.5f), 1, K);
        const std::vector<float> residual_values = rnd.floats(size_t(M * K), -3, 3);
        Both res = floats(residual_values, M, K), res_ref = floats(residual_values, M, K);
        Both h = output(M, K), a = output(M, 64), b = output(M, 40);
        Both h_ref = output(M, K), a_ref = output(M, 64), b_ref = output(M, 40);
        cpu_->rmsnorm_linears(residual ? &res.cpu : nullptr, x.cpu, norm_w.cpu, 1e-5f, h.cpu,
                              {{&a_cpu, nullptr, &a.cpu}, {&b_cpu, nullptr, &b.cpu}});
        gpu_->rmsnorm_linears(residual ? &res.gpu : nullptr, x.gpu, norm_w.gpu, 1e-5f, h.gpu,
                              {{&a_gpu, nullptr, &a.gpu}, {&b_gpu, nullptr, &b.gpu}});
        if (residual)
          gpu_->add_rmsnorm(res_ref.gpu, x.gpu, norm_w.gpu, 1e-5f, h_ref.gpu);
        else
          gpu_->rmsnorm(x.gpu, norm_w.gpu, 1e-5f, h_ref.gpu);
        gpu_->linear(h_ref.gpu, a_gpu, nullptr, a_ref.gpu);
        gpu_->linear(h_ref.gpu, b_gpu, nullptr, b_ref.gpu);
        expect_close(read(*gpu_, h_ref.gpu), read(*gpu_, h.gpu), {0, 0}, what + ": norm output");
        expect_close(read(*gpu_, res_ref.gpu), read(*gpu_, res.gpu), {0, 0}, what + ": residual");
        expect_close(read(*gpu_, a_ref.gpu), read(*gpu_, a.gpu), {0, 0}, what + ": first linear");
        expect_close(read(*gpu_, b_ref.gpu), read(*gpu_, b.gpu), {0, 0}, what + ": second linear");
        // Against the CPU: inputs of about unit size after the norm, as kLinearCases' (fp8: its
        // tolerance; 16-bit weights: BF16's, the looser of the two).
        const Tolerance tol = pair.a_quant == QuantMode::Fp8 ? Tolerance{5e-4, 0.05} : Tolerance{8e-3, 0.2};
        expect_close(read(*cpu_, a.cpu), read(*gpu_, a.gpu), tol, what + ": first linear, GPU vs CPU");
        expect_close(read(*cpu_, b.cpu), read(*gpu_, b.gpu), tol, what + ": second linear, GPU vs CPU");
        quantized_.clear();
      }
}

#ifdef LLMQ_HAVE_CUDA
// Backend::attention_inputs and Backend::mlp (a layer's two blocks as single ops) on the GPU, where
// the q/k/v and gate/up linears that cuBLASLt computes leave their scales and bias to the RoPE and
// SiLU-mul kernels: exactly the bits of the ops they stand for (norm output, residual, rotated q and
// k, the INT8 KV cache's codes and scales byte for byte, the down projection), with cuBLASLt forced
// and with the timed choice; int8wo weights (per-channel scales), FP8 weights with dynamic scales
// (row scales as well, which the SiLU-mul's quantization replaces in the same buffer) and BF16
// weights with q/k/v biases; a decode row, a short run and a long one. With the stream kernel
// forced, a decode row's q/k/v go as one launch of it (INT8: checked against one launch each).
TEST_F(GpuLinear, LayerBlocksEqualTheirOps) {
  Random rnd(23);
  const int32_t heads = 4, kv_heads = 2, D = 64, block_size = 16;
  const int64_t K = int64_t(heads) * D, kv_cols = int64_t(kv_heads) * D, hidden = 320;
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = float(std::pow(10000.0, -2.0 * double(i) / D));
  auto bytes_of = [](const void* device, size_t n) {
    std::vector<uint8_t> host(n);
    EXPECT_EQ(cudaMemcpy(host.data(), device, n, cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  };
  for (const char* path : {"gemm", "stream", ""}) {
    SCOPED_TRACE(*path ? path : "the timed choice");
    if (*path) setenv("LLMQ_LINEAR_PATH", path, 1);
    gpu_ = make_cuda_backend(CudaBackendOptions{});
    unsetenv("LLMQ_LINEAR_PATH");
    Both freq = floats(inv_freq, 1, int64_t(inv_freq.size())), norm_w = floats(rnd.floats(size_t(K), 0.5f, 1.5f), 1, K);
    for (QuantMode quant : {QuantMode::Int8WeightOnly, QuantMode::Fp8, QuantMode::None})
      for (int32_t M : {1, 19, 733}) {
        const std::string what = fmt::format("{} M={}", quant_mode_name(quant), M);
        auto weight = [&](int64_t N, int64_t in) {
          std::vector<uint8_t> bytes = encode(rnd.floats(size_t(N * in)), DType::BF16);
          LinearWeight w;
          if (quant == QuantMode::None) {
            w.w = tensor(bytes, DType::BF16, N, in).gpu;
            return w;
          }
          quantized_.push_back(quantize_weight(Tensor{bytes.data(), DType::BF16, N, in}, quant, 2));
          w = quantized_.back().view(DType::BF16);
          w.w = gpu_->upload(w.w);
          w.scale = gpu_->upload(w.scale);
          w.layer = 0;
          return w;
        };
        const LinearWeight wq = weight(K, K), wk = weight(kv_cols, K), wv = weight(kv_cols, K);
        const LinearWeight w_gate = weight(hidden, K), w_up = weight(hidden, K), w_down = weight(K, hidden);
        const bool biased = quant == QuantMode::None;
        Both bq = floats(rnd.floats(size_t(K)), 1, K, DType::BF16), bk = floats(rnd.floats(size_t(kv_cols)), 1, kv_cols),
             bv = floats(rnd.floats(size_t(kv_cols)), 1, kv_cols, DType::BF16);

        const test::PagedSequences seqs = {{0, M}};
        Rng block_rng{uint64_t(M)};
        const std::vector<int32_t> order = test::scattered_blocks(seqs, block_size, block_rng);
        gpu_->begin_step(test::paged_step(seqs, order, block_size, 1));
        const int64_t blocks = int64_t(order.size()), per_block = int64_t(kv_heads) * block_size * D;
        const std::vector<float> x_values = rnd.floats(size_t(M * K), -3, 3), res_values = rnd.floats(size_t(M * K), -3, 3);
        // Everything twice: [0] through the block ops, [1] through the ops they stand for.
        struct Side {
          Both x, res, h, q, k, v, gate, up, out, k_cache, v_cache, k_scale, v_scale;
          KvLayer layer;
        } side[2];
        for (Side& s : side) {
          s.x = floats(x_values, M, K);
          s.res = floats(res_values, M, K);
          s.h = output(M, K), s.q = output(M, K), s.k = output(M, kv_cols), s.v = output(M, kv_cols);
          s.gate = output(M, hidden), s.up = output(M, hidden), s.out = output(M, K);
          s.k_cache = tensor(std::vector<uint8_t>(size_t(blocks * per_block)), DType::I8, blocks, per_block);
          s.v_cache = tensor(std::vector<uint8_t>(size_t(blocks * per_block)), DType::I8, blocks, per_block);
          s.k_scale = floats(std::vector<float>(size_t(blocks) * kv_heads * block_size), blocks, int64_t(kv_heads) * block_size);
          s.v_scale = floats(std::vector<float>(size_t(blocks) * kv_heads * block_size), blocks, int64_t(kv_heads) * block_size);
          s.layer.k = s.k_cache.gpu, s.layer.v = s.v_cache.gpu, s.layer.k_scale = s.k_scale.gpu, s.layer.v_scale = s.v_scale.gpu;
          s.layer.block_size = block_size, s.layer.num_kv_heads = kv_heads, s.layer.head_dim = D, s.layer.layer = 0;
        }
        auto jobs = [&](Side& s) {
          return std::array<Backend::LinearJob, 5>{Backend::LinearJob{&wq, biased ? &bq.gpu : nullptr, &s.q.gpu},
                                                   {&wk, biased ? &bk.gpu : nullptr, &s.k.gpu},
                                                   {&wv, biased ? &bv.gpu : nullptr, &s.v.gpu},
                                                   {&w_gate, nullptr, &s.gate.gpu},
                                                   {&w_up, nullptr, &s.up.gpu}};
        };
        const auto a = jobs(side[0]), b = jobs(side[1]);
        gpu_->attention_inputs(&side[0].res.gpu, side[0].x.gpu, norm_w.gpu, 1e-5f, side[0].h.gpu, a[0], a[1], a[2],
                               freq.gpu, side[0].layer);
        gpu_->rmsnorm_linears(&side[1].res.gpu, side[1].x.gpu, norm_w.gpu, 1e-5f, side[1].h.gpu, {b[0], b[1], b[2]});
        if (quant == QuantMode::Int8WeightOnly) {
          // With the stream kernel forced (and up to 16 rows) q/k/v went as one launch of it: each
          // equals its own launch on the norm's output (whose 16-bit rounding is the norm's copy).
          for (auto [name, job] : {std::pair{"q", b[0]}, std::pair{"k", b[1]}, std::pair{"v", b[2]}}) {
            Both alone = output(M, job.out->cols);
            gpu_->linear(side[1].h.gpu, *job.weight, job.bias, alone.gpu);
            expect_close(read(*gpu_, alone.gpu), read(*gpu_, *job.out), {0, 0}, what + ": " + name + " of one launch for q/k/v");
          }
        }
        gpu_->rope_kv_write(side[1].q.gpu, side[1].k.gpu, side[1].v.gpu, freq.gpu, side[1].layer);
        for (auto [name, got, want] : {std::tuple{"norm output", &side[0].h, &side[1].h},
                                       std::tuple{"residual", &side[0].res, &side[1].res},
                                       std::tuple{"rotated q", &side[0].q, &side[1].q},
                                       std::tuple{"rotated k", &side[0].k, &side[1].k}})
          expect_close(read(*gpu_, want->gpu), read(*gpu_, got->gpu), {0, 0}, what + ": attention_inputs' " + name);
        for (auto [name, got, want] : {std::tuple{"K codes", &side[0].k_cache, &side[1].k_cache},
                                       std::tuple{"V codes", &side[0].v_cache, &side[1].v_cache}})
          EXPECT_EQ(bytes_of(got->gpu.data, size_t(blocks * per_block)), bytes_of(want->gpu.data, size_t(blocks * per_block)))
              << what << ": attention_inputs' " << name;
        for (auto [name, got, want] : {std::tuple{"K scales", &side[0].k_scale, &side[1].k_scale},
                                       std::tuple{"V scales", &side[0].v_scale, &side[1].v_scale}})
          expect_close(read(*gpu_, want->gpu), read(*gpu_, got->gpu), {0, 0}, what + ": attention_inputs' " + name);

        // The MLP reads q as the layer's attention output would be (any [M, K] input serves).
        gpu_->mlp(&side[0].res.gpu, side[0].q.gpu, norm_w.gpu, 1e-5f, side[0].h.gpu, a[3], a[4], w_down, side[0].out.gpu);
        gpu_->rmsnorm_linears(&side[1].res.gpu, side[1].q.gpu, norm_w.gpu, 1e-5f, side[1].h.gpu, {b[3], b[4]});
        gpu_->silu_mul_linear(side[1].gate.gpu, side[1].up.gpu, side[1].gate.gpu, w_down, nullptr, side[1].out.gpu);
        expect_close(read(*gpu_, side[1].h.gpu), read(*gpu_, side[0].h.gpu), {0, 0}, what + ": mlp's norm output");
        expect_close(read(*gpu_, side[1].res.gpu), read(*gpu_, side[0].res.gpu), {0, 0}, what + ": mlp's residual");
        expect_close(read(*gpu_, side[1].out.gpu), read(*gpu_, side[0].out.gpu), {0, 0}, what + ": mlp's output");
        quantized_.clear();
      }
  }
}
#endif

// ---- Norms, embedding, SiLU, gather ---------------------------------------------------------------

TEST_F(BackendPair, RmsNormAndResidual) {
  Random rnd(7);
  for (int64_t rows : {1, 7, 19})
    for (int64_t dim : {7, 64, 733, 4096})
      for (DType w_dtype : {DType::F32, DType::BF16}) {
        const std::string what = fmt::format("rows={} dim={} {}", rows, dim, dtype_name(w_dtype));
        Both x = floats(rnd.floats(size_t(rows * dim), -3, 3), rows, dim);
        Both w = floats(rnd.floats(size_t(dim), 0.5f, 1.5f), 1, dim, w_dtype);
        Both out = output(rows, dim);
        cpu_->rmsnorm(x.cpu, w.cpu, 1e-5f, out.cpu);
        gpu_->rmsnorm(x.gpu, w.gpu, 1e-5f, out.gpu);
        expect_close(read(*cpu_, out.cpu), read(*gpu_, out.gpu), {1e-6, 1e-5}, "rmsnorm " + what);

        Both residual = floats(rnd.floats(size_t(rows * dim), -3, 3), rows, dim);
        Both out2 = output(rows, dim);
        cpu_->add_rmsnorm(residual.cpu, x.cpu, w.cpu, 1e-5f, out2.cpu);
        gpu_->add_rmsnorm(residual.gpu, x.gpu, w.gpu, 1e-5f, out2.gpu);
        expect_close(read(*cpu_, out2.cpu), read(*gpu_, out2.gpu), {1e-6, 1e-5}, "add_rmsnorm " + what);
        expect_close(read(*cpu_, residual.cpu), read(*gpu_, residual.gpu), {0, 0}, "residual " + what);
      }
}

TEST_F(BackendPair, EmbedSiluGather) {
  Random rnd(11);
  const int64_t vocab = 733, dim = 19, T = 37;
  BatchPlan plan;
  plan.clear();
  for (int64_t t = 0; t < T; ++t) {
    plan.tokens.push_back(rnd.below(int32_t(vocab)));
    plan.positions.push_back(int32_t(t));
    plan.token_seq.push_back(0);
    plan.slots.push_back(int32_t(t));
  }
  plan.block_ids = {0, 1, 2};
  plan.block_offsets.push_back(3);
  plan.logit_rows = {36, 0, 17};
  begin(plan);
  Both table = floats(rnd.floats(size_t(vocab * dim)), vocab, dim, DType::BF16);
  Both e = output(T, dim);
  cpu_->embed(table.cpu, 0, e.cpu);
  gpu_->embed(table.gpu, 0, e.gpu);
  expect_close(read(*cpu_, e.cpu), read(*gpu_, e.gpu), {0, 0}, "embed");
  // A vocab-parallel shard: rows [100, 300) of the table; other ids give zero rows.
  Both shard_out = output(T, dim);
  Tensor cpu_shard = table.cpu.row_slice(100, 200), gpu_shard = table.gpu.row_slice(100, 200);
  cpu_->embed(cpu_shard, 100, shard_out.cpu);
  gpu_->embed(gpu_shard, 100, shard_out.gpu);
  expect_close(read(*cpu_, shard_out.cpu), read(*gpu_, shard_out.gpu), {0, 0}, "embed (vocab shard)");

  Both up = floats(rnd.floats(size_t(T * dim), -4, 4), T, dim);
  Both s = output(T, dim);
  cpu_->silu_mul(e.cpu, up.cpu, s.cpu);
  gpu_->silu_mul(e.gpu, up.gpu, s.gpu);
  expect_close(read(*cpu_, s.cpu), read(*gpu_, s.gpu), {1e-6, 1e-6}, "silu_mul");

  Both g = output(3, dim);
  cpu_->gather_rows(s.cpu, g.cpu);
  gpu_->gather_rows(s.gpu, g.gpu);
  expect_close(read(*cpu_, g.cpu), read(*gpu_, g.gpu), {1e-6, 1e-6}, "gather_rows");
}

// ---- RoPE, paged KV and attention -----------------------------------------------------------------

struct AttentionCase {
  int32_t heads, kv_heads, head_dim, window;
  DType kv_dtype;
  Tolerance tol;
};

class GpuAttention : public BackendPair {
 protected:
  // Sequences given as (cached tokens before the step, new tokens in the step). A first step writes
  // the cached prefixes; the second step (the one compared) mixes prefill and decode tokens.
  void check(const AttentionCase& c, const std::vector<std::pair<int32_t, int32_t>>& seqs) {
    const int32_t block_size = 16;
    const std::string what = fmt::format("heads={}/{} D={} window={} kv={}", c.heads, c.kv_heads, c.head_dim,
                                         c.window, dtype_name(c.kv_dtype));
    Random rnd(uint64_t(c.heads * 31 + c.head_dim * 7 + c.window + int(c.kv_dtype)));
    // Blocks of each sequence, scattered over the cache in a random order.
    Rng block_rng(uint64_t(c.heads * 31 + c.head_dim * 7 + c.window + int(c.kv_dtype)));
    const std::vector<int32_t> order = test::scattered_blocks(seqs, block_size, block_rng);
    const int32_t total_blocks = int32_t(order.size());
    const int64_t per_block = int64_t(c.kv_heads) * block_size * c.head_dim;
    const size_t kv_bytes = size_t(total_blocks * per_block) * dtype_size(c.kv_dtype);
    Both k_cache = tensor(std::vector<uint8_t>(kv_bytes), c.kv_dtype, total_blocks, per_block);
    Both v_cache = tensor(std::vector<uint8_t>(kv_bytes), c.kv_dtype, total_blocks, per_block);
    KvLayer cpu_layer, gpu_layer;
    cpu_layer.k = k_cache.cpu;
    cpu_layer.v = v_cache.cpu;
    gpu_layer.k = k_cache.gpu;
    gpu_layer.v = v_cache.gpu;
    if (c.kv_dtype == DType::I8) {  // a scale per token and head, written with the codes
      const int64_t heads = int64_t(c.kv_heads) * block_size;
      Both ks = floats(std::vector<float>(size_t(total_blocks * heads)), total_blocks, heads);
      Both vs = floats(std::vector<float>(size_t(total_blocks * heads)), total_blocks, heads);
      cpu_layer.k_scale = ks.cpu, cpu_layer.v_scale = vs.cpu, gpu_layer.k_scale = ks.gpu, gpu_layer.v_scale = vs.gpu;
    } else if (c.kv_dtype == DType::F8_E4M3) {  // static per-layer scales
      Both ks = floats({1.0f / 64}, 1, 1), vs = floats({1.0f / 128}, 1, 1);
      cpu_layer.k_scale = ks.cpu, cpu_layer.v_scale = vs.cpu, gpu_layer.k_scale = ks.gpu, gpu_layer.v_scale = vs.gpu;
    }
    for (KvLayer* layer : {&cpu_layer, &gpu_layer}) {
      layer->block_size = block_size;
      layer->num_kv_heads = c.kv_heads;
      layer->head_dim = c.head_dim;
    }
    std::vector<float> inv_freq(static_cast<size_t>(c.head_dim / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = float(std::pow(10000.0, -2.0 * double(i) / c.head_dim));
    Both freq = floats(inv_freq, 1, int64_t(inv_freq.size()));
    AttentionParams params{c.heads, c.kv_heads, c.head_dim, float(1.0 / std::sqrt(double(c.head_dim))), c.window};

    for (int phase = 0; phase < 2; ++phase) {
      const BatchPlan plan = test::paged_step(seqs, order, block_size, phase);
      const int64_t T = plan.n_tokens();
      if (T == 0) continue;
      begin(plan);
      Both q = floats(rnd.floats(size_t(T * c.heads * c.head_dim), -2, 2), T, int64_t(c.heads) * c.head_dim);
      Both k = floats(rnd.floats(size_t(T * c.kv_heads * c.head_dim), -2, 2), T, int64_t(c.kv_heads) * c.head_dim);
      Both v = floats(rnd.floats(size_t(T * c.kv_heads * c.head_dim), -2, 2), T, int64_t(c.kv_heads) * c.head_dim);
      cpu_->rope_kv_write(q.cpu, k.cpu, v.cpu, freq.cpu, cpu_layer);
      gpu_->rope_kv_write(q.gpu, k.gpu, v.gpu, freq.gpu, gpu_layer);
      if (phase == 0) continue;
      expect_close(read(*cpu_, q.cpu), read(*gpu_, q.gpu), {1e-6, 2e-6}, "rope q " + what);
      expect_close(read(*cpu_, k.cpu), read(*gpu_, k.gpu), {1e-6, 2e-6}, "rope k " + what);
      Both out = output(T, int64_t(c.heads) * c.head_dim);
      cpu_->attention(q.cpu, cpu_layer, params, out.cpu);
      gpu_->attention(q.gpu, gpu_layer, params, out.gpu);
      const std::vector<float> attention_out = read(*gpu_, out.gpu);
      expect_close(read(*cpu_, out.cpu), attention_out, c.tol, "attention " + what);
      // attention_linear with a BF16 weight (the attention kernels write its input as well): the
      // attention output and the projection exactly those of attention then linear.
      const int64_t K = int64_t(c.heads) * c.head_dim;
      std::vector<uint8_t> w_bytes = encode(rnd.floats(size_t(24 * K)), DType::BF16);
      Both w = tensor(w_bytes, DType::BF16, 24, K);
      LinearWeight wo;
      wo.w = w.gpu;
      Both attn = output(T, K), proj = output(T, 24), proj_ref = output(T, 24);
      gpu_->attention_linear(q.gpu, gpu_layer, params, attn.gpu, wo, nullptr, proj.gpu);
      gpu_->linear(out.gpu, wo, nullptr, proj_ref.gpu);
      expect_close(attention_out, read(*gpu_, attn.gpu), {0, 0}, "attention_linear's attention " + what);
      expect_close(read(*gpu_, proj_ref.gpu), read(*gpu_, proj.gpu), {0, 0}, "attention_linear's linear " + what);
    }
  }
};

// 16-bit caches: the rotated keys may differ in their last fp32 bit (cosf/sinf), which can move a
// rounding to 16 bits by one unit; with a run of more than 16 tokens of one sequence (prefill) the
// tensor-core kernel also rounds q and the probabilities to the cache's 16-bit type.
const AttentionCase kAttentionCases[] = {
    {8, 2, 64, 0, DType::F32, {1e-5, 1e-4}},    {8, 8, 8, 0, DType::BF16, {8e-3, 0.05}},
    {4, 1, 128, 0, DType::F16, {2e-3, 0.01}},   {8, 2, 64, 16, DType::F32, {1e-5, 1e-4}},
    {32, 32, 128, 0, DType::BF16, {8e-3, 0.05}}, {8, 2, 64, 16, DType::BF16, {8e-3, 0.05}},
    // 8-bit caches: the same codes on both backends unless a rotated value sits on a rounding
    // boundary (then one code differs by one step); prefill runs on the tensor cores round Q, the
    // dequantized K/V and P to F16 (2^-11 relative each).
    {8, 2, 64, 0, DType::I8, {4e-3, 0.05}},      {4, 1, 128, 16, DType::I8, {4e-3, 0.05}},
    {8, 2, 64, 0, DType::F8_E4M3, {4e-3, 0.05}}, {8, 8, 8, 0, DType::F8_E4M3, {3e-3, 0.05}},
    {4, 2, 128, 0, DType::F8_E4M3, {4e-3, 0.05}},
};

TEST_F(GpuAttention, MixedPrefillAndDecodeMatchCpu) {
  for (const AttentionCase& c : kAttentionCases) check(c, {{0, 37}, {300, 1}, {5, 19}, {16, 1}, {0, 1}});
  for (const AttentionCase& c : kAttentionCases) check(c, {{0, 200}, {700, 129}});  // long prefill runs
}

TEST_F(GpuAttention, DecodeBatchesMatchCpu) {
  for (const AttentionCase& c : kAttentionCases) check(c, {{100, 1}, {7, 1}, {63, 1}, {64, 1}, {65, 1}, {1, 1}});
}

TEST_F(GpuAttention, LongContextDecodeSplitsKeys) {
  // One decoding sequence with a long context: few blocks, so the keys are split and merged.
  for (const AttentionCase& c : kAttentionCases) check(c, {{3000, 1}});
  check(kAttentionCases[0], {{2047, 1}, {1000, 1}});
}

// ---- End to end on stories260K -------------------------------------------------------------------

EngineOptions greedy_options(llmq_backend backend, QuantMode quant, llmq_kv_dtype kv) {
  EngineOptions o;
  o.backend = backend;
  o.n_threads = 2;
  o.quant = quant;
  o.kv_dtype = kv;
  o.max_batch_tokens = 7;  // chunked prefill, then decode
  return o;
}

std::vector<int32_t> greedy(Engine& engine, const std::vector<int32_t>& prompt) {
  GenerateOptions g;
  g.sampling.temperature = 0.0f;
  g.max_new_tokens = 200;
  return engine.generate(prompt, g).tokens;
}

// 200 greedy tokens on the GPU and on the CPU, in every mode. The backends sum in different orders,
// so where a step's top two logits nearly tie they may pick differently, and the sequences part
// there (an H200 run, int8wo with an INT8 cache: equal for 32+ tokens, then not). So each GPU
// token is judged by the CPU's scores of the GPU's own sequence: its logit is at most a tie below
// the best. A tie: 0.02 (20 times ScoreLogitsMatchCpu's 1e-3 between the backends' scores), 0.25
// with FP8 activations, whose codes may round apart on the two backends (see that test). And the
// sequences agree at first: 16 tokens at least.
TEST(GpuEndToEnd, GreedyTokensAreCpuArgmaxesInEveryMode) {
  REQUIRE_GPU();
  auto model = Model::load(test::stories_dir());
  const std::vector<int32_t> prompt = model->tokenizer()->encode("Once upon a time, there was a little", true);
  struct Mode {
    QuantMode quant;
    llmq_kv_dtype kv;
  };
  for (Mode m : {Mode{QuantMode::None, LLMQ_KV_DTYPE_AUTO}, Mode{QuantMode::Int8WeightOnly, LLMQ_KV_DTYPE_AUTO},
                 Mode{QuantMode::Fp8, LLMQ_KV_DTYPE_AUTO}, Mode{QuantMode::Int8WeightOnly, LLMQ_KV_DTYPE_INT8},
                 Mode{QuantMode::Fp8, LLMQ_KV_DTYPE_FP8}, Mode{QuantMode::None, LLMQ_KV_DTYPE_BF16}}) {
    const std::string mode = std::string(quant_mode_name(m.quant)) + " kv " + std::to_string(int(m.kv));
    const float tie = m.quant == QuantMode::Fp8 ? 0.25f : 0.02f;
    Engine cpu_engine(model, greedy_options(LLMQ_BACKEND_CPU, m.quant, m.kv));
    Engine gpu_engine(model, greedy_options(LLMQ_BACKEND_CUDA, m.quant, m.kv));
    const std::vector<int32_t> cpu = greedy(cpu_engine, prompt), gpu = greedy(gpu_engine, prompt);
    ASSERT_EQ(gpu.size(), 200u) << mode;
    const std::vector<float> gaps = test::greedy_gaps(cpu_engine, prompt, gpu);
    for (size_t i = 0; i < gaps.size(); ++i) EXPECT_LE(gaps[i], tie) << mode << ", GPU token " << i;
    const size_t same = size_t(std::mismatch(cpu.begin(), cpu.end(), gpu.begin(), gpu.end()).first - cpu.begin());
    EXPECT_GE(same, 16u) << mode;
    if (same < cpu.size())
      std::printf("greedy %s: GPU equal to CPU for %zu tokens, then a near tie (gap %.3g)\n", mode.c_str(), same,
                  double(gaps[same]));
  }
}

double relative_error(const std::vector<float>& ref, const std::vector<float>& got) {
  double diff2 = 0, ref2 = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff2 += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    ref2 += double(ref[i]) * ref[i];
  }
  return std::sqrt(diff2 / ref2);
}

TEST(GpuEndToEnd, ScoreLogitsMatchCpu) {
  REQUIRE_GPU();
  auto model = Model::load(test::stories_dir());
  std::vector<int32_t> ids = model->tokenizer()->encode("Lily and Ben went to the park. They saw a big red ball.", true);
  auto score = [&](llmq_backend backend, QuantMode quant) {
    EngineOptions o;
    o.backend = backend;
    o.quant = quant;
    Engine engine(model, o);
    std::vector<float> logits(ids.size() * size_t(engine.vocab_size()));
    engine.score(ids, logits.data());
    return logits;
  };
  const std::vector<float> unquantized = score(LLMQ_BACKEND_CPU, QuantMode::None);
  expect_close(unquantized, score(LLMQ_BACKEND_CUDA, QuantMode::None), {1e-4, 1e-3}, "score none");
  expect_close(score(LLMQ_BACKEND_CPU, QuantMode::Int8WeightOnly), score(LLMQ_BACKEND_CUDA, QuantMode::Int8WeightOnly),
               {1e-4, 1e-3}, "score int8wo");
  // FP8: Hopper's FP8 tensor cores keep about 14 bits of the fp32 accumulator between promotions
  // (a relative error near 1e-4, see GpuLinear), and each layer quantizes its input per token
  // again, so a value near an FP8 rounding boundary can take the neighbouring code (6-12% apart)
  // on one backend and not the other. The backends must agree on the next token nearly always, and
  // differ less than FP8 differs from the unquantized model.
  const std::vector<float> cpu_fp8 = score(LLMQ_BACKEND_CPU, QuantMode::Fp8);
  const std::vector<float> gpu_fp8 = score(LLMQ_BACKEND_CUDA, QuantMode::Fp8);
  const double backends = relative_error(cpu_fp8, gpu_fp8);
  const double quantization = relative_error(unquantized, cpu_fp8);
  EXPECT_LE(backends, 0.75 * quantization) << "fp8: GPU vs CPU " << backends << ", fp8 vs unquantized " << quantization;
  const size_t vocab = size_t(model->config().vocab_size);
  size_t same = 0;
  for (size_t t = 0; t < ids.size(); ++t) {
    auto argmax = [&](const std::vector<float>& l) {
      return std::max_element(l.begin() + long(t * vocab), l.begin() + long((t + 1) * vocab)) - l.begin();
    };
    same += argmax(cpu_fp8) == argmax(gpu_fp8);
  }
  EXPECT_GE(double(same), 0.9 * double(ids.size())) << "fp8: next-token agreement " << same << "/" << ids.size();
  std::printf("score fp8: GPU vs CPU relative error %.4f; CPU fp8 vs unquantized %.4f\n", backends, quantization);
}

// Seeded sampling on the device (the engine's serving step) draws exactly the tokens that the host
// sampler draws from the same GPU's logits, copied to the host.
TEST(GpuEndToEnd, DeviceSamplingEqualsHostSamplingOfTheSameLogits) {
  REQUIRE_GPU();
  auto model = Model::load(test::stories_dir());
  const std::vector<int32_t> prompt = model->tokenizer()->encode("Once upon a time, there was a little", true);
  SamplingParams params;
  params.temperature = 0.9f;
  params.top_k = 40;
  params.top_p = 0.9f;
  params.min_p = 0.02f;
  params.repetition_penalty = 1.1f;
  params.seed = 7;
  for (bool plain : {true, false}) {
    SamplingParams p = params;
    if (plain) p = SamplingParams{1.0f, 0, 1.0f, 0.0f, 1.0f, 11};
    EngineOptions o;
    o.backend = LLMQ_BACKEND_CUDA;
    Engine engine(model, o);
    GenerateOptions g;
    g.sampling = p;
    g.max_new_tokens = 120;
    g.ignore_eos = true;
    const std::vector<int32_t> device = engine.generate(prompt, g).tokens;

    Sampler sampler(p);
    std::unique_ptr<SequenceKv> seq = engine.new_sequence();
    std::vector<float> logits;
    std::vector<int32_t> history = prompt, host;
    engine.step({SequenceStep{seq.get(), prompt.data(), int32_t(prompt.size()), false, true}}, &logits);
    while (host.size() < device.size()) {
      int32_t token = sampler.sample(logits.data(), engine.vocab_size(), history);
      host.push_back(token);
      history.push_back(token);
      engine.step({SequenceStep{seq.get(), &token, 1, false, true}}, &logits);
    }
    EXPECT_EQ(device.size(), 120u);
    EXPECT_EQ(device, host) << (plain ? "temperature 1" : "top-k, top-p, min-p, penalty");
  }
}

// Decode steps are recorded (CUDA graphs) from the second step of a shape on: the replayed steps
// must give the same logits, bit for bit, as steps run op by op. Each engine times its linear
// paths on its own, and two that time alike (the GEMV and cuBLASLt at these tiny shapes) may go
// either way, which changes the order of the fp32 sums (an H200 run saw 254 bytes differ): the
// path is pinned so that the engines differ only in recording.
TEST(GpuEndToEnd, RecordedDecodeStepsEqualEagerSteps) {
  REQUIRE_GPU();
  auto model = Model::load(test::stories_dir());
  auto run = [&](bool graphs) {
    setenv("LLMQ_CUDA_GRAPHS", graphs ? "1" : "0", 1);
    setenv("LLMQ_LINEAR_PATH", "gemv", 1);
    EngineOptions o;
    o.backend = LLMQ_BACKEND_CUDA;
    Engine engine(model, o);
    unsetenv("LLMQ_CUDA_GRAPHS");
    unsetenv("LLMQ_LINEAR_PATH");
    std::vector<std::unique_ptr<SequenceKv>> seqs;
    std::vector<float> logits, all;
    const std::vector<int32_t> prompt = {1, 403, 407, 261, 378};
    for (int s = 0; s < 3; ++s) {
      seqs.push_back(engine.new_sequence());
      engine.step({SequenceStep{seqs.back().get(), prompt.data(), int32_t(prompt.size()) - s, false, true}}, &logits);
    }
    for (int32_t i = 0; i < 80; ++i) {  // crosses 64 keys: a second recorded shape
      std::vector<int32_t> tokens = {10 + i % 50, 20 + i % 40, 30 + i % 30};
      std::vector<SequenceStep> step;
      for (int s = 0; s < 3; ++s) step.push_back(SequenceStep{seqs[size_t(s)].get(), &tokens[size_t(s)], 1, false, true});
      engine.step(step, &logits);
      all.insert(all.end(), logits.begin(), logits.end());
    }
    return all;
  };
  const std::vector<float> eager = run(false), recorded = run(true);
  ASSERT_EQ(eager.size(), recorded.size());
  EXPECT_EQ(0, std::memcmp(eager.data(), recorded.data(), eager.size() * sizeof(float)));
}

// The sampling kernel draws the host sampler's token for every row: random logits with ties, NaN
// and infinities at odd and real vocabulary sizes, every parameter combination, 64 rows a launch.
TEST_F(BackendPair, SamplingDrawsTheHostsTokens) {
  SampleScratch scratch;
  size_t rows_checked = 0;
  for (int32_t vocab : {1, 3, 7, 19, 733, 4099, 32000, 128256}) {
    const std::vector<test::SamplingCase> cases =
        test::with_draws(test::random_sampling_cases(uint64_t(vocab), 16, {vocab}), 4, uint64_t(vocab));
    std::vector<float> logits;
    std::vector<SampleRow> rows;
    std::vector<int32_t> expected;
    for (const test::SamplingCase& c : cases) {
      logits.insert(logits.end(), c.logits.begin(), c.logits.end());
      rows.push_back(c.with_penalized());
      std::vector<float> scratch_logits = c.logits;
      expected.push_back(sample_row(scratch_logits.data(), vocab, rows.back(), scratch));
    }
    Both t = floats(logits, int64_t(cases.size()), vocab);
    std::vector<int32_t> tokens(cases.size(), -1);
    gpu_->sample(t.gpu, rows, tokens.data());
    for (size_t i = 0; i < cases.size(); ++i)
      EXPECT_EQ(tokens[i], expected[i]) << "vocab " << vocab << " row " << i << ": T " << rows[i].temperature
                                        << " top_k " << rows[i].top_k << " top_p " << rows[i].top_p << " min_p "
                                        << rows[i].min_p << " penalty " << rows[i].repetition_penalty;
    rows_checked += cases.size();
  }
  EXPECT_EQ(rows_checked, 8u * 64u);
}

// ---- Errors ----------------------------------------------------------------------------------------

TEST(GpuErrors, KvCacheLargerThanTheGpuIsOutOfMemory) {
  REQUIRE_GPU();
  auto model = Model::load(test::stories_dir());
  EngineOptions o;
  o.backend = LLMQ_BACKEND_CUDA;
  o.kv_cache_bytes = uint64_t(1) << 40;  // 1 TiB
  try {
    Engine engine(model, o);
    FAIL() << "a 1 TiB KV cache was allocated";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_OUT_OF_MEMORY) << e.what();
    EXPECT_NE(std::string(e.what()).find("cudaMalloc"), std::string::npos) << e.what();
  }
}

// ---- Tensor parallelism through NCCL ------------------------------------------------------------
// A single GPU runs the NCCL path with a group of one rank; two GPUs or more run tp = 2 against
// tp = 1 (skipped, saying so, on a machine with fewer).

#define REQUIRE_NCCL()                                                      \
  do {                                                                      \
    std::string why_;                                                       \
    if (!nccl_available(&why_)) GTEST_SKIP() << "no NCCL: " << why_;        \
  } while (0)

struct TpOutputs {
  std::vector<float> logits;    // score() of 40 ids
  std::vector<int32_t> greedy;  // 16 tokens after another prompt
};

TpOutputs tp_outputs(Engine& engine) {
  TpOutputs out;
  std::vector<int32_t> ids{1};
  for (int i = 1; i < 40; ++i) ids.push_back(3 + (i * 37 + 505) % 509);
  out.logits.resize(ids.size() * size_t(engine.vocab_size()));
  engine.score(ids, out.logits.data());
  GenerateOptions g;
  g.sampling.temperature = 0;
  g.max_new_tokens = 16;
  g.ignore_eos = true;
  out.greedy = engine.generate({1, 403, 407, 261, 378}, g).tokens;
  return out;
}

// Row by row within 1e-4, but for at most `flips` rows within 1e-2: where a last-bit difference of
// the reordered sums lands on an FP8 rounding boundary (tests/test_tensor_parallel.cpp).
void expect_rows_close(const TpOutputs& expected, const TpOutputs& got, int flips, const std::string& what) {
  EXPECT_EQ(got.greedy, expected.greedy) << what;
  ASSERT_EQ(got.logits.size(), expected.logits.size()) << what;
  const size_t vocab = 512;
  int beyond = 0;
  for (size_t row = 0; row * vocab < got.logits.size(); ++row) {
    double diff = 0;
    for (size_t v = row * vocab; v < (row + 1) * vocab; ++v)
      diff = std::max(diff, double(std::fabs(got.logits[v] - expected.logits[v])));
    if (diff <= 1e-4) continue;
    ++beyond;
    EXPECT_LE(diff, 1e-2) << what << " row " << row;
  }
  EXPECT_LE(beyond, flips) << what;
}

std::vector<QuantMode> gpu_quant_modes() {
  std::vector<QuantMode> modes = {QuantMode::None, QuantMode::Int8WeightOnly};
  std::string why;
  if (make_cuda_backend(CudaBackendOptions{0})->supports_fp8(&why)) modes.push_back(QuantMode::Fp8);
  return modes;
}

TEST(GpuTensorParallel, OneRankThroughNcclEqualsNoNccl) {
  REQUIRE_GPU();
  REQUIRE_NCCL();
  auto model = Model::load(test::stories_dir());
  for (QuantMode quant : gpu_quant_modes()) {
    EngineOptions o;
    o.backend = LLMQ_BACKEND_CUDA;
    o.quant = quant;
    Engine plain(model, o);
    const TpOutputs expected = tp_outputs(plain);
    o.communicator = make_nccl_communicator(nccl_unique_id(), 1, 0, 0, 60000);
    Engine through_nccl(model, o);
    EXPECT_EQ(through_nccl.tensor_parallel(), 1);
    expect_rows_close(expected, tp_outputs(through_nccl), 0, std::string("nccl, 1 rank, ") + quant_mode_name(quant));
  }
}

TEST(GpuTensorParallel, NcclInitTimesOutWhenAPeerNeverJoins) {
  REQUIRE_GPU();
  REQUIRE_NCCL();
  const auto start = std::chrono::steady_clock::now();
  try {
    make_nccl_communicator(nccl_unique_id(), 2, 0, 0, 1000);  // rank 1 never comes
    FAIL() << "joined a group of 2 alone";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_TIMEOUT) << e.what();
    EXPECT_NE(std::string(e.what()).find("waited 1000 ms"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

TEST(GpuTensorParallel, TwoGpusMatchOne) {
  REQUIRE_GPU();
  REQUIRE_NCCL();
  std::string why;
  const int gpus = cuda_device_count(&why);
  if (gpus < 2) GTEST_SKIP() << "tensor parallelism on GPUs needs 2 of them; " << gpus << " visible";
  auto model = Model::load(test::stories_dir());
  for (QuantMode quant : gpu_quant_modes()) {
    const std::string mode = quant_mode_name(quant);
    const int flips = quant == QuantMode::Fp8 ? 2 : 0;
    EngineOptions o;
    o.backend = LLMQ_BACKEND_CUDA;
    o.quant = quant;
    Engine one(model, o);
    const TpOutputs expected = tp_outputs(one);
    // One process, one thread per GPU (ncclCommInitAll).
    o.tensor_parallel = 2;
    Engine two(model, o);
    expect_rows_close(expected, tp_outputs(two), flips, "tp 2 in one engine, " + mode);
    // One engine per rank, as separate processes would hold them (ncclCommInitRank).
    const NcclId id = nccl_unique_id();
    std::vector<TpOutputs> got(2);
    std::vector<std::string> errors(2);
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r)
      threads.emplace_back([&, r] {
        try {
          EngineOptions rank = o;
          rank.tensor_parallel = 1;
          rank.communicator = make_nccl_communicator(id, 2, r, r, 60000);
          Engine engine(model, rank);
          got[size_t(r)] = tp_outputs(engine);
        } catch (const Error& e) {
          errors[size_t(r)] = e.what();
        }
      });
    for (auto& t : threads) t.join();
    for (int r = 0; r < 2; ++r) {
      ASSERT_EQ(errors[size_t(r)], "") << "rank " << r;
      expect_rows_close(expected, got[size_t(r)], flips, "one rank per engine, rank " + std::to_string(r) + ", " + mode);
    }
  }
}

}  // namespace
}  // namespace llmq
