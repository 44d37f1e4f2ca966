// The CPU backend: every op in fp32, weights converted from their stored dtype inside the kernels,
// work split over a thread pool so that each output element is computed by one task only (results
// are bitwise independent of the thread count and of the other sequences in the batch).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <type_traits>

#include "engine/backend.h"
#include "engine/host_peak.h"
#include "engine/error.h"
#include "engine/fp8.h"
#include "engine/quant.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/thread_pool.h"

namespace llmq {

namespace {

class HostBuffer final : public Buffer {
 public:
  explicit HostBuffer(uint64_t bytes) : size_(bytes) {
    // 64-byte alignment for vector loads and to keep rows off shared cache lines.
    data_ = std::aligned_alloc(64, std::max<uint64_t>(64, (bytes + 63) / 64 * 64));
    if (!data_) fail(LLMQ_ERR_OUT_OF_MEMORY, "cpu backend: cannot allocate {} bytes", bytes);
  }
  ~HostBuffer() override { std::free(data_); }
  void* data() override { return data_; }
  uint64_t size() const override { return size_; }

 private:
  void* data_;
  uint64_t size_;
};

float load_element(const void* base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::F32:
      return static_cast<const float*>(base)[index];
    case DType::BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(base)[index]);
    case DType::F16:
      return f16_to_f32(static_cast<const uint16_t*>(base)[index]);
    default:
      fail(LLMQ_ERR_INTERNAL, "cpu backend: unexpected dtype {}", dtype_name(dtype));
  }
}

// KV cache elements: fp32, or 16-bit rounded to nearest even on write.
struct F32Kv {
  using Elem = float;
  static float load(Elem e) { return e; }
  static Elem store(float f) { return f; }
};
struct Bf16Kv {
  using Elem = uint16_t;
  static float load(Elem e) { return bf16_to_f32(e); }
  static Elem store(float f) { return f32_to_bf16(f); }
};
struct F16Kv {
  using Elem = uint16_t;
  static float load(Elem e) { return f16_to_f32(e); }
  static Elem store(float f) { return f32_to_f16(f); }
};

// 8-bit caches: codes, scaled by KvLayer's k_scale / v_scale (stored by write_kv_head below).
struct I8Kv {
  using Elem = int8_t;
  static float load(Elem e) { return float(e); }
};
struct Fp8Kv {
  using Elem = uint8_t;
  static float load(Elem e) { return fp8_e4m3_to_f32(e); }
};

// Calls fn(KvType{}) for the cache's dtype.
template <typename Fn>
void with_kv_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32:
      return fn(F32Kv{});
    case DType::BF16:
      return fn(Bf16Kv{});
    case DType::F16:
      return fn(F16Kv{});
    case DType::I8:
      return fn(I8Kv{});
    case DType::F8_E4M3:
      return fn(Fp8Kv{});
    default:
      fail(LLMQ_ERR_UNSUPPORTED, "cpu backend: KV cache dtype {} is not supported", dtype_name(dtype));
  }
}

void rmsnorm_row(const float* x, const Tensor& weight, float eps, int64_t dim, float* out) {
  double sum_squares = 0.0;
  for (int64_t i = 0; i < dim; ++i) sum_squares += double(x[i]) * double(x[i]);
  float inv = float(1.0 / std::sqrt(sum_squares / double(dim) + double(eps)));
  for (int64_t i = 0; i < dim; ++i) out[i] = (x[i] * inv) * load_element(weight.data, weight.dtype, i);
}

