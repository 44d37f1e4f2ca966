// The serving part of the C ABI (llmq_server_*), through llmq.h only: events by poll and by
// callback (and on which thread), the host-driven mode, cancellation, the per-request errors that
// leave the server serving, older smaller event structs, statistics, and handle lifetimes.
#include "llmq.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace {

const std::vector<int32_t> kPrompt = {1, 403, 407, 261, 378};  // "Once upon a time" with BOS
// llama2.c run.c's greedy continuation of kPrompt (reference/reference_cases.json).
const std::vector<int32_t> kReference = {432, 383, 286, 261, 376, 298, 315, 421,
                                         395, 317, 426, 338, 401, 396, 267, 337};

#define ASSERT_LLMQ_OK(call) ASSERT_EQ((call), LLMQ_OK) << #call << ": " << llmq_last_error()

// `status` with a message containing `needle`.
::testing::AssertionResult fails_with(llmq_status got, llmq_status status, const std::string& needle) {
  const std::string message = llmq_last_error();
  if (got != status)
    return ::testing::AssertionFailure() << "got " << llmq_status_string(got) << " \"" << message << "\"";
  if (message.find(needle) == std::string::npos)
    return ::testing::AssertionFailure() << "message \"" << message << "\" lacks \"" << needle << "\"";
  return ::testing::AssertionSuccess();
}

struct Collected {
  std::vector<int32_t> tokens;
  std::string text;
  llmq_event finished{};
  std::string error;
  bool done = false;
};

class CapiServer : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_LLMQ_OK(llmq_model_load(llmq::test::stories_dir().c_str(), nullptr, &model_));
    llmq_engine_params params;
    llmq_engine_params_default(&params);
    params.n_threads = 1;
    ASSERT_LLMQ_OK(llmq_engine_create(model_, &params, &engine_));
  }
  void TearDown() override {
    llmq_server_destroy(server_);
    llmq_engine_destroy(engine_);
    llmq_model_destroy(model_);
  }

  llmq_server_params params(int own_thread) {
    llmq_server_params p;
    llmq_server_params_default(&p);
    p.own_thread = own_thread;
    p.peak_bandwidth = 1e10;  // no measurement: keeps the tests fast
    return p;
  }

  static llmq_request_params greedy(int32_t max_new_tokens, void* user_data = nullptr) {
    llmq_request_params r;
    llmq_request_params_default(&r);
    static llmq_sampling_params s;
    llmq_sampling_params_default(&s);
    s.temperature = 0;
    r.sampling = &s;
    r.max_new_tokens = max_new_tokens;
    r.ignore_eos = 1;
    r.user_data = user_data;
    return r;
  }

  // Polls until request `id` has finished (60 s at most).
  void poll_until_finished(llmq_request_id id, Collected* out) {
    llmq_event events[8];
    events[0].struct_size = sizeof(llmq_event);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!out->done) {
      size_t n = 0;
      ASSERT_LLMQ_OK(llmq_server_poll(server_, events, 8, &n, 100));
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(events[i].struct_size, sizeof(llmq_event));
        ASSERT_EQ(events[i].request_id, id);
        if (events[i].type == LLMQ_EVENT_TOKEN) {
          out->tokens.push_back(events[i].token);
          out->text.append(events[i].text, events[i].text_len);
          EXPECT_EQ(events[i].n_generated, int32_t(out->tokens.size()));
        } else {
          out->finished = events[i];
          out->error = events[i].error;
          out->done = true;
        }
      }
      ASSERT_LT(std::chrono::steady_clock::now(), deadline);
    }
  }

  llmq_model* model_ = nullptr;
  llmq_engine* engine_ = nullptr;
  llmq_server* server_ = nullptr;
};

