#include "engine/host_peak.h"

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "engine/error.h"

namespace llmq {
namespace {

__attribute__((target("avx2"))) uint64_t sum_avx2(const uint8_t* p, size_t n) {
  // Four independent accumulators keep several loads in flight per cycle.
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

uint64_t sum_scalar(const uint8_t* p, size_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i < n; i += 32) {
    uint64_t w[4];
    std::memcpy(w, p + i, 32);
    s0 += w[0];
    s1 += w[1];
    s2 += w[2];
    s3 += w[3];
  }
  return s0 + s1 + s2 + s3;
}

}  // namespace

MemoryBandwidth measure_read_bandwidth(size_t bytes, int threads, int passes) {
  constexpr size_t kAlign = size_t(2) << 20;  // huge-page aligned, slices multiples of 128 bytes
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  auto* buffer = static_cast<uint8_t*>(std::aligned_alloc(kAlign, bytes));
  if (!buffer) fail(LLMQ_ERR_OUT_OF_MEMORY, "bandwidth test: cannot allocate {} bytes", bytes);
  madvise(buffer, bytes, MADV_HUGEPAGE);  // fewer TLB misses, as for a large mapped model; a hint only

  const size_t slice = bytes / size_t(threads) / 128 * 128;
  MemoryBandwidth result;
  result.avx2 = __builtin_cpu_supports("avx2");
  std::atomic<uint64_t> sink{0};  // the sums land here so that the reads cannot be dropped
  auto run_threads = [&](auto&& body) {
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        body(buffer + size_t(t) * slice, t + 1 == threads ? bytes - size_t(t) * slice : slice);
      });
    const auto start = std::chrono::steady_clock::now();
    go.store(true, std::memory_order_release);
    for (auto& thread : pool) thread.join();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  // Each thread fills its own slice first, so the pages exist (and sit near the reader).
  run_threads([](uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i) p[i] = uint8_t(i * 131 + 7);
  });
  for (int pass = 0; pass < passes; ++pass) {
    double seconds = run_threads([&](const uint8_t* p, size_t n) {
      sink.fetch_add(result.avx2 ? sum_avx2(p, n) : sum_scalar(p, n), std::memory_order_relaxed);
    });
    result.passes.push_back(double(bytes) / seconds);
    result.best_bytes_per_s = std::max(result.best_bytes_per_s, result.passes.back());
  }
  std::free(buffer);
  return result;
}

namespace {

// Ten independent accumulators cover the FMA latency (4-5 cycles) on two ports.
__attribute__((target("avx2,fma"))) float fma_avx2(int64_t iterations) {
  __m256 acc[10];
  for (int i = 0; i < 10; ++i) acc[i] = _mm256_set1_ps(float(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < 10; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  __m256 sum = acc[0];
  for (int i = 1; i < 10; ++i) sum = _mm256_add_ps(sum, acc[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  return lanes[0];
}

float fma_scalar(int64_t iterations) {
  float acc[80];
  for (int i = 0; i < 80; ++i) acc[i] = float(i);
  for (int64_t it = 0; it < iterations; ++it)
    for (float& x : acc) x = x * 0.999999f + 1e-7f;
  float sum = 0;
  for (float x : acc) sum += x;
  return sum;
}

}  // namespace

double measure_peak_flops(int threads) {
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  constexpr int64_t kIterations = 4000000;  // 80 lanes x 2 FLOPs each: 640 MFLOP per thread
  double best = 0;
  for (int pass = 0; pass < 3; ++pass) {
    std::atomic<float> sink{0};
    std::vector<std::thread> pool;
    const auto start = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&] {
        const float r = avx2 ? fma_avx2(kIterations) : fma_scalar(kIterations);
        float expected = sink.load();
        while (!sink.compare_exchange_weak(expected, expected + r)) {
        }
      });
    for (auto& thread : pool) thread.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(threads) * double(kIterations) * 80.0 * 2.0 / seconds);
  }
  return best;
}

}  // namespace llmq