// Stores one head's K or V row (head_dim values) at scale index `head` of a cache layer; returns
// how many values a static FP8 scale clipped.
int64_t write_kv_head(const float* src, int64_t head_dim, const Tensor& cache, const Tensor& scale, int64_t head) {
  const int64_t dst = head * head_dim;
  switch (cache.dtype) {
    case DType::I8: {
      float amax = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(src[d]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      scale.as<float>()[head] = amax / 127.0f;
      for (int64_t d = 0; d < head_dim; ++d)
        cache.as<int8_t>()[dst + d] = int8_t(std::clamp(std::nearbyint(src[d] * inv), -127.0f, 127.0f));
      return 0;
    }
    case DType::F8_E4M3: {
      const float inv = 1.0f / scale.as<float>()[0];
      int64_t clipped = 0;
      for (int64_t d = 0; d < head_dim; ++d) {
        clipped += std::fabs(src[d] * inv) > kFp8E4M3Max;
        cache.as<uint8_t>()[dst + d] = f32_to_fp8_e4m3(src[d] * inv);
      }
      return clipped;
    }
    default:
      with_kv_type(cache.dtype, [&](auto kv) {
        using Kv = decltype(kv);
        if constexpr (std::is_same<Kv, F32Kv>::value || std::is_same<Kv, Bf16Kv>::value || std::is_same<Kv, F16Kv>::value)
          for (int64_t d = 0; d < head_dim; ++d) cache.as<typename Kv::Elem>()[dst + d] = Kv::store(src[d]);
      });
      return 0;
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuBackendOptions& options)
      : pool_(options.n_threads > 0 ? options.n_threads : int(std::max(1u, std::thread::hardware_concurrency()))) {}

  const char* name() const override { return "cpu"; }

  double measure_peak_bandwidth() override {
    // 1 GiB: past any last-level cache (some EPYCs hold 256 MiB or more); the best of 3 passes by the
    // pool's thread count. Smaller when memory is short, else 0.
    for (size_t bytes : {size_t(1) << 30, size_t(256) << 20, size_t(64) << 20}) {
      try {
        return measure_read_bandwidth(bytes, pool_.size(), 3).best_bytes_per_s;
      } catch (const Error& e) {
        if (e.status() != LLMQ_ERR_OUT_OF_MEMORY) throw;
      }
    }
    return 0;
  }

  std::unique_ptr<Buffer> allocate(uint64_t bytes) override { return std::make_unique<HostBuffer>(bytes); }

  Tensor upload(const Tensor& host) override { return host; }  // host memory is ours already: no copy

  void begin_step(const BatchPlan& plan) override { plan_ = &plan; }

  void embed(const Tensor& table, int64_t first_id, Tensor& out) override {
    const int64_t dim = out.cols;
    pool_.parallel_for(out.rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row = plan_->tokens[size_t(t)] - first_id;
        float* dst = out.as<float>() + t * dim;
        if (row < 0 || row >= table.rows)
          std::fill(dst, dst + dim, 0.0f);
        else
          for (int64_t i = 0; i < dim; ++i) dst[i] = load_element(table.data, table.dtype, row * dim + i);
      }
    });
  }

  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    pool_.parallel_for(x.rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        rmsnorm_row(x.as<float>() + t * x.cols, weight, eps, x.cols, out.as<float>() + t * x.cols);
    });
  }

  void add_rmsnorm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    pool_.parallel_for(x.rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* r = residual.as<float>() + t * x.cols;
        const float* d = x.as<float>() + t * x.cols;
        for (int64_t i = 0; i < x.cols; ++i) r[i] += d[i];
        rmsnorm_row(r, weight, eps, x.cols, out.as<float>() + t * x.cols);
      }
    });
  }

  void linear(const Tensor& x, const LinearWeight& weight, const Tensor* bias, Tensor& out,
              const Tensor* row_amax = nullptr) override {
    const int64_t M = x.rows, K = x.cols, N = weight.w.rows;
    const float* input = x.as<float>();
    const DType w_dtype = weight.w.dtype;
    // Quantized weights: the activations first take the form the products use (engine/quant.h).
    if (w_dtype == DType::I8 || w_dtype == DType::F8_E4M3) {
      reserve_counters(weight.layer);
      activations_.resize(size_t(M * K));
      if (w_dtype == DType::F8_E4M3) row_scales_.assign(size_t(M), 1.0f);
      pool_.parallel_for(M, 4, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          const float* src = input + m * K;
          float* dst = activations_.data() + m * K;
          if (w_dtype == DType::F8_E4M3 && !weight.input_scale.empty()) {
            row_scales_[size_t(m)] = weight.input_scale.as<float>()[0];
            count(weight.layer, kActivationsClipped, quantize_row_fp8_static(src, K, row_scales_[size_t(m)], dst));
            count(weight.layer, kActivationsStatic, K);
          } else if (w_dtype == DType::F8_E4M3) {
            row_scales_[size_t(m)] = row_amax ? quantize_row_fp8(src, K, row_amax->as<float>()[m], dst)
                                              : quantize_row_fp8(src, K, dst);
          }
          if (w_dtype == DType::I8)
            for (int64_t k = 0; k < K; ++k) dst[k] = round_activation(src[k], weight.act_dtype);
        }
      });
      input = activations_.data();
    }
    // Split the output columns in groups of 4 weight rows; small products run inline.
    const int64_t tiles = (N + 3) / 4;
    const int64_t macs_per_tile = 4 * M * K;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, macs_per_tile));
    pool_.parallel_for(tiles, grain, [&](int64_t begin, int64_t end) {
      int64_t n_begin = begin * 4, n_end = std::min(N, end * 4);
      float* o = out.as<float>();
      cpu::linear_rows(input, M, K, weight.w.data, w_dtype, N, n_begin, n_end, o);
      if (weight.quantized()) {
        const float* scale = weight.scale.as<float>();
        const bool per_channel = weight.scale.cols > 1;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n_begin; n < n_end; ++n)
            o[m * N + n] *= row_scales_.empty() ? scale[per_channel ? n : 0]
                                                : row_scales_[size_t(m)] * scale[per_channel ? n : 0];
      }
      if (bias) {
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n_begin; n < n_end; ++n) o[m * N + n] += load_element(bias->data, bias->dtype, n);
      }
    });
    row_scales_.clear();
  }

  void rope_kv_write(Tensor& q, Tensor& k, const Tensor& v, const Tensor& inv_freq, const KvLayer& cache) override {
    reserve_counters(cache.layer);
    const int64_t head_dim = cache.head_dim, half = head_dim / 2;
    const int64_t n_q_heads = q.cols / head_dim, n_kv_heads = cache.num_kv_heads;
    pool_.parallel_for(q.rows, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> cos_table(static_cast<size_t>(half)), sin_table(static_cast<size_t>(half));
      for (int64_t t = begin; t < end; ++t) {
        // As Hugging Face: angle = position * inv_freq in fp32, then cos/sin in fp32.
        float position = float(plan_->positions[size_t(t)]);
        for (int64_t i = 0; i < half; ++i) {
          float angle = position * inv_freq.as<float>()[i];
          cos_table[size_t(i)] = std::cos(angle);
          sin_table[size_t(i)] = std::sin(angle);
        }
        auto rotate = [&](float* head) {
          for (int64_t i = 0; i < half; ++i) {
            float x0 = head[i], x1 = head[i + half];
            head[i] = x0 * cos_table[size_t(i)] - x1 * sin_table[size_t(i)];
            head[i + half] = x1 * cos_table[size_t(i)] + x0 * sin_table[size_t(i)];
          }
        };
        for (int64_t h = 0; h < n_q_heads; ++h) rotate(q.as<float>() + t * q.cols + h * head_dim);
        for (int64_t h = 0; h < n_kv_heads; ++h) rotate(k.as<float>() + t * k.cols + h * head_dim);

        int64_t slot = plan_->slots[size_t(t)];
        int64_t block = slot / cache.block_size, offset = slot % cache.block_size;
        int64_t k_clipped = 0, v_clipped = 0;
        for (int64_t h = 0; h < n_kv_heads; ++h) {
          const int64_t head = (block * n_kv_heads + h) * cache.block_size + offset;  // scale index
          k_clipped += write_kv_head(k.as<float>() + t * k.cols + h * head_dim, head_dim, cache.k, cache.k_scale, head);
          v_clipped += write_kv_head(v.as<float>() + t * v.cols + h * head_dim, head_dim, cache.v, cache.v_scale, head);
        }
        if (cache.k.dtype == DType::F8_E4M3) {
          count(cache.layer, kKClipped, k_clipped);
          count(cache.layer, kVClipped, v_clipped);
          count(cache.layer, kKvStatic, n_kv_heads * head_dim);
        }
      }
    });
  }

  void attention(const Tensor& q, const KvLayer& cache, const AttentionParams& params, Tensor& out) override {
    with_kv_type(cache.k.dtype, [&](auto kv) { attend<decltype(kv)>(q, cache, params, out); });
  }

  void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    const int64_t n = gate.numel();
    pool_.parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
      const float* g = gate.as<float>();
      const float* u = up.as<float>();
      float* o = out.as<float>();
      for (int64_t i = begin; i < end; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    });
  }

  void gather_rows(const Tensor& x, Tensor& out) override {
    for (size_t i = 0; i < plan_->logit_rows.size(); ++i)
      std::memcpy(out.as<float>() + int64_t(i) * x.cols, x.as<float>() + int64_t(plan_->logit_rows[i]) * x.cols,
                  sizeof(float) * size_t(x.cols));
  }

  void row_absmax(const Tensor& x, Tensor& out) override {
    for (int64_t m = 0; m < x.rows; ++m) {
      float amax = 0.0f;
      for (int64_t k = 0; k < x.cols; ++k) amax = std::max(amax, std::fabs(x.as<float>()[m * x.cols + k]));
      out.as<float>()[m] = amax;
    }
  }

  void sample(Tensor& logits, const std::vector<SampleRow>& rows, int32_t* tokens) override {
    for (size_t i = 0; i < rows.size(); ++i)
      tokens[i] = sample_row(logits.as<float>() + int64_t(i) * logits.cols, int32_t(logits.cols), rows[i], sample_scratch_);
  }

  void to_host(const Tensor& x, float* host) override { std::memcpy(host, x.data, x.nbytes()); }
  void from_host(const float* host, Tensor& x) override { std::memcpy(x.data, host, x.nbytes()); }

  std::vector<uint64_t> saturation(int32_t layers, bool reset) override {
    std::vector<uint64_t> out(size_t(layers) * kSaturationCounters, 0);
    for (size_t i = 0; i < out.size() && i < counters_.size(); ++i)
      out[i] = reset ? counters_[i].exchange(0) : counters_[i].load();
    return out;
  }

 private:
  SampleScratch sample_scratch_;

  template <typename Kv>
  void attend(const Tensor& q, const KvLayer& cache, const AttentionParams& params, Tensor& out) {
    using Elem = typename Kv::Elem;
    const int64_t head_dim = params.head_dim, bs = cache.block_size;
    const int64_t group = params.num_heads / params.num_kv_heads;
    const int64_t tasks = q.rows * params.num_heads;
    // Waking the workers costs more than a short decode attention: run small steps inline.
    int64_t work = 0;
    for (int32_t position : plan_->positions) work += position + 1;
    const int64_t grain = work * params.num_heads * head_dim < (1 << 16) ? tasks : 1;
    pool_.parallel_for(tasks, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t task = begin; task < end; ++task) {
        int64_t t = task / params.num_heads, h = task % params.num_heads, kv_head = h / group;
        int32_t seq = plan_->token_seq[size_t(t)];
        int64_t position = plan_->positions[size_t(t)];
        int64_t first = params.sliding_window > 0 ? std::max<int64_t>(0, position - params.sliding_window + 1) : 0;
        const int32_t* blocks = plan_->block_ids.data() + plan_->block_offsets[size_t(seq)];
        const float* qh = q.as<float>() + t * q.cols + h * head_dim;
        auto head_index = [&](int64_t j) { return (int64_t(blocks[j / bs]) * cache.num_kv_heads + kv_head) * bs + j % bs; };
        auto kv_row = [&](const Tensor& store, int64_t j) { return store.as<Elem>() + head_index(j) * head_dim; };
        // 8-bit caches: code * scale, dequantized before the products (1.0 and exact otherwise).
        const bool per_token = cache.k.dtype == DType::I8;
        auto row_scale = [&](const Tensor& scale, int64_t j) {
          return scale.empty() ? 1.0f : scale.as<float>()[per_token ? head_index(j) : 0];
        };
        scores.resize(size_t(position - first + 1));
        float max_score = -INFINITY;
        for (int64_t j = first; j <= position; ++j) {
          const Elem* kj = kv_row(cache.k, j);
          const float ks = row_scale(cache.k_scale, j);
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * (Kv::load(kj[d]) * ks);
          float s = dot * params.scale;
          scores[size_t(j - first)] = s;
          max_score = std::max(max_score, s);
        }
        float denominator = 0.0f;
        for (float& s : scores) {
          s = std::exp(s - max_score);
          denominator += s;
        }
        float* oh = out.as<float>() + t * out.cols + h * head_dim;
        std::fill(oh, oh + head_dim, 0.0f);
        for (int64_t j = first; j <= position; ++j) {
          const Elem* vj = kv_row(cache.v, j);
          const float vs = row_scale(cache.v_scale, j);
          float p = scores[size_t(j - first)];
          for (int64_t d = 0; d < head_dim; ++d) oh[d] += p * (Kv::load(vj[d]) * vs);
        }
        float inv = 1.0f / denominator;
        for (int64_t d = 0; d < head_dim; ++d) oh[d] *= inv;
      }
    });
  }

  // Saturation counters, kSaturationCounters per layer; sized before the parallel ops that add.
  void reserve_counters(int32_t layer) {
    const size_t needed = size_t(layer + 1) * kSaturationCounters;
    if (layer < 0 || counters_.size() >= needed) return;
    std::vector<std::atomic<uint64_t>> grown(needed);
    for (size_t i = 0; i < counters_.size(); ++i) grown[i] = counters_[i].load();
    counters_.swap(grown);
  }
  void count(int32_t layer, SaturationCounter counter, int64_t n) {
    if (layer >= 0 && n > 0) counters_[size_t(layer) * kSaturationCounters + counter].fetch_add(uint64_t(n));
  }

  ThreadPool pool_;
  const BatchPlan* plan_ = nullptr;
  std::vector<std::atomic<uint64_t>> counters_;
  std::vector<float> activations_;  // quantized-form inputs of a linear
  std::vector<float> row_scales_;   // per-token FP8 activation scales; empty for int8wo
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

}  // namespace llmq
