// The tensor-core kernels for 8-bit weights, in a header of their own so that the CPU emulation of
// tests/emulated/ runs them too (w8a16_gemm.cu plans and launches them):
//  - the tiled INT8 weight-only GEMM (W8A16, below), any number of rows;
//  - the decode kernel that streams INT8 or FP8 weights into registers (up to 64 rows);
//  - the Hopper wgmma kernels for INT8 (with 16-bit x) and FP8 (with FP8 x) weights, for prefill.
// The W8A16 ones compute out[M, N] (fp32) = x[M, K] (BF16/F16) . W[N, K]^T (INT8 codes), then the
// weight scale per column and the bias (engine/quant.h). The codes travel as one byte each and
// become 16-bit values exactly (|code| <= 128), so the weights cost a fifth of the bytes of
// dequantizing them to memory first and half of a 16-bit GEMM's.
//
// Shape of the tiled kernel (all tiles in elements):
//  - a block computes a BM x 128 tile of out over a range of K; a warp a (BM / WM) x (128 / WN) part
//    of it as m16 x n8 MMA tiles (mma16816, fp32 accumulators);
//  - K goes in steps of 64 through a kStages-deep cp.async pipeline: the x tile (BM x 64 16-bit
//    values, 16-byte chunks XOR-swizzled by row) and the W tile (128 x 64 bytes, plain rows);
//  - few rows (M <= 64: decode batches) read the weights once, with BM = 16/32/64 and 4 warps side by
//    side along N; when the N tiles cannot fill the GPU, K is split over blocks (split-K) and the last
//    block of a tile adds the partial sums in split order (deterministic) before the epilogue;
//  - more rows (prefill) use 128 x 128 tiles and 8 warps (2 x 4), each warp 64 x 32.
//
// The k order inside a 64-wide step is permuted, identically for x and W, so that every fragment is
// one 16-byte shared-memory load: lane (g, t) loads x[row][16t .. 16t+15] and W[col][16t .. 16t+15]
// and uses elements 16t + 4s .. 16t + 4s + 3 in the s-th MMA (s = 0..3) as the fragment's k = 2t, 2t+1,
// 2t+8, 2t+9. A dot product does not depend on the order of k, and each MMA still sees 16 distinct k.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace llmq::cuda {
namespace {

constexpr int kBK = 64;  // K per pipeline stage (kW8A16KMultiple)
constexpr int kBN = 128;
constexpr int kStages = 4;
static_assert(kBK == kW8A16KMultiple, "the K step is the K multiple the kernel requires");

// ---- INT8 codes to 16-bit pairs, exact ----------------------------------------------------------

// Four codes (bytes 0..3 of q) as two registers of two 16-bit values: lo = codes 0, 1 and hi = codes
// 2, 3, the lower code in the lower half. Bias trick: u = code + 128 (flip the sign bit), put u in
// the low mantissa bits of a power of two, subtract that power of two plus 128.
__device__ __forceinline__ void i8x4_to_pairs(uint32_t q, uint32_t& lo, uint32_t& hi, f16) {
  const uint32_t u = q ^ 0x80808080u;
  // f16 0x64XX = 1024 + XX; 0x6480 = 1152 = 1024 + 128.
  const __half2 magic = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
  const uint32_t l = __byte_perm(u, 0x64646464u, 0x4140), h = __byte_perm(u, 0x64646464u, 0x4342);
  const __half2 lo2 = __hsub2(*reinterpret_cast<const __half2*>(&l), magic);
  const __half2 hi2 = __hsub2(*reinterpret_cast<const __half2*>(&h), magic);
  lo = *reinterpret_cast<const uint32_t*>(&lo2);
  hi = *reinterpret_cast<const uint32_t*>(&hi2);
}
__device__ __forceinline__ void i8x4_to_pairs(uint32_t q, uint32_t& lo, uint32_t& hi, bf16) {
  const uint32_t u = q ^ 0x80808080u;
  // fp32 0x4B0000XX = 2^23 + XX, so (2^23 + XX) - (2^23 + 128) = code; a small integer's fp32 has
  // zero low 16 bits, so its upper 16 bits are its bf16.
  float f[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440 | i)) - 8388736.0f;
  lo = __byte_perm(__float_as_uint(f[0]), __float_as_uint(f[1]), 0x7632);
  hi = __byte_perm(__float_as_uint(f[2]), __float_as_uint(f[3]), 0x7632);
}

// Two codes (bytes 0 and 1 of p) as one register of two 16-bit values, exact, code 0 in the lower
// half: each code spread to the low byte of a half, then a bias trick in 16-bit arithmetic.
__device__ __forceinline__ uint32_t i8x2_to_pair(uint32_t p, f16) {
  // f16 0x64XX = 1024 + XX: with XX = code + 128 (the sign bit flipped), minus 1152.
  const uint32_t u = __byte_perm(p, 0, 0x4140) ^ 0x64806480u;
  const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&u), __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480)));
  return *reinterpret_cast<const uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t i8x2_to_pair(uint32_t p, bf16) {
  // bf16 0x43XX = 128 + XX for XX < 128 (7 mantissa bits): v = 128 + (code & 127), then minus 128
  // for codes >= 0 and 256 (0x4380) for negative ones.
  const uint32_t spread = __byte_perm(p, 0, 0x4140);
  const uint32_t v = (spread & 0x007f007fu) | 0x43004300u, m = (spread & 0x00800080u) ^ 0x43004300u;
  const __nv_bfloat162 r =
      __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v), *reinterpret_cast<const __nv_bfloat162*>(&m));
  return *reinterpret_cast<const uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// ---- Split-K's end ----------------------------------------------------------------------------

