// The C ABI's contracts, through the llmq_* functions only: params structs by size (older, smaller
// structs get defaults; sizes 0 or too large are named errors), output structs written only up to
// their struct_size, BUFFER_TOO_SMALL sizes, argument validation, backend availability, handle
// lifetimes, the thread-local last error, one engine used from several threads, score against
// generate, and seeds. The C11 side (and the header as C) is tests/c_api_test.c.
#include "llmq.h"  // first: the header compiles on its own as C++

#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <future>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace {

const std::vector<int32_t> kPrompt = {1, 403, 407, 261, 378};  // "Once upon a time" with BOS
// llama2.c run.c's greedy continuation of kPrompt (reference/reference_cases.json).
const std::vector<int32_t> kReference = {432, 383, 286, 261, 376, 298, 315, 421,
                                         395, 317, 426, 338, 401, 396, 267, 337};
constexpr int32_t kVocab = 512;

std::string last_error() { return llmq_last_error(); }

// A status and the message that came with it, for readable assertions.
struct Outcome {
  llmq_status status;
  std::string message;
};
Outcome outcome(llmq_status status) { return {status, status == LLMQ_OK ? "" : last_error()}; }

std::ostream& operator<<(std::ostream& os, const Outcome& o) {
  return os << llmq_status_string(o.status) << " \"" << o.message << "\"";
}

#define EXPECT_LLMQ_OK(call)                                           \
  do {                                                                 \
    llmq_status expect_ok_status_ = (call);                            \
    EXPECT_EQ(expect_ok_status_, LLMQ_OK) << #call << ": " << last_error(); \
  } while (0)
#define ASSERT_LLMQ_OK(call)                                           \
  do {                                                                 \
    llmq_status assert_ok_status_ = (call);                            \
    ASSERT_EQ(assert_ok_status_, LLMQ_OK) << #call << ": " << last_error(); \
  } while (0)

// The error is `status` and its message contains every one of `parts`.
::testing::AssertionResult fails_with(const Outcome& o, llmq_status status, std::vector<std::string> parts) {
  if (o.status != status)
    return ::testing::AssertionFailure() << "got " << o << ", expected " << llmq_status_string(status);
  for (const std::string& part : parts)
    if (o.message.find(part) == std::string::npos)
      return ::testing::AssertionFailure() << "message \"" << o.message << "\" does not contain \"" << part << "\"";
  return ::testing::AssertionSuccess();
}

// One model and a 1-thread engine per test (loading stories260K takes well under a millisecond of
// real work: it is memory-mapped).
class Capi : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_LLMQ_OK(llmq_model_load(llmq::test::stories_dir().c_str(), nullptr, &model_));
    llmq_engine_params params;
    llmq_engine_params_default(&params);
    params.n_threads = 1;
    ASSERT_LLMQ_OK(llmq_engine_create(model_, &params, &engine_));
  }
  void TearDown() override {
    llmq_engine_destroy(engine_);
    llmq_model_destroy(model_);
  }

  // Greedy generation of `n` tokens (temperature 0) with defaults otherwise.
  static std::vector<int32_t> greedy(llmq_engine* engine, const std::vector<int32_t>& prompt, int32_t n,
                                     llmq_status* status_out = nullptr) {
    llmq_sampling_params sampling;
    llmq_sampling_params_default(&sampling);
    sampling.temperature = 0.0f;
    return generate(engine, prompt, n, &sampling, status_out);
  }

  static std::vector<int32_t> generate(llmq_engine* engine, const std::vector<int32_t>& prompt, int32_t n,
                                       const llmq_sampling_params* sampling, llmq_status* status_out = nullptr) {
    llmq_generate_params params;
    llmq_generate_params_default(&params);
    params.sampling = sampling;
    params.max_new_tokens = n;
    std::vector<int32_t> out(size_t(n) + 1, -7);
    llmq_generate_result result;
    result.struct_size = sizeof result;
    llmq_status status = llmq_generate(engine, prompt.data(), prompt.size(), &params, out.data(), out.size(), &result);
    if (status_out) *status_out = status;
    if (status != LLMQ_OK) {
      if (!status_out) ADD_FAILURE() << "llmq_generate: " << llmq_status_string(status) << ": " << last_error();
      return {};
    }
    out.resize(size_t(result.n_generated));
    return out;
  }

  llmq_model* model_ = nullptr;
  llmq_engine* engine_ = nullptr;
};

// ---- Params structs by size --------------------------------------------------------------------

TEST_F(Capi, DefaultsSetStructSize) {
  llmq_model_params mp;
  llmq_engine_params ep;
  llmq_sampling_params sp;
  llmq_generate_params gp;
  std::memset(&mp, 0xab, sizeof mp);
  std::memset(&ep, 0xab, sizeof ep);
  std::memset(&sp, 0xab, sizeof sp);
  std::memset(&gp, 0xab, sizeof gp);
  llmq_model_params_default(&mp);
  llmq_engine_params_default(&ep);
  llmq_sampling_params_default(&sp);
  llmq_generate_params_default(&gp);
  EXPECT_EQ(mp.struct_size, sizeof mp);
  EXPECT_EQ(ep.struct_size, sizeof ep);
  EXPECT_EQ(sp.struct_size, sizeof sp);
  EXPECT_EQ(gp.struct_size, sizeof gp);
  // The documented defaults.
  EXPECT_EQ(ep.backend, LLMQ_BACKEND_CPU);
  EXPECT_EQ(ep.n_threads, 0);
  EXPECT_EQ(ep.kv_cache_bytes, 0u);
  EXPECT_EQ(ep.kv_block_size, 16);
  EXPECT_EQ(ep.max_batch_tokens, 512);
  EXPECT_EQ(sp.temperature, 1.0f);
  EXPECT_EQ(sp.top_k, 0);
  EXPECT_EQ(sp.top_p, 1.0f);
  EXPECT_EQ(sp.min_p, 0.0f);
  EXPECT_EQ(sp.repetition_penalty, 1.0f);
  EXPECT_EQ(sp.seed, LLMQ_SEED_RANDOM);
  EXPECT_EQ(gp.sampling, nullptr);
  EXPECT_EQ(gp.max_new_tokens, 256);
  EXPECT_EQ(gp.stop_ids, nullptr);
  EXPECT_EQ(gp.n_stop_ids, 0u);
  EXPECT_EQ(gp.ignore_eos, 0);
  EXPECT_EQ(gp.on_token, nullptr);
  EXPECT_EQ(gp.user_data, nullptr);
}