TEST_F(CapiServer, StreamsTheReferenceTokensThroughPoll) {
  llmq_server_params p = params(1);
  ASSERT_LLMQ_OK(llmq_server_create(engine_, &p, &server_));
  int tag = 0;
  llmq_request_params r = greedy(16, &tag);
  llmq_request_id id = -1;
  ASSERT_LLMQ_OK(llmq_server_submit(server_, kPrompt.data(), kPrompt.size(), &r, &id));
  Collected c;
  poll_until_finished(id, &c);
  EXPECT_EQ(c.tokens, kReference);
  EXPECT_EQ(c.finished.type, LLMQ_EVENT_FINISHED);
  EXPECT_EQ(c.finished.token, -1);
  EXPECT_EQ(c.finished.user_data, &tag);
  EXPECT_EQ(c.finished.finish_reason, LLMQ_FINISH_LENGTH);
  EXPECT_EQ(c.finished.status, LLMQ_OK);
  EXPECT_EQ(c.error, "");
  EXPECT_EQ(c.finished.n_generated, 16);
  EXPECT_EQ(c.finished.n_prompt_tokens, 5);
  EXPECT_GT(c.finished.time_to_first_token_s, 0);
  EXPECT_GE(c.finished.time_to_first_token_s, c.finished.queue_time_s);
  EXPECT_GT(c.finished.decode_time_s, 0);
  char text[256];
  size_t len = 0;
  ASSERT_LLMQ_OK(llmq_detokenize(model_, kReference.data(), kReference.size(), 0, text, sizeof text, &len));
  EXPECT_EQ(c.text, std::string(text, len));

  llmq_server_stats s;
  s.struct_size = sizeof s;
  ASSERT_LLMQ_OK(llmq_server_get_stats(server_, &s));
  EXPECT_EQ(s.requests_submitted, 1u);
  EXPECT_EQ(s.requests_finished, 1u);
  EXPECT_EQ(s.generated_tokens, 16u);
  EXPECT_EQ(s.prompt_tokens, 5u);
  EXPECT_EQ(s.running + s.waiting, 0);
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_EQ(s.peak_bandwidth, 1e10);
  EXPECT_GT(s.mean_decode_mbu, 0);
  uint64_t in_histogram = 0;
  for (uint64_t n : s.ttft_histogram) in_histogram += n;
  EXPECT_EQ(in_histogram, 1u);
  EXPECT_GT(s.ttft_p50_s, 0);
  EXPECT_GE(s.tpot_p99_s, s.tpot_p50_s);
  EXPECT_EQ(llmq_histogram_bound(0), 1e-4);
  EXPECT_TRUE(std::isinf(llmq_histogram_bound(LLMQ_HISTOGRAM_BUCKETS - 1)));
  EXPECT_TRUE(std::isnan(llmq_histogram_bound(LLMQ_HISTOGRAM_BUCKETS)));
}

void record_event(const llmq_event* e, void* user_data);

struct CallbackLog {
  std::mutex mutex;
  std::vector<llmq_event> events;
  std::vector<std::thread::id> threads;
};

void record_event(const llmq_event* e, void* user_data) {
  auto* log = static_cast<CallbackLog*>(user_data);
  std::lock_guard<std::mutex> lock(log->mutex);
  log->events.push_back(*e);
  log->threads.push_back(std::this_thread::get_id());
}

TEST_F(CapiServer, CallbackRunsOnTheServerThread) {
  CallbackLog log;
  llmq_server_params p = params(1);
  p.on_event = record_event;
  p.user_data = &log;
  ASSERT_LLMQ_OK(llmq_server_create(engine_, &p, &server_));
  llmq_request_params r = greedy(16);
  llmq_request_id id = 0;
  ASSERT_LLMQ_OK(llmq_server_submit(server_, kPrompt.data(), kPrompt.size(), &r, &id));
  llmq_event e;
  e.struct_size = sizeof e;
  size_t n = 0;
  EXPECT_TRUE(fails_with(llmq_server_poll(server_, &e, 1, &n, 0), LLMQ_ERR_INVALID_ARGUMENT, "on_event"));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(log.mutex);
      if (!log.events.empty() && log.events.back().type == LLMQ_EVENT_FINISHED) break;
    }
    ASSERT_LT(std::chrono::steady_clock::now(), deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  std::lock_guard<std::mutex> lock(log.mutex);
  ASSERT_EQ(log.events.size(), kReference.size() + 1);
  for (size_t i = 0; i < kReference.size(); ++i) EXPECT_EQ(log.events[i].token, kReference[i]);
  for (std::thread::id t : log.threads) {
    EXPECT_NE(t, std::this_thread::get_id());
    EXPECT_EQ(t, log.threads.front()) << "one server thread calls back";
  }
}