// For a block whose split of K is done (grid z = the splits): its sums go to partial[split][M][N]
// (for_outputs(slice, fn) calls fn(float& sum, int64_t m * N + n, int m, int n) for each of the
// thread's outputs inside [M, N] in slice 0 .. kSlices - 1). The last of the tile's split blocks to
// arrive (at `counter`, zero before the first arrival) resets the counter for the next launch and
// writes out = e.apply(the splits' sums added in split order: the same bits whichever block is
// last) over the block's tile, [m0, m0 + tile_m) x [n0, n0 + tile_n). Its threads share the tile in
// 16-byte quads (N a multiple of 4; else one element at a time), and a thread loads kQuadLoads
// quads of kSplitLoads splits each before adding any, so that a round costs one L2 round trip.
// (Each thread once added its own fragments' sums, one load and add an output and split, every
// load behind a branch: one round trip each. An H200 took 85 us so for a 64-row 4096 x 4096 W8A16
// linear of 8 splits, against 3.5 us to read its weights.)
constexpr unsigned kSplitLoads = 4;
constexpr int kQuadLoads = 4;
template <int kSlices, typename ForOutputs>
__device__ void reduce_splits(ForOutputs&& for_outputs, int m0, int tile_m, int n0, int tile_n, int M, int N,
                              const Epilogue& e, float* out, float* partial, unsigned* counter) {
  float* const mine = partial + int64_t(blockIdx.z) * M * N;
#pragma unroll
  for (int slice = 0; slice < kSlices; ++slice) for_outputs(slice, [&](float& v, int64_t at, int, int) { mine[at] = v; });
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(counter, 1u) == gridDim.z - 1;
    if (last) *counter = 0;  // every split has arrived
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // Partial sums are read through L2 (__ldcg): other multiprocessors wrote them.
  const unsigned splits = gridDim.z;
  const int64_t plane = int64_t(M) * N;
  const int rows = min(tile_m, M - m0), cols = min(tile_n, N - n0);
  if (N % 4 != 0) {
    for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
      const int m = m0 + i / cols, n = n0 + i % cols;
      const int64_t at = int64_t(m) * N + n;
      float sum = __ldcg(partial + at);
      for (unsigned split = 1; split < splits; ++split) sum += __ldcg(partial + split * plane + at);
      out[at] = e.apply(sum, m, n);
    }
    return;
  }
  const int quads = cols / 4;  // tile_n and n0 are multiples of 4: whole quads, 16-byte aligned
  for (int base = threadIdx.x; base < rows * quads; base += kQuadLoads * blockDim.x) {
    int64_t at[kQuadLoads];  // a quad past the tile: the round's first again, not stored
#pragma unroll
    for (int q = 0; q < kQuadLoads; ++q) {
      const int i = base + q * int(blockDim.x) < rows * quads ? base + q * int(blockDim.x) : base;
      at[q] = int64_t(m0 + i / quads) * N + n0 + 4 * (i % quads);
    }
    float4 sum[kQuadLoads];
    for (unsigned first = 0; first < splits; first += kSplitLoads) {
      float4 ps[kQuadLoads][kSplitLoads];
#pragma unroll
      for (int q = 0; q < kQuadLoads; ++q)
#pragma unroll
        for (unsigned d = 0; d < kSplitLoads; ++d)  // past the last split: the last again, not added
          ps[q][d] = __ldcg(reinterpret_cast<const float4*>(partial + min(first + d, splits - 1) * plane + at[q]));
#pragma unroll
      for (int q = 0; q < kQuadLoads; ++q)
#pragma unroll
        for (unsigned d = 0; d < kSplitLoads; ++d) {
          if (first + d >= splits) continue;
          const float4 p = ps[q][d];
          sum[q] = first + d == 0 ? p : make_float4(sum[q].x + p.x, sum[q].y + p.y, sum[q].z + p.z, sum[q].w + p.w);
        }
    }
#pragma unroll
    for (int q = 0; q < kQuadLoads; ++q) {
      if (base + q * int(blockDim.x) >= rows * quads) break;
      const int m = int(at[q] / N), n = int(at[q] % N);
      *reinterpret_cast<float4*>(out + at[q]) = make_float4(e.apply(sum[q].x, m, n), e.apply(sum[q].y, m, n + 1),
                                                            e.apply(sum[q].z, m, n + 2), e.apply(sum[q].w, m, n + 3));
    }
  }
}

// ---- The kernel -------------------------------------------------------------------------------

// Shared memory: kStages x (x tile [BM][kBK] of T, 16-byte chunk c of row r at chunk c ^ (r % 8);
// W tile [kBN][kBK] bytes).
template <typename T, int BM>
constexpr int smem_bytes() {
  return kStages * (BM * kBK * int(sizeof(T)) + kBN * kBK);
}

