#include "engine/quant.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include "engine/error.h"
#include "engine/fp8.h"

namespace llmq {

namespace {

float load_weight(const Tensor& w, int64_t index) {
  switch (w.dtype) {
    case DType::F32:
      return w.as<float>()[index];
    case DType::BF16:
      return bf16_to_f32(w.as<uint16_t>()[index]);
    case DType::F16:
      return f16_to_f32(w.as<uint16_t>()[index]);
    default:
      fail(LLMQ_ERR_UNSUPPORTED, "quantize: weights of dtype {} cannot be quantized", dtype_name(w.dtype));
  }
}

// Runs fn(begin, end) over [0, n) split into `threads` contiguous ranges.
template <typename Fn>
void split_rows(int64_t n, int threads, Fn&& fn) {
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, n / 64 + 1)));
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back([&, t] { fn(n * t / threads, n * (t + 1) / threads); });
  fn(0, n / threads);
  for (auto& thread : pool) thread.join();
}

}  // namespace

const char* quant_mode_name(QuantMode mode) {
  switch (mode) {
    case QuantMode::None:
      return "none";
    case QuantMode::Int8WeightOnly:
      return "int8wo";
    case QuantMode::Fp8:
      return "fp8";
  }
  return "?";
}

LinearWeight QuantizedWeight::view(DType act_dtype) {
  LinearWeight v;
  v.w = Tensor{data.data(), dtype, rows, cols};
  v.scale = Tensor{scale.data(), DType::F32, 1, int64_t(scale.size())};
  v.act_dtype = act_dtype;
  return v;
}

std::vector<float> weight_amax(const Tensor& w, QuantMode mode, int n_threads) {
  if (mode != QuantMode::Int8WeightOnly && mode != QuantMode::Fp8) fail(LLMQ_ERR_INTERNAL, "quantize: no quantization mode");
  std::vector<float> row_amax(size_t(w.rows));
  split_rows(w.rows, n_threads, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float amax = 0.0f;
      for (int64_t k = 0; k < w.cols; ++k) amax = std::max(amax, std::fabs(load_weight(w, n * w.cols + k)));
      row_amax[size_t(n)] = amax;
    }
  });
  if (mode == QuantMode::Int8WeightOnly) return row_amax;
  return {row_amax.empty() ? 0.0f : *std::max_element(row_amax.begin(), row_amax.end())};
}

QuantizedWeight quantize_weight(const Tensor& w, QuantMode mode, int n_threads) {
  return quantize_weight(w, mode, n_threads, weight_amax(w, mode, n_threads));
}

QuantizedWeight quantize_weight(const Tensor& w, QuantMode mode, int n_threads, const std::vector<float>& amax) {
  QuantizedWeight q;
  q.rows = w.rows;
  q.cols = w.cols;
  q.data.resize(size_t(w.numel()));
  const int64_t K = w.cols;
  if (mode == QuantMode::Int8WeightOnly) {
    if (int64_t(amax.size()) != w.rows) fail(LLMQ_ERR_INTERNAL, "quantize: {} amax values for {} rows", amax.size(), w.rows);
    q.dtype = DType::I8;
    q.scale.resize(size_t(w.rows));
    // Checked here, not in the threads below (an exception must not leave a std::thread).
    for (size_t n = 0; n < amax.size(); ++n)
      if (!std::isfinite(amax[n])) fail(LLMQ_ERR_MODEL_FORMAT, "quantize: weight row {} is not finite", n);
    split_rows(w.rows, n_threads, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const float row_amax = amax[size_t(n)];
        q.scale[size_t(n)] = row_amax / 127.0f;
        const float inv = row_amax > 0.0f ? 127.0f / row_amax : 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          float r = std::nearbyint(load_weight(w, n * K + k) * inv);  // round to nearest even
          q.data[size_t(n * K + k)] = uint8_t(int8_t(std::clamp(r, -127.0f, 127.0f)));
        }
      }
    });
  } else if (mode == QuantMode::Fp8) {
    if (amax.size() != 1) fail(LLMQ_ERR_INTERNAL, "quantize: fp8 takes one amax per tensor, got {}", amax.size());
    q.dtype = DType::F8_E4M3;
    if (!std::isfinite(amax[0])) fail(LLMQ_ERR_MODEL_FORMAT, "quantize: weight is not finite");
    q.scale.assign(1, amax[0] / kFp8E4M3Max);
    const float inv = amax[0] > 0.0f ? kFp8E4M3Max / amax[0] : 0.0f;
    split_rows(w.rows, n_threads, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * K; i < end * K; ++i) q.data[size_t(i)] = f32_to_fp8_e4m3(load_weight(w, i) * inv);
    });
  } else {
    fail(LLMQ_ERR_INTERNAL, "quantize: no quantization mode");
  }
  return q;
}

float round_activation(float x, DType act_dtype) {
  switch (act_dtype) {
    case DType::BF16:
      return bf16_to_f32(f32_to_bf16(x));
    case DType::F16:
      return f16_to_f32(f32_to_f16(x));
    default:
      return x;
  }
}

float quantize_row_fp8(const float* x, int64_t n, float* out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  return quantize_row_fp8(x, n, amax, out);
}

float quantize_row_fp8(const float* x, int64_t n, float amax, float* out) {
  const float inv = amax > 0.0f ? kFp8E4M3Max / amax : 0.0f;
  for (int64_t i = 0; i < n; ++i) out[i] = fp8_e4m3_to_f32(f32_to_fp8_e4m3(x[i] * inv));
  return amax / kFp8E4M3Max;
}

}  // namespace llmq

namespace llmq {

int64_t quantize_row_fp8_static(const float* x, int64_t n, float scale, float* out) {
  const float inv = 1.0f / scale;
  int64_t clipped = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * inv;
    clipped += std::fabs(v) > kFp8E4M3Max;
    out[i] = fp8_e4m3_to_f32(f32_to_fp8_e4m3(v));
  }
  return clipped;
}

}  // namespace llmq
