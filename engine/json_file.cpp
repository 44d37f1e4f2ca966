#include "engine/json_file.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

#include "engine/error.h"

namespace llmq {

std::string read_text_file(const std::string& path, size_t max_bytes) {
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) fail(LLMQ_ERR_IO, "{}: cannot open: {}", path, std::strerror(errno));
  std::string text;
  char chunk[65536];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof chunk, file.get())) > 0) {
    if (text.size() + n > max_bytes) fail(LLMQ_ERR_MODEL_FORMAT, "{}: larger than the {} byte limit", path, max_bytes);
    text.append(chunk, n);
  }
  if (std::ferror(file.get())) fail(LLMQ_ERR_IO, "{}: read error", path);
  return text;
}

nlohmann::json parse_json(const std::string& text, const std::string& source) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: invalid JSON: {}", source, e.what());
  }
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace llmq
