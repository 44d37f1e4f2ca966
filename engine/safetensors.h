// Reading and writing safetensors files: an 8-byte little-endian header length N, N bytes of JSON
// describing each tensor, then the raw tensor data. Files are untrusted: open() validates every
// field against the file size before using it, and maps the file read-only instead of reading it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "engine/dtype.h"

namespace llmq {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes;   // numel * dtype_size
  const void* data;  // into the read-only mapping; not necessarily aligned
};

class SafetensorsFile {
 public:
  // Maps and validates the file; throws llmq::Error (LLMQ_ERR_IO, LLMQ_ERR_MODEL_FORMAT or
  // LLMQ_ERR_UNSUPPORTED for an unknown dtype) with a message naming the file and tensor.
  // Duplicate keys in the header JSON are rejected too.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Sorted by data offset (ties by name).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr if there is no such tensor.
  const TensorInfo* find(std::string_view name) const;
  // The "__metadata__" entry: string keys and values only.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return size_; }

 private:
  explicit SafetensorsFile(std::string path) : path_(std::move(path)) {}
  void map_file();
  void parse_header();

  std::string path_;
  const uint8_t* base_ = nullptr;  // the whole file, mapped read-only
  uint64_t size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string_view, size_t> index_;  // views into tensors_[i].name
  std::map<std::string, std::string> metadata_;
};

struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;  // numel * dtype_size bytes
};

// Writes the tensors in the given order, packed with no gaps. The header is padded with spaces so
// that the data section starts at a multiple of 64 bytes from the file start. Writes PATH.tmp and
// renames it over PATH, so readers never see a partial file. Throws LLMQ_ERR_INVALID_ARGUMENT for
// bad tensors (duplicate names, negative dims) and LLMQ_ERR_IO for write failures.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace llmq
