#include "engine/text_data.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

#include "engine/error.h"

namespace llmq {

// Offset of the first byte that does not begin a well-formed UTF-8 character (no overlong forms,
// surrogates or code points above U+10FFFF), or npos when the text is valid.
size_t invalid_utf8_offset(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto lead = static_cast<unsigned char>(s[i]);
    size_t len;
    uint32_t cp, min;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xE0) == 0xC0) {
      len = 2, cp = lead & 0x1Fu, min = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      len = 3, cp = lead & 0x0Fu, min = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      len = 4, cp = lead & 0x07u, min = 0x10000;
    } else {
      return i;
    }
    if (len > s.size() - i) return i;
    for (size_t k = 1; k < len; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return i;
      cp = cp << 6 | (b & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string read_corpus(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(LLMQ_ERR_IO, "cannot open {} '{}': {}", what, path, std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail(LLMQ_ERR_IO, "cannot read {} '{}'", what, path);
  if (text.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "{} '{}' is empty", what, path);
  const size_t bad = invalid_utf8_offset(text);
  if (bad != std::string_view::npos)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "{} '{}' is not valid UTF-8: bad byte 0x{:02X} at byte offset {}", what, path,
         static_cast<unsigned char>(text[bad]), bad);
  return text;
}

// The paragraphs: text.split("\n\n") without the empty strings.
std::vector<std::string_view> split_documents(std::string_view text) {
  std::vector<std::string_view> docs;
  for (size_t start = 0; start <= text.size();) {
    size_t end = text.find("\n\n", start);
    if (end == std::string_view::npos) end = text.size();
    if (end > start) docs.push_back(text.substr(start, end - start));
    start = end + 2;
  }
  return docs;
}

}  // namespace llmq
