#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <limits>
#include <set>
#include <system_error>
#include <unordered_set>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "engine/error.h"

namespace llmq {

namespace {

using nlohmann::json;

// Same bound as the reference implementation: real headers are well under a megabyte.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::string errno_message(int err) { return std::generic_category().message(err); }

// A first pass over the header JSON that builds nothing. It rejects duplicate keys (nlohmann would
// silently keep the last one) and nesting deeper than safetensors uses (root object, tensor
// entry, shape array) before the second pass builds the DOM. Not a parse callback on the DOM
// parser: that one rescans the parent at every object end, quadratic in the number of tensors.
class HeaderChecker : public nlohmann::json_sax<json> {
 public:
  explicit HeaderChecker(const std::string& path) : path_(path) {}
  const std::string& error() const { return error_; }

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    enter();
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& key) override {
    if (!keys_.back().insert(key).second)
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: duplicate key '{}' in the header", path_, key);
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override {
    enter();
    keys_.emplace_back();  // keeps keys_ in step with depth_; arrays have no keys
    return true;
  }
  bool end_array() override { return end_object(); }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    error_ = e.what();
    return false;
  }

 private:
  void enter() {
    if (++depth_ > 3) fail(LLMQ_ERR_MODEL_FORMAT, "{}: header JSON is nested deeper than safetensors allows", path_);
  }

  const std::string& path_;
  std::string error_;
  int depth_ = 0;
  std::vector<std::set<std::string>> keys_;
};

// A JSON value that must be a non-negative integer; nlohmann parses those as unsigned.
bool get_u64(const json& value, uint64_t* out) {
  if (!value.is_number_unsigned()) return false;
  *out = value.get<uint64_t>();
  return true;
}

struct Entry {
  TensorInfo info;
  uint64_t begin, end;
};

Entry parse_entry(const std::string& path, const std::string& name, const json& entry, uint64_t data_size) {
  if (!entry.is_object()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}': entry is not a JSON object", path, name);
  Entry out{};
  out.info.name = name;

  auto dtype = entry.find("dtype");
  if (dtype == entry.end() || !dtype->is_string())
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}': \"dtype\" is missing or not a string", path, name);
  const std::string& dtype_str = dtype->get_ref<const std::string&>();
  if (!parse_dtype(dtype_str, &out.info.dtype))
    fail(LLMQ_ERR_UNSUPPORTED, "{}: tensor '{}': unsupported dtype '{}'", path, name, dtype_str);