// (Asking for two 8-warp blocks per multiprocessor, i.e. 128 registers, spills about 200 bytes.)
template <typename T, int BM, int WM, int WN>
__global__ void __launch_bounds__(WM * WN * 32)
    w8a16_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, int M, int N, int K, int k_steps_per_split,
                 Epilogue e, float* __restrict__ out, float* __restrict__ partial, unsigned* __restrict__ counters) {
  constexpr int kThreads = WM * WN * 32;
  constexpr int kWarpM = BM / WM, kWarpN = kBN / WN;       // a warp's tile
  constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;  // its MMA tiles
  constexpr int kAChunks = BM * kBK * int(sizeof(T)) / 16;  // 16-byte copies per stage: 8 per x row
  constexpr int kBChunks = kBN * kBK / 16;                  // 4 per W row
  static_assert(sizeof(T) == 2 && kBK == 64, "the swizzle and the fragment loads assume 8 chunks of 8 values per x row");
  static_assert(kWarpM % 16 == 0 && kWarpN % 8 == 0, "whole MMA tiles per warp");
  static_assert(kAChunks % kThreads == 0 && kBChunks % kThreads == 0, "whole copies per thread");

  LLMQ_DYNAMIC_SHARED(uint4, smem);  // uint4: 16-byte aligned, one declaration for every instantiation
  T* const a_s = reinterpret_cast<T*>(smem);
  int8_t* const b_s = reinterpret_cast<int8_t*>(smem) + kStages * BM * kBK * int(sizeof(T));

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int warp_m0 = (warp / WN) * kWarpM, warp_n0 = (warp % WN) * kWarpN;  // within the block tile
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * kBN;
  const int kt_begin = blockIdx.z * k_steps_per_split;
  const int n_k = min(K / kBK - kt_begin, k_steps_per_split);  // >= 1: the launcher leaves no split empty

  // Copies K tile kt into pipeline stage `stage`; rows past M or N are zero-filled.
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    T* as = a_s + stage * BM * kBK;
#pragma unroll
    for (int i = 0; i < kAChunks / kThreads; ++i) {
      const int q = tid + i * kThreads, r = q / 8, c = q % 8;
      const bool valid = m0 + r < M;
      cp_async16(as + r * kBK + (c ^ (r % 8)) * 8, x + int64_t(valid ? m0 + r : 0) * K + k0 + c * 8, valid);
    }
    int8_t* bs = b_s + stage * kBN * kBK;
#pragma unroll
    for (int i = 0; i < kBChunks / kThreads; ++i) {
      const int q = tid + i * kThreads, r = q / 4, c = q % 4;
      const bool valid = n0 + r < N;
      cp_async16(bs + r * kBK + c * 16, w + int64_t(valid ? n0 + r : 0) * K + k0 + c * 16, valid);
    }
  };

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  // One commit group per K tile, empty past the end, so that "tile i has landed" is always
  // "at most kStages - 2 groups pending" at iteration i.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_k) load_stage(s, kt_begin + s);
    cp_async_commit();
  }
  for (int i = 0; i < n_k; ++i) {
    cp_async_wait<kStages - 2>();
    // Tile i is visible to all threads, and every warp is done with the stage read at i - 1,
    // which the copy below refills.
    __syncthreads();
    if (i + kStages - 1 < n_k) load_stage((i + kStages - 1) % kStages, kt_begin + i + kStages - 1);
    cp_async_commit();

    const T* as = a_s + (i % kStages) * BM * kBK;
    const int8_t* bs = b_s + (i % kStages) * kBN * kBK;
    // W: 16 codes per n8 tile, columns warp_n0 + 8j + g, k 16t .. 16t+15 (conflict-free: 8
    // consecutive lanes read 128 consecutive bytes).
    uint4 b_raw[kNTiles];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
      b_raw[j] = *reinterpret_cast<const uint4*>(bs + (warp_n0 + 8 * j + g) * kBK + 16 * t);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // x: rows warp_m0 + 16i + g and + 8 (both = g mod 8), k 16t + 8h .. +7: logical chunk 2t + h.
      uint4 a_lo[kMTiles], a_hi[kMTiles];
      const int chunk = ((2 * t + h) ^ g) * 8;
#pragma unroll
      for (int i2 = 0; i2 < kMTiles; ++i2) {
        const int row = warp_m0 + 16 * i2 + g;
        a_lo[i2] = *reinterpret_cast<const uint4*>(as + row * kBK + chunk);
        a_hi[i2] = *reinterpret_cast<const uint4*>(as + (row + 8) * kBK + chunk);
      }
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2) {
        const int s = 2 * h + s2;  // the MMA: k 16t + 4s .. 16t + 4s + 3 of each lane
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
          uint32_t b[2];
          i8x4_to_pairs(word(b_raw[j], s), b[0], b[1], T{});
#pragma unroll
          for (int i2 = 0; i2 < kMTiles; ++i2) {
            const uint32_t a[4] = {word(a_lo[i2], 2 * s2), word(a_hi[i2], 2 * s2), word(a_lo[i2], 2 * s2 + 1),
                                   word(a_hi[i2], 2 * s2 + 1)};
            mma16816(acc[i2][j], a, b, T{});
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // only empty groups remain; nothing is left in flight at exit

  // C fragment element c of MMA tile (i, j): row 16i + g (+8 for c >= 2), column 8j + 2t + (c & 1).
  // Slice i2: the MMA row tile i2.
  auto for_outputs = [&](int i2, auto&& fn) {
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int m = m0 + warp_m0 + 16 * i2 + g + (c >= 2 ? 8 : 0);
        const int n = n0 + warp_n0 + 8 * j + 2 * t + (c & 1);
        if (m < M && n < N) fn(acc[i2][j][c], int64_t(m) * N + n, m, n);
      }
  };
  if (gridDim.z > 1)
    return reduce_splits<kMTiles>(for_outputs, m0, BM, n0, kBN, M, N, e, out, partial,
                                  counters + blockIdx.y * gridDim.x + blockIdx.x);
#pragma unroll
  for (int i2 = 0; i2 < kMTiles; ++i2)
    for_outputs(i2, [&](float& v, int64_t at, int m, int n) { out[at] = e.apply(v, m, n); });
}

// The block tile's rows for M rows: decode batches get the smallest of 16/32/64 that holds them.
constexpr int block_m(int64_t M) { return M <= 16 ? 16 : M <= 32 ? 32 : M <= 64 ? 64 : 128; }

// Calls launch(kernel, grid, threads, shared memory bytes) with the kernel's instantiation for M
// rows of T activations (its tile shape) and the plan's grid.
template <typename T, typename Launch>
void w8a16_for_rows(int64_t M, int64_t N, const SplitKPlan& plan, Launch&& launch) {
  auto with = [&](auto kernel, int bm, int threads, int smem) {
    launch(kernel, dim3(unsigned((N + kBN - 1) / kBN), unsigned((M + bm - 1) / bm), unsigned(plan.splits)), threads,
           smem);
  };
  switch (block_m(M)) {
    case 16:
      return with(w8a16_kernel<T, 16, 1, 4>, 16, 128, smem_bytes<T, 16>());
    case 32:
      return with(w8a16_kernel<T, 32, 1, 4>, 32, 128, smem_bytes<T, 32>());
    case 64:
      return with(w8a16_kernel<T, 64, 1, 4>, 64, 128, smem_bytes<T, 64>());
    default:
      return with(w8a16_kernel<T, 128, 2, 4>, 128, 256, smem_bytes<T, 128>());
  }
}


