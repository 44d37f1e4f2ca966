#include "engine/device.h"

#include "engine/backend.h"
#include "engine/error.h"

namespace llmq {

#ifndef LLMQ_HAVE_CUDA
int cuda_device_count(std::string* why) {
  *why = "this build of llmq has no CUDA backend (configured with LLMQ_CUDA=OFF or without nvcc)";
  return 0;
}

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions&) {
  std::string why;
  cuda_device_count(&why);
  fail(LLMQ_ERR_BACKEND_UNAVAILABLE, "engine: no CUDA backend: {}", why);
}
#endif

}  // namespace llmq