TEST_F(CapiServer, HostDrivenSteps) {
  llmq_server_params p = params(0);
  ASSERT_LLMQ_OK(llmq_server_create(engine_, &p, &server_));
  llmq_request_params r = greedy(16);
  llmq_request_id a = 0, b = 0;
  ASSERT_LLMQ_OK(llmq_server_submit(server_, kPrompt.data(), kPrompt.size(), &r, &a));
  ASSERT_LLMQ_OK(llmq_server_submit(server_, kPrompt.data(), 3, &r, &b));
  EXPECT_NE(a, b);
  size_t unfinished = 99, steps = 0;
  do {
    ASSERT_LLMQ_OK(llmq_server_step(server_, &unfinished));
    ASSERT_LT(++steps, 100u);
  } while (unfinished > 0);
  EXPECT_EQ(steps, 16u) << "both prompts prefill in the first step, then one token per step";
  std::vector<llmq_event> events(64);
  events[0].struct_size = sizeof(llmq_event);
  size_t n = 0;
  ASSERT_LLMQ_OK(llmq_server_poll(server_, events.data(), events.size(), &n, 0));
  ASSERT_EQ(n, 34u);  // 16 tokens and an end, twice
  std::vector<int32_t> tokens_a;
  for (size_t i = 0; i < n; ++i)
    if (events[i].request_id == a && events[i].type == LLMQ_EVENT_TOKEN) tokens_a.push_back(events[i].token);
  EXPECT_EQ(tokens_a, kReference);
  ASSERT_LLMQ_OK(llmq_server_poll(server_, events.data(), events.size(), &n, 10));
  EXPECT_EQ(n, 0u) << "a timeout is not an error";

  llmq_server* threaded = nullptr;
  llmq_server_params tp = params(1);
  ASSERT_LLMQ_OK(llmq_server_create(engine_, &tp, &threaded));
  EXPECT_TRUE(fails_with(llmq_server_step(threaded, nullptr), LLMQ_ERR_INVALID_ARGUMENT, "own thread"));
  llmq_server_destroy(threaded);
}

TEST_F(CapiServer, CancelEndsARunningRequest) {
  llmq_server_params p = params(0);
  ASSERT_LLMQ_OK(llmq_server_create(engine_, &p, &server_));
  llmq_request_params r = greedy(200);
  llmq_request_id id = 0;
  ASSERT_LLMQ_OK(llmq_server_submit(server_, kPrompt.data(), kPrompt.size(), &r, &id));
  size_t unfinished = 0;
  for (int i = 0; i < 3; ++i) ASSERT_LLMQ_OK(llmq_server_step(server_, &unfinished));
  ASSERT_LLMQ_OK(llmq_server_cancel(server_, id));
  ASSERT_LLMQ_OK(llmq_server_step(server_, &unfinished));
  EXPECT_EQ(unfinished, 0u);
  Collected c;
  poll_until_finished(id, &c);
  EXPECT_EQ(c.finished.finish_reason, LLMQ_FINISH_CANCELLED);
  EXPECT_EQ(c.finished.status, LLMQ_OK);
  EXPECT_EQ(c.tokens, std::vector<int32_t>(kReference.begin(), kReference.begin() + 3));
  EXPECT_TRUE(fails_with(llmq_server_cancel(server_, id), LLMQ_ERR_INVALID_ARGUMENT, "no unfinished request has id"));
  EXPECT_TRUE(fails_with(llmq_server_cancel(server_, 12345), LLMQ_ERR_INVALID_ARGUMENT, "12345"));
  llmq_server_stats s;
  s.struct_size = sizeof s;
  ASSERT_LLMQ_OK(llmq_server_get_stats(server_, &s));
  EXPECT_EQ(s.requests_cancelled, 1u);
}