// ---- Decode batches: the weights streamed into registers ---------------------------------------
//
// Up to kStreamMaxM rows (decode batches), a linear reads each weight once and does little
// arithmetic per byte: this kernel is built around the weight stream, with no shared-memory tiles
// and no split-K scratch. It takes INT8 weights with 16-bit activations (T = BF16/F16: codes made
// 16-bit in registers, mma m16n8k16) or FP8 weights with FP8 activation codes and row scales
// (T = fp8: mma m16n8k32 E4M3 on the codes as they are). It computes the product transposed,
// out^T = W . x^T, so that the weights are the MMA's A operand (16 channels) and the rows its B
// operand (8 tokens): 1..8 rows leave 8 - M columns of each MMA unused, not 16 - M rows.
//  - A block of kStreamWarps warps computes 16 * CT channels over all of K for 8 * TT tokens (TT
//    tiles of 8): all rows, or with the tokens split, rows 8 * TT * blockIdx.x onwards (blocks of
//    the same channels run side by side, so their weights come from DRAM about once). Warp w takes
//    the 64-wide K steps w, w + kStreamWarps, ...; the warps' sums are added in warp order through
//    shared memory (deterministic).
//  - Wide (kWide): the block's warps take kStreamWarps tiles of 16 * CT channels instead, each
//    over all of K, and write their own sums. The block's warps read the same activations at about
//    the same time, so each block fetches them from L2 once for 8x the channels: at 17-64 rows the
//    activations, not the weights, are most of what the narrow blocks move (an H200 profile: one
//    64-row block of 32 channels per multiprocessor, L1 hits 42%, DRAM 10-13% busy).
//  - Lane (g, t) loads the 16 codes at k 16t .. 16t+15 of a step of channels 16c + g and
//    16c + g + 8 straight from global memory (the 4 lanes of a group read 64 consecutive bytes of a
//    row), kStreamLoads<TT> 16-byte loads in flight, cached in L2 only so that they do not evict the
//    activations from L1; and the activations at the same k of token 8i + g, which every block
//    reads (cached).
//  - The k order inside a step is permuted alike for both operands: for 16-bit x, elements 16t + 4q
//    .. 16t + 4q + 3 are the fragment's k = 2t, 2t+1, 2t+8, 2t+9 of the q-th MMA (w8a16_kernel's
//    order); for FP8, codes 16t + 8q .. + 7 are its k = 4t .. 4t+3, 16+4t .. 16+4t+3.
//  - Channels past N and tokens past M read the last channel and token: an MMA output's row depends
//    only on its A row and its column only on its B column, so they reach only outputs that are
//    not written.
constexpr int kStreamWarps = 8;
// 16-byte weight loads in flight per lane. Up to 8 rows a linear is a few microseconds of weight
// reads, about as long as a DRAM round trip or two: 16 loads a lane put a 4096 x 4096 layer's 64 KB
// a block (256 blocks) in flight at once rather than in two rounds (Little's law; 8 loads took
// 10.3 us for those 16.8 MB on an H200, 1.6 TB/s). More rows keep 8: their registers go to the
// activations' tiles.
template <int TT>
constexpr int kStreamLoads = TT == 1 ? 16 : 8;

// Shared memory: every warp's sums, [kStreamWarps][16 * CT channels][8 * TT tokens] floats (none
// for the wide form).
template <int CT, int TT, bool kWide = false>
constexpr int stream_smem_bytes() {
  return kWide ? 0 : kStreamWarps * 16 * CT * 8 * TT * int(sizeof(float));
}

// The linears of one launch: job j's blocks are grid.y first_block[j] onwards.
struct StreamJobs {
  StreamJob job[kMaxStreamJobs];
  int first_block[kMaxStreamJobs];
  int count;
};

// The kernel's parameter for `count` jobs with block_channels channels a block; *blocks: the
// blocks they take (grid.y).
inline StreamJobs stream_jobs(const StreamJob* jobs, int count, int block_channels, int* blocks) {
  StreamJobs all{};
  all.count = count;
  *blocks = 0;
  for (int j = 0; j < count; ++j) {
    all.job[j] = jobs[j];
    all.first_block[j] = *blocks;
    *blocks += int((jobs[j].N + block_channels - 1) / block_channels);
  }
  return all;
}

template <typename T, int CT, int TT, bool kWide = false>
__global__ void __launch_bounds__(kStreamWarps * 32)
    stream_linear_kernel(const T* __restrict__ x, StreamJobs jobs, int M, int K) {
  // This block's job, read with constant indices (no copy of the parameters to local memory), and
  // the block's index among the job's.
  StreamJob job = jobs.job[0];
  int block_y = int(blockIdx.y);
#pragma unroll
  for (int j = 1; j < kMaxStreamJobs; ++j)
    if (j < jobs.count && int(blockIdx.y) >= jobs.first_block[j]) {
      job = jobs.job[j];
      block_y = int(blockIdx.y) - jobs.first_block[j];
    }
  const uint8_t* __restrict__ w = static_cast<const uint8_t*>(job.w);
  const int N = int(job.N);
  const Epilogue e{job.scales};
  float* __restrict__ out = job.out;
  constexpr bool kFp8 = sizeof(T) == 1;  // FP8 codes on both sides, else INT8 codes and 16-bit x
  constexpr int kSteps = kStreamLoads<TT> / (2 * CT);  // K steps loaded per iteration
  constexpr int kChannels = 16 * CT, kTokens = 8 * TT, kTile = kChannels * kTokens;
  // The warps' K steps: every kStreamWarps-th from the warp's index, or (wide) all of them.
  constexpr int kStepStride = kWide ? 1 : kStreamWarps;
  static_assert(kSteps >= 1, "whole steps in flight");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int n0 = kWide ? (block_y * kStreamWarps + warp) * kChannels : block_y * kChannels;
  // Blocks of rows (grid.x > 1) come only in 16-row blocks (stream_for_rows); a constant 0 for the
  // other forms keeps their registers (the 64-row FP8 form: 198 rather than 255 and a spill).
  const int m0 = TT == 2 ? int(blockIdx.x) * kTokens : 0, k_steps = K / kBK;
  x += int64_t(m0) * K;  // from here on x and M are the block's rows, m0 onwards
  M -= m0;

  const uint8_t* w_row[CT][2];  // channels 16c + g and 16c + g + 8, at k 16t
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int h = 0; h < 2; ++h) w_row[c][h] = w + int64_t(min(n0 + 16 * c + 8 * h + g, N - 1)) * K + 16 * t;
  float acc[CT][TT][4];
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int i = 0; i < TT; ++i) acc[c][i][0] = acc[c][i][1] = acc[c][i][2] = acc[c][i][3] = 0.0f;

  for (int s0 = kWide ? 0 : warp; s0 < k_steps; s0 += kStepStride * kSteps) {
    uint4 raw[kSteps][CT][2];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int s = s0 + u * kStepStride;
      if (s < k_steps)
#pragma unroll
        for (int c = 0; c < CT; ++c)
#pragma unroll
          for (int h = 0; h < 2; ++h) raw[u][c][h] = __ldcg(reinterpret_cast<const uint4*>(w_row[c][h] + int64_t(s) * kBK));
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int s = s0 + u * kStepStride;
      if (s >= k_steps) break;  // the same for the whole warp
      if constexpr (kFp8) {
        // 2 MMAs of k32 a step: codes 16t + 8q .. 16t + 8q + 7 are the fragment's k = 4t .. 4t+3,
        // 16+4t .. 16+4t+3 of the q-th; A rows g (registers 0, 2) and g + 8 (1, 3), as they are.
#pragma unroll
        for (int i = 0; i < TT; ++i) {
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + int64_t(min(8 * i + g, M - 1)) * K +
                                                                 int64_t(s) * kBK + 16 * t));
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const uint32_t b[2] = {word(xv, 2 * q), word(xv, 2 * q + 1)};
#pragma unroll
            for (int c = 0; c < CT; ++c) {
              const uint32_t a[4] = {word(raw[u][c][0], 2 * q), word(raw[u][c][1], 2 * q),
                                     word(raw[u][c][0], 2 * q + 1), word(raw[u][c][1], 2 * q + 1)};
              mma16832(acc[c][i], a, b, T{});
            }
          }
        }
      } else {
        // A fragments of the 4 MMAs of the step: rows g (registers 0, 2) and g + 8 (1, 3).
        uint32_t a[CT][4][4];
#pragma unroll
        for (int c = 0; c < CT; ++c)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            i8x4_to_pairs(word(raw[u][c][0], q), a[c][q][0], a[c][q][2], T{});
            i8x4_to_pairs(word(raw[u][c][1], q), a[c][q][1], a[c][q][3], T{});
          }
