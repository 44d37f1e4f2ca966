// The CPU backend's ops, its thread pool and the scalar dtype conversions, each checked against an
// independent float64 reference written here (fresh random inputs from fixed seeds, odd sizes, weights
// in F32, F16 and BF16; outputs are poisoned with a NaN of a known bit pattern beforehand, so an
// unwritten element shows up as NaN and a write past the end shows up in a guard row).
//
// Tolerances. Every kernel computes in fp32 (unit roundoff u = 2^-24 ~ 6e-8); the reference is
// float64 on the same (exactly converted) inputs, so the difference is the kernel's fp32 rounding.
//  - linear: |out - ref| <= 1e-5 * sum_k |x_k w_k| (+ |bias|) per element, and ||out-ref||/||ref|| <= 1e-5.
//    The fixed-order blocked sum (16 lanes, then a tree, then the K % 16 tail) has a worst-case bound
//    of about (K/16 + 20) u * sum|x w| ~ 3e-6 for K = 733; typical errors are ~1e-7.
//  - embed, gather_rows, to_host: exact (bitwise): they copy, or convert 16-bit values exactly.
//  - rmsnorm / add_rmsnorm: per element |out - ref| <= 1e-6 |ref| (the kernel rounds three times: the
//    scale, x * scale, * weight -> <= ~2 u relative); the residual update is bitwise r + x in fp32.
//  - silu_mul: per element |out - ref| <= 1e-6 |ref| + 1e-30 (expf is within 1 ulp, then three roundings;
//    the absolute term covers gate <= -88, where exp overflows in fp32 and the result is -0 vs ~1e-40).
//  - rope: the kernel takes angle = float(pos) * inv_freq rounded to fp32 (as Hugging Face), the
//    reference angle = pos * inv_freq in float64; at positions <= 13 the angle error is <= 0.5 ulp(13)
//    ~ 1e-6 rad, so |out - ref| <= 2e-5 absolute on values of magnitude <= ~3, and relative L2 <= 1e-5.
//  - attention: rope's error plus fp32 dot products / softmax / weighted sum over <= 14 positions:
//    ||out-ref||/||ref|| <= 1e-5, max abs <= 2e-5 (values are in [-1, 1]).
//  - dtype conversions: exact (bitwise; any NaN is accepted where the reference is NaN).
// Bitwise properties: linear's row m of an M-row product equals the row computed alone (M = 1), for
// every dtype (M <= 4 and M > 4 are different code paths for F16/BF16), and a column does not depend
// on which weight rows are computed with it; linear gives the same bits for 1, 2, 3 and 5 threads, the
// other ops for 1 and 3 (attention also 2), with sizes large enough for the pool to split the work.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/dtype.h"
#include "kernels/cpu/thread_pool.h"

// The CUDA toolkit's half / bfloat16 conversions have host paths; when the headers are reachable
// (a CUDA build puts them on the include path; else the default toolkit location) they serve as a
// second, independent reference for the conversions.
#if defined(__has_include)
#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LLMQ_TEST_CUDA_FP16 1
#elif __has_include("/usr/local/cuda/include/cuda_fp16.h") && __has_include("/usr/local/cuda/include/cuda_bf16.h")
#include "/usr/local/cuda/include/cuda_bf16.h"
#include "/usr/local/cuda/include/cuda_fp16.h"
#define LLMQ_TEST_CUDA_FP16 1
#endif
#endif

namespace llmq {
namespace {

// ---------------------------------------------------------------------------------------------
// Helpers

constexpr uint32_t kPoisonBits = 0x7fedcba9u;  // a quiet NaN with a recognizable payload

float poison() { return f32_from_bits(kPoisonBits); }
bool is_poison(float f) { return f32_bits(f) == kPoisonBits; }
std::vector<float> poisoned(size_t n) { return std::vector<float>(n, poison()); }

// A portable generator: the same numbers with any standard library.
struct Rng {
  explicit Rng(uint64_t seed) : engine(seed) {}
  double uniform(double lo, double hi) { return lo + (hi - lo) * double(engine() >> 11) * 0x1.0p-53; }
  uint32_t u32() { return uint32_t(engine() >> 32); }
  int32_t below(int32_t n) { return int32_t(engine() % uint64_t(n)); }
  std::vector<float> floats(size_t n, double lo, double hi) {
    std::vector<float> v(n);
    for (float& f : v) f = float(uniform(lo, hi));
    return v;
  }
  std::mt19937_64 engine;
};

// ---- Reference dtype conversions from the bit layouts, in float64 ----

double ref_f16_value(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0x1f)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0)
    v = std::ldexp(double(m), -24);
  else
    v = std::ldexp(double(1024 + m), e - 25);
  return (h & 0x8000) ? -v : v;
}

double ref_bf16_value(uint16_t b) {
  const int e = (b >> 7) & 0xff, m = b & 0x7f;
  double v;
  if (e == 0xff)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0)
    v = std::ldexp(double(m), -133);
  else
    v = std::ldexp(double(128 + m), e - 134);
  return (b & 0x8000) ? -v : v;
}

bool f16_is_nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }
bool bf16_is_nan(uint16_t b) { return (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0; }

// Round to nearest even with double arithmetic: scale the value so that the target's last significant
// bit has weight 1 (exact in double), round with nearbyint (ties to even in the default mode).
// Returns a NaN pattern for NaN input (callers only check that the result is a NaN).
uint16_t ref_f32_to_f16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return uint16_t(sign | 0x7e00);
  const double a = std::fabs(double(f));
  if (std::isinf(a)) return uint16_t(sign | 0x7c00);
  if (a < 0x1p-14) return uint16_t(sign | uint16_t(std::nearbyint(a * 0x1p24)));  // 1024 -> the smallest normal
  int e;
  std::frexp(a, &e);
  const int E = e - 1;  // a in [2^E, 2^(E+1))
  if (E > 15) return uint16_t(sign | 0x7c00);
  const double n = std::nearbyint(std::ldexp(a, 10 - E));  // in [1024, 2048]; 2048 carries into the exponent
  uint32_t bits = (uint32_t(E + 15) << 10) + uint32_t(n) - 1024u;
  if (bits >= 0x7c00u) bits = 0x7c00u;
  return uint16_t(sign | bits);
}

uint16_t ref_f32_to_bf16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return uint16_t(sign | 0x7fc0);
  const double a = std::fabs(double(f));
  if (std::isinf(a)) return uint16_t(sign | 0x7f80);
  if (a < 0x1p-126) return uint16_t(sign | uint16_t(std::nearbyint(a * 0x1p133)));
  int e;
  std::frexp(a, &e);
  const int E = e - 1;
  const double n = std::nearbyint(std::ldexp(a, 7 - E));  // in [128, 256]
  uint32_t bits = (uint32_t(E + 127) << 7) + uint32_t(n) - 128u;
  if (bits >= 0x7f80u) bits = 0x7f80u;
  return uint16_t(sign | bits);
}

// ---- Weights in a stored dtype, with their exact values for the reference ----

struct Stored {
  DType dtype = DType::F32;
  std::vector<float> f32;
  std::vector<uint16_t> u16;
  std::vector<double> value;  // the exact value of every element
  Tensor tensor(int64_t rows, int64_t cols) const {
    void* data = dtype == DType::F32 ? static_cast<void*>(const_cast<float*>(f32.data()))
                                     : static_cast<void*>(const_cast<uint16_t*>(u16.data()));
    return Tensor{data, dtype, rows, cols};
  }
};