TEST_F(CapiServer, BadRequestsAreRefusedAndTheServerGoesOn) {
  llmq_server_params p = params(1);
  ASSERT_LLMQ_OK(llmq_server_create(engine_, &p, &server_));
  llmq_request_id id = 0;
  llmq_request_params r = greedy(8);
  const int32_t bad_ids[] = {1, 512};
  EXPECT_TRUE(fails_with(llmq_server_submit(nullptr, kPrompt.data(), 5, &r, &id), LLMQ_ERR_INVALID_ARGUMENT, "server"));
  EXPECT_TRUE(fails_with(llmq_server_submit(server_, kPrompt.data(), 5, &r, nullptr), LLMQ_ERR_INVALID_ARGUMENT, "out_id"));
  EXPECT_TRUE(fails_with(llmq_server_submit(server_, nullptr, 5, &r, &id), LLMQ_ERR_INVALID_ARGUMENT, "prompt_ids"));
  EXPECT_TRUE(fails_with(llmq_server_submit(server_, kPrompt.data(), 0, &r, &id), LLMQ_ERR_INVALID_ARGUMENT, "empty"));
  EXPECT_TRUE(fails_with(llmq_server_submit(server_, bad_ids, 2, &r, &id), LLMQ_ERR_INVALID_ARGUMENT, "prompt_ids[1] = 512"));
  llmq_request_params long_request = greedy(600);
  EXPECT_TRUE(fails_with(llmq_server_submit(server_, kPrompt.data(), 5, &long_request, &id), LLMQ_ERR_CONTEXT_OVERFLOW,
                         "context of 512"));
  llmq_sampling_params s;
  llmq_sampling_params_default(&s);
  s.top_p = 0;
  r.sampling = &s;
  EXPECT_TRUE(fails_with(llmq_server_submit(server_, kPrompt.data(), 5, &r, &id), LLMQ_ERR_INVALID_ARGUMENT, "top_p"));
  s.top_p = 1;
  s.temperature = -0.5f;
  EXPECT_TRUE(fails_with(llmq_server_submit(server_, kPrompt.data(), 5, &r, &id), LLMQ_ERR_INVALID_ARGUMENT, "temperature"));
  llmq_request_params too_big = greedy(8);
  too_big.struct_size = sizeof too_big + 8;
  EXPECT_TRUE(fails_with(llmq_server_submit(server_, kPrompt.data(), 5, &too_big, &id), LLMQ_ERR_INVALID_ARGUMENT, "struct_size"));

  llmq_event e;
  size_t n = 0;
  e.struct_size = 0;
  EXPECT_TRUE(fails_with(llmq_server_poll(server_, &e, 1, &n, 0), LLMQ_ERR_INVALID_ARGUMENT, "struct_size"));
  e.struct_size = sizeof e;
  EXPECT_TRUE(fails_with(llmq_server_poll(server_, &e, 0, &n, 0), LLMQ_ERR_INVALID_ARGUMENT, "capacity"));
  EXPECT_TRUE(fails_with(llmq_server_poll(server_, nullptr, 1, &n, 0), LLMQ_ERR_INVALID_ARGUMENT, "events"));
  EXPECT_TRUE(fails_with(llmq_server_poll(server_, &e, 1, &n, -2), LLMQ_ERR_INVALID_ARGUMENT, "timeout_ms"));

  llmq_server_params bad = params(1);
  llmq_server* other = nullptr;
  bad.max_batched_tokens = 100000;
  EXPECT_TRUE(fails_with(llmq_server_create(engine_, &bad, &other), LLMQ_ERR_INVALID_ARGUMENT, "max_batched_tokens"));
  bad = params(1);
  bad.max_running = 0;
  EXPECT_TRUE(fails_with(llmq_server_create(engine_, &bad, &other), LLMQ_ERR_INVALID_ARGUMENT, "max_running"));
  bad = params(1);
  bad.peak_bandwidth = -1;
  EXPECT_TRUE(fails_with(llmq_server_create(engine_, &bad, &other), LLMQ_ERR_INVALID_ARGUMENT, "peak_bandwidth"));
  EXPECT_EQ(other, nullptr);

  // The server still serves, and counted none of the refused requests.
  r = greedy(16);
  ASSERT_LLMQ_OK(llmq_server_submit(server_, kPrompt.data(), kPrompt.size(), &r, &id));
  Collected c;
  poll_until_finished(id, &c);
  EXPECT_EQ(c.tokens, kReference);
  llmq_server_stats stats;
  stats.struct_size = sizeof stats;
  ASSERT_LLMQ_OK(llmq_server_get_stats(server_, &stats));
  EXPECT_EQ(stats.requests_submitted, 1u);
}