#pragma unroll
        for (int i = 0; i < TT; ++i) {
          const uint4* xp =
              reinterpret_cast<const uint4*>(x + int64_t(min(8 * i + g, M - 1)) * K + int64_t(s) * kBK + 16 * t);
          const uint4 lo = __ldg(xp), hi = __ldg(xp + 1);  // elements 0..7 and 8..15
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint4& half = q < 2 ? lo : hi;  // elements 4q .. 4q + 3
            const uint32_t b[2] = {word(half, 2 * (q % 2)), word(half, 2 * (q % 2) + 1)};
#pragma unroll
            for (int c = 0; c < CT; ++c) mma16816(acc[c][i], a[c][q], b, T{});
          }
        }
      }
    }
  }

  // C fragment element r of tile (c, i): channel 16c + g (+8 for r >= 2), token 8i + 2t + (r & 1).
  if constexpr (kWide) {
#pragma unroll
    for (int c = 0; c < CT; ++c)
#pragma unroll
      for (int i = 0; i < TT; ++i)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int m = 8 * i + 2 * t + (r & 1), n = n0 + 16 * c + g + (r >= 2 ? 8 : 0);
          if (m < M && n < N) out[int64_t(m0 + m) * N + n] = e.apply(acc[c][i][r], m0 + m, n);
        }
    return;
  }
  LLMQ_DYNAMIC_SHARED(uint4, smem);
  float* const sums = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int i = 0; i < TT; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        sums[warp * kTile + (16 * c + g + (r >= 2 ? 8 : 0)) * kTokens + 8 * i + 2 * t + (r & 1)] = acc[c][i][r];
  __syncthreads();
  // Token-major, so that neighbouring threads write neighbouring channels of an output row.
  for (int at = threadIdx.x; at < kTile; at += kStreamWarps * 32) {
    const int m = at / kChannels, channel = at % kChannels, n = n0 + channel;
    if (m >= M || n >= N) continue;
    float v = sums[channel * kTokens + m];
#pragma unroll
    for (int wi = 1; wi < kStreamWarps; ++wi) v += sums[wi * kTile + channel * kTokens + m];
    out[int64_t(m0 + m) * N + n] = e.apply(v, m0 + m, n);
  }
}

// Calls launch(kernel, blocks of rows (grid.x), channels a block, threads, shared memory bytes)
// with the stream kernel's instantiation for M (<= kStreamMaxM) rows of T activations, in the
// layout asked for:
//  - Whole: all rows in one block, token tiles for M; 32 channels a block (CT = 2) at 33-64 rows,
//    where each step's 16 activation loads per lane would otherwise take the L1 about as long as
//    the step's weights take to stream in (CT = 1: 1 KB a warp);
//  - Rows16: 16 rows a block (the 9-16 row instantiation, fewer registers, more blocks a
//    multiprocessor), each weight read by ceil(M / 16) blocks, from L2 but for the first;
//  - Wide: 16 rows and 128 channels (8 warps of 16) a block, the warps over all of K.
// Up to 16 rows every layout is Whole's.
template <typename T, typename Launch>
void stream_for_rows(int64_t M, StreamLayout layout, Launch&& launch) {
  auto with = [&](auto kernel, int block_channels, int tokens, int smem) {
    launch(kernel, int((M + tokens - 1) / tokens), block_channels, kStreamWarps * 32, smem);
  };
  if (M <= 8) return with(stream_linear_kernel<T, 1, 1>, 16, 8, stream_smem_bytes<1, 1>());
  if (M <= 16 || layout == StreamLayout::Rows16)
    return with(stream_linear_kernel<T, 1, 2>, 16, 16, stream_smem_bytes<1, 2>());
  if (layout == StreamLayout::Wide)
    return with(stream_linear_kernel<T, 1, 2, true>, 16 * kStreamWarps, 16, stream_smem_bytes<1, 2, true>());
  if (M <= 32) return with(stream_linear_kernel<T, 1, 4>, 16, 32, stream_smem_bytes<1, 4>());
  return with(stream_linear_kernel<T, 2, 8>, 32, 64, stream_smem_bytes<2, 8>());
}