Stored make_stored(DType dtype, size_t n, Rng& rng, double lo, double hi) {
  Stored s;
  s.dtype = dtype;
  s.value.resize(n);
  if (dtype == DType::F32) s.f32.resize(n);
  else s.u16.resize(n);
  for (size_t i = 0; i < n; ++i) {
    float r = float(rng.uniform(lo, hi));
    if (dtype == DType::F32) {
      s.f32[i] = r;
      s.value[i] = r;
    } else if (dtype == DType::F16) {
      s.u16[i] = ref_f32_to_f16(r);
      s.value[i] = ref_f16_value(s.u16[i]);
    } else {
      s.u16[i] = ref_f32_to_bf16(r);
      s.value[i] = ref_bf16_value(s.u16[i]);
    }
  }
  return s;
}

const DType kWeightDtypes[] = {DType::F32, DType::F16, DType::BF16};

// ---- Comparing an output to the reference ----

struct Diff {
  double rel_l2 = 0;      // ||out - ref|| / ||ref||
  double max_abs = 0;     // max |out - ref|
  double max_scaled = 0;  // max |out - ref| / scale (when a scale is given)
  int64_t not_finite = 0;  // outputs that are NaN/inf where the reference is finite (unwritten: poison)
  int64_t worst = -1;
};

Diff compare(const float* out, const double* ref, size_t n, const double* scale = nullptr) {
  Diff d;
  double err2 = 0, ref2 = 0, worst = -1;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(out[i])) {
      if (std::isfinite(ref[i]) || std::isnan(out[i]) != std::isnan(ref[i])) ++d.not_finite;
      continue;
    }
    const double e = std::fabs(double(out[i]) - ref[i]);
    err2 += e * e;
    ref2 += ref[i] * ref[i];
    d.max_abs = std::max(d.max_abs, e);
    const double s = scale ? e / scale[i] : e;
    if (s > worst) {
      worst = s;
      d.worst = int64_t(i);
    }
    if (scale) d.max_scaled = std::max(d.max_scaled, s);
  }
  d.rel_l2 = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  return d;
}

std::string describe(const Diff& d) {
  std::ostringstream s;
  s << "rel_l2 " << d.rel_l2 << ", max_abs " << d.max_abs << ", max_scaled " << d.max_scaled << ", not finite "
    << d.not_finite << ", worst element " << d.worst;
  return s.str();
}

// Reports at most a few failures of a sweep in full, then counts the rest.
class FailureLog {
 public:
  explicit FailureLog(const char* what) : what_(what) {}
  ~FailureLog() { EXPECT_EQ(count_, 0) << what_ << ": " << count_ << " failing checks in all"; }
  void add(const std::string& message) {
    if (++count_ <= 3) ADD_FAILURE() << message;
  }
  bool ok() const { return count_ == 0; }

 private:
  const char* what_;
  int count_ = 0;
};

bool same_bits(const float* a, const float* b, size_t n, size_t* where = nullptr) {
  for (size_t i = 0; i < n; ++i) {
    if (f32_bits(a[i]) != f32_bits(b[i])) {
      if (where) *where = i;
      return false;
    }
  }
  return true;
}

// One backend per thread count, kept for the whole run.
Backend& cpu(int threads) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<Backend>> backends;
  std::lock_guard<std::mutex> lock(mutex);
  auto& b = backends[threads];
  if (!b) b = make_cpu_backend(CpuBackendOptions{threads});
  return *b;
}

Tensor f32_tensor(std::vector<float>& v, int64_t rows, int64_t cols) {
  return Tensor{v.data(), DType::F32, rows, cols};
}

// ---------------------------------------------------------------------------------------------
// linear

struct LinearCase {
  int64_t M, K, N;
  DType dtype;
  bool bias;
  std::string name() const {
    std::ostringstream s;
    s << dtype_name(dtype) << " M=" << M << " K=" << K << " N=" << N << (bias ? " +bias" : "");
    return s.str();
  }
};

// Reference and per-element error scale (sum_k |x w| + |b|).
void linear_reference(const std::vector<float>& x, const Stored& w, const Stored* b, int64_t M, int64_t K,
                      int64_t N, std::vector<double>* ref, std::vector<double>* scale) {
  ref->assign(size_t(M * N), 0.0);
  scale->assign(size_t(M * N), 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0, mag = 0;
      const float* xr = x.data() + m * K;
      const double* wr = w.value.data() + n * K;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(xr[k]) * wr[k];
        sum += p;
        mag += std::fabs(p);
      }
      if (b) {
        sum += b->value[size_t(n)];
        mag += std::fabs(b->value[size_t(n)]);
      }
      (*ref)[size_t(m * N + n)] = sum;
      (*scale)[size_t(m * N + n)] = mag > 0 ? mag : 1e-30;
    }
  }
}

// Runs linear into a poisoned buffer with one guard row; checks the guard; returns the M x N result.
std::vector<float> run_linear(Backend& backend, std::vector<float>& x, const Stored& w, const Stored* b, int64_t M,
                              int64_t K, int64_t N, FailureLog& log, const std::string& name) {
  std::vector<float> out = poisoned(size_t((M + 1) * N));
  Tensor xt = f32_tensor(x, M, K), wt = w.tensor(N, K), ot = f32_tensor(out, M, N);
  Tensor bt = b ? b->tensor(1, N) : Tensor{};
  LinearWeight lw;
  lw.w = wt;
  backend.linear(xt, lw, b ? &bt : nullptr, ot);
  for (int64_t i = M * N; i < (M + 1) * N; ++i) {
    if (!is_poison(out[size_t(i)])) {
      log.add(name + ": wrote past the output at element " + std::to_string(i));
      break;
    }
  }
  out.resize(size_t(M * N));
  return out;
}

