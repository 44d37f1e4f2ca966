// CPU matrix-vector / matrix-matrix product over weights in their stored dtype.
#pragma once

#include <cstdint>

#include "engine/dtype.h"

namespace llmq::cpu {

// out[m * N + n] = sum_k x[m * K + k] * w[n * K + k] for m in [0, M), n in [n_begin, n_end).
//
// Order of operations, fixed so that every output element gets the same bits whatever M, the
// thread split or the instruction set: eight 8-lane fp32 accumulators a0..a7; k runs in blocks
// of 64, block lanes 8i..8i+7 going into a_i with one fused multiply-add per element; the
// remaining whole groups of 8 go into a0, a1, ... in order; then ((a0+a1)+(a2+a3)) +
// ((a4+a5)+(a6+a7)) lane by lane, reduced as (l0+l4, l1+l5, l2+l6, l3+l7) -> (s0+s2, s1+s3) ->
// one sum; the K % 8 tail is added element by element with fused multiply-adds. Weights are
// converted to fp32 exactly. Each weight row is read as one sequential stream, which is what the
// hardware prefetchers serve best (decode at batch 1 is bound by memory bandwidth).
void linear_rows(const float* x, int64_t M, int64_t K, const void* w, DType w_dtype, int64_t N, int64_t n_begin,
                 int64_t n_end, float* out);

// True when the AVX2/FMA/F16C kernels are in use (else a portable scalar version of the same order).
bool linear_uses_avx2();

}  // namespace llmq::cpu
