// The tensor-core attention kernel (prefill), in a header of its own so that the CPU emulation of
// tests/emulated/ can run it too; cuda_kernels.cu launches it.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace llmq::cuda {
namespace {

// ---- Tensor-core attention (mma16816 of common.cuh: its fragment layouts) --------------------

constexpr int kMmaTileQ = kAttentionTileQLarge;  // 4 warps x 16 rows
constexpr int kMmaKPad = 8;                      // row padding of the smem tiles (conflict-free fragment loads)

// Dynamic shared memory of the kernel: two buffers of a K and a V tile, [key][dim] in 16 bits.
constexpr int attention_mma_smem_bytes(int head_dim) { return 2 * 2 * kTileK * (head_dim + kMmaKPad) * 2; }

// Key tiles are double-buffered: while the warps compute on one, the next is on its way. 16-bit
// caches feed the tensor cores as stored and travel by cp.async. 8-bit codes are loaded and
// dequantized (code * scale, in fp32 as the CUDA-core kernel does) to F16 when the tile is fetched:
// F16's 11 bits keep them better than BF16's 8.
template <typename KvT, int D>
__global__ void __launch_bounds__(128) attention_mma_kernel(const float* q, int64_t q_cols, const KvT* k_cache,
                                                            const KvT* v_cache, AttentionArgs a, DevicePlan plan,
                                                            float* out) {
  constexpr bool kCodes = sizeof(KvT) == 1;
  using MmaT = std::conditional_t<kCodes, f16, KvT>;
  using Tile = MmaT[kTileK][D + kMmaKPad];  // K or V tile, [key][dim] (V: ldmatrix.trans reads it)
  LLMQ_DYNAMIC_SHARED(uint4, tiles_smem);  // a name of its own: extern shared arrays of one file alias
  Tile* const k_tiles = reinterpret_cast<Tile*>(tiles_smem);  // [2]
  Tile* const v_tiles = k_tiles + 2;                    // [2]
  __shared__ int pos_s[kMmaTileQ];
  __shared__ int64_t offset_s[2][kTileK];
  __shared__ float k_scale_s[2][kTileK], v_scale_s[2][kTileK];  // 8-bit caches: each key's scales

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t4 = lane % 4;
  // Tiles in reverse: a sequence's later tiles have more keys, and blocks start in index order, so
  // the longest start first and the grid's last blocks are short ones (less of a tail).
  const int tile = int(gridDim.x) - 1 - int(blockIdx.x), h = blockIdx.y;
  const int t0 = plan.large.first[tile], count = plan.large.count[tile];
  const int32_t* blocks = plan.block_ids + plan.block_offsets[plan.token_seq[t0]];
  const int kv_head = h / (a.num_heads / a.num_kv_heads);

  int lo, hi;
  tile_key_range(plan.positions, t0, count, a.sliding_window, &lo, &hi);
  for (int r = tid; r < kMmaTileQ; r += blockDim.x) pos_s[r] = r < count ? plan.positions[t0 + r] : -1;

  // This warp's 16 query rows as A fragments, pre-scaled and rounded to 16 bits. The scale takes
  // log2(e) as well: scores are in base-2 units, so the softmax's exponentials are exp2 (one
  // instruction) and its result is the same.
  const int row0 = warp * 16 + g, row1 = row0 + 8;
  const float q_scale = a.scale * 1.44269504088896341f;
  uint32_t qa[D / 16][4];
  auto q_at = [&](int row, int d) {
    return row < count ? q[int64_t(t0 + row) * q_cols + int64_t(h) * D + d] * q_scale : 0.0f;
  };
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
    const int d = 16 * c + 2 * t4;
    qa[c][0] = pack2(q_at(row0, d), q_at(row0, d + 1), MmaT{});
    qa[c][1] = pack2(q_at(row1, d), q_at(row1, d + 1), MmaT{});
    qa[c][2] = pack2(q_at(row0, d + 8), q_at(row0, d + 9), MmaT{});
    qa[c][3] = pack2(q_at(row1, d + 8), q_at(row1, d + 9), MmaT{});
  }
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g and g + 8; l is this thread's part