TEST_F(Capi, OlderSmallerModelParams) {
  llmq_model_params params;
  llmq_model_params_default(&params);
  params.struct_size = offsetof(llmq_model_params, reserved);  // the oldest possible: struct_size only
  params.reserved = 12345;                                     // past struct_size: ignored
  llmq_model* model = nullptr;
  EXPECT_LLMQ_OK(llmq_model_load(llmq::test::stories_dir().c_str(), &params, &model));
  EXPECT_NE(model, nullptr);
  llmq_model_destroy(model);
}

TEST_F(Capi, OlderSmallerEngineParamsUseDefaults) {
  llmq_engine_params params;
  llmq_engine_params_default(&params);
  params.n_threads = 1;
  // Past struct_size: invalid values that must not be read.
  params.kv_block_size = -3;
  params.max_batch_tokens = 0;
  params.struct_size = offsetof(llmq_engine_params, kv_block_size);
  llmq_engine* engine = nullptr;
  ASSERT_LLMQ_OK(llmq_engine_create(model_, &params, &engine));
  EXPECT_EQ(greedy(engine, kPrompt, 8), std::vector<int32_t>(kReference.begin(), kReference.begin() + 8));
  llmq_engine_destroy(engine);

  // The same struct at full size is rejected, naming the field.
  params.struct_size = sizeof params;
  engine = reinterpret_cast<llmq_engine*>(&params);
  EXPECT_TRUE(fails_with(outcome(llmq_engine_create(model_, &params, &engine)), LLMQ_ERR_INVALID_ARGUMENT,
                         {"kv_block_size"}));
  EXPECT_EQ(engine, nullptr);
}

TEST_F(Capi, KvDtypeIsChecked) {
  llmq_engine_params params;
  llmq_engine_params_default(&params);
  int32_t bad = 6;
  std::memcpy(&params.kv_dtype, &bad, sizeof bad);
  llmq_engine* engine = nullptr;
  EXPECT_TRUE(fails_with(outcome(llmq_engine_create(model_, &params, &engine)), LLMQ_ERR_INVALID_ARGUMENT,
                         {"params.kv_dtype", "6"}));
  for (llmq_kv_dtype kv : {LLMQ_KV_DTYPE_INT8, LLMQ_KV_DTYPE_FP8}) {
    params.kv_dtype = kv;
    ASSERT_LLMQ_OK(llmq_engine_create(model_, &params, &engine));
    EXPECT_EQ(greedy(engine, kPrompt, 4).size(), 4u);
    llmq_engine_destroy(engine);
  }
}

TEST_F(Capi, SaturationCounters) {
  size_t n = 0;
  uint64_t counts[32];
  EXPECT_TRUE(fails_with(outcome(llmq_engine_saturation(engine_, counts, 3, &n, 0)), LLMQ_ERR_BUFFER_TOO_SMALL,
                         {"25 counters", "capacity 3"}));
  EXPECT_EQ(n, 25u);  // 5 layers x LLMQ_SATURATION_COUNTERS
  std::fill(std::begin(counts), std::end(counts), 7u);
  ASSERT_LLMQ_OK(llmq_engine_saturation(engine_, counts, 32, &n, 1));
  EXPECT_EQ(n, 25u);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(counts[i], 0u);  // no static scales in this engine
  EXPECT_EQ(counts[25], 7u);                               // past n: untouched
  EXPECT_TRUE(fails_with(outcome(llmq_engine_saturation(nullptr, counts, 32, &n, 0)), LLMQ_ERR_INVALID_ARGUMENT,
                         {"engine"}));
}

TEST_F(Capi, QuantModeIsCheckedAndUsed) {
  llmq_engine_params params;
  llmq_engine_params_default(&params);
  EXPECT_EQ(params.quant, LLMQ_QUANT_NONE);
  int32_t bad = 7;  // stored as a C caller might
  std::memcpy(&params.quant, &bad, sizeof bad);
  llmq_engine* engine = reinterpret_cast<llmq_engine*>(&params);
  EXPECT_TRUE(fails_with(outcome(llmq_engine_create(model_, &params, &engine)), LLMQ_ERR_INVALID_ARGUMENT,
                         {"params.quant", "7"}));
  EXPECT_EQ(engine, nullptr);
  // A struct from before the field existed: the field is not read (LLMQ_QUANT_NONE).
  params.struct_size = offsetof(llmq_engine_params, quant);
  ASSERT_LLMQ_OK(llmq_engine_create(model_, &params, &engine));
  EXPECT_EQ(greedy(engine, kPrompt, 16), kReference);
  llmq_engine_destroy(engine);
  // int8wo on stories260K keeps the greedy reference continuation's first tokens.
  params.struct_size = sizeof params;
  params.quant = LLMQ_QUANT_INT8WO;
  ASSERT_LLMQ_OK(llmq_engine_create(model_, &params, &engine));
  EXPECT_EQ(greedy(engine, kPrompt, 8), std::vector<int32_t>(kReference.begin(), kReference.begin() + 8));
  llmq_engine_destroy(engine);
}

TEST_F(Capi, OlderSmallerSamplingParamsUseDefaults) {
  llmq_sampling_params sampling;
  llmq_sampling_params_default(&sampling);
  sampling.temperature = 0.0f;
  // Past struct_size: invalid values that must not be read.
  sampling.top_k = -1;
  sampling.top_p = std::numeric_limits<float>::quiet_NaN();
  sampling.min_p = 7.0f;
  sampling.repetition_penalty = -2.0f;
  sampling.struct_size = offsetof(llmq_sampling_params, top_k);
  EXPECT_EQ(generate(engine_, kPrompt, 16, &sampling), kReference);

  // At full size the same struct is rejected (top_k is the first bad field checked).
  sampling.struct_size = sizeof sampling;
  llmq_status status;
  EXPECT_TRUE(generate(engine_, kPrompt, 4, &sampling, &status).empty());
  EXPECT_TRUE(fails_with({status, last_error()}, LLMQ_ERR_INVALID_ARGUMENT, {"top_k"}));
}

