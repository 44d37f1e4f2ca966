// Which accelerators this build can use. Implemented in kernels/cuda/ when the CUDA backend is
// built in, else by a fallback that reports its absence.
#pragma once

#include <string>

namespace llmq {

// Number of usable CUDA devices; 0 with the reason in *why (not built with CUDA, no driver, no
// device). The CUDA runtime is linked statically, so this works on machines without a driver.
int cuda_device_count(std::string* why);

}  // namespace llmq