  // A key tile's offsets (and 8-bit scales) into buffer b, by key_offsets' threads; published by a
  // barrier before fetch() reads them.
  auto prepare = [&](int key0, int b) {
    key_offsets(blocks, key0, hi + 1, a.block_size, a.num_kv_heads, kv_head, D, offset_s[b]);
    if constexpr (kCodes) {
      for (int j = tid; j < kTileK; j += blockDim.x) {  // key_offsets' own threads: offset_s[b][j] is theirs
        const int64_t offset = offset_s[b][j];
        const int64_t at = a.scale_per_token ? offset / D : 0;
        k_scale_s[b][j] = offset < 0 ? 0.0f : a.k_scale[at];
        v_scale_s[b][j] = offset < 0 ? 0.0f : a.v_scale[at];
      }
    }
  };
  constexpr int kVectors = D / kPerVector<KvT>;  // 16-byte vectors per key row
  // Starts bringing the prepared key tile of buffer b in: its K and V rows. Commits a cp.async group
  // either way (empty for 8-bit caches, loaded at once).
  auto fetch = [&](int b) {
#pragma unroll 4
    for (int i = tid; i < kTileK * kVectors; i += blockDim.x) {
      const int j = i / kVectors, c = i % kVectors;
      const int64_t offset = offset_s[b][j];
      if constexpr (kCodes) {
        uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);  // zeros past the end (never NaN)
        if (offset >= 0) {
          kv = __ldg(reinterpret_cast<const uint4*>(k_cache + offset) + c);
          vv = __ldg(reinterpret_cast<const uint4*>(v_cache + offset) + c);
        }
        float kf[16], vf[16];
        unpack_vector(kv, KvT{}, kf);
        unpack_vector(vv, KvT{}, vf);
        const float ks = k_scale_s[b][j], vs = v_scale_s[b][j];
        uint4 kh[2], vh[2];  // 16 F16 values each, stored as two 16-byte vectors
#pragma unroll
        for (int e = 0; e < 16; e += 2) {
          reinterpret_cast<uint32_t*>(kh)[e / 2] = pack2(kf[e] * ks, kf[e + 1] * ks, f16{});
          reinterpret_cast<uint32_t*>(vh)[e / 2] = pack2(vf[e] * vs, vf[e + 1] * vs, f16{});
        }
        *reinterpret_cast<uint4*>(&k_tiles[b][j][c * 16]) = kh[0];
        *reinterpret_cast<uint4*>(&k_tiles[b][j][c * 16 + 8]) = kh[1];
        *reinterpret_cast<uint4*>(&v_tiles[b][j][c * 16]) = vh[0];
        *reinterpret_cast<uint4*>(&v_tiles[b][j][c * 16 + 8]) = vh[1];
      } else {
        const bool valid = offset >= 0;  // else zeros (never NaN); the source address is then not read
        cp_async16(&k_tiles[b][j][c * 8], valid ? static_cast<const void*>(k_cache + offset + c * 8) : k_cache, valid);
        cp_async16(&v_tiles[b][j][c * 8], valid ? static_cast<const void*>(v_cache + offset + c * 8) : v_cache, valid);
      }
    }
    cp_async_commit();
  };

  prepare(lo, 0);
  if (lo + kTileK <= hi) prepare(lo + kTileK, 1);
  __syncthreads();  // the offsets, and pos_s
  fetch(0);
  // The lowest position of this warp's rows (-1 for a row past count, masked everywhere): key tiles
  // wholly at or below it need no mask, unless a sliding window applies.
  int warp_min_pos = INT_MAX;
  for (int r = 0; r < 16; ++r) warp_min_pos = min(warp_min_pos, pos_s[warp * 16 + r]);
  for (int key0 = lo, b = 0; key0 <= hi; key0 += kTileK, b ^= 1) {
    // The next tile goes into the other buffer (computed on last time round: see the barrier at
    // the end); an empty group when there is none keeps the wait below the same.
    if (key0 + kTileK <= hi)
      fetch(b ^ 1);
    else
      cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile b have landed
    __syncthreads();     // and everyone's
    const Tile& k_s = k_tiles[b];
    const Tile& v_s = v_tiles[b];

    // S = Q.K^T for this warp's 16 rows and the tile's 64 keys. One ldmatrix gives the B fragments
    // of two 16-dim chunks: lane l addresses key 8j + l % 8 at dims 16c + 8 (l / 8).
    float s[kTileK / 8][4];
#pragma unroll
    for (int j = 0; j < kTileK / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < D / 16; c += 2) {
        uint32_t frag[4];
        ldmatrix_x4(frag, &k_s[8 * j + lane % 8][16 * c + 8 * (lane / 8)]);
        mma16816(s[j], qa[c], frag, MmaT{});
        mma16816(s[j], qa[c + 1], frag + 2, MmaT{});
      }
    }
    // Mask (tiles that reach past a row's position or the last key, or with a window), then the
    // online softmax per row (each row's 64 scores sit in the 4 threads of a quad).
    if (a.sliding_window > 0 || key0 + kTileK - 1 > warp_min_pos) {
#pragma unroll
      for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + 8 * j + 2 * t4 + (e & 1);
          const int p = pos_s[e < 2 ? row0 : row1];
          const int window_lo = a.sliding_window > 0 ? p - a.sliding_window + 1 : 0;
          if (key > hi || key > p || key < window_lo) s[j][e] = -INFINITY;
        }
    }
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
    // A row whose keys so far are all masked keeps m = -inf: its exponentials subtract 0 instead
    // (exp2(-inf) = 0, never NaN), and its correction is 0 (l and o are still 0).
    float correction[2], m_sub[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      m_sub[r] = m_new == -INFINITY ? 0.0f : m_new;
      correction[r] = exp2f(m[r] - m_sub[r]);
      m[r] = m_new;
      l[r] *= correction[r];
    }
