// Error handling inside the library: every failure is an llmq::Error carrying the C ABI status
// code and a message that names the file, tensor, field or argument at fault. capi/ turns it into
// a status code plus llmq_last_error(); nothing else crosses the ABI.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "llmq.h"

namespace llmq {

class Error : public std::runtime_error {
 public:
  Error(llmq_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  llmq_status status() const noexcept { return status_; }

 private:
  llmq_status status_;
};

// fail(LLMQ_ERR_MODEL_FORMAT, "{}: tensor '{}' ...", path, name);
template <typename... Args>
[[noreturn]] void fail(llmq_status status, fmt::format_string<Args...> format, Args&&... args) {
  throw Error(status, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace llmq