struct CallbackLog {
  int calls = 0;
  static int on_token(int32_t, const char*, size_t, void* user_data) {
    ++static_cast<CallbackLog*>(user_data)->calls;
    return 0;
  }
};

TEST_F(Capi, OlderSmallerGenerateParamsUseDefaults) {
  llmq_sampling_params sampling;
  llmq_sampling_params_default(&sampling);
  sampling.temperature = 0.0f;
  CallbackLog log;
  const int32_t stop = kReference[0];
  llmq_generate_params params;
  llmq_generate_params_default(&params);
  params.sampling = &sampling;
  params.max_new_tokens = 16;
  // Past struct_size: stop at the first token, a callback. Neither may be used.
  params.stop_ids = &stop;
  params.n_stop_ids = 1;
  params.on_token = CallbackLog::on_token;
  params.user_data = &log;
  params.struct_size = offsetof(llmq_generate_params, stop_ids);
  std::vector<int32_t> out(16, -1);
  llmq_generate_result result;
  result.struct_size = sizeof result;
  ASSERT_LLMQ_OK(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, out.data(), out.size(), &result));
  EXPECT_EQ(out, kReference);
  EXPECT_EQ(result.finish_reason, LLMQ_FINISH_LENGTH);
  EXPECT_EQ(log.calls, 0);

  // At full size the stop id and the callback take effect.
  params.struct_size = sizeof params;
  ASSERT_LLMQ_OK(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, out.data(), out.size(), &result));
  EXPECT_EQ(result.finish_reason, LLMQ_FINISH_STOP);
  EXPECT_EQ(result.n_generated, 0);
  EXPECT_EQ(log.calls, 0);  // the stop id is not emitted
  params.n_stop_ids = 0;
  ASSERT_LLMQ_OK(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, out.data(), out.size(), &result));
  EXPECT_EQ(log.calls, 16);

  // Without max_new_tokens either: the default, 256 (the greedy story runs on for 340 tokens).
  params.max_new_tokens = 3;
  params.struct_size = offsetof(llmq_generate_params, max_new_tokens);
  log.calls = 0;
  ASSERT_LLMQ_OK(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, nullptr, 0, &result));
  EXPECT_EQ(result.n_generated, 256);
  EXPECT_EQ(result.finish_reason, LLMQ_FINISH_LENGTH);
  EXPECT_EQ(log.calls, 0);
}

TEST_F(Capi, StructSizeZeroOrTooLargeIsNamed) {
  // For each struct: 0, less than the struct_size field itself, a little larger than this
  // library's struct (a caller built against a newer llmq.h), absurd.
  for (size_t kind = 0; kind < 4; ++kind) {
    auto bad_size = [kind](size_t ours) {
      const size_t sizes[] = {0, 4, ours + 8, size_t(1) << 40};
      return sizes[kind];
    };
    SCOPED_TRACE("struct_size kind " + std::to_string(kind));
    llmq_model_params mp;
    llmq_model_params_default(&mp);
    const size_t bad_mp = bad_size(sizeof(mp));
    mp.struct_size = bad_mp;
    llmq_model* model = reinterpret_cast<llmq_model*>(&mp);
    EXPECT_TRUE(fails_with(outcome(llmq_model_load(llmq::test::stories_dir().c_str(), &mp, &model)),
                           LLMQ_ERR_INVALID_ARGUMENT, {"llmq_model_load: params", "struct_size"}));
    EXPECT_EQ(model, nullptr);

    llmq_engine_params ep;
    llmq_engine_params_default(&ep);
    const size_t bad_ep = bad_size(sizeof(ep));
    ep.struct_size = bad_ep;
    llmq_engine* engine = reinterpret_cast<llmq_engine*>(&ep);
    EXPECT_TRUE(fails_with(outcome(llmq_engine_create(model_, &ep, &engine)), LLMQ_ERR_INVALID_ARGUMENT,
                           {"llmq_engine_create: params", "struct_size"}));
    EXPECT_EQ(engine, nullptr);

    CallbackLog log;
    llmq_sampling_params sp;
    llmq_sampling_params_default(&sp);
    sp.temperature = 0.0f;
    llmq_generate_params gp;
    llmq_generate_params_default(&gp);
    gp.sampling = &sp;
    gp.max_new_tokens = 4;
    gp.on_token = CallbackLog::on_token;
    gp.user_data = &log;

    const size_t bad_gp = bad_size(sizeof(gp));
    gp.struct_size = bad_gp;
    EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &gp, nullptr, 0, nullptr)),
                           LLMQ_ERR_INVALID_ARGUMENT, {"llmq_generate: params:", "struct_size"}));
    gp.struct_size = sizeof gp;

    const size_t bad_sp = bad_size(sizeof(sp));
    sp.struct_size = bad_sp;
    EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &gp, nullptr, 0, nullptr)),
                           LLMQ_ERR_INVALID_ARGUMENT, {"params.sampling", "struct_size"}));
    sp.struct_size = sizeof sp;

    llmq_generate_result result;
    std::memset(&result, 0x5a, sizeof result);
    const size_t bad_result = bad_size(sizeof(result));
    result.struct_size = bad_result;
    EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &gp, nullptr, 0, &result)),
                           LLMQ_ERR_INVALID_ARGUMENT, {"llmq_generate: result", "struct_size"}));
    EXPECT_EQ(result.struct_size, bad_result);
    EXPECT_EQ(result.n_generated, 0x5a5a5a5a);  // untouched
    EXPECT_EQ(log.calls, 0);                    // nothing was generated

    llmq_model_info info;
    std::memset(&info, 0x5a, sizeof info);
    const size_t bad_info = bad_size(sizeof(info));
    info.struct_size = bad_info;
    EXPECT_TRUE(fails_with(outcome(llmq_model_get_info(model_, &info)), LLMQ_ERR_INVALID_ARGUMENT,
                           {"llmq_model_get_info: info", "struct_size"}));
    EXPECT_EQ(info.struct_size, bad_info);
    EXPECT_EQ(info.vocab_size, 0x5a5a5a5a);
  }
}