// ---- Prefill on Hopper: warpgroup MMAs over 8-bit weights -------------------------------------
//
// For many rows on compute capability 9.0 (sm_90a), T being the activations' element type, two
// kernels with blocks of two warpgroups (256 threads), each over a range of K in steps of 128 bytes
// of a row (64 16-bit values, 128 FP8 codes), through a kWgStages-deep cp.async pipeline (copies
// kWgStages - 2 steps ahead, one MMA group in flight):
//  - INT8 weights with BF16/F16 x (W8A16): out^T = W . x^T, so that the weights are wgmma's A
//    operand, which may come from registers: the codes go from shared memory straight into A
//    fragments, converted exactly to T on the way, and never back to shared memory (an H200 run of
//    the earlier form that wrote them back: half the speed of dequantize + cuBLASLt). A block is
//    128 channels x 256 tokens, each warpgroup 64 channels x 256 tokens (two m64n128 halves, 128
//    fp32 accumulators a thread). Lane (g, t) needs k = 2t, 2t + 1, 2t + 8, 2t + 9 of each 16 of
//    its rows g and g + 8, two bytes at a time; the code rows are 80 bytes apart in shared memory so
//    that those loads fall in 32 different banks. Each K slice's fragments are built while the
//    MMAs of the slices before run, in two buffers (even and odd steps).
//  - FP8 weights with FP8 x codes and their row scales: both operands from shared memory, a block
//    128 tokens x 128 channels, each warpgroup 64 tokens.
// The x tiles (and FP8 weight tiles) are laid out as wgmma reads K-major operands with the 128-byte
// swizzle: a row's 128 bytes are 8 chunks of 16, chunk c of row r stored at chunk c ^ (r % 8), 8-row
// groups 1024 bytes apart from 1024-aligned tiles. Unlike the other INT8 kernels the k order is the
// natural one (the descriptors cannot permute it). When the tiles cannot fill the GPU (short
// prompts), K is split over blocks as in the tiled kernel (wgmma_plan). Scales (the weight's, FP8's
// row scales) and bias are applied to the fp32 sums.
constexpr int kWgStages = 5, kWgThreads = 256;

template <typename T, bool kCopiers = false>  // kCopiers: the INT8 form with a copier warpgroup
struct WgmmaTiles {
  static constexpr bool kRegisterA = sizeof(T) == 2;  // INT8 weights as A from registers, 16-bit x
  static constexpr int kTokens = kRegisterA && !kCopiers ? 256 : 128, kChannels = 128;
  static constexpr int kHalves = kTokens / 128;  // of 128 tokens: one m64n128 MMA each a K slice
  static constexpr int kStepK = 128 / int(sizeof(T));         // K per step: one 128-byte row of x
  static constexpr int kWRowBytes = kRegisterA ? 80 : 128;    // between the weight tile's rows
  static constexpr int kXBytes = kTokens * 128, kWBytes = kChannels * kWRowBytes;
  static constexpr int kStageBytes = kXBytes + kWBytes;       // 1024-aligned stages
  static constexpr int kSmemBytes = kWgStages * kStageBytes + 1024;  // + aligning the first stage
  static_assert(kStageBytes % 1024 == 0, "1024-aligned stages");
};

