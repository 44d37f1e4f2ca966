// Reading untrusted JSON files: every failure becomes an llmq::Error naming the file.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace llmq {

// Reads a whole file (at most max_bytes; larger is LLMQ_ERR_MODEL_FORMAT). Missing or unreadable
// files are LLMQ_ERR_IO.
std::string read_text_file(const std::string& path, size_t max_bytes);

// Parses JSON text; a syntax error is LLMQ_ERR_MODEL_FORMAT naming `source` and the parser's message.
nlohmann::json parse_json(const std::string& text, const std::string& source);

bool file_exists(const std::string& path);

}  // namespace llmq