// ---- Output structs written only up to their struct_size ----------------------------------------

// A struct of type T at the start of a bigger buffer filled with a canary.
template <typename T>
struct Canaried {
  static constexpr unsigned char kCanary = 0xc3;
  alignas(T) unsigned char bytes[sizeof(T) + 64];
  explicit Canaried(size_t struct_size) {
    std::memset(bytes, kCanary, sizeof bytes);
    std::memcpy(bytes, &struct_size, sizeof struct_size);
  }
  T* get() { return reinterpret_cast<T*>(bytes); }
  // The first byte at or after `from` that is not the canary, or -1.
  ptrdiff_t first_touched(size_t from) const {
    for (size_t i = from; i < sizeof bytes; ++i)
      if (bytes[i] != kCanary) return ptrdiff_t(i);
    return -1;
  }
};

TEST_F(Capi, ModelInfoWrittenOnlyUpToStructSize) {
  llmq_model_info full;
  full.struct_size = sizeof full;
  ASSERT_LLMQ_OK(llmq_model_get_info(model_, &full));

  for (size_t size : {offsetof(llmq_model_info, vocab_size) + sizeof(int32_t), offsetof(llmq_model_info, num_eos_ids),
                      offsetof(llmq_model_info, eos_ids) + 4, offsetof(llmq_model_info, weight_bytes),
                      offsetof(llmq_model_info, architecture), sizeof(llmq_model_info)}) {
    SCOPED_TRACE("struct_size " + std::to_string(size));
    Canaried<llmq_model_info> buffer(size);
    ASSERT_LLMQ_OK(llmq_model_get_info(model_, buffer.get()));
    EXPECT_EQ(buffer.first_touched(size), -1) << "a byte past struct_size was written";
    EXPECT_EQ(buffer.get()->struct_size, size);
    EXPECT_EQ(std::memcmp(buffer.bytes + sizeof(size_t), reinterpret_cast<const unsigned char*>(&full) + sizeof(size_t),
                          size - sizeof(size_t)),
              0)
        << "the fields within struct_size differ from a full-size call";
  }
  EXPECT_EQ(full.vocab_size, kVocab);
  EXPECT_STREQ(full.architecture, "LlamaForCausalLM");
}

TEST_F(Capi, GenerateResultWrittenOnlyUpToStructSize) {
  llmq_sampling_params sampling;
  llmq_sampling_params_default(&sampling);
  sampling.temperature = 0.0f;
  llmq_generate_params params;
  llmq_generate_params_default(&params);
  params.sampling = &sampling;
  params.max_new_tokens = 4;
  for (size_t size : {offsetof(llmq_generate_result, finish_reason), offsetof(llmq_generate_result, n_generated),
                      offsetof(llmq_generate_result, time_to_first_token_s), sizeof(llmq_generate_result)}) {
    SCOPED_TRACE("struct_size " + std::to_string(size));
    Canaried<llmq_generate_result> buffer(size);
    ASSERT_LLMQ_OK(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, nullptr, 0, buffer.get()));
    EXPECT_EQ(buffer.first_touched(size), -1) << "a byte past struct_size was written";
    EXPECT_EQ(buffer.get()->struct_size, size);
    if (size > offsetof(llmq_generate_result, finish_reason)) {
      EXPECT_EQ(buffer.get()->finish_reason, LLMQ_FINISH_LENGTH);
    }
    if (size > offsetof(llmq_generate_result, n_prompt_tokens)) {
      EXPECT_EQ(buffer.get()->n_prompt_tokens, int32_t(kPrompt.size()));
    }
    if (size > offsetof(llmq_generate_result, n_generated)) {
      EXPECT_EQ(buffer.get()->n_generated, 4);
    }
  }
}

TEST_F(Capi, OutIdsWrittenOnlyUpToCapacity) {
  llmq_sampling_params sampling;
  llmq_sampling_params_default(&sampling);
  sampling.temperature = 0.0f;
  llmq_generate_params params;
  llmq_generate_params_default(&params);
  params.sampling = &sampling;
  params.max_new_tokens = 16;
  std::vector<int32_t> out(8, -7);
  llmq_generate_result result;
  result.struct_size = sizeof result;
  ASSERT_LLMQ_OK(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, out.data(), 4, &result));
  EXPECT_EQ(std::vector<int32_t>(out.begin(), out.begin() + 4), std::vector<int32_t>(kReference.begin(), kReference.begin() + 4));
  EXPECT_EQ(std::vector<int32_t>(out.begin() + 4, out.end()), std::vector<int32_t>(4, -7));
  EXPECT_EQ(result.n_generated, 16);  // tokens produced, beyond the capacity
}

// ---- BUFFER_TOO_SMALL ------------------------------------------------------------------------

TEST_F(Capi, TokenizeReportsNeededSize) {
  const std::string text = "Once upon a time";
  size_t n = 0;
  EXPECT_TRUE(fails_with(outcome(llmq_tokenize(model_, text.data(), text.size(), 1, nullptr, 0, &n)),
                         LLMQ_ERR_BUFFER_TOO_SMALL, {"llmq_tokenize", "5"}));
  EXPECT_EQ(n, 5u);
  std::vector<int32_t> ids(8, -7);
  n = 0;
  EXPECT_TRUE(fails_with(outcome(llmq_tokenize(model_, text.data(), text.size(), 1, ids.data(), 4, &n)),
                         LLMQ_ERR_BUFFER_TOO_SMALL, {"ids_capacity 4"}));
  EXPECT_EQ(n, 5u);
  EXPECT_EQ(ids, std::vector<int32_t>(8, -7)) << "nothing may be written on BUFFER_TOO_SMALL";
  ASSERT_LLMQ_OK(llmq_tokenize(model_, text.data(), text.size(), 1, ids.data(), 5, &n));
  EXPECT_EQ(n, 5u);
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + 5), kPrompt);
  EXPECT_EQ(ids[5], -7);
}

