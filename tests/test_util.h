// Helpers shared by the tests: paths to the shared test data and temporary directories.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/error.h"

namespace llmq::test {

// LLMQ_SHARED_DIR in the environment overrides the configured path (a build taken to another machine).
inline std::string shared_dir() {
  const char* env = std::getenv("LLMQ_SHARED_DIR");
  return env && *env ? env : LLMQ_SHARED_DIR;
}
inline std::string stories_dir() { return shared_dir() + "/models/stories260K"; }
inline std::string bin_dir() { return LLMQ_BIN_DIR; }

// Runs fn, which must throw an llmq::Error with `status` and a message containing `needle`.
template <typename Fn>
void expect_error(Fn&& fn, llmq_status status, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown; expected " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// A fresh directory under the test temp dir, removed with the object.
class TempDir {
 public:
  TempDir() {
    std::string pattern = std::filesystem::temp_directory_path().string() + "/llmq-test-XXXXXX";
    if (!mkdtemp(pattern.data())) std::abort();
    path_ = pattern;
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code;
  std::string out;
};

// Runs a shell command, capturing stdout (stderr goes to stderr_path if given, else is dropped).
inline CommandResult run_command(const std::string& command) {
  CommandResult result{-1, ""};
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) result.out.append(buffer, n);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

}  // namespace llmq::test
