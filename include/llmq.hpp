/*
 * llmq.hpp: C++17 RAII over the C ABI of libllmq (llmq.h). Header-only: it uses nothing but the
 * functions of llmq.h, so a program built with it depends on libllmq.so.0's C ABI alone.
 *
 *   llmq::Model model("models/stories260K");
 *   llmq::Engine engine(model);
 *   llmq::Generation out = engine.generate(model.tokenize("Once upon a time"), llmq::greedy(32));
 *   std::cout << out.text << "\n";
 *
 * Failed calls throw llmq::Error, which carries the status and llmq_last_error(). Model and
 * Engine own their handle (move-only) and free it in the destructor. Thread safety is llmq.h's:
 * a Model's const functions may run on any number of threads; an Engine's calls are serialized
 * by the library; neither may be destroyed while another thread uses it.
 */
#ifndef LLMQ_HPP
#define LLMQ_HPP

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "llmq.h"

namespace llmq {

class Error : public std::runtime_error {
 public:
  Error(llmq_status status, const std::string& message)
      : std::runtime_error(std::string(llmq_status_string(status)) + ": " + message), status_(status),
        message_(message) {}
  llmq_status status() const noexcept { return status_; }
  /* The library's message, without the status name. */
  const std::string& message() const noexcept { return message_; }

 private:
  llmq_status status_;
  std::string message_;
};

/* Throws Error with this thread's llmq_last_error() unless status is LLMQ_OK. */
inline void check(llmq_status status) {
  if (status != LLMQ_OK) throw Error(status, llmq_last_error());
}

class Model {
 public:
  explicit Model(const std::string& dir, const llmq_model_params* params = nullptr) {
    llmq_model* raw = nullptr;
    check(llmq_model_load(dir.c_str(), params, &raw));
    handle_.reset(raw);
  }

  llmq_model* get() const noexcept { return handle_.get(); }

  llmq_model_info info() const {
    llmq_model_info info{};
    info.struct_size = sizeof info;
    check(llmq_model_get_info(get(), &info));
    return info;
  }

  std::vector<int32_t> tokenize(std::string_view text, bool add_special = true) const {
    std::vector<int32_t> ids(text.size() + 2);
    size_t n = 0;
    llmq_status status = llmq_tokenize(get(), text.data(), text.size(), add_special, ids.data(), ids.size(), &n);
    if (status == LLMQ_ERR_BUFFER_TOO_SMALL) {
      ids.resize(n);
      status = llmq_tokenize(get(), text.data(), text.size(), add_special, ids.data(), ids.size(), &n);
    }
    check(status);
    ids.resize(n);
    return ids;
  }

  std::string detokenize(const std::vector<int32_t>& ids, bool skip_special = true) const {
    std::string text(16 * ids.size() + 16, '\0');
    size_t n = 0;
    llmq_status status = llmq_detokenize(get(), ids.data(), ids.size(), skip_special, &text[0], text.size(), &n);
    if (status == LLMQ_ERR_BUFFER_TOO_SMALL) {
      text.resize(n);
      status = llmq_detokenize(get(), ids.data(), ids.size(), skip_special, &text[0], text.size(), &n);
    }
    check(status);
    text.resize(n);
    return text;
  }

 private:
  struct Deleter {
    void operator()(llmq_model* model) const noexcept { llmq_model_destroy(model); }
  };
  std::unique_ptr<llmq_model, Deleter> handle_;
};

/* What one generation asks for; the defaults are the library's. */
struct GenerateOptions {
  int32_t max_tokens;
  llmq_sampling_params sampling;
  std::vector<int32_t> stop_ids;
  bool ignore_eos = false;

  GenerateOptions() {
    llmq_generate_params params;
    llmq_generate_params_default(&params);
    max_tokens = params.max_new_tokens;
    llmq_sampling_params_default(&sampling);
  }
};

/* Greedy decoding of up to max_tokens tokens. */
inline GenerateOptions greedy(int32_t max_tokens) {
  GenerateOptions options;
  options.max_tokens = max_tokens;
  options.sampling.temperature = 0.0f;
  return options;
}

struct Generation {
  std::vector<int32_t> tokens;
  std::string text;
  llmq_generate_result result;  // finish reason, prompt length, timings
};

/* Called for each new token with its text ("" inside a multi-byte character); return false to
 * stop (finish reason LLMQ_FINISH_CANCELLED). An exception it throws stops generation and is
 * rethrown from generate() once the library has returned. */
using TokenCallback = std::function<bool(int32_t token, std::string_view text)>;

class Engine {
 public:
  explicit Engine(const Model& model, const llmq_engine_params* params = nullptr) {
    llmq_engine* raw = nullptr;
    check(llmq_engine_create(model.get(), params, &raw));
    handle_.reset(raw);
  }

  llmq_engine* get() const noexcept { return handle_.get(); }

  Generation generate(const std::vector<int32_t>& prompt, const GenerateOptions& options = GenerateOptions(),
                      const TokenCallback& on_token = nullptr) {
    State state{{}, on_token, nullptr};
    llmq_generate_params params;
    llmq_generate_params_default(&params);
    params.sampling = &options.sampling;
    params.max_new_tokens = options.max_tokens;
    params.stop_ids = options.stop_ids.data();
    params.n_stop_ids = options.stop_ids.size();
    params.ignore_eos = options.ignore_eos;
    params.on_token = &Engine::trampoline;
    params.user_data = &state;
    state.out.result.struct_size = sizeof state.out.result;
    llmq_status status = llmq_generate(get(), prompt.data(), prompt.size(), &params, nullptr, 0, &state.out.result);
    if (state.error) std::rethrow_exception(state.error);
    check(status);
    return std::move(state.out);
  }

  /* Logits of every position of ids: vocab_size floats per position. */
  std::vector<float> score(const std::vector<int32_t>& ids, int32_t vocab_size) {
    std::vector<float> logits(ids.size() * size_t(vocab_size));
    check(llmq_score(get(), ids.data(), ids.size(), logits.data(), logits.size()));
    return logits;
  }

 private:
  struct State {
    Generation out;
    const TokenCallback& on_token;
    std::exception_ptr error;
  };

  static int trampoline(int32_t token, const char* text, size_t text_len, void* user_data) noexcept {
    State& state = *static_cast<State*>(user_data);
    try {  // no exception may cross into the C library
      state.out.tokens.push_back(token);
      if (text_len > 0) state.out.text.append(text, text_len);
      return state.on_token && !state.on_token(token, std::string_view(text, text_len)) ? 1 : 0;
    } catch (...) {
      state.error = std::current_exception();
      return 1;
    }
  }

  struct Deleter {
    void operator()(llmq_engine* engine) const noexcept { llmq_engine_destroy(engine); }
  };
  std::unique_ptr<llmq_engine, Deleter> handle_;
};

}  // namespace llmq

#endif /* LLMQ_HPP */