TEST_F(Capi, DetokenizeReportsNeededSize) {
  size_t len = 0;
  EXPECT_TRUE(fails_with(outcome(llmq_detokenize(model_, kPrompt.data(), kPrompt.size(), 1, nullptr, 0, &len)),
                         LLMQ_ERR_BUFFER_TOO_SMALL, {"llmq_detokenize", "16"}));
  EXPECT_EQ(len, 16u);
  std::string text(32, '#');
  len = 0;
  EXPECT_TRUE(fails_with(outcome(llmq_detokenize(model_, kPrompt.data(), kPrompt.size(), 1, text.data(), 15, &len)),
                         LLMQ_ERR_BUFFER_TOO_SMALL, {"text_capacity 15"}));
  EXPECT_EQ(len, 16u);
  EXPECT_EQ(text, std::string(32, '#')) << "nothing may be written on BUFFER_TOO_SMALL";
  ASSERT_LLMQ_OK(llmq_detokenize(model_, kPrompt.data(), kPrompt.size(), 1, text.data(), 16, &len));
  EXPECT_EQ(text, "Once upon a time" + std::string(16, '#'));  // no terminating NUL
  // Zero ids: the empty text, with a NULL buffer.
  ASSERT_LLMQ_OK(llmq_detokenize(model_, nullptr, 0, 1, nullptr, 0, &len));
  EXPECT_EQ(len, 0u);
}

TEST_F(Capi, ScoreReportsNeededSize) {
  std::vector<float> logits(kPrompt.size() * kVocab, -1.0f);
  // The needed size is n_ids * vocab_size floats; the message states both factors.
  EXPECT_TRUE(fails_with(outcome(llmq_score(engine_, kPrompt.data(), kPrompt.size(), nullptr, 0)),
                         LLMQ_ERR_BUFFER_TOO_SMALL, {"llmq_score", "5 * 512"}));
  EXPECT_TRUE(fails_with(outcome(llmq_score(engine_, kPrompt.data(), kPrompt.size(), logits.data(), logits.size() - 1)),
                         LLMQ_ERR_BUFFER_TOO_SMALL, {"logits_capacity 2559", "5 * 512"}));
  EXPECT_EQ(logits, std::vector<float>(logits.size(), -1.0f)) << "nothing may be written on BUFFER_TOO_SMALL";
  EXPECT_LLMQ_OK(llmq_score(engine_, kPrompt.data(), kPrompt.size(), logits.data(), logits.size()));
}

// ---- Argument validation -----------------------------------------------------------------------

TEST_F(Capi, GenerateRejectsBadSamplingParamsNamingTheField) {
  struct Case {
    const char* field;
    void (*set)(llmq_sampling_params*);
  };
  const Case cases[] = {
      {"top_p", [](llmq_sampling_params* s) { s->top_p = 0.0f; }},
      {"top_p", [](llmq_sampling_params* s) { s->top_p = 1.5f; }},
      {"top_p", [](llmq_sampling_params* s) { s->top_p = std::numeric_limits<float>::quiet_NaN(); }},
      {"temperature", [](llmq_sampling_params* s) { s->temperature = -1.0f; }},
      {"temperature", [](llmq_sampling_params* s) { s->temperature = std::numeric_limits<float>::quiet_NaN(); }},
      {"temperature", [](llmq_sampling_params* s) { s->temperature = std::numeric_limits<float>::infinity(); }},
      {"top_k", [](llmq_sampling_params* s) { s->top_k = -1; }},
      {"min_p", [](llmq_sampling_params* s) { s->min_p = -0.5f; }},
      {"min_p", [](llmq_sampling_params* s) { s->min_p = std::numeric_limits<float>::quiet_NaN(); }},
      {"repetition_penalty", [](llmq_sampling_params* s) { s->repetition_penalty = 0.0f; }},
      {"repetition_penalty", [](llmq_sampling_params* s) { s->repetition_penalty = std::numeric_limits<float>::quiet_NaN(); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    llmq_sampling_params sampling;
    llmq_sampling_params_default(&sampling);
    c.set(&sampling);
    CallbackLog log;
    llmq_generate_params params;
    llmq_generate_params_default(&params);
    params.sampling = &sampling;
    params.max_new_tokens = 4;
    params.on_token = CallbackLog::on_token;
    params.user_data = &log;
    std::vector<int32_t> out(4, -7);
    EXPECT_TRUE(fails_with(
        outcome(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, out.data(), out.size(), nullptr)),
        LLMQ_ERR_INVALID_ARGUMENT, {c.field}));
    EXPECT_EQ(log.calls, 0);
    EXPECT_EQ(out, std::vector<int32_t>(4, -7));
  }
}

TEST_F(Capi, GenerateRejectsOutOfRangePromptIds) {
  for (int32_t bad : {kVocab, -1, std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()}) {
    SCOPED_TRACE(bad);
    std::vector<int32_t> prompt = kPrompt;
    prompt[2] = bad;
    std::vector<int32_t> out(4, -7);
    EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, prompt.data(), prompt.size(), nullptr, out.data(), 4, nullptr)),
                           LLMQ_ERR_INVALID_ARGUMENT, {"prompt_ids[2]", std::to_string(bad)}));
    EXPECT_EQ(out, std::vector<int32_t>(4, -7));
    std::vector<float> logits(prompt.size() * kVocab);
    EXPECT_TRUE(fails_with(outcome(llmq_score(engine_, prompt.data(), prompt.size(), logits.data(), logits.size())),
                           LLMQ_ERR_INVALID_ARGUMENT, {"ids[2]"}));
  }
  // Stop ids are checked too.
  llmq_generate_params params;
  llmq_generate_params_default(&params);
  const int32_t stop[] = {2, kVocab};
  params.stop_ids = stop;
  params.n_stop_ids = 2;
  EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, nullptr, 0, nullptr)),
                         LLMQ_ERR_INVALID_ARGUMENT, {"stop_ids[1]"}));
  params.stop_ids = nullptr;
  EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, nullptr, 0, nullptr)),
                         LLMQ_ERR_INVALID_ARGUMENT, {"stop_ids"}));
}

