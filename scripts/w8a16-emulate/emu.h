// Host emulation of the CUDA features the W8A16 kernel uses (scripts/w8a16-emulate/run.sh): one
// std::thread per CUDA thread, std::barrier for __syncthreads and for warp collectives (mma), cp.async
// groups landing at issue (eager) or at the latest legal moment (the wait), shared memory poisoned.
#pragma once
#include <cuda_runtime.h>
#undef __launch_bounds__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define __launch_bounds__(...)
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>

struct EmuDim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim emu_tid;
inline EmuDim emu_bid, emu_gdim, emu_bdim;
#define threadIdx emu_tid
#define blockIdx emu_bid
#define gridDim emu_gdim
#define blockDim emu_bdim

inline std::barrier<>* emu_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline uint4* emu_dyn_smem = nullptr;
inline bool emu_eager = false;

using std::min;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
template <class T>
inline T __ldcg(const T* p) { return *p; }
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t in = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 0xf;
    if (sel & 8) throw 1;  // sign replication: not used
    r |= uint32_t((in >> (8 * sel)) & 0xff) << (8 * i);
  }
  return r;
}
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { return a * b; }

// cp.async
struct EmuCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<EmuCopy> emu_open;
inline thread_local std::deque<std::vector<EmuCopy>> emu_groups;
inline void emu_land(const EmuCopy& c) {
  if (c.valid) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}
inline void cp_async16(void* smem, const void* src, bool valid) {
  if (emu_eager) emu_land({smem, src, valid});
  else emu_open.push_back({smem, src, valid});
}
inline void cp_async_commit() {
  emu_groups.push_back(std::move(emu_open));
  emu_open.clear();
}
template <int kPending>
inline void cp_async_wait() {
  while (int(emu_groups.size()) > kPending) {
    for (auto& c : emu_groups.front()) emu_land(c);
    emu_groups.pop_front();
  }
}

// mma.sync m16n8k16 .row.col, fp32 accumulate: fragments exchanged through per-warp slots.
struct EmuWarpX {
  uint32_t a[32][4], b[32][2];
};
inline EmuWarpX emu_x[32];
inline float emu_half(uint32_t reg, int half, __nv_bfloat16) {
  const uint32_t bits = half ? reg >> 16 : reg & 0xffff;
  return __uint_as_float(bits << 16);
}
inline float emu_half(uint32_t reg, int half, __half) {
  const unsigned short bits = half ? reg >> 16 : reg & 0xffff;
  return __half2float(__ushort_as_half(bits));
}
template <class T>
inline void emu_mma(float* c, const uint32_t* a, const uint32_t* b, T) {
  const int lane = emu_tid.x % 32, warp = emu_tid.x / 32;
  EmuWarpX& X = emu_x[warp];
  for (int i = 0; i < 4; ++i) X.a[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) X.b[lane][i] = b[i];
  emu_warp_barriers[warp]->arrive_and_wait();
  // A[row][k]: lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2.
  // B[k][col]: lane 4 col + (k % 8) / 2, register k >= 8, half k % 2.
  auto A = [&](int row, int k) { return emu_half(X.a[4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2, T{}); };
  auto B = [&](int k, int col) { return emu_half(X.b[4 * col + (k % 8) / 2][k >= 8], k % 2, T{}); };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    double sum = 0;
    for (int k = 0; k < 16; ++k) sum += double(A(row, k)) * double(B(k, col));
    out[e] = float(double(c[e]) + sum);
  }
  emu_warp_barriers[warp]->arrive_and_wait();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

template <class Kernel, class... Args>
void emu_launch(dim3 grid, unsigned threads, size_t smem_bytes, Kernel kernel, Args... args) {
  emu_gdim = {grid.x, grid.y, grid.z};
  emu_bdim = {threads, 1, 1};
  std::vector<uint4> smem(smem_bytes / 16 + 1);
  emu_dyn_smem = smem.data();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(smem.data(), 0xff, smem.size() * 16);  // NaN-ish garbage
        emu_bid = {x, y, z};
        std::barrier<> block(threads);
        emu_block_barrier = &block;
        emu_warp_barriers.clear();
        for (unsigned w = 0; w < threads / 32; ++w) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> pool;
        for (unsigned i = 0; i < threads; ++i)
          pool.emplace_back([&, i] {
            emu_tid = {i, 0, 0};
            emu_open.clear();
            emu_groups.clear();
            kernel(args...);
            if (!emu_open.empty()) throw 2;  // copies never committed
          });
        for (auto& th : pool) th.join();
      }
}