TEST(CpuKernels, LinearMatchesFloat64Reference) {
  FailureLog log("linear");
  const int64_t Ms[] = {1, 2, 3, 4, 5, 9, 33};
  const int64_t Ks[] = {1, 7, 16, 17, 64, 172, 733};
  const int64_t Ns[] = {1, 3, 5, 19, 64};
  Rng rng(0x11ea4);
  int cases = 0;
  for (DType dtype : kWeightDtypes) {
    for (int64_t K : Ks) {
      for (int64_t N : Ns) {
        const Stored w = make_stored(dtype, size_t(N * K), rng, -1, 1);
        const Stored b = make_stored(dtype, size_t(N), rng, -1, 1);
        for (int64_t M : Ms) {
          std::vector<float> x = rng.floats(size_t(M * K), -1, 1);
          for (bool with_bias : {false, true}) {
            const LinearCase c{M, K, N, dtype, with_bias};
            const Stored* bias = with_bias ? &b : nullptr;
            ++cases;
            std::vector<double> ref, scale;
            linear_reference(x, w, bias, M, K, N, &ref, &scale);
            std::vector<float> out = run_linear(cpu(3), x, w, bias, M, K, N, log, c.name());
            const Diff d = compare(out.data(), ref.data(), out.size(), scale.data());
            if (d.not_finite || d.rel_l2 > 1e-5 || d.max_scaled > 1e-5) log.add(c.name() + ": " + describe(d));

            // The same bits with other thread counts.
            for (int threads : {1, 2, 5}) {
              std::vector<float> other = run_linear(cpu(threads), x, w, bias, M, K, N, log, c.name());
              size_t at = 0;
              if (!same_bits(out.data(), other.data(), out.size(), &at))
                log.add(c.name() + ": threads 3 vs " + std::to_string(threads) + " differ at element " +
                        std::to_string(at));
            }
            // Row m of the M-row product is the row computed alone.
            if (M > 1) {
              for (int64_t m = 0; m < M; ++m) {
                std::vector<float> row(x.begin() + m * K, x.begin() + (m + 1) * K);
                std::vector<float> alone = run_linear(cpu(1), row, w, bias, 1, K, N, log, c.name());
                size_t at = 0;
                if (!same_bits(out.data() + m * N, alone.data(), size_t(N), &at))
                  log.add(c.name() + ": row " + std::to_string(m) + " differs from the row alone at column " +
                          std::to_string(at));
              }
            }
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 3 * 7 * 5 * 7 * 2);
}

// Rows [first, first + count) of a stored [rows, cols] tensor, as a tensor of their own.
Stored slice_rows(const Stored& s, int64_t first, int64_t count, int64_t cols) {
  Stored r;
  r.dtype = s.dtype;
  const size_t b = size_t(first * cols), e = size_t((first + count) * cols);
  r.value = std::vector<double>(s.value.begin() + ptrdiff_t(b), s.value.begin() + ptrdiff_t(e));
  if (s.dtype == DType::F32) r.f32 = std::vector<float>(s.f32.begin() + ptrdiff_t(b), s.f32.begin() + ptrdiff_t(e));
  else r.u16 = std::vector<uint16_t>(s.u16.begin() + ptrdiff_t(b), s.u16.begin() + ptrdiff_t(e));
  return r;
}

// Products large enough that every thread count splits them (N = 443 is 111 tiles of 4 weight rows,
// the last one partial), compared across thread counts, against rows alone, against narrower slices
// of the weight (the tile position of a column must not matter) and against the reference.
TEST(CpuKernels, LinearThreadSplitsAndSlicesAreBitwiseIdentical) {
  FailureLog log("linear split");
  const int64_t K = 733, N = 443;
  Rng rng(0x5b117);
  for (DType dtype : kWeightDtypes) {
    const Stored w = make_stored(dtype, size_t(N * K), rng, -1, 1);
    const Stored b = make_stored(dtype, size_t(N), rng, -1, 1);
    for (int64_t M : {1, 4, 5, 33}) {
      std::vector<float> x = rng.floats(size_t(M * K), -1, 1);
      const LinearCase c{M, K, N, dtype, true};
      std::vector<float> base = run_linear(cpu(1), x, w, &b, M, K, N, log, c.name());
      std::vector<double> ref, scale;
      linear_reference(x, w, &b, M, K, N, &ref, &scale);
      const Diff d = compare(base.data(), ref.data(), base.size(), scale.data());
      if (d.not_finite || d.rel_l2 > 1e-5 || d.max_scaled > 1e-5) log.add(c.name() + ": " + describe(d));
      for (int threads : {2, 3, 5}) {
        std::vector<float> out = run_linear(cpu(threads), x, w, &b, M, K, N, log, c.name());
        size_t at = 0;
        if (!same_bits(base.data(), out.data(), base.size(), &at))
          log.add(c.name() + ": threads 1 vs " + std::to_string(threads) + " differ at element " + std::to_string(at));
      }
      for (int64_t m : {int64_t(0), M / 2, M - 1}) {
        std::vector<float> row(x.begin() + m * K, x.begin() + (m + 1) * K);
        std::vector<float> alone = run_linear(cpu(5), row, w, &b, 1, K, N, log, c.name());
        size_t at = 0;
        if (!same_bits(base.data() + m * N, alone.data(), size_t(N), &at))
          log.add(c.name() + ": row " + std::to_string(m) + " alone differs at column " + std::to_string(at));
      }
      // Columns [n0, n0 + count) computed with only those weight rows (and bias entries).
      for (auto [n0, count] : {std::pair<int64_t, int64_t>{0, 1}, {1, 1}, {5, 3}, {6, 7}, {438, 5}, {200, 40}}) {
        const Stored ws = slice_rows(w, n0, count, K), bs = slice_rows(b, n0, count, 1);
        std::vector<float> part = run_linear(cpu(2), x, ws, &bs, M, K, count, log, c.name());
        for (int64_t m = 0; m < M; ++m) {
          size_t at = 0;
          if (!same_bits(base.data() + m * N + n0, part.data() + m * count, size_t(count), &at)) {
            log.add(c.name() + ": columns [" + std::to_string(n0) + ", " + std::to_string(n0 + count) +
                    ") computed alone differ at row " + std::to_string(m) + " column " + std::to_string(n0 + int64_t(at)));
            break;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// embed, rmsnorm, add_rmsnorm, silu_mul, gather_rows, to_host

TEST(CpuKernels, EmbedCopiesTheTokensRowsExactly) {
  FailureLog log("embed");
  Rng rng(0xe3bed);
  const int32_t vocab = 23;
  for (DType dtype : kWeightDtypes) {
    for (int64_t dim : {1, 7, 33, 733}) {
      const Stored table = make_stored(dtype, size_t(vocab * dim), rng, -3, 3);
      for (int32_t T : {1, 3, 19, 37}) {
        BatchPlan plan;
        plan.clear();
        for (int32_t t = 0; t < T; ++t) {
          plan.tokens.push_back(t == 0 ? vocab - 1 : t == 1 ? 0 : rng.below(vocab));
          plan.positions.push_back(t);
          plan.token_seq.push_back(0);
          plan.slots.push_back(t);
        }
        for (int threads : {1, 3}) {
          Backend& backend = cpu(threads);
          backend.begin_step(plan);
          std::vector<float> out = poisoned(size_t((T + 1) * dim));
          Tensor ot = f32_tensor(out, T, dim);
          backend.embed(table.tensor(vocab, dim), 0, ot);
          std::ostringstream name;
          name << dtype_name(dtype) << " dim " << dim << " T " << T << " threads " << threads;
          for (int32_t t = 0; t < T; ++t) {
            for (int64_t i = 0; i < dim; ++i) {
              const float expected = float(table.value[size_t(plan.tokens[size_t(t)] * dim + i)]);
              const float got = out[size_t(t * dim + i)];
              if (f32_bits(got) != f32_bits(expected)) {
                log.add(name.str() + ": token " + std::to_string(t) + " element " + std::to_string(i) + " is " +
                        std::to_string(got) + ", expected " + std::to_string(expected));
                t = T;
                break;
              }
            }
          }
          for (int64_t i = T * dim; i < (T + 1) * dim; ++i)
            if (!is_poison(out[size_t(i)])) {
              log.add(name.str() + ": wrote past the output");
              break;
            }
        }
      }
    }
  }
}

// rmsnorm(x) * w in float64.
std::vector<double> rmsnorm_reference(const std::vector<float>& x, const Stored& w, double eps, int64_t rows,
                                      int64_t dim) {
  std::vector<double> ref(size_t(rows * dim));
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[size_t(r * dim + i)]) * double(x[size_t(r * dim + i)]);
    const double inv = 1.0 / std::sqrt(ss / double(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) ref[size_t(r * dim + i)] = double(x[size_t(r * dim + i)]) * inv * w.value[size_t(i)];
  }
  return ref;
}

// Rows of random values, with a zero row, a huge row (x^2 overflows fp32) and a tiny row among them.
std::vector<float> norm_input(Rng& rng, int64_t rows, int64_t dim) {
  std::vector<float> x = rng.floats(size_t(rows * dim), -2, 2);
  if (rows >= 3) {
    for (int64_t i = 0; i < dim; ++i) {
      x[size_t(0 * dim + i)] = 0.0f;
      x[size_t(1 * dim + i)] *= 1e20f;
      x[size_t(2 * dim + i)] *= 1e-20f;
    }
  }
  return x;
}

std::vector<double> relative_scale(const std::vector<double>& ref, double floor) {
  std::vector<double> s(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) s[i] = std::max(std::fabs(ref[i]), floor);
  return s;
}

TEST(CpuKernels, RmsnormMatchesFloat64Reference) {
  FailureLog log("rmsnorm");
  Rng rng(0x125);
  const float eps = 1e-5f;
  for (DType dtype : kWeightDtypes) {
    for (int64_t dim : {1, 7, 33, 733}) {
      const Stored w = make_stored(dtype, size_t(dim), rng, 0.5, 1.5);
      for (int64_t rows : {1, 3, 19, 33}) {
        std::vector<float> x = norm_input(rng, rows, dim);
        const std::vector<float> x_before = x;
        const std::vector<double> ref = rmsnorm_reference(x, w, eps, rows, dim);
        const std::vector<double> scale = relative_scale(ref, 1e-30);
        std::vector<float> first;
        for (int threads : {3, 1}) {
          std::vector<float> out = poisoned(size_t((rows + 1) * dim));
          Tensor xt = f32_tensor(x, rows, dim), ot = f32_tensor(out, rows, dim);
          cpu(threads).rmsnorm(xt, w.tensor(1, dim), eps, ot);
          std::ostringstream name;
          name << dtype_name(dtype) << " dim " << dim << " rows " << rows << " threads " << threads;
          const Diff d = compare(out.data(), ref.data(), ref.size(), scale.data());
          if (d.not_finite || d.rel_l2 > 1e-6 || d.max_scaled > 1e-6) log.add(name.str() + ": " + describe(d));
          for (int64_t i = rows * dim; i < (rows + 1) * dim; ++i)
            if (!is_poison(out[size_t(i)])) {
              log.add(name.str() + ": wrote past the output");
              break;
            }
          if (!same_bits(x.data(), x_before.data(), x.size())) log.add(name.str() + ": modified its input");
          out.resize(ref.size());
          if (first.empty()) first = out;
          else if (!same_bits(first.data(), out.data(), out.size())) log.add(name.str() + ": differs from 3 threads");
        }
      }
    }
  }
}

TEST(CpuKernels, AddRmsnormUpdatesTheResidualAndNormalizes) {
  FailureLog log("add_rmsnorm");
  Rng rng(0xadd);
  const float eps = 1e-6f;
  for (DType dtype : kWeightDtypes) {
    for (int64_t dim : {1, 7, 33, 733}) {
      const Stored w = make_stored(dtype, size_t(dim), rng, -1.5, 1.5);
      for (int64_t rows : {1, 3, 19, 33}) {
        const std::vector<float> residual0 = norm_input(rng, rows, dim);
        const std::vector<float> x = rng.floats(size_t(rows * dim), -1, 1);
        std::vector<float> sum(x.size());
        for (size_t i = 0; i < x.size(); ++i) sum[i] = residual0[i] + x[i];  // the fp32 update
        const std::vector<double> ref = rmsnorm_reference(sum, w, eps, rows, dim);
        const std::vector<double> scale = relative_scale(ref, 1e-30);
        std::vector<float> first;
        for (int threads : {3, 1}) {
          std::vector<float> residual = residual0, xin = x;
          std::vector<float> out = poisoned(size_t((rows + 1) * dim));
          Tensor rt = f32_tensor(residual, rows, dim), xt = f32_tensor(xin, rows, dim), ot = f32_tensor(out, rows, dim);
          cpu(threads).add_rmsnorm(rt, xt, w.tensor(1, dim), eps, ot);
          std::ostringstream name;
          name << dtype_name(dtype) << " dim " << dim << " rows " << rows << " threads " << threads;
          size_t at = 0;
          if (!same_bits(residual.data(), sum.data(), sum.size(), &at))
            log.add(name.str() + ": residual is not residual + x at element " + std::to_string(at));
          if (!same_bits(xin.data(), x.data(), x.size())) log.add(name.str() + ": modified x");
          const Diff d = compare(out.data(), ref.data(), ref.size(), scale.data());
          if (d.not_finite || d.rel_l2 > 1e-6 || d.max_scaled > 1e-6) log.add(name.str() + ": " + describe(d));
          for (int64_t i = rows * dim; i < (rows + 1) * dim; ++i)
            if (!is_poison(out[size_t(i)])) {
              log.add(name.str() + ": wrote past the output");
              break;
            }
          out.resize(ref.size());
          if (first.empty()) first = out;
          else if (!same_bits(first.data(), out.data(), out.size())) log.add(name.str() + ": differs from 3 threads");
        }
      }
    }
  }
}

TEST(CpuKernels, SiluMulMatchesFloat64Reference) {
  FailureLog log("silu_mul");
  Rng rng(0x5170);
  // 19 x 2111 = 40109 elements is enough for the pool to split the work.
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {1, 7}, {3, 19}, {1, 733}, {19, 2111}}) {
    const size_t n = size_t(rows * cols);
    std::vector<float> gate = rng.floats(n, -12, 12), up = rng.floats(n, -3, 3);
    const float extremes[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 50.0f, 100.0f, -87.0f, -88.5f, -95.0f, -100.0f, 1e30f};
    for (size_t i = 0; i < std::size(extremes) && i < n; ++i) gate[i] = extremes[i];
    std::vector<double> ref(n);
    for (size_t i = 0; i < n; ++i) {
      const double g = gate[i];
      ref[i] = g / (1.0 + std::exp(-g)) * double(up[i]);
    }
    const std::vector<double> scale = relative_scale(ref, 1e-30);
    std::vector<float> first;
    for (int threads : {3, 1}) {
      std::vector<float> out = poisoned(n + size_t(cols));
      std::vector<float> g = gate, u = up;
      Tensor gt = f32_tensor(g, rows, cols), ut = f32_tensor(u, rows, cols), ot = f32_tensor(out, rows, cols);
      cpu(threads).silu_mul(gt, ut, ot);
      std::ostringstream name;
      name << rows << "x" << cols << " threads " << threads;
      const Diff d = compare(out.data(), ref.data(), n, scale.data());
      if (d.not_finite || d.rel_l2 > 1e-6 || d.max_scaled > 1e-6) log.add(name.str() + ": " + describe(d));
      for (size_t i = n; i < out.size(); ++i)
        if (!is_poison(out[i])) {
          log.add(name.str() + ": wrote past the output");
          break;
        }
      out.resize(n);
      if (first.empty()) first = out;
      else if (!same_bits(first.data(), out.data(), n)) log.add(name.str() + ": differs from 3 threads");
      // In place (out = gate), as the engine calls it: the same bits.
      Tensor gate_inout = f32_tensor(g, rows, cols);
      cpu(threads).silu_mul(gate_inout, ut, gate_inout);
      if (!same_bits(g.data(), out.data(), n)) log.add(name.str() + ": in place differs from out of place");
    }
  }
}

// silu_mul_linear (the MLP's down projection) is, on the CPU, silu_mul then linear: the same output
// bits, act left holding the product (also when act is gate itself, as the engine calls it), and the
// same saturation counts, for every kind of weight: 16/32-bit, int8wo, FP8 with dynamic per-token
// scales and FP8 with a static input scale small enough to clip.
TEST(CpuKernels, SiluMulLinearEqualsSiluMulThenLinear) {
  FailureLog log("silu_mul_linear");
  Rng rng(0x51f8);
  Backend& b = cpu(3);
  for (auto [M, K, N] : {std::tuple<int64_t, int64_t, int64_t>{1, 733, 19}, {3, 64, 48}, {19, 7, 5}, {9, 2111, 33}}) {
    const size_t mk = size_t(M * K);
    std::vector<float> gate = rng.floats(mk, -6, 6), up = rng.floats(mk, -3, 3);
    Stored w16 = make_stored(DType::BF16, size_t(N * K), rng, -1, 1);
    std::vector<float> bias = rng.floats(size_t(N), -1, 1);
    std::vector<float> input_scale = {1.0f / 448.0f};  // |silu(g) * u| > 1 clips
    QuantizedWeight int8 = quantize_weight(w16.tensor(N, K), QuantMode::Int8WeightOnly, 1);
    QuantizedWeight fp8 = quantize_weight(w16.tensor(N, K), QuantMode::Fp8, 1);
    struct Case {
      const char* name;
      LinearWeight w;
    };
    std::vector<Case> cases(5);
    cases[0] = {"bf16", LinearWeight{}};
    cases[0].w.w = w16.tensor(N, K);
    cases[1] = {"int8wo", int8.view(DType::BF16)};
    cases[2] = {"fp8 dynamic", fp8.view(DType::BF16)};
    cases[3] = {"fp8 static", cases[2].w};
    cases[3].w.input_scale = f32_tensor(input_scale, 1, 1);
    cases[4] = {"f32", LinearWeight{}};
    std::vector<float> w32(w16.value.begin(), w16.value.end());
    cases[4].w.w = f32_tensor(w32, N, K);
    for (Case& c : cases) {
      c.w.layer = 0;
      for (bool with_bias : {false, true}) {
        std::ostringstream name;
        name << c.name << " M=" << M << " K=" << K << " N=" << N << (with_bias ? " +bias" : "");
        Tensor bt = f32_tensor(bias, 1, N);
        const Tensor* bp = with_bias ? &bt : nullptr;
        Tensor gt = f32_tensor(gate, M, K), ut = f32_tensor(up, M, K);
        b.saturation(1, /*reset=*/true);
        std::vector<float> act_ref = poisoned(mk), out_ref = poisoned(size_t(M * N));
        Tensor act_ref_t = f32_tensor(act_ref, M, K), out_ref_t = f32_tensor(out_ref, M, N);
        b.silu_mul(gt, ut, act_ref_t);
        b.linear(act_ref_t, c.w, bp, out_ref_t);
        const std::vector<uint64_t> counts_ref = b.saturation(1, true);

        std::vector<float> act = poisoned(mk), out = poisoned(size_t(M * N));
        Tensor act_t = f32_tensor(act, M, K), out_t = f32_tensor(out, M, N);
        b.silu_mul_linear(gt, ut, act_t, c.w, bp, out_t);
        if (!same_bits(out.data(), out_ref.data(), out.size())) log.add(name.str() + ": output differs");
        if (!same_bits(act.data(), act_ref.data(), act.size())) log.add(name.str() + ": act is not the product");
        if (b.saturation(1, true) != counts_ref) log.add(name.str() + ": saturation counts differ");

        std::vector<float> gate_inout = gate, out2 = poisoned(size_t(M * N));
        Tensor g2 = f32_tensor(gate_inout, M, K), out2_t = f32_tensor(out2, M, N);
        b.silu_mul_linear(g2, ut, g2, c.w, bp, out2_t);
        if (!same_bits(out2.data(), out_ref.data(), out2.size())) log.add(name.str() + ": in place: output differs");
        if (std::string(c.name) == "fp8 static" &&
            (counts_ref[kActivationsClipped] == 0 || counts_ref[kActivationsStatic] != uint64_t(M * K)))
          log.add(name.str() + ": the static scale clipped nothing, or not every value was counted");
      }
    }
  }
}

TEST(CpuKernels, GatherRowsAndToHostCopyExactly) {
  Rng rng(0x6a7);
  for (int64_t dim : {1, 7, 733}) {
    const int64_t T = 9;
    std::vector<float> x = rng.floats(size_t(T * dim), -5, 5);
    Tensor xt = f32_tensor(x, T, dim);
    for (const std::vector<int32_t>& rows : {std::vector<int32_t>{8}, std::vector<int32_t>{8, 0, 3, 3, 5},
                                             std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8}, std::vector<int32_t>{}}) {
      BatchPlan plan;
      plan.clear();
      for (int32_t t = 0; t < T; ++t) {
        plan.tokens.push_back(1);
        plan.positions.push_back(t);
        plan.token_seq.push_back(0);
        plan.slots.push_back(t);
      }
      plan.logit_rows = rows;
      const int64_t R = int64_t(rows.size());
      Backend& backend = cpu(3);
      backend.begin_step(plan);
      std::vector<float> out = poisoned(size_t((R + 1) * dim));
      Tensor ot = f32_tensor(out, R, dim);
      backend.gather_rows(xt, ot);
      for (int64_t i = 0; i < R; ++i)
        EXPECT_TRUE(same_bits(out.data() + i * dim, x.data() + rows[size_t(i)] * dim, size_t(dim)))
            << "dim " << dim << " output row " << i << " (row " << rows[size_t(i)] << ")";
      for (int64_t i = R * dim; i < (R + 1) * dim; ++i) {
        EXPECT_TRUE(is_poison(out[size_t(i)])) << "dim " << dim << ": gather_rows wrote past its " << R << " rows";
        if (!is_poison(out[size_t(i)])) break;
      }
    }
    // to_host: an exact copy of exactly nbytes.
    for (int64_t rows : {int64_t(1), T}) {
      std::vector<float> host = poisoned(size_t(rows * dim + 17));
      cpu(3).to_host(xt.row_slice(0, rows), host.data());
      EXPECT_TRUE(same_bits(host.data(), x.data(), size_t(rows * dim))) << "to_host dim " << dim << " rows " << rows;
      for (size_t i = size_t(rows * dim); i < host.size(); ++i) ASSERT_TRUE(is_poison(host[i])) << "to_host overran";
    }
    std::vector<float> host = poisoned(size_t(dim + 1));
    cpu(1).to_host(xt.row_slice(4, 1), host.data());
    EXPECT_TRUE(same_bits(host.data(), x.data() + 4 * dim, size_t(dim))) << "to_host of a row slice";
    EXPECT_TRUE(is_poison(host[size_t(dim)]));
  }
}

// ---------------------------------------------------------------------------------------------
// rope_kv_write + attention over a paged KV cache

struct AttnCase {
  int32_t num_heads, num_kv_heads, head_dim, window;
  std::string name() const {
    std::ostringstream s;
    s << "Hq " << num_heads << " Hkv " << num_kv_heads << " D " << head_dim << " window " << window;
    return s.str();
  }
};

// Runs two steps over three sequences and checks every output; returns all outputs concatenated
// (for comparing thread counts bitwise).
//   step 1: seq 0 prefills positions 0..6, seq 1 positions 0..2, seq 2 positions 0..12
//   step 2: seq 2 decodes position 13, seq 0 position 7, seq 1 prefills positions 3..5 (a second chunk)
// The step-2 plan lists the sequences in another order (2, 0, 1) than step 1.
std::vector<float> run_attention_scenario(Backend& backend, const AttnCase& c, FailureLog& log) {
  const int32_t Hq = c.num_heads, Hkv = c.num_kv_heads, D = c.head_dim, half = D / 2, group = Hq / Hkv;
  const int32_t bs = 4, num_blocks = 16, n_seqs = 3;
  const int32_t final_length[n_seqs] = {8, 6, 14};
  Rng rng(0xa77e + uint64_t(D) * 131 + uint64_t(Hq) * 7 + uint64_t(c.window));

  // Shuffled, non-contiguous blocks for each sequence.
  std::vector<int32_t> pool(num_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  for (int32_t i = num_blocks - 1; i > 0; --i) std::swap(pool[size_t(i)], pool[size_t(rng.below(i + 1))]);
  std::vector<std::vector<int32_t>> blocks(n_seqs);
  size_t next = 0;
  for (int32_t s = 0; s < n_seqs; ++s)
    for (int32_t b = 0; b < (final_length[s] + bs - 1) / bs; ++b) blocks[size_t(s)].push_back(pool[next++]);
  auto slot = [&](int32_t s, int32_t pos) { return blocks[size_t(s)][size_t(pos / bs)] * bs + pos % bs; };

  // Inputs per (sequence, position), and the float64 rotated q and k.
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int32_t i = 0; i < half; ++i) inv_freq[size_t(i)] = float(1.0 / std::pow(10000.0, double(2 * i) / double(D)));
  struct TokenData {
    std::vector<float> q, k, v;
    std::vector<double> q_rot, k_rot;
  };
  std::vector<std::vector<TokenData>> data(n_seqs);
  auto rotate = [&](const std::vector<float>& x, int32_t heads, int32_t pos) {
    std::vector<double> r(x.size());
    for (int32_t h = 0; h < heads; ++h)
      for (int32_t i = 0; i < half; ++i) {
        const double angle = double(pos) * double(inv_freq[size_t(i)]);
        const double x0 = x[size_t(h * D + i)], x1 = x[size_t(h * D + i + half)];
        r[size_t(h * D + i)] = x0 * std::cos(angle) - x1 * std::sin(angle);
        r[size_t(h * D + i + half)] = x1 * std::cos(angle) + x0 * std::sin(angle);
      }
    return r;
  };
  for (int32_t s = 0; s < n_seqs; ++s)
    for (int32_t p = 0; p < final_length[s]; ++p) {
      TokenData t;
      t.q = rng.floats(size_t(Hq * D), -2, 2);
      t.k = rng.floats(size_t(Hkv * D), -2, 2);
      t.v = rng.floats(size_t(Hkv * D), -1, 1);
      t.q_rot = rotate(t.q, Hq, p);
      t.k_rot = rotate(t.k, Hkv, p);
      data[size_t(s)].push_back(std::move(t));
    }

  // The cache, poisoned; `mirror` is what it must hold after each step.
  const int64_t per_block = int64_t(Hkv) * bs * D;
  std::vector<float> k_cache = poisoned(size_t(num_blocks * per_block)), v_cache = k_cache;
  std::vector<float> k_mirror = k_cache, v_mirror = v_cache;
  KvLayer layer;
  layer.k = f32_tensor(k_cache, num_blocks, per_block);
  layer.v = f32_tensor(v_cache, num_blocks, per_block);
  layer.block_size = bs;
  layer.num_kv_heads = Hkv;
  layer.head_dim = D;
  auto cache_index = [&](int32_t sl, int32_t h) { return ((int64_t(sl / bs) * Hkv + h) * bs + sl % bs) * D; };

  AttentionParams params;
  params.num_heads = Hq;
  params.num_kv_heads = Hkv;
  params.head_dim = D;
  params.scale = float(1.0 / std::sqrt(double(D)));
  params.sliding_window = c.window;

  std::vector<float> results;
  struct Span {
    int32_t seq, first, count;
  };
  const std::vector<std::vector<Span>> steps = {{{0, 0, 7}, {1, 0, 3}, {2, 0, 13}}, {{2, 13, 1}, {0, 7, 1}, {1, 3, 3}}};
  for (size_t step = 0; step < steps.size(); ++step) {
    const std::string where = c.name() + " step " + std::to_string(step + 1);
    BatchPlan plan;
    plan.clear();
    std::vector<std::pair<int32_t, int32_t>> token_of;  // (seq, pos) of each token
    for (size_t i = 0; i < steps[step].size(); ++i) {
      const Span& sp = steps[step][i];
      for (int32_t p = sp.first; p < sp.first + sp.count; ++p) {
        plan.tokens.push_back(7);
        plan.positions.push_back(p);
        plan.token_seq.push_back(int32_t(i));
        plan.slots.push_back(slot(sp.seq, p));
        token_of.emplace_back(sp.seq, p);
      }
      // The block table covers the sequence's blocks so far (as the engine reserves them).
      const int32_t n_blocks = (sp.first + sp.count + bs - 1) / bs;
      plan.block_ids.insert(plan.block_ids.end(), blocks[size_t(sp.seq)].begin(),
                            blocks[size_t(sp.seq)].begin() + n_blocks);
      plan.block_offsets.push_back(int32_t(plan.block_ids.size()));
    }
    const int32_t T = plan.n_tokens();
    std::vector<float> q(size_t(T * Hq * D)), k(size_t(T * Hkv * D)), v(size_t(T * Hkv * D));
    std::vector<double> q_ref(q.size()), k_ref(k.size());
    for (int32_t t = 0; t < T; ++t) {
      const TokenData& td = data[size_t(token_of[size_t(t)].first)][size_t(token_of[size_t(t)].second)];
      std::copy(td.q.begin(), td.q.end(), q.begin() + t * Hq * D);
      std::copy(td.k.begin(), td.k.end(), k.begin() + t * Hkv * D);
      std::copy(td.v.begin(), td.v.end(), v.begin() + t * Hkv * D);
      std::copy(td.q_rot.begin(), td.q_rot.end(), q_ref.begin() + t * Hq * D);
      std::copy(td.k_rot.begin(), td.k_rot.end(), k_ref.begin() + t * Hkv * D);
    }
    const std::vector<float> v_in = v;
    Tensor qt = f32_tensor(q, T, Hq * D), kt = f32_tensor(k, T, Hkv * D), vt = f32_tensor(v, T, Hkv * D);
    Tensor ft{inv_freq.data(), DType::F32, 1, half};

    backend.begin_step(plan);
    backend.rope_kv_write(qt, kt, vt, ft, layer);

    Diff d = compare(q.data(), q_ref.data(), q.size());
    if (d.not_finite || d.rel_l2 > 1e-5 || d.max_abs > 2e-5) log.add(where + ": rope q: " + describe(d));
    d = compare(k.data(), k_ref.data(), k.size());
    if (d.not_finite || d.rel_l2 > 1e-5 || d.max_abs > 2e-5) log.add(where + ": rope k: " + describe(d));
    if (!same_bits(v.data(), v_in.data(), v.size())) log.add(where + ": rope_kv_write modified v");
    // The cache holds the rotated k and the unchanged v at each token's slot, and nothing else changed.
    for (int32_t t = 0; t < T; ++t)
      for (int32_t h = 0; h < Hkv; ++h) {
        const int64_t at = cache_index(plan.slots[size_t(t)], h);
        std::copy(k.begin() + (t * Hkv + h) * D, k.begin() + (t * Hkv + h + 1) * D, k_mirror.begin() + at);
        std::copy(v_in.begin() + (t * Hkv + h) * D, v_in.begin() + (t * Hkv + h + 1) * D, v_mirror.begin() + at);
      }
    size_t at = 0;
    if (!same_bits(k_cache.data(), k_mirror.data(), k_cache.size(), &at))
      log.add(where + ": K cache differs from the rotated k at its slots (or changed elsewhere) at element " +
              std::to_string(at));
    if (!same_bits(v_cache.data(), v_mirror.data(), v_cache.size(), &at))
      log.add(where + ": V cache differs from v at its slots (or changed elsewhere) at element " + std::to_string(at));

    // With a sliding window, positions before every window of this step are poisoned: attention
    // must not read them at all (a cache may reuse those blocks).
    if (c.window > 0) {
      for (const Span& sp : steps[step]) {
        const int32_t first_needed = std::max(0, sp.first - c.window + 1);
        for (int32_t p = 0; p < first_needed; ++p)
          for (int32_t h = 0; h < Hkv; ++h) {
            const int64_t i = cache_index(slot(sp.seq, p), h);
            std::fill(k_cache.begin() + i, k_cache.begin() + i + D, poison());
            std::fill(v_cache.begin() + i, v_cache.begin() + i + D, poison());
          }
      }
    }

    // Attention, against the float64 reference over [max(0, pos - window + 1), pos].
    std::vector<float> out = poisoned(size_t((T + 1) * Hq * D));
    Tensor ot = f32_tensor(out, T, Hq * D);
    backend.attention(qt, layer, params, ot);
    std::vector<double> ref(size_t(T * Hq * D));
    for (int32_t t = 0; t < T; ++t) {
      const auto [s, pos] = token_of[size_t(t)];
      const int32_t first = c.window > 0 ? std::max(0, pos - c.window + 1) : 0;
      for (int32_t h = 0; h < Hq; ++h) {
        const int32_t kvh = h / group;
        const double* qh = data[size_t(s)][size_t(pos)].q_rot.data() + h * D;
        std::vector<double> score;
        double max_score = -INFINITY;
        for (int32_t j = first; j <= pos; ++j) {
          const double* kj = data[size_t(s)][size_t(j)].k_rot.data() + kvh * D;
          double dot = 0;
          for (int32_t i = 0; i < D; ++i) dot += qh[i] * kj[i];
          score.push_back(dot * double(params.scale));
          max_score = std::max(max_score, score.back());
        }
        double denominator = 0;
        for (double& e : score) denominator += (e = std::exp(e - max_score));
        for (int32_t i = 0; i < D; ++i) {
          double o = 0;
          for (int32_t j = first; j <= pos; ++j)
            o += score[size_t(j - first)] * double(data[size_t(s)][size_t(j)].v[size_t(kvh * D + i)]);
          ref[size_t((t * Hq + h) * D + i)] = o / denominator;
        }
      }
    }
    d = compare(out.data(), ref.data(), ref.size());
    if (d.not_finite || d.rel_l2 > 1e-5 || d.max_abs > 2e-5) log.add(where + ": attention: " + describe(d));
    for (size_t i = ref.size(); i < out.size(); ++i)
      if (!is_poison(out[i])) {
        log.add(where + ": attention wrote past its output");
        break;
      }
    // Restore the window-poisoned entries so that the next step sees the whole history again.
    std::copy(k_mirror.begin(), k_mirror.end(), k_cache.begin());
    std::copy(v_mirror.begin(), v_mirror.end(), v_cache.begin());

    results.insert(results.end(), q.begin(), q.end());
    results.insert(results.end(), k.begin(), k.end());
    results.insert(results.end(), out.begin(), out.end());
  }
  results.insert(results.end(), k_cache.begin(), k_cache.end());
  return results;
}

TEST(CpuKernels, RopeKvWriteAndPagedAttentionMatchFloat64Reference) {
  FailureLog log("rope + attention");
  const AttnCase cases[] = {{8, 2, 8, 0}, {8, 2, 8, 5}, {8, 2, 16, 0}, {8, 2, 16, 5},
                            {6, 3, 16, 5}, {4, 4, 8, 0}, {4, 1, 16, 5}};
  for (const AttnCase& c : cases) {
    std::vector<float> first;
    for (int threads : {3, 1, 2}) {
      std::vector<float> results = run_attention_scenario(cpu(threads), c, log);
      if (first.empty()) {
        first = std::move(results);
      } else {
        size_t at = 0;
        if (results.size() != first.size() || !same_bits(first.data(), results.data(), first.size(), &at))
          log.add(c.name() + ": threads " + std::to_string(threads) + " differ from 3 threads at element " +
                  std::to_string(at));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ThreadPool

TEST(ThreadPool, ParallelForCoversTheRangeExactlyOnce) {
  const int64_t sizes[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 100, 1000, 1023};
  const int64_t grains[] = {0, 1, 2, 3, 7, 64, 1000};
  for (int threads : {1, 2, 3, 5, 8}) {
    ThreadPool pool(threads);
    ASSERT_EQ(pool.size(), threads);
    for (int64_t n : sizes) {
      for (int64_t grain : grains) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        for (auto& h : hits) h = 0;
        std::mutex mutex;
        std::vector<std::pair<int64_t, int64_t>> chunks;
        std::vector<std::thread::id> callers;
        pool.parallel_for(n, grain, [&](int64_t begin, int64_t end) {
          {
            std::lock_guard<std::mutex> lock(mutex);
            chunks.emplace_back(begin, end);
            callers.push_back(std::this_thread::get_id());
          }
          for (int64_t i = std::max<int64_t>(begin, 0); i < std::min(end, n); ++i) ++hits[size_t(i)];
        });
        const std::string where = "threads " + std::to_string(threads) + " n " + std::to_string(n) + " grain " +
                                  std::to_string(grain);
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << where << " index " << i;
        EXPECT_LE(int(chunks.size()), threads) << where;
        for (auto [b, e] : chunks) {
          EXPECT_LE(0, b) << where;
          EXPECT_LE(b, e) << where;
          EXPECT_LE(e, n) << where;
        }
        if (n > 0 && n < 2 * std::max<int64_t>(grain, 1)) {  // documented: runs inline
          ASSERT_EQ(chunks.size(), 1u) << where;
          EXPECT_EQ(chunks[0], std::make_pair(int64_t(0), n)) << where;
          EXPECT_EQ(callers[0], std::this_thread::get_id()) << where;
        }
      }
    }
  }
}

TEST(ThreadPool, ManyJobsInARowOnOnePool) {
  for (int threads : {2, 3, 5}) {
    ThreadPool pool(threads);
    for (int round = 0; round < 300; ++round) {
      const int64_t n = 1 + (round * 37) % 101;
      std::vector<int64_t> values(size_t(n), -1);
      pool.parallel_for(n, 1 + round % 3, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) values[size_t(i)] = i * i + round;
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(values[size_t(i)], i * i + round) << "round " << round;
    }
  }
  // Pools that are built and destroyed without (or right after) a job.
  for (int i = 0; i < 20; ++i) {
    ThreadPool idle(1 + i % 4);
    if (i % 2) {
      std::atomic<int64_t> sum{0};
      idle.parallel_for(64, 1, [&](int64_t b, int64_t e) { sum += e - b; });
      EXPECT_EQ(sum.load(), 64);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// DType conversions

TEST(DType, F16ToF32IsExactForAllValues) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = f16_to_f32(uint16_t(h));
    const double ref = ref_f16_value(uint16_t(h));
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << "half 0x" << h;
    } else {
      ASSERT_EQ(f32_bits(got), f32_bits(float(ref))) << std::hex << "half 0x" << h << " -> " << got;
    }
  }
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0x0001), 0x1p-24f);
  EXPECT_EQ(f16_to_f32(0x03ff), 0x3ffp-24f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f32_bits(f16_to_f32(0x8000)), 0x80000000u);
}

TEST(DType, Bf16ToF32IsExactForAllValues) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float got = bf16_to_f32(uint16_t(b));
    const double ref = ref_bf16_value(uint16_t(b));
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << "bf16 0x" << b;
    } else {
      ASSERT_EQ(f32_bits(got), f32_bits(float(ref))) << std::hex << "bf16 0x" << b;
    }
  }
}

TEST(DType, F32ToF16RoundTripsAndRoundsToNearestEven) {
  // Every half survives the round trip; NaN stays NaN.
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = f32_to_f16(f16_to_f32(uint16_t(h)));
    if (f16_is_nan(uint16_t(h)))
      ASSERT_TRUE(f16_is_nan(back)) << std::hex << "half 0x" << h << " -> 0x" << back;
    else
      ASSERT_EQ(back, h) << std::hex << "half 0x" << h;
  }
  // Every halfway point between neighbouring finite halves (and between 65504 and 65536, which
  // rounds to infinity) goes to the even one; one fp32 ulp either side goes to the nearer one.
  for (uint32_t h = 0; h <= 0x7bff; ++h) {
    const double lo = ref_f16_value(uint16_t(h)), hi = h == 0x7bff ? 65536.0 : ref_f16_value(uint16_t(h + 1));
    const double mid = (lo + hi) / 2;
    const float fm = float(mid);
    ASSERT_EQ(double(fm), mid);
    const uint16_t even = uint16_t((h & 1) ? h + 1 : h);
    ASSERT_EQ(f32_to_f16(fm), even) << std::hex << "halfway above 0x" << h;
    ASSERT_EQ(f32_to_f16(-fm), uint16_t(0x8000 | even)) << std::hex << "halfway below -0x" << h;
    ASSERT_EQ(f32_to_f16(std::nextafter(fm, 0.0f)), h) << std::hex << "just below halfway above 0x" << h;
    ASSERT_EQ(f32_to_f16(std::nextafter(fm, INFINITY)), h + 1) << std::hex << "just above halfway above 0x" << h;
  }
  EXPECT_EQ(f32_to_f16(65519.996f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(1e10f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e10f), 0xfc00);
  EXPECT_EQ(f32_to_f16(INFINITY), 0x7c00);
  EXPECT_EQ(f32_to_f16(-INFINITY), 0xfc00);
  EXPECT_EQ(f32_to_f16(0x1p-25f), 0x0000);  // halfway to the smallest subnormal: to even (zero)
  EXPECT_EQ(f32_to_f16(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16(0x1.8p-24f), 0x0002);  // 1.5 subnormal units: to even (2)
  EXPECT_EQ(f32_to_f16(0x1p-26f), 0x0000);
  EXPECT_EQ(f32_to_f16(-0x1p-26f), 0x8000);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(0x1p-149f), 0x0000);  // fp32 subnormals
  EXPECT_EQ(f32_to_f16(0x1.ffcp-15f), 0x0400);  // rounds up into the smallest normal
  EXPECT_TRUE(f16_is_nan(f32_to_f16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(f16_is_nan(f32_to_f16(f32_from_bits(0x7f800001u))));  // signaling NaN whose top bits look like inf
  EXPECT_TRUE(f16_is_nan(f32_to_f16(f32_from_bits(0xff800001u))));
  EXPECT_TRUE(f16_is_nan(f32_to_f16(f32_from_bits(0x7fffffffu))));
}

TEST(DType, F32ToBf16RoundTripsAndRoundsToNearestEven) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t back = f32_to_bf16(bf16_to_f32(uint16_t(b)));
    if (bf16_is_nan(uint16_t(b)))
      ASSERT_TRUE(bf16_is_nan(back)) << std::hex << "bf16 0x" << b << " -> 0x" << back;
    else
      ASSERT_EQ(back, b) << std::hex << "bf16 0x" << b;
  }
  for (uint32_t b = 0; b <= 0x7f7f; ++b) {
    const double lo = ref_bf16_value(uint16_t(b)), hi = b == 0x7f7f ? 0x1p128 : ref_bf16_value(uint16_t(b + 1));
    const double mid = (lo + hi) / 2;
    const float fm = float(mid);
    ASSERT_EQ(double(fm), mid);
    const uint16_t even = uint16_t((b & 1) ? b + 1 : b);
    ASSERT_EQ(f32_to_bf16(fm), even) << std::hex << "halfway above 0x" << b;
    ASSERT_EQ(f32_to_bf16(-fm), uint16_t(0x8000 | even)) << std::hex << "halfway below -0x" << b;
    ASSERT_EQ(f32_to_bf16(std::nextafter(fm, 0.0f)), b) << std::hex << "just below halfway above 0x" << b;
    ASSERT_EQ(f32_to_bf16(std::nextafter(fm, INFINITY)), b + 1) << std::hex << "just above halfway above 0x" << b;
  }
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // above the last halfway point
  EXPECT_EQ(f32_to_bf16(INFINITY), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-INFINITY), 0xff80);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(0x1p-149f), 0x0000);  // fp32 subnormals round like the rest
  EXPECT_EQ(f32_to_bf16(0x1p-133f), 0x0001);
  // NaN stays NaN (quiet) with its sign, including the NaNs whose top 16 bits look like infinity.
  for (uint32_t nan : {0x7f800001u, 0x7f80ffffu, 0x7fc00000u, 0x7fffffffu, 0x7fbfffffu, 0xff800001u, 0xffffffffu}) {
    const uint16_t got = f32_to_bf16(f32_from_bits(nan));
    EXPECT_TRUE(bf16_is_nan(got)) << std::hex << "0x" << nan << " -> 0x" << got;
    EXPECT_TRUE(got & 0x40) << std::hex << "0x" << nan << " -> 0x" << got << " is not a quiet NaN";
    EXPECT_EQ(got & 0x8000, (nan >> 16) & 0x8000) << std::hex << "0x" << nan << " lost its sign";
  }
}

// 1e6 random floats: half are random bit patterns (every exponent, NaNs, infinities, subnormals),
// half lie in and around the half range.
std::vector<float> random_floats_for_conversion() {
  Rng rng(0xf16b16);
  std::vector<float> v(1000000);
  for (size_t i = 0; i < v.size(); ++i) {
    if (i % 2 == 0) {
      v[i] = f32_from_bits(rng.u32());
    } else {
      const uint32_t exponent = 98 + uint32_t(rng.below(146 - 98));  // 2^-29 .. 2^18
      v[i] = f32_from_bits((rng.u32() & 0x807fffffu) | (exponent << 23));
    }
  }
  return v;
}

TEST(DType, RandomFloatsConvertLikeTheFloat64Reference) {
  const std::vector<float> values = random_floats_for_conversion();
  int64_t bad_f16 = 0, bad_bf16 = 0;
  for (float f : values) {
    const uint16_t h = f32_to_f16(f), b = f32_to_bf16(f);
    const uint16_t rh = ref_f32_to_f16(f), rb = ref_f32_to_bf16(f);
    if (std::isnan(f)) {
      if (!f16_is_nan(h) && ++bad_f16 <= 5) ADD_FAILURE() << std::hex << "f16 of NaN 0x" << f32_bits(f) << " is 0x" << h;
      if (!bf16_is_nan(b) && ++bad_bf16 <= 5) ADD_FAILURE() << std::hex << "bf16 of NaN 0x" << f32_bits(f) << " is 0x" << b;
      continue;
    }
    if (h != rh && ++bad_f16 <= 5)
      ADD_FAILURE() << std::hex << "f32_to_f16(0x" << f32_bits(f) << " = " << f << ") = 0x" << h << ", expected 0x" << rh;
    if (b != rb && ++bad_bf16 <= 5)
      ADD_FAILURE() << std::hex << "f32_to_bf16(0x" << f32_bits(f) << " = " << f << ") = 0x" << b << ", expected 0x" << rb;
  }
  EXPECT_EQ(bad_f16, 0);
  EXPECT_EQ(bad_bf16, 0);
}

#ifdef LLMQ_TEST_CUDA_FP16
uint16_t half_bits(__half h) { return __half_raw(h).x; }
uint16_t bf16_bits(__nv_bfloat16 b) { return __nv_bfloat16_raw(b).x; }
__half half_of(uint16_t bits) {
  __half_raw r;
  r.x = bits;
  return __half(r);
}
__nv_bfloat16 bf16_of(uint16_t bits) {
  __nv_bfloat16_raw r;
  r.x = bits;
  return __nv_bfloat16(r);
}

TEST(DType, ConversionsAgreeWithTheCudaToolkitHostFunctions) {
  for (uint32_t u = 0; u < 65536; ++u) {
    const uint16_t bits = uint16_t(u);
    const float cf = __half2float(half_of(bits)), cb = __bfloat162float(bf16_of(bits));
    if (f16_is_nan(bits)) ASSERT_TRUE(std::isnan(cf) && std::isnan(f16_to_f32(bits)));
    else ASSERT_EQ(f32_bits(f16_to_f32(bits)), f32_bits(cf)) << std::hex << "half 0x" << u;
    if (bf16_is_nan(bits)) ASSERT_TRUE(std::isnan(cb) && std::isnan(bf16_to_f32(bits)));
    else ASSERT_EQ(f32_bits(bf16_to_f32(bits)), f32_bits(cb)) << std::hex << "bf16 0x" << u;
  }
  const std::vector<float> values = random_floats_for_conversion();
  int64_t bad = 0;
  for (float f : values) {
    if (std::isnan(f)) continue;  // the toolkit returns a canonical NaN; llmq keeps sign and payload bits
    const uint16_t h = f32_to_f16(f), ch = half_bits(__float2half_rn(f));
    const uint16_t b = f32_to_bf16(f), cb = bf16_bits(__float2bfloat16_rn(f));
    if ((h != ch || b != cb) && ++bad <= 5)
      ADD_FAILURE() << std::hex << "0x" << f32_bits(f) << ": f16 0x" << h << " vs cuda 0x" << ch << ", bf16 0x" << b
                    << " vs cuda 0x" << cb;
  }
  EXPECT_EQ(bad, 0);
}
#endif

}  // namespace
}  // namespace llmq
