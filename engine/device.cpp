#include "engine/device.h"

namespace llmq {

#ifndef LLMQ_HAVE_CUDA
int cuda_device_count(std::string* why) {
  *why = "this build of llmq has no CUDA backend (configured with LLMQ_CUDA=OFF or without nvcc)";
  return 0;
}
#endif

}  // namespace llmq