// A K-major operand's descriptor: start address, 1024 bytes between 8-row groups, 128-byte swizzle.
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t address) {
  return uint64_t((address & 0x3FFFF) >> 4) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// The dynamic shared memory from its first 1024-aligned byte (wgmma's swizzle needs it).
__device__ __forceinline__ uint8_t* wgmma_shared(uint4* smem_raw) {
  return reinterpret_cast<uint8_t*>(smem_raw) + (1024 - smem_address(smem_raw) % 1024) % 1024;
}

// kThreads threads, this one being `copier`, copy 128 bytes (from byte `col`) of kRows rows (`row0`
// onwards, `row_bytes` apart) of src into a swizzled tile: 16-byte chunk copier % 8 of rows
// copier / 8 + kThreads / 8 * i; rows at or past `rows` are zero-filled (from a valid address).
template <int kRows, int kThreads>
__device__ __forceinline__ void copy_swizzled(uint8_t* tile, const uint8_t* src, int64_t row_bytes, int row0,
                                              int rows, int64_t col, int copier) {
  static_assert(kRows * 8 % kThreads == 0 && kThreads % 64 == 0, "whole rounds, rows 8k apart: one swizzle");
  const int c = copier % 8, r0 = copier / 8;
  uint8_t* const dst = tile + r0 * 128 + (c ^ (r0 % 8)) * 16;
#pragma unroll
  for (int i = 0; i < kRows * 8 / kThreads; ++i) {
    const int r = r0 + kThreads / 8 * i, row = row0 + r;
    cp_async16(dst + kThreads / 8 * i * 128, src + int64_t(row < rows ? row : 0) * row_bytes + col + c * 16, row < rows);
  }
}

// The INT8 kernel in two forms (kCopiers):
//  - false: the block's 256 threads all copy, convert and issue; one block barrier a step (a step's
//    copies landed for all, and the stage refilled next freed by both warpgroups);
//  - true: a third warpgroup only copies (kWgStages stages ahead), the other two only convert and
//    issue; no block barrier in the loop: each stage has a "full" mbarrier (the 128 copiers arrive
//    as their copies land: cp.async.mbarrier.arrive) and an "empty" one (the 256 consumer threads
//    arrive once their MMAs of the stage are done). 384 threads get 168 registers a thread (ptxas
//    keeps the kernel to that even with setmaxnreg in the branches), so a block is 128 channels x
//    128 tokens here (64 accumulators a thread; 256 tokens spilled 5 KB). Written without a GPU:
//    not yet run on one.
template <bool kCopiers>
constexpr int w8a16_wgmma_threads() {
  return kCopiers ? kWgThreads + 128 : kWgThreads;
}

template <typename T, bool kCopiers>
__global__ void __launch_bounds__(w8a16_wgmma_threads<kCopiers>(), 1)
    wgmma_w8a16_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, int M, int N, int K,
                       int k_steps_per_split, Epilogue e, float* __restrict__ out, float* __restrict__ partial,
                       unsigned* __restrict__ counters) {
  using Tiles = WgmmaTiles<T, kCopiers>;
  static_assert(Tiles::kRegisterA, "16-bit activations");
  constexpr int kHalves = Tiles::kHalves;
  LLMQ_DYNAMIC_SHARED(uint4, smem_raw);
  uint8_t* const smem = wgmma_shared(smem_raw);
  // Accumulators read in a path ptxas takes as divergent make it serialize every MMA (C7518: the
  // wait it inserts sits there). So without copiers every thread is a consumer at compile time
  // (`tid < kWgThreads` was a branch to ptxas), and with them the warpgroup comes through a
  // shuffle, which ptxas knows is the same across the warp.
  const int tid = threadIdx.x, group = kCopiers ? __shfl_sync(0xffffffffu, tid / 128, 0) : tid / 128;
  const int warp = tid / 32 % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const bool consumer = !kCopiers || group < kWgThreads / 128;
  const int n0 = blockIdx.x * Tiles::kChannels, m0 = blockIdx.y * Tiles::kTokens;
  const int step_begin = blockIdx.z * k_steps_per_split;
  const int n_k = min(K / Tiles::kStepK - step_begin, k_steps_per_split);  // >= 1: the plan leaves no split empty
  auto x_tile = [&](int stage) { return smem + stage * Tiles::kStageBytes; };
  auto code_tile = [&](int stage) { return x_tile(stage) + Tiles::kXBytes; };

  // Copies the split's K step i, x's 64 values of the block's tokens and the codes of its channels,
  // by kCopyThreads threads, this one being `copier`: for the codes, 16-byte chunk copier % 4 of rows
  // copier / 4 + kCopyThreads / 4 * r (rows past N zero-filled, from a valid address).
  constexpr int kCopyThreads = kCopiers ? 128 : kWgThreads;
  constexpr int kCodeRounds = Tiles::kChannels * 4 / kCopyThreads;
  const int copier = tid % kCopyThreads;
  const uint8_t* const code_src = w + (copier % 4) * 16;
  const int code_row = n0 + copier / 4, code_dst = (copier / 4) * Tiles::kWRowBytes + (copier % 4) * 16;
  auto load = [&](int i) {
    const int stage = i % kWgStages;
    const int64_t k = int64_t(step_begin + i) * Tiles::kStepK;
    copy_swizzled<Tiles::kTokens, kCopyThreads>(x_tile(stage), reinterpret_cast<const uint8_t*>(x),
                                                K * int64_t(sizeof(T)), m0, M, k * int64_t(sizeof(T)), copier);
#pragma unroll
    for (int r = 0; r < kCodeRounds; ++r) {
      const int row = code_row + kCopyThreads / 4 * r;
      cp_async16(code_tile(stage) + code_dst + r * kCopyThreads / 4 * Tiles::kWRowBytes,
                 code_src + (row < N ? row : 0) * int64_t(K) + k, row < N);
    }
  };

  float d[kHalves][64];  // the 128-token halves
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) d[h][i] = 0.0f;
  uint32_t a_even[4][4], a_odd[4][4];  // A fragments of the 4 K slices of even and odd steps
  // The MMAs of the step in `stage`: for each K slice its fragments built from the codes (a[slice]:
  // a[0], a[1] k = 2t, 2t + 1 of rows g, g + 8; a[2], a[3] k = 2t + 8, 2t + 9) and its MMAs
  // issued and committed, so that the tensor cores start on the step while its later slices
  // convert. A group per slice (kSliceGroups a step): fragments written inside an open group
  // (between fence and commit) make ptxas serialize the MMAs (C7513), as CUTLASS's mixed-input
  // mainloop avoids by committing each k-block too.
  auto mmas = [&](int stage, uint32_t(&a)[4][4]) {
    const uint8_t* const codes = code_tile(stage) + (64 * group + 16 * warp + g) * Tiles::kWRowBytes + 2 * t;
    const uint32_t xa = smem_address(x_tile(stage));
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
      for (int i = 0; i < 4; ++i)  // rows g (i even), g + 8 (i odd); k 2t (i < 2), 2t + 8
        a[s][i] = i8x2_to_pair(
            *reinterpret_cast<const uint16_t*>(codes + (i % 2) * 8 * Tiles::kWRowBytes + 16 * s + (i / 2) * 8), T{});
      wgmma_fence();
#pragma unroll
      for (int h = 0; h < kHalves; ++h) wgmma_m64n128(d[h], a[s], wgmma_descriptor(xa + h * 128 * 128 + 32 * s), T{});
      wgmma_commit();
    }
  };
  constexpr int kSliceGroups = 4;

  if constexpr (kCopiers) {
    __shared__ uint64_t full[kWgStages], empty[kWgStages];
    if (tid == 0)
      for (int s = 0; s < kWgStages; ++s) {
        mbarrier_init(&full[s], kCopyThreads);
        mbarrier_init(&empty[s], kWgThreads);
      }
    __syncthreads();
    if (!consumer) {
      for (int i = 0; i < n_k; ++i) {
        // The stage's previous round (step i - kWgStages) released; the first round passes (parity 1
        // of a fresh barrier counts as complete).
        mbarrier_wait(&empty[i % kWgStages], ((i / kWgStages) & 1) ^ 1);
        load(i);
        cp_async_mbarrier_arrive(&full[i % kWgStages]);
      }
      cp_async_wait<0>();
    } else {
      auto step = [&](int j, uint32_t(&a)[4][4]) {
        mbarrier_wait(&full[j % kWgStages], (j / kWgStages) & 1);
        mmas(j % kWgStages, a);
        wgmma_wait<kSliceGroups>();
        if (j > 0) mbarrier_arrive(&empty[(j - 1) % kWgStages]);  // step j - 1's MMAs are done
      };
      for (int j = 0; j < n_k; j += 2) {
        step(j, a_even);
        if (j + 1 < n_k) step(j + 1, a_odd);
      }
    }
  } else {
    auto step = [&](int j, uint32_t(&a)[4][4]) {
      cp_async_wait<kWgStages - 3>();
      // Step j is visible to all threads (and to the tensor cores: cp.async writes need no proxy
      // fence before wgmma reads them, as CUTLASS's and Triton's cp.async + wgmma loops have none),
      // and every warpgroup has waited for its MMAs of step j - 2, whose stage the copy below
      // refills (and whose fragment registers `a` are).
      __syncthreads();
      if (j + kWgStages - 2 < n_k) load(j + kWgStages - 2);
      cp_async_commit();
      mmas(j % kWgStages, a);
      // The MMAs of the step before are done. (One buffer of fragments, rebuilt a slice at a time
      // after waiting for that slice of the step before, spilled 116 bytes to ptxas's 24 with two.)
      wgmma_wait<kSliceGroups>();
    };
    // One commit group of copies per K step, empty past the end: step j has landed when at most
    // kWgStages - 3 groups are pending at step j.
#pragma unroll
    for (int p = 0; p < kWgStages - 2; ++p) {
      if (p < n_k) load(p);
      cp_async_commit();
    }
    for (int j = 0; j < n_k; j += 2) {
      step(j, a_even);
      if (j + 1 < n_k) step(j + 1, a_odd);
    }
    cp_async_wait<0>();  // only empty groups remain
  }
  if (consumer) {
    wgmma_wait<0>();
#pragma unroll
    for (int h = 0; h < kHalves; ++h) wgmma_hold(d[h], 64);
  }

  // d[h][4j + 2i + c]: channel 64 group + 16 warp + g + 8i, token 128h + 8j + 2t + c.
  // Slice q: tokens 64q .. 64q + 63 of the block's. The copiers have no outputs but take part in
  // reduce_splits's block barriers.
  auto for_outputs = [&](int q, auto&& fn) {
    if (!consumer) return;
#pragma unroll
    for (int j = 8 * (q % 2); j < 8 * (q % 2) + 8; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int n = n0 + 64 * group + 16 * warp + g + 8 * i, m = m0 + 128 * (q / 2) + 8 * j + 2 * t + c;
          if (m < M && n < N) fn(d[q / 2][4 * j + 2 * i + c], int64_t(m) * N + n, m, n);
        }
  };
  if (gridDim.z > 1)
    return reduce_splits<2 * kHalves>(for_outputs, m0, Tiles::kTokens, n0, Tiles::kChannels, M, N, e, out, partial,
                                      counters + blockIdx.y * gridDim.x + blockIdx.x);
