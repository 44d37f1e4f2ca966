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
//
// A block takes a query tile of up to 128 tokens of one sequence and one head; each of its 4 warps
// takes 32 of those rows as two 16-row mma tiles, so that every K or V fragment a warp loads from
// shared memory feeds two mmas (FlashAttention-2's shape: 16 rows a warp would load the whole K/V
// tile for half the work). The keys go by in tiles of kTileK.

constexpr int kMmaTileQ = kAttentionTileQLarge;  // 4 warps x 32 rows
constexpr int kMmaWarpRows = 32;
constexpr int kMmaKPad = 8;  // row padding of the 16-bit smem tiles (conflict-free ldmatrix)
static_assert(kMmaTileQ == 4 * kMmaWarpRows, "a block of 4 warps covers the query tile");

// Dynamic shared memory of the kernel: the Q tile, and K/V tiles, 16 bits an element with padded
// rows. 16-bit caches double-buffer the K/V tiles (cp.async straight into them); 8-bit caches
// double-buffer their codes instead, and convert each tile into one 16-bit K/V tile.
constexpr int attention_mma_smem_bytes(int head_dim) {
  const int row_bytes = (head_dim + kMmaKPad) * 2;
  const int sixteen_bit = (kMmaTileQ + 4 * kTileK) * row_bytes;
  const int eight_bit = (kMmaTileQ + 2 * kTileK) * row_bytes + 2 * 2 * kTileK * head_dim;
  return sixteen_bit > eight_bit ? sixteen_bit : eight_bit;
}

