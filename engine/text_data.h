// Text corpora for evaluation and calibration, read as ../shared/data/README.md's protocol says:
// UTF-8 text, documents separated by blank lines.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace llmq {

// Offset of the first byte that does not begin a well-formed UTF-8 character (no overlong forms,
// surrogates or code points above U+10FFFF), or npos when the text is valid.
size_t invalid_utf8_offset(std::string_view s);

// The whole file; `what` names it in errors ("data file"). Empty or non-UTF-8 text is an error
// (LLMQ_ERR_INVALID_ARGUMENT naming the byte offset), as is a file that cannot be read (LLMQ_ERR_IO).
std::string read_corpus(const std::string& path, const char* what);

// The paragraphs: text.split("\n\n") without the empty strings.
std::vector<std::string_view> split_documents(std::string_view text);

}  // namespace llmq