#pragma unroll
  for (int q = 0; q < 2 * kHalves; ++q)
    for_outputs(q, [&](float& v, int64_t at, int m, int n) { out[at] = e.apply(v, m, n); });
}

__global__ void __launch_bounds__(kWgThreads)
    wgmma_fp8_kernel(const fp8* __restrict__ x, const uint8_t* __restrict__ w, int M, int N, int K,
                     int k_steps_per_split, Epilogue e, float* __restrict__ out, float* __restrict__ partial,
                     unsigned* __restrict__ counters) {
  using Tiles = WgmmaTiles<fp8>;
  LLMQ_DYNAMIC_SHARED(uint4, smem_raw);
  uint8_t* const smem = wgmma_shared(smem_raw);
  const int tid = threadIdx.x, group = tid / 128, warp = tid / 32 % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int m0 = blockIdx.y * Tiles::kTokens, n0 = blockIdx.x * Tiles::kChannels;
  const int step_begin = blockIdx.z * k_steps_per_split;
  const int n_k = min(K / Tiles::kStepK - step_begin, k_steps_per_split);  // >= 1: the plan leaves no split empty
  auto x_tile = [&](int stage) { return smem + stage * Tiles::kStageBytes; };
  auto w_tile = [&](int stage) { return x_tile(stage) + Tiles::kXBytes; };
  // Copies the split's K step i (codes k .. k + 127 of x's rows and of the weights' rows).
  auto load = [&](int i) {
    const int stage = i % kWgStages, k = (step_begin + i) * Tiles::kStepK;
    copy_swizzled<Tiles::kTokens, kWgThreads>(x_tile(stage), reinterpret_cast<const uint8_t*>(x), K, m0, M, k, tid);
    copy_swizzled<Tiles::kChannels, kWgThreads>(w_tile(stage), w, K, n0, N, k, tid);
  };

  // FP8 MMAs keep fewer bits in their sums than fp32 (an H200 run: 0.57 off at K = 4096), so each
  // step's sums (128 products) are added into fp32 ones, as cuBLASLt does without fast
  // accumulation. This waits for the step's MMAs: the copies ahead still overlap them.
  float d[64], sums[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = sums[i] = 0.0f;
#pragma unroll
  for (int p = 0; p < kWgStages - 2; ++p) {
    if (p < n_k) load(p);
    cp_async_commit();
  }
  for (int j = 0; j < n_k; ++j) {
    cp_async_wait<kWgStages - 3>();
    // Step j is visible to all threads (and to the tensor cores, as in the INT8 kernel), and every
    // warpgroup has waited for its MMAs of step j - 1.
    __syncthreads();
    if (j + kWgStages - 2 < n_k) load(j + kWgStages - 2);
    cp_async_commit();
    const int stage = j % kWgStages;
    const uint32_t xa = smem_address(x_tile(stage) + group * 64 * 128), wa = smem_address(w_tile(stage));
    wgmma_fence();
#pragma unroll
    for (int q = 0; q < 4; ++q) wgmma_m64n128(d, wgmma_descriptor(xa + 32 * q), wgmma_descriptor(wa + 32 * q), fp8{});
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(d, 64);
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      sums[i] += d[i];
      d[i] = 0.0f;
    }
  }
  cp_async_wait<0>();  // only empty groups remain

  // sums[4j + 2h + c]: token 16 warp + g + 8h of the warpgroup's 64, channel 8j + 2t + c.
  // Slice q: channels 32q .. 32q + 31 of the block's 128.
  auto for_outputs = [&](int q, auto&& fn) {
#pragma unroll
    for (int j = 4 * q; j < 4 * q + 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int m = m0 + 64 * group + 16 * warp + g + 8 * h, n = n0 + 8 * j + 2 * t + c;
          if (m < M && n < N) fn(sums[4 * j + 2 * h + c], int64_t(m) * N + n, m, n);
        }
  };
  if (gridDim.z > 1)
    return reduce_splits<4>(for_outputs, m0, Tiles::kTokens, n0, Tiles::kChannels, M, N, e, out, partial,
                            counters + blockIdx.y * gridDim.x + blockIdx.x);
#pragma unroll
  for (int q = 0; q < 4; ++q) for_outputs(q, [&](float& v, int64_t at, int m, int n) { out[at] = e.apply(v, m, n); });
}

// The Hopper kernel for T activations (16-bit: INT8 weights, with a copier warpgroup or not; fp8: FP8
// weights), its threads and its grid.
template <typename T, bool kCopiers = false>
constexpr auto wgmma_kernel() {
  if constexpr (std::is_same_v<T, fp8>)
    return wgmma_fp8_kernel;
  else
    return wgmma_w8a16_kernel<T, kCopiers>;
}
template <typename T, bool kCopiers = false>
constexpr int wgmma_threads() {
  return std::is_same_v<T, fp8> ? kWgThreads : w8a16_wgmma_threads<kCopiers>();
}
template <typename T, bool kCopiers = false>
dim3 wgmma_grid(int64_t M, int64_t N, const SplitKPlan& plan) {
  using Tiles = WgmmaTiles<T, kCopiers>;
  return dim3(unsigned((N + Tiles::kChannels - 1) / Tiles::kChannels), unsigned((M + Tiles::kTokens - 1) / Tiles::kTokens),
              unsigned(plan.splits));
}

}  // namespace
}  // namespace llmq::cuda