TEST_F(CapiServer, OlderSmallerEventStructsGetTheirFieldsAtTheirStride) {
  llmq_server_params p = params(0);
  ASSERT_LLMQ_OK(llmq_server_create(engine_, &p, &server_));
  llmq_request_params r = greedy(2);
  llmq_request_id id = 0;
  ASSERT_LLMQ_OK(llmq_server_submit(server_, kPrompt.data(), kPrompt.size(), &r, &id));
  size_t unfinished = 1;
  while (unfinished > 0) ASSERT_LLMQ_OK(llmq_server_step(server_, &unfinished));
  // A caller that knows only the fields up to user_data: 3 events in a packed array of that size.
  const size_t old_size = offsetof(llmq_event, user_data) + sizeof(void*);
  std::vector<unsigned char> buffer(old_size * 3 + 16, 0xAB);
  llmq_event* events = reinterpret_cast<llmq_event*>(buffer.data());
  events->struct_size = old_size;
  size_t n = 0;
  ASSERT_LLMQ_OK(llmq_server_poll(server_, events, 3, &n, 0));
  ASSERT_EQ(n, 3u);
  for (size_t i = 0; i < 3; ++i) {
    llmq_event e;
    std::memcpy(&e, buffer.data() + i * old_size, old_size);
    EXPECT_EQ(e.struct_size, old_size);
    EXPECT_EQ(e.request_id, id);
    EXPECT_EQ(e.type, i < 2 ? LLMQ_EVENT_TOKEN : LLMQ_EVENT_FINISHED);
    if (i < 2) {
      EXPECT_EQ(e.token, kReference[i]);
    }
  }
  for (size_t i = old_size * 3; i < buffer.size(); ++i) ASSERT_EQ(buffer[i], 0xAB) << "written past the array";
}

TEST_F(CapiServer, OutlivesItsEngineHandleAndReusesPrefixes) {
  llmq_server_params p = params(1);
  p.prefix_caching = 1;
  ASSERT_LLMQ_OK(llmq_server_create(engine_, &p, &server_));
  llmq_engine_destroy(engine_);  // the server keeps the engine alive
  engine_ = nullptr;
  std::vector<int32_t> prompt = {1};
  for (int i = 0; i < 40; ++i) prompt.push_back(100 + i);
  llmq_request_params r = greedy(8);
  std::vector<int32_t> first;
  for (int round = 0; round < 2; ++round) {
    llmq_request_id id = 0;
    ASSERT_LLMQ_OK(llmq_server_submit(server_, prompt.data(), prompt.size(), &r, &id));
    Collected c;
    poll_until_finished(id, &c);
    if (round == 0) {
      first = c.tokens;
      EXPECT_EQ(c.finished.n_cached_tokens, 0);
    } else {
      EXPECT_EQ(c.tokens, first);
      EXPECT_EQ(c.finished.n_cached_tokens, 32) << "two full blocks of 16 from the first round";
    }
  }
  llmq_server_stats s;
  s.struct_size = sizeof s;
  ASSERT_LLMQ_OK(llmq_server_get_stats(server_, &s));
  EXPECT_EQ(s.cached_prompt_tokens, 32u);
  EXPECT_GT(s.kv_blocks_cached, 0);
}

}  // namespace