// The next key tile is on its way while the warps compute on this one. 8-bit codes are dequantized
// (code * scale, in fp32 as the CUDA-core kernel does) to F16 once they have landed: F16's 11 bits
// keep them better than BF16's 8. q rows are read as float4 (the launcher checks the alignment).
template <typename KvT, int D>
__global__ void __launch_bounds__(128) attention_mma_kernel(const float* q, int64_t q_cols, const KvT* k_cache,
                                                            const KvT* v_cache, AttentionArgs a, DevicePlan plan,
                                                            float* out) {
  constexpr bool kCodes = sizeof(KvT) == 1;
  using MmaT = std::conditional_t<kCodes, f16, KvT>;
  using Row = MmaT[D + kMmaKPad];
  using Tile = MmaT[kTileK][D + kMmaKPad];  // K or V tile, [key][dim] (V: ldmatrix.trans reads it)
  using Codes = KvT[kTileK][D];             // 8-bit caches: a tile's codes as stored
  LLMQ_DYNAMIC_SHARED(uint4, tiles_smem);  // a name of its own: extern shared arrays of one file alias
  Row* const q_s = reinterpret_cast<Row*>(tiles_smem);                       // [kMmaTileQ]
  Tile* const k_tiles = reinterpret_cast<Tile*>(q_s + kMmaTileQ);            // [2] (8-bit caches: [1])
  Tile* const v_tiles = k_tiles + (kCodes ? 1 : 2);                          // likewise
  Codes* const k_codes = reinterpret_cast<Codes*>(v_tiles + (kCodes ? 1 : 2));  // [2], 8-bit caches only
  Codes* const v_codes = k_codes + 2;                                           // [2]
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

  // The tile's positions (a thread a row; -1 past count) and its Q rows, pre-scaled and rounded to
  // 16 bits (zeros past count). The scale takes log2(e) as well: scores are in base-2 units, so the
  // softmax's exponentials are exp2 (one instruction) and its result is the same.
  pos_s[tid] = tid < count ? plan.positions[t0 + tid] : -1;
  const float q_scale = a.scale * 1.44269504088896341f;
  for (int i = tid; i < kMmaTileQ * D / 4; i += blockDim.x) {
    const int r = i / (D / 4), d = 4 * (i % (D / 4));
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (r < count) v = *reinterpret_cast<const float4*>(q + int64_t(t0 + r) * q_cols + int64_t(h) * D + d);
    *reinterpret_cast<uint2*>(&q_s[r][d]) =
        make_uint2(pack2(v.x * q_scale, v.y * q_scale, MmaT{}), pack2(v.z * q_scale, v.w * q_scale, MmaT{}));
  }
  __syncthreads();  // pos_s and q_s
  // A tile's positions are consecutive (make_query_tiles): its keys are lo .. hi.
  const int hi = pos_s[count - 1];
  const int lo = a.sliding_window > 0 ? max(0, pos_s[0] - a.sliding_window + 1) : 0;

  // A key tile's offsets into slot b, one thread a key, in two steps so that the block table's read
  // for the tile after next is in flight while the warps compute: block_of reads this thread's
  // block id (-1 past hi), set_offset writes the key's offset (-1 past hi).
  auto block_of = [&](int key0) {
    const int key = key0 + tid;
    return tid < kTileK && key <= hi ? blocks[key / a.block_size] : -1;
  };
  auto set_offset = [&](int key0, int block, int b) {
    if (tid < kTileK)
      offset_s[b][tid] = block < 0 ? -1 : kv_row_offset(block, key0 + tid, a.block_size, a.num_kv_heads, kv_head, D);
  };
  constexpr int kVectors = D / kPerVector<KvT>;  // 16-byte vectors per key row
  // Starts bringing the key tile of slot b in: its K and V rows (and 8-bit scales); zeros past hi
  // (never NaN), whose source addresses are then not read. Commits a cp.async group.
  auto fetch = [&](int b) {
#pragma unroll 4
    for (int i = tid; i < kTileK * kVectors; i += blockDim.x) {
      const int j = i / kVectors, c = i % kVectors;
      const int64_t offset = offset_s[b][j];
      const bool valid = offset >= 0;
      const KvT* k_src = valid ? k_cache + offset + c * kPerVector<KvT> : k_cache;
      const KvT* v_src = valid ? v_cache + offset + c * kPerVector<KvT> : v_cache;
      if constexpr (kCodes) {
        cp_async16(&k_codes[b][j][c * 16], k_src, valid);
        cp_async16(&v_codes[b][j][c * 16], v_src, valid);
      } else {
        cp_async16(&k_tiles[b][j][c * 8], k_src, valid);
        cp_async16(&v_tiles[b][j][c * 8], v_src, valid);
      }
    }
    if constexpr (kCodes) {
      if (tid < kTileK) {
        const int64_t offset = offset_s[b][tid];
        const int64_t at = offset < 0 ? 0 : a.scale_per_token ? offset / D : 0;
        cp_async4(&k_scale_s[b][tid], a.k_scale + at, offset >= 0);
        cp_async4(&v_scale_s[b][tid], a.v_scale + at, offset >= 0);
      }
    }
    cp_async_commit();
  };
  // 8-bit caches: the landed codes of slot b, times their key's scale, into the F16 K/V tile.
  auto convert = [&](int b) {
    for (int i = tid; i < kTileK * kVectors; i += blockDim.x) {
      const int j = i / kVectors, c = i % kVectors;
      auto put = [&](const Codes& codes, float scale, Tile& tile) {
        float f[16];
        unpack_vector(*reinterpret_cast<const uint4*>(&codes[j][c * 16]), KvT{}, f);
        uint4 h[2];  // 16 F16 values, as two 16-byte vectors
#pragma unroll
        for (int e = 0; e < 16; e += 2) reinterpret_cast<uint32_t*>(h)[e / 2] = pack2(f[e] * scale, f[e + 1] * scale, f16{});
        *reinterpret_cast<uint4*>(&tile[j][c * 16]) = h[0];
        *reinterpret_cast<uint4*>(&tile[j][c * 16 + 8]) = h[1];
      };
      put(k_codes[b], k_scale_s[b][j], k_tiles[0]);
      put(v_codes[b], v_scale_s[b][j], v_tiles[0]);
    }
  };

  set_offset(lo, block_of(lo), 0);
  if (lo + kTileK <= hi) set_offset(lo + kTileK, block_of(lo + kTileK), 1);
  __syncthreads();  // the first two tiles' offsets
  fetch(0);

  // This warp's rows: r0 + 16 mt + g (+ 8), mt = 0, 1. A warp wholly past count only takes part in
  // the loads and barriers. The lowest position of its rows (-1 for a row past count, masked
  // everywhere): key tiles wholly at or below it need no mask, unless a sliding window applies.
  const int r0 = warp * kMmaWarpRows;
  const bool active = r0 < count;
  int warp_min_pos = INT_MAX;
  for (int r = 0; r < kMmaWarpRows; ++r) warp_min_pos = min(warp_min_pos, pos_s[r0 + r]);
  float o[2][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.0f;
  // Rows g and g + 8 of each mma tile; l is this thread's part of the row sum.
  float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};

  for (int key0 = lo, b = 0; key0 <= hi; key0 += kTileK, b ^= 1) {
    // The next tile goes into the other slot (computed on last time round: see the barrier at the
    // end); an empty group when there is none keeps the wait below the same.
    if (key0 + kTileK <= hi)
      fetch(b ^ 1);
    else
      cp_async_commit();
    const int next_block = key0 + 2 * kTileK <= hi ? block_of(key0 + 2 * kTileK) : -1;
    cp_async_wait<1>();  // this thread's copies of tile b have landed
    __syncthreads();     // and everyone's
    if constexpr (kCodes) {
      convert(b);
      __syncthreads();
    }
    const Tile& k_s = k_tiles[kCodes ? 0 : b];
    const Tile& v_s = v_tiles[kCodes ? 0 : b];

    if (active) {
      // S = Q.K^T for the warp's 32 rows and the tile's keys, 16 dims at a time: the Q fragments of
      // both row tiles (ldmatrix: lane l addresses row l % 16 at dims + 8 (l / 16)), then for each
      // 16 keys one ldmatrix of K giving the B fragments of two 8-key groups (lane l: key
      // 8 (j + l / 16) + l % 8 at dims + 8 ((l / 8) % 2)), and four mmas.
      float s[2][kTileK / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < kTileK / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < D / 16; ++c) {
        uint32_t qa[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(qa[mt], &q_s[r0 + 16 * mt + lane % 16][16 * c + 8 * (lane / 16)]);
#pragma unroll
        for (int j = 0; j < kTileK / 8; j += 2) {
          uint32_t frag[4];
          ldmatrix_x4(frag, &k_s[8 * (j + lane / 16) + lane % 8][16 * c + 8 * ((lane / 8) % 2)]);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816(s[mt][j], qa[mt], frag, MmaT{});
            mma16816(s[mt][j + 1], qa[mt], frag + 2, MmaT{});
          }
        }
      }
      // Mask (tiles that reach past a row's position or the last key, or with a window), then the
      // online softmax per row (each row's scores sit in the 4 threads of a quad).
      if (a.sliding_window > 0 || key0 + kTileK - 1 > warp_min_pos) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = key0 + 8 * j + 2 * t4 + (e & 1);
              const int p = pos_s[r0 + 16 * mt + g + 8 * (e / 2)];
              const int window_lo = a.sliding_window > 0 ? p - a.sliding_window + 1 : 0;
              if (key > hi || key > p || key < window_lo) s[mt][j][e] = -INFINITY;
            }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[mt][j][e]);
        // A row whose keys so far are all masked keeps m = -inf: its exponentials subtract 0
        // instead (exp2(-inf) = 0, never NaN), and its correction is 0 (l and o are still 0).
        float correction[2], m_sub[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
          tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
          const float m_new = fmaxf(m[mt][r], tile_max[r]);
          m_sub[r] = m_new == -INFINITY ? 0.0f : m_new;
          correction[r] = exp2f(m[mt][r] - m_sub[r]);
          m[mt][r] = m_new;
          l[mt][r] *= correction[r];
        }
#pragma unroll
        for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][j][e] = exp2f(s[mt][j][e] - m_sub[e / 2]);
            l[mt][e / 2] += s[mt][j][e];
          }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          o[mt][j][0] *= correction[0];
          o[mt][j][1] *= correction[0];
          o[mt][j][2] *= correction[1];
          o[mt][j][3] *= correction[1];
        }
      }
      // O += P.V, 16 keys at a time: P's C fragments become A fragments (rounded to 16 bits); one
      // ldmatrix.trans of V gives the B fragments of two 8-dim groups (lane l addresses row l % 8
      // of 8x8 matrix l / 8: keys +0 / +8 (bit 0) of dims 8j / 8(j + 1) (bit 1)), for four mmas.
