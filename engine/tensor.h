// A non-owning view of a 2-D row-major tensor in host or device memory. 1-D tensors have rows = 1.
#pragma once

#include <cstdint>

#include "engine/dtype.h"

namespace llmq {

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;

  int64_t numel() const { return rows * cols; }
  uint64_t nbytes() const { return uint64_t(numel()) * dtype_size(dtype); }
  bool empty() const { return data == nullptr; }
  template <typename T>
  T* as() const { return static_cast<T*>(data); }
  // Rows [first, first + count) of the same tensor.
  Tensor row_slice(int64_t first, int64_t count) const {
    return Tensor{static_cast<char*>(data) + uint64_t(first) * uint64_t(cols) * dtype_size(dtype), dtype, count, cols};
  }
};

}  // namespace llmq