#pragma unroll
    for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        s[j][e] = exp2f(s[j][e] - m_sub[r]);
        l[r] += s[j][e];
      }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= correction[0];
      o[j][1] *= correction[0];
      o[j][2] *= correction[1];
      o[j][3] *= correction[1];
    }
    // O += P.V: P's C fragments become A fragments (rounded to 16 bits), V^T rows give B.
#pragma unroll
    for (int c = 0; c < kTileK / 16; ++c) {
      uint32_t pa[4];
      pa[0] = pack2(s[2 * c][0], s[2 * c][1], MmaT{});
      pa[1] = pack2(s[2 * c][2], s[2 * c][3], MmaT{});
      pa[2] = pack2(s[2 * c + 1][0], s[2 * c + 1][1], MmaT{});
      pa[3] = pack2(s[2 * c + 1][2], s[2 * c + 1][3], MmaT{});
      // B fragments of V (keys 16c.., dims 8j..) for two j at once: lane l addresses row l % 8 of
      // 8x8 matrix l / 8, which is keys +0 / +8 (bit 0) of dims 8j / 8(j + 1) (bit 1).
      const int mat = lane / 8;
#pragma unroll
      for (int j = 0; j < D / 8; j += 2) {
        uint32_t frag[4];
        ldmatrix_x4_trans(frag, &v_s[16 * c + (mat & 1) * 8 + lane % 8][8 * (j + (mat >> 1))]);
        mma16816(o[j], pa, frag, MmaT{});
        mma16816(o[j + 1], pa, frag + 2, MmaT{});
      }
    }
    // Buffer b's offsets were read when its copies were issued: it takes the tile after next's.
    if (key0 + 2 * kTileK <= hi) prepare(key0 + 2 * kTileK, b);
    __syncthreads();  // tile b is no longer read: the next round may fetch into it; its offsets are set
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e / 2, row = r == 0 ? row0 : row1;
      if (row < count) {
        const int64_t at = int64_t(t0 + row) * q_cols + int64_t(h) * D + 8 * j + 2 * t4 + (e & 1);
        const float v = l[r] > 0.0f ? o[j][e] / l[r] : 0.0f;
        out[at] = v;
        store_rounded(a.rounded, at, v);
      }
    }
}

}  // namespace
}  // namespace llmq::cuda