#pragma unroll
      for (int c = 0; c < kTileK / 16; ++c) {
        uint32_t pa[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          pa[mt][0] = pack2(s[mt][2 * c][0], s[mt][2 * c][1], MmaT{});
          pa[mt][1] = pack2(s[mt][2 * c][2], s[mt][2 * c][3], MmaT{});
          pa[mt][2] = pack2(s[mt][2 * c + 1][0], s[mt][2 * c + 1][1], MmaT{});
          pa[mt][3] = pack2(s[mt][2 * c + 1][2], s[mt][2 * c + 1][3], MmaT{});
        }
        const int mat = lane / 8;
#pragma unroll
        for (int j = 0; j < D / 8; j += 2) {
          uint32_t frag[4];
          ldmatrix_x4_trans(frag, &v_s[16 * c + (mat & 1) * 8 + lane % 8][8 * (j + (mat >> 1))]);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816(o[mt][j], pa[mt], frag, MmaT{});
            mma16816(o[mt][j + 1], pa[mt], frag + 2, MmaT{});
          }
        }
      }
    }
    // Slot b's offsets were read when its copies were issued: it takes the tile after next's.
    if (key0 + 2 * kTileK <= hi) set_offset(key0 + 2 * kTileK, next_block, b);
    __syncthreads();  // tile b is no longer read: the next round may fetch into it; its offsets are set
  }

#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
    }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + 16 * mt + g + 8 * r;
      if (row >= count) continue;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int64_t at = int64_t(t0 + row) * q_cols + int64_t(h) * D + 8 * j + 2 * t4;
        const float v0 = l[mt][r] > 0.0f ? o[mt][j][2 * r] / l[mt][r] : 0.0f;
        const float v1 = l[mt][r] > 0.0f ? o[mt][j][2 * r + 1] / l[mt][r] : 0.0f;
        *reinterpret_cast<float2*>(out + at) = make_float2(v0, v1);
        store_rounded(a.rounded, at, v0);
        store_rounded(a.rounded, at + 1, v1);
      }
    }
}

}  // namespace
}  // namespace llmq::cuda
