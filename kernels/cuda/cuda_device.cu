// Device discovery through the (statically linked) CUDA runtime.
#include <cuda_runtime.h>

#include <string>

#include "engine/device.h"

namespace llmq {

int cuda_device_count(std::string* why) {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    *why = std::string("CUDA runtime: ") + cudaGetErrorString(status);
    return 0;
  }
  if (count == 0) *why = "CUDA runtime: no CUDA device is visible";
  return count;
}

}  // namespace llmq