  auto shape = entry.find("shape");
  if (shape == entry.end() || !shape->is_array())
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}': \"shape\" is missing or not an array", path, name);
  // Messages give the dimension's index rather than the shape, which may be huge.
  int64_t numel = 1;
  for (size_t i = 0; i < shape->size(); ++i) {
    uint64_t dim;
    if (!get_u64((*shape)[i], &dim) || dim > uint64_t(std::numeric_limits<int64_t>::max()))
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}': shape dimension {} is not an integer in [0, 2^63)", path, name, i);
    out.info.shape.push_back(int64_t(dim));
    if (__builtin_mul_overflow(numel, int64_t(dim), &numel))
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}': element count overflows int64 at shape dimension {}", path, name,
           i);
  }
  if (__builtin_mul_overflow(uint64_t(numel), uint64_t(dtype_size(out.info.dtype)), &out.info.nbytes))
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}': byte size of {} {} elements overflows uint64", path, name, numel,
         dtype_str);

  auto offsets = entry.find("data_offsets");
  if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 || !get_u64((*offsets)[0], &out.begin) ||
      !get_u64((*offsets)[1], &out.end))
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}': \"data_offsets\" is not an array of two non-negative integers", path,
         name);
  if (out.end < out.begin)
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}': data_offsets [{}, {}] end before they begin", path, name, out.begin,
         out.end);
  if (out.end - out.begin != out.info.nbytes)
    fail(LLMQ_ERR_MODEL_FORMAT,
         "{}: tensor '{}': wrong size: data_offsets [{}, {}] hold {} bytes, {} {} elements need {}", path, name,
         out.begin, out.end, out.end - out.begin, numel, dtype_str, out.info.nbytes);
  if (out.end > data_size)
    fail(LLMQ_ERR_MODEL_FORMAT,
         "{}: tensor '{}': data_offsets [{}, {}] out of range of the {}-byte data section (truncated file?)", path,
         name, out.begin, out.end, data_size);
  return out;
}

}  // namespace

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile(path));
  file->map_file();
  file->parse_header();
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_) munmap(const_cast<uint8_t*>(base_), size_);
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsFile::map_file() {
  // O_NONBLOCK so that a FIFO cannot hang open(); it has no effect on regular files.
  int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(LLMQ_ERR_IO, "{}: cannot open: {}", path_, errno_message(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(LLMQ_ERR_IO, "{}: cannot stat: {}", path_, errno_message(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(LLMQ_ERR_IO, "{}: not a regular file", path_);
  }
  size_ = uint64_t(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: file is {} bytes, too short for the 8-byte header length (truncated)", path_,
         size_);
  }
  void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (p == MAP_FAILED) fail(LLMQ_ERR_IO, "{}: cannot mmap {} bytes: {}", path_, size_, errno_message(err));
  base_ = static_cast<const uint8_t*>(p);
  // The engine reads every tensor soon after opening: start reading ahead. Only a hint.
  madvise(p, size_, MADV_WILLNEED);
}

void SafetensorsFile::parse_header() {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | base_[i];  // little-endian
  if (n == 0) fail(LLMQ_ERR_MODEL_FORMAT, "{}: header length is 0", path_);
  if (n > kMaxHeaderBytes)
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: header length {} exceeds the 100 MB bound (corrupt or not safetensors?)", path_,
         n);
  if (n > size_ - 8)
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: header length {} runs past the end of the {}-byte file (truncated)", path_, n,
         size_);
  const char* text = reinterpret_cast<const char*>(base_ + 8);
  if (text[0] != '{')
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: header is not a JSON object (it does not start with '{{')", path_);

  HeaderChecker checker(path_);
  if (!json::sax_parse(text, text + n, &checker))
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: header is not valid JSON: {}", path_, checker.error());
  json header = json::parse(text, text + n);  // cannot fail after the check above
  if (!header.is_object()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: header is not a JSON object", path_);

  const uint64_t data_size = size_ - 8 - n;
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: \"__metadata__\" is not a JSON object", path_);
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          fail(LLMQ_ERR_MODEL_FORMAT, "{}: \"__metadata__\" value of '{}' is not a string", path_, m.key());
        metadata_.emplace(m.key(), m->get<std::string>());
      }
      continue;
    }
    entries.push_back(parse_entry(path_, it.key(), *it, data_size));
  }

  // Sort by offset; an empty tensor occupies no bytes, so it overlaps nothing.
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Entry* last = nullptr;  // the previous non-empty tensor, which ends furthest so far
  for (const Entry& e : entries) {
    if (e.begin == e.end) continue;
    if (last && e.begin < last->end)
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensors '{}' [{}, {}) and '{}' [{}, {}) overlap", path_, last->info.name,
           last->begin, last->end, e.info.name, e.begin, e.end);
    last = &e;
  }

  const uint8_t* data = base_ + 8 + n;
  tensors_.reserve(entries.size());
  for (Entry& e : entries) {
    e.info.data = data + e.begin;
    tensors_.push_back(std::move(e.info));
  }
  // tensors_ no longer changes, so views of its names stay valid.
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();  // keeps the given order
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::unordered_set<std::string_view> names;
  std::vector<uint64_t> sizes;
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    if (t.name == "__metadata__" || !names.insert(t.name).second)
      fail(LLMQ_ERR_INVALID_ARGUMENT, "{}: tensor name '{}' is reserved or repeated", path, t.name);
    uint64_t numel = 1;
    for (int64_t dim : t.shape) {
      if (dim < 0 || __builtin_mul_overflow(numel, uint64_t(dim), &numel))
        fail(LLMQ_ERR_INVALID_ARGUMENT, "{}: tensor '{}': bad shape [{}]", path, t.name, fmt::join(t.shape, ", "));
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, uint64_t(dtype_size(t.dtype)), &nbytes) || (nbytes && !t.data))
      fail(LLMQ_ERR_INVALID_ARGUMENT, "{}: tensor '{}': no data or size overflows", path, t.name);
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = dtype_name(t.dtype);
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + nbytes};
    header[t.name] = std::move(entry);
    sizes.push_back(nbytes);
    offset += nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // a name that is not valid UTF-8
    fail(LLMQ_ERR_INVALID_ARGUMENT, "{}: cannot encode the header: {}", path, e.what());
  }
  text.append((64 - (8 + text.size()) % 64) % 64, ' ');
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = uint8_t(uint64_t(text.size()) >> (8 * i));

  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail(LLMQ_ERR_IO, "{}: cannot create: {}", tmp, errno_message(errno));
  bool ok = std::fwrite(length, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (size_t i = 0; ok && i < tensors.size(); ++i)
    ok = sizes[i] == 0 || std::fwrite(tensors[i].data, 1, sizes[i], f) == sizes[i];
  // fsync before rename: otherwise a crash can leave PATH renamed but empty.
  ok = ok && std::fflush(f) == 0 && fsync(fileno(f)) == 0;
  int err = errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    std::remove(tmp.c_str());
    fail(LLMQ_ERR_IO, "{}: cannot write: {}", path, errno_message(err));
  }
}

}  // namespace llmq