TEST_F(Capi, GenerateRejectsEmptyAndOverlongPrompts) {
  EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, kPrompt.data(), 0, nullptr, nullptr, 0, nullptr)),
                         LLMQ_ERR_INVALID_ARGUMENT, {"empty"}));
  EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, nullptr, 0, nullptr, nullptr, 0, nullptr)),
                         LLMQ_ERR_INVALID_ARGUMENT, {"empty"}));
  std::vector<int32_t> long_prompt(513, 300);
  EXPECT_TRUE(
      fails_with(outcome(llmq_generate(engine_, long_prompt.data(), long_prompt.size(), nullptr, nullptr, 0, nullptr)),
                 LLMQ_ERR_CONTEXT_OVERFLOW, {"513"}));
  llmq_generate_params params;
  llmq_generate_params_default(&params);
  params.max_new_tokens = -1;
  EXPECT_TRUE(fails_with(outcome(llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, nullptr, 0, nullptr)),
                         LLMQ_ERR_INVALID_ARGUMENT, {"max_new_tokens"}));
}

TEST_F(Capi, CudaBackendIsUnavailableInACpuBuild) {
  llmq_engine_params params;
  llmq_engine_params_default(&params);
  params.backend = LLMQ_BACKEND_CUDA;
  llmq_engine* engine = reinterpret_cast<llmq_engine*>(&params);
  const Outcome o = outcome(llmq_engine_create(model_, &params, &engine));
#ifdef LLMQ_HAVE_CUDA
  // A CUDA build: the engine exists where there is a device the backend can use.
  if (o.status == LLMQ_OK) {
    EXPECT_NE(engine, nullptr);
    llmq_engine_destroy(engine);
    return;
  }
#endif
  EXPECT_TRUE(fails_with(o, LLMQ_ERR_BACKEND_UNAVAILABLE, {"CUDA"}));
  EXPECT_EQ(engine, nullptr);

  // A backend this library does not know (from a newer llmq.h, say). Stored as a C caller would:
  // an int in the enum's storage (a C++ static_cast to an out-of-range enum would itself be UB).
  static_assert(sizeof(llmq_backend) == sizeof(int32_t), "llmq_backend is an int in the C ABI");
  const int32_t unknown_backend = 7;
  std::memcpy(&params.backend, &unknown_backend, sizeof unknown_backend);
  EXPECT_TRUE(fails_with(outcome(llmq_engine_create(model_, &params, &engine)), LLMQ_ERR_INVALID_ARGUMENT,
                         {"backend"}));
}

// ---- Lifetimes ---------------------------------------------------------------------------------

TEST(CapiLifetime, ModelOutlivesItsHandleWhileAnEngineExists) {
  llmq_model* model = nullptr;
  ASSERT_LLMQ_OK(llmq_model_load(llmq::test::stories_dir().c_str(), nullptr, &model));
  llmq_engine_params params;
  llmq_engine_params_default(&params);
  params.n_threads = 2;
  llmq_engine* engine = nullptr;
  ASSERT_LLMQ_OK(llmq_engine_create(model, &params, &engine));
  llmq_model_destroy(model);  // the engine keeps the weights (memory-mapped) alive
  model = nullptr;

  llmq_sampling_params sampling;
  llmq_sampling_params_default(&sampling);
  sampling.temperature = 0.0f;
  llmq_generate_params gp;
  llmq_generate_params_default(&gp);
  gp.sampling = &sampling;
  gp.max_new_tokens = 16;
  std::string streamed;
  gp.user_data = &streamed;
  gp.on_token = [](int32_t, const char* text, size_t len, void* user_data) {
    static_cast<std::string*>(user_data)->append(text, len);  // uses the (kept) tokenizer
    return 0;
  };
  std::vector<int32_t> out(16);
  EXPECT_LLMQ_OK(llmq_generate(engine, kPrompt.data(), kPrompt.size(), &gp, out.data(), out.size(), nullptr));
  EXPECT_EQ(out, kReference);
  EXPECT_EQ(streamed.rfind(", there was a little girl named Lily.", 0), 0u) << streamed;
  std::vector<float> logits(kPrompt.size() * kVocab);
  EXPECT_LLMQ_OK(llmq_score(engine, kPrompt.data(), kPrompt.size(), logits.data(), logits.size()));
  llmq_engine_destroy(engine);
}

TEST(CapiLifetime, SeveralEnginesOnOneModel) {
  llmq_model* model = nullptr;
  ASSERT_LLMQ_OK(llmq_model_load(llmq::test::stories_dir().c_str(), nullptr, &model));
  llmq_engine_params params;
  llmq_engine_params_default(&params);
  params.n_threads = 1;
  llmq_engine *a = nullptr, *b = nullptr;
  ASSERT_LLMQ_OK(llmq_engine_create(model, &params, &a));
  ASSERT_LLMQ_OK(llmq_engine_create(model, &params, &b));
  llmq_model_destroy(model);
  llmq_engine_destroy(a);
  // b still works after a and the model handle are gone.
  std::vector<float> logits(kPrompt.size() * kVocab);
  EXPECT_LLMQ_OK(llmq_score(b, kPrompt.data(), kPrompt.size(), logits.data(), logits.size()));
  llmq_engine_destroy(b);
}

// ---- Threads -----------------------------------------------------------------------------------

