// Sampling on the device: engine/sampler.h's rule, one block per logits row, so that only the
// token ids leave the GPU (the kernel: sampling_kernel.cuh).
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/sampling_kernel.cuh"

namespace llmq::cuda {

void sample(float* logits, int64_t rows, int64_t vocab, const SampleArgs* args, const int32_t* penalized,
            int32_t* tokens, cudaStream_t stream) {
  if (rows == 0) return;
  sample_kernel<<<unsigned(rows), kSampleThreads, 0, stream>>>(logits, int(vocab), args, penalized, tokens);
}

}  // namespace llmq::cuda
