// The autotuner's check of a linear path (kernels/cuda/kernels.cuh's output_distance_kernel and
// cuda_kernels.h's outputs_agree), run on the CPU through tests/emulated/cuda_emulation.h: the
// distance equals a float64 computation here (sums to 1e-12 relative, maxima and counts exactly),
// over grid-stride loops and partial warps, skipping elements not finite in the reference; and
// the verdict accepts what two right paths differ by (fp32 sums in another order) and rejects a
// wrong element, an unwritten (NaN) one and a wrong row.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "engine/rng.h"

#include "emulated/cuda_emulation.h"  // before the kernels: it stands in for CUDA
#include "kernels/cuda/kernels.cuh"

namespace llmq {
namespace {

cuda::OutputDistance distance_of(const std::vector<float>& y, const std::vector<float>& ref, unsigned blocks,
                                 unsigned threads) {
  cuda::OutputDistance d;
  emulation::launch(dim3(blocks), threads, 0,
                    [&] { cuda::output_distance_kernel(y.data(), ref.data(), int64_t(y.size()), &d); });
  return d;
}

TEST(OutputDistanceKernelEmulated, EqualsFloat64) {
  Rng rng(11);
  auto uniform = [&] { return float(rng.uniform() * 2.0 - 1.0); };
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (size_t n : {size_t(1), size_t(33), size_t(5000)})
    for (auto [blocks, threads] : {std::pair{1u, 32u}, std::pair{3u, 64u}}) {
      SCOPED_TRACE(testing::Message() << "n " << n << " grid " << blocks << " x " << threads);
      std::vector<float> ref(n), y(n);
      for (size_t i = 0; i < n; ++i) {
        ref[i] = uniform() * 10.0f;
        y[i] = ref[i] + uniform() * 1e-3f;
      }
      if (n > 100) {
        ref[7] = nan;  // skipped: nothing to compare with
        ref[8] = inf;
        y[20] = nan;  // counted
        y[21] = -inf;
        y[22] = ref[22] + 3.0f;  // the largest difference
      }
      double diff2 = 0, ref2 = 0, max_diff = 0, max_ref = 0;
      unsigned long long not_finite = 0;
      for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(ref[i])) continue;
        if (!std::isfinite(y[i])) {
          ++not_finite;
          continue;
        }
        const double diff = double(y[i]) - double(ref[i]);
        diff2 += diff * diff;
        ref2 += double(ref[i]) * double(ref[i]);
        max_diff = std::max(max_diff, double(float(std::fabs(diff))));
        max_ref = std::max(max_ref, double(std::fabs(ref[i])));
      }
      const cuda::OutputDistance d = distance_of(y, ref, blocks, threads);
      EXPECT_NEAR(d.diff2, diff2, 1e-12 * diff2);
      EXPECT_NEAR(d.ref2, ref2, 1e-12 * ref2);
      EXPECT_EQ(double(d.max_diff()), max_diff);
      EXPECT_EQ(double(d.max_ref()), max_ref);
      EXPECT_EQ(d.not_finite, not_finite);
      EXPECT_EQ(d.not_finite, n > 100 ? 2u : 0u);
    }
}

TEST(OutputDistanceKernelEmulated, AgreesWithRightPathsOnly) {
  // A 64 x 300 output of sums of 4096 products, one path's sums in another order: what a right
  // path differs by, to a few units in the last place of fp32.
  Rng rng(5);
  const int64_t M = 64, N = 300;
  std::vector<float> ref(size_t(M * N)), reordered(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    float forward = 0, backward = 0;
    std::vector<float> terms(4096);
    for (float& t : terms) t = float(rng.uniform() * 2.0 - 1.0) * float(rng.uniform() * 2.0 - 1.0);
    for (size_t k = 0; k < terms.size(); ++k) forward += terms[k];
    for (size_t k = terms.size(); k-- > 0;) backward += terms[k];
    ref[i] = forward;
    reordered[i] = backward;
  }
  for (bool fp8 : {false, true}) {
    SCOPED_TRACE(fp8 ? "fp8" : "16-bit");
    EXPECT_TRUE(cuda::outputs_agree(distance_of(ref, ref, 4, 64), fp8));
    EXPECT_TRUE(cuda::outputs_agree(distance_of(reordered, ref, 4, 64), fp8));

    std::vector<float> wrong = reordered;
    wrong[size_t(17 * N + 5)] += 5.0f;  // one element (|ref| is 21 on average, up to about 80)
    EXPECT_FALSE(cuda::outputs_agree(distance_of(wrong, ref, 4, 64), fp8));

    wrong = reordered;
    wrong[size_t(3 * N + 299)] = std::numeric_limits<float>::quiet_NaN();  // left unwritten (poisoned)
    EXPECT_FALSE(cuda::outputs_agree(distance_of(wrong, ref, 4, 64), fp8));

    wrong = reordered;
    for (int64_t n = 0; n < N; ++n) wrong[size_t(40 * N + n)] = ref[size_t(41 * N + n)];  // a row's sums in the next row
    EXPECT_FALSE(cuda::outputs_agree(distance_of(wrong, ref, 4, 64), fp8));
  }
  // FP8's looser bound admits a 5e-4 relative error that the 16-bit bound does not.
  std::vector<float> coarse = ref;
  for (float& v : coarse) v *= 1.0005f;
  EXPECT_FALSE(cuda::outputs_agree(distance_of(coarse, ref, 4, 64), false));
  EXPECT_TRUE(cuda::outputs_agree(distance_of(coarse, ref, 4, 64), true));
}

}  // namespace
}  // namespace llmq