TEST(CapiThreads, LastErrorIsThreadLocal) {
  std::promise<void> a_failed, b_failed;
  std::shared_future<void> a_done = a_failed.get_future().share(), b_done = b_failed.get_future().share();
  std::string a_message, b_message;
  llmq_status a_status = LLMQ_OK, b_status = LLMQ_OK;

  std::thread a([&] {
    llmq_model* model = nullptr;
    a_status = llmq_model_load("/nonexistent/llmq-thread-a", nullptr, &model);
    a_failed.set_value();
    b_done.wait();  // b has failed too, after us
    a_message = llmq_last_error();
  });
  std::thread b([&] {
    a_done.wait();
    size_t n = 0;
    b_status = llmq_tokenize(nullptr, "x", 1, 1, nullptr, 0, &n);
    b_failed.set_value();
    b_message = llmq_last_error();
  });
  a.join();
  b.join();
  EXPECT_EQ(a_status, LLMQ_ERR_IO);
  EXPECT_EQ(b_status, LLMQ_ERR_INVALID_ARGUMENT);
  EXPECT_NE(a_message.find("/nonexistent/llmq-thread-a"), std::string::npos) << a_message;
  EXPECT_EQ(a_message.find("llmq_tokenize"), std::string::npos) << a_message;
  EXPECT_NE(b_message.find("llmq_tokenize: model"), std::string::npos) << b_message;
  EXPECT_EQ(b_message.find("thread-a"), std::string::npos) << b_message;

  // This thread has its own (fresh thread: empty) message.
  std::string fresh;
  std::thread([&] { fresh = llmq_last_error(); }).join();
  EXPECT_EQ(fresh, "");
}

TEST_F(Capi, ConcurrentGenerateOnOneEngine) {
  const std::vector<int32_t> expected = greedy(engine_, kPrompt, 24);
  ASSERT_EQ(std::vector<int32_t>(expected.begin(), expected.begin() + 16), kReference);

  struct PerThread {
    std::vector<int32_t> tokens;
    std::vector<int32_t> streamed;
    bool callback_on_own_thread = true;
    std::thread::id id;
    llmq_status status = LLMQ_ERR_INTERNAL;
  };
  PerThread results[3];
  std::vector<std::thread> threads;
  for (PerThread& r : results) {
    threads.emplace_back([&r, this] {
      r.id = std::this_thread::get_id();
      llmq_sampling_params sampling;
      llmq_sampling_params_default(&sampling);
      sampling.temperature = 0.0f;
      llmq_generate_params params;
      llmq_generate_params_default(&params);
      params.sampling = &sampling;
      params.max_new_tokens = 24;
      params.user_data = &r;
      params.on_token = [](int32_t token, const char*, size_t, void* user_data) {
        PerThread* self = static_cast<PerThread*>(user_data);
        self->streamed.push_back(token);
        if (std::this_thread::get_id() != self->id) self->callback_on_own_thread = false;
        return 0;
      };
      for (int round = 0; round < 3; ++round) {
        std::vector<int32_t> out(24, -1);
        r.streamed.clear();
        r.status = llmq_generate(engine_, kPrompt.data(), kPrompt.size(), &params, out.data(), out.size(), nullptr);
        if (r.status != LLMQ_OK) return;
        if (round > 0 && out != r.tokens) r.status = LLMQ_ERR_INTERNAL;
        r.tokens = out;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const PerThread& r : results) {
    EXPECT_EQ(r.status, LLMQ_OK) << llmq_status_string(r.status);
    EXPECT_EQ(r.tokens, expected);
    EXPECT_EQ(r.streamed, expected);
    EXPECT_TRUE(r.callback_on_own_thread);
  }
}

TEST(CapiThreads, ModelCallsFromManyThreads) {
  llmq_model* model = nullptr;
  ASSERT_LLMQ_OK(llmq_model_load(llmq::test::stories_dir().c_str(), nullptr, &model));
  std::vector<std::thread> threads;
  int ok[4] = {0, 0, 0, 0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        int32_t ids[8];
        size_t n = 0, len = 0;
        char text[32];
        llmq_model_info info;
        info.struct_size = sizeof info;
        if (llmq_tokenize(model, "Once upon a time", 16, 1, ids, 8, &n) != LLMQ_OK || n != 5) return;
        if (llmq_detokenize(model, ids, n, 1, text, sizeof text, &len) != LLMQ_OK || len != 16) return;
        if (llmq_model_get_info(model, &info) != LLMQ_OK || info.vocab_size != kVocab) return;
      }
      ok[t] = 1;
    });
  }
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(ok[t], 1) << "thread " << t;
  llmq_model_destroy(model);
}

// ---- Streaming text ----------------------------------------------------------------------------

struct Stream {
  std::vector<int32_t> ids;
  std::string text;
  bool cancel_at_lead_byte = false;
  static int on_token(int32_t token, const char* text, size_t len, void* user_data) {
    Stream* self = static_cast<Stream*>(user_data);
    self->ids.push_back(token);
    self->text.append(text, len);
    // Byte-fallback ids are byte + 3; 0xC2..0xF4 start a multi-byte UTF-8 character.
    return self->cancel_at_lead_byte && token >= 3 + 0xC2 && token <= 3 + 0xF4;
  }
};

std::string decode(llmq_model* model, const std::vector<int32_t>& ids) {
  size_t len = 0;
  llmq_status status = llmq_detokenize(model, ids.data(), ids.size(), 1, nullptr, 0, &len);
  if (status != LLMQ_OK && status != LLMQ_ERR_BUFFER_TOO_SMALL) {
    ADD_FAILURE() << "llmq_detokenize: " << last_error();
    return "";
  }
  std::string text(len, '\0');
  if (len > 0 && llmq_detokenize(model, ids.data(), ids.size(), 1, text.data(), len, &len) != LLMQ_OK)
    ADD_FAILURE() << "llmq_detokenize: " << last_error();
  return text;
}

