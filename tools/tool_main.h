// Shared by the command-line tools: integer flags, and main()'s error handling.
#pragma once

#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#include "engine/error.h"

namespace llmq::tool {

// An integer flag in [min, max]; anything else is LLMQ_ERR_INVALID_ARGUMENT naming the flag.
inline int64_t parse_int(const std::string& flag, const std::string& text, int64_t min, int64_t max) {
  int64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < min || value > max)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "{} expects an integer in [{}, {}], got '{}'", flag, min, max, text);
  return value;
}

// A finite number flag in [min, max]; anything else is LLMQ_ERR_INVALID_ARGUMENT naming the flag.
inline double parse_double(const std::string& flag, const std::string& text, double min, double max) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !(value >= min && value <= max))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "{} expects a number in [{}, {}], got '{}'", flag, min, max, text);
  return value;
}

// Seconds from `start` until now.
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The non-empty items of a comma-separated list ("a,,b" -> {"a", "b"}).
inline std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// Runs the tool; an error is printed as "NAME: message" and exits with 1.
inline int run_main(const char* name, int (*run)(int, char**), int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace llmq::tool
