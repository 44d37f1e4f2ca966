// CPU matrix-vector / matrix-matrix product over weights in their stored dtype.
#pragma once

#include <cstdint>

#include "engine/dtype.h"

namespace llmq::cpu {

// out[m * N + n] = sum_k x[m * K + k] * w[n * K + k] for m in [0, M), n in [n_begin, n_end).
//
// Order of operations, fixed so that every output element gets the same bits whatever M, the
// thread split or the instruction set: k runs in blocks of 16 into two 8-lane fp32 accumulators
// (lanes 0-7 and 8-15 of each block, one fused multiply-add per element), which are added lane by
// lane and then reduced as (l0+l4, l1+l5, l2+l6, l3+l7) -> pairs -> one sum; the K % 16 tail is
// then added element by element with fused multiply-adds. Weights are converted to fp32 exactly.
void linear_rows(const float* x, int64_t M, int64_t K, const void* w, DType w_dtype, int64_t N, int64_t n_begin,
                 int64_t n_end, float* out);

// True when the AVX2/FMA/F16C kernels are in use (else a portable scalar version of the same order).
bool linear_uses_avx2();

}  // namespace llmq::cpu