// The streamed text is what each token adds to the text before it, the prompt included:
// decode(prompt) + streamed == decode(prompt + generated), for sampled text too (temperature 2
// reaches odd tokens, byte-fallback pieces among them).
TEST_F(Capi, StreamedTextContinuesTheDecodedPrompt) {
  const std::string prompt_text = "The caf\xc3\xa9";  // "café": é is a byte-fallback pair
  std::vector<int32_t> prompt(16);
  size_t n = 0;
  ASSERT_LLMQ_OK(llmq_tokenize(model_, prompt_text.data(), prompt_text.size(), 1, prompt.data(), prompt.size(), &n));
  prompt.resize(n);
  EXPECT_EQ(decode(model_, prompt), prompt_text);
  int compared = 0;
  for (uint64_t seed = 0; seed < 12; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    llmq_sampling_params sampling;
    llmq_sampling_params_default(&sampling);
    sampling.temperature = 2.0f;
    sampling.seed = seed;
    Stream stream;
    llmq_generate_params params;
    llmq_generate_params_default(&params);
    params.sampling = &sampling;
    params.max_new_tokens = 16;
    params.ignore_eos = 1;
    params.on_token = Stream::on_token;
    params.user_data = &stream;
    ASSERT_LLMQ_OK(llmq_generate(engine_, prompt.data(), prompt.size(), &params, nullptr, 0, nullptr));
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), stream.ids.begin(), stream.ids.end());
    const std::string decoded = decode(model_, all);
    // Invalid UTF-8 runs of byte tokens decode to one U+FFFD per byte (Hugging Face's ByteFallback)
    // but stream as one U+FFFD per maximal invalid subpart: compare only valid runs.
    if (decoded.find("\xef\xbf\xbd") != std::string::npos) continue;
    ++compared;
    EXPECT_EQ(decoded, decode(model_, prompt) + stream.text);
  }
  EXPECT_GE(compared, 6) << "most samples held invalid UTF-8; pick other seeds";
}

// Generation that ends inside a multi-byte character: the callback gave "" for its leading bytes,
// and the incomplete tail is never streamed (there is no later token to carry it), while
// llmq_detokenize shows it as U+FFFD. The header only promises "may be empty when a token holds
// part of a multi-byte character"; this pins the current behaviour (see the report on flush()).
TEST_F(Capi, StreamDropsAnIncompleteCharacterAtTheEnd) {
  const std::string prompt_text = "The caf\xc3\xa9";
  std::vector<int32_t> prompt(16);
  size_t n = 0;
  ASSERT_LLMQ_OK(llmq_tokenize(model_, prompt_text.data(), prompt_text.size(), 1, prompt.data(), prompt.size(), &n));
  prompt.resize(n);
  // Seed 337 ends on a lead byte (0xE9) at the second token with this build's logits; should the
  // logits differ a little elsewhere, the search goes on over other seeds.
  for (uint64_t i = 0; i < 4000; ++i) {
    const uint64_t seed = (337 + i) % 4000;
    llmq_sampling_params sampling;
    llmq_sampling_params_default(&sampling);
    sampling.temperature = 2.0f;
    sampling.seed = seed;
    Stream stream;
    stream.cancel_at_lead_byte = true;
    llmq_generate_params params;
    llmq_generate_params_default(&params);
    params.sampling = &sampling;
    params.max_new_tokens = 4;
    params.on_token = Stream::on_token;
    params.user_data = &stream;
    llmq_generate_result result;
    result.struct_size = sizeof result;
    ASSERT_LLMQ_OK(llmq_generate(engine_, prompt.data(), prompt.size(), &params, nullptr, 0, &result));
    if (result.finish_reason != LLMQ_FINISH_CANCELLED) continue;
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), stream.ids.begin(), stream.ids.end());
    const std::string decoded = decode(model_, all);
    if (decoded.find("\xef\xbf\xbd") != decoded.size() - 3) continue;  // other invalid bytes before
    EXPECT_EQ(decoded, decode(model_, prompt) + stream.text + "\xef\xbf\xbd");
    return;
  }
  GTEST_SKIP() << "no sample ended on the lead byte of a multi-byte character";
}

// ---- Score and generate agree; seeds -----------------------------------------------------------

TEST_F(Capi, ScoreArgmaxIsGreedyGenerate) {
  const std::vector<int32_t> generated = greedy(engine_, kPrompt, 24);
  ASSERT_EQ(generated.size(), 24u);
  std::vector<int32_t> sequence = kPrompt;
  sequence.insert(sequence.end(), generated.begin(), generated.end());
  std::vector<float> logits(sequence.size() * kVocab, std::numeric_limits<float>::quiet_NaN());
  ASSERT_LLMQ_OK(llmq_score(engine_, sequence.data(), sequence.size(), logits.data(), logits.size()));
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
  // Position p's logits score sequence[p + 1]; greedy picked their argmax (lowest id on ties).
  for (size_t p = kPrompt.size() - 1; p + 1 < sequence.size(); ++p) {
    const float* row = logits.data() + p * kVocab;
    int32_t best = 0;
    for (int32_t v = 1; v < kVocab; ++v)
      if (row[v] > row[best]) best = v;
    EXPECT_EQ(best, sequence[p + 1]) << "position " << p;
  }
  // The scored logits of a prefix are the same whether or not more ids follow.
  std::vector<float> prefix(kPrompt.size() * kVocab);
  ASSERT_LLMQ_OK(llmq_score(engine_, kPrompt.data(), kPrompt.size(), prefix.data(), prefix.size()));
  for (size_t i = 0; i < prefix.size(); ++i) ASSERT_NEAR(prefix[i], logits[i], 1e-4f) << i;
}

TEST_F(Capi, SameSeedSameTokens) {
  llmq_sampling_params sampling;
  llmq_sampling_params_default(&sampling);
  sampling.temperature = 1.0f;
  sampling.seed = 1234;
  const std::vector<int32_t> first = generate(engine_, kPrompt, 32, &sampling);
  ASSERT_EQ(first.size(), 32u);
  EXPECT_EQ(generate(engine_, kPrompt, 32, &sampling), first);

  // Another engine on the same model, with another thread count: the same tokens.
  llmq_engine_params params;
  llmq_engine_params_default(&params);
  params.n_threads = 3;
  llmq_engine* other = nullptr;
  ASSERT_LLMQ_OK(llmq_engine_create(model_, &params, &other));
  EXPECT_EQ(generate(other, kPrompt, 32, &sampling), first);
  llmq_engine_destroy(other);

  // Another seed gives another sample (deterministically so, for this model and these seeds).
  sampling.seed = 1235;
  EXPECT_NE(generate(engine_, kPrompt, 32, &sampling), first);
  // Seed 0 is a seed like any other.
  sampling.seed = 0;
  const std::vector<int32_t> zero = generate(engine_, kPrompt, 32, &sampling);
  EXPECT_EQ(generate(engine_, kPrompt, 32, &sampling), zero);
}

}  // namespace
