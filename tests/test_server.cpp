// The serving runtime under load: requests submitted from several threads with random lengths,
// sampling params and cancellations, on a KV cache small enough to force preemption, with prefix
// caching on. Every request that finishes must produce exactly what Engine::generate produces for
// it alone (bitwise on the CPU), no request may be lost or reported twice, and every KV block must
// be free at the end. Also: the host-driven mode, callbacks, statistics and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "engine/rng.h"
#include "engine/server.h"
#include "test_util.h"

namespace llmq {
namespace {

std::shared_ptr<const Model> stories() {
  static std::shared_ptr<const Model> model = Model::load(test::stories_dir());
  return model;
}

// Fewer requests under the sanitizers, which run 5-20 times slower.
int stress_requests() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return 240;
#else
  return 1000;
#endif
}

Request random_request(Rng& rng, const std::vector<std::vector<int32_t>>& prefixes) {
  Request r;
  // Half the prompts start with one of a few shared prefixes (the prefix cache's case).
  if (rng.next() % 2 == 0) r.prompt = prefixes[rng.next() % prefixes.size()];
  else r.prompt = {1};
  const int64_t extra = int64_t(rng.next() % 40);
  for (int64_t i = 0; i < extra; ++i) r.prompt.push_back(int32_t(3 + rng.next() % 500));
  r.max_new_tokens = 1 + int32_t(rng.next() % 32);
  r.ignore_eos = rng.next() % 2 == 0;
  switch (rng.next() % 3) {
    case 0:
      r.sampling.temperature = 0.0f;
      break;
    case 1:
      r.sampling.temperature = 0.9f;
      r.sampling.top_p = 0.9f;
      r.sampling.seed = rng.next();
      break;
    default:
      r.sampling.temperature = 1.1f;
      r.sampling.top_k = 20;
      r.sampling.min_p = 0.05f;
      r.sampling.repetition_penalty = 1.2f;
      r.sampling.seed = rng.next();
  }
  r.priority = rng.next() % 8 == 0 ? 1 : 0;
  return r;
}

std::vector<int32_t> run_alone(Engine& engine, const Request& r) {
  GenerateOptions g;
  g.sampling = r.sampling;
  g.max_new_tokens = r.max_new_tokens;
  g.stop_ids = r.stop_ids;
  g.ignore_eos = r.ignore_eos;
  return engine.generate(r.prompt, g).tokens;
}

// Runs the stress test with `total` requests on engines of `tensor_parallel` ranks.
void stress(int total, int32_t tensor_parallel) {
  EngineOptions o;
  o.tensor_parallel = tensor_parallel;
  o.n_threads = 1;  // a model this small gains nothing from more, and the submitters need the cores
  o.max_batch_tokens = 64;
  o.kv_cache_bytes = 20 * 16 * 1280;  // 20 blocks of 16 tokens: a handful of requests at once
  Engine engine(stories(), o);
  std::mutex engine_mutex;
  ServerOptions so;
  so.scheduler = SchedulerOptions{48, 16, true};
  so.peak_bandwidth = 1e10;
  Server server(engine, engine_mutex, so);

  const int kThreads = 4;
  Rng prefix_rng(7);
  std::vector<std::vector<int32_t>> prefixes(5, std::vector<int32_t>{1});
  for (auto& p : prefixes)
    for (int i = 0; i < 33; ++i) p.push_back(int32_t(3 + prefix_rng.next() % 500));

  std::mutex mutex;  // guards the maps below
  std::map<int64_t, Request> submitted;
  std::set<int64_t> cancel_accepted;
  std::atomic<int> refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      Rng rng(1000 + uint64_t(t));
      std::vector<int64_t> mine;
      for (int i = 0; i < total / kThreads; ++i) {
        Request r = random_request(rng, prefixes);
        if (i % 97 == 5) {  // bad input now and then: refused at once, the others go on
          r.prompt.push_back(100000);
          EXPECT_THROW(server.submit(r, nullptr), Error);
          ++refused;
          continue;
        }
        const int64_t id = server.submit(r, reinterpret_cast<void*>(intptr_t(t)));
        mine.push_back(id);
        {
          std::lock_guard<std::mutex> lock(mutex);
          submitted.emplace(id, std::move(r));
        }
        if (rng.next() % 8 == 0) {  // cancel one of ours, maybe finished already
          const int64_t victim = mine[rng.next() % mine.size()];
          if (server.cancel(victim)) {
            std::lock_guard<std::mutex> lock(mutex);
            cancel_accepted.insert(victim);
          }
        }
        if (rng.next() % 16 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });

  // Collect events until every accepted request has finished.
  const auto start = std::chrono::steady_clock::now();
  std::map<int64_t, std::shared_ptr<const FinishedRequest>> done;
  std::map<int64_t, std::vector<int32_t>> streamed;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(10);
  std::vector<ServerEvent> events;
  bool submitting = true;
  for (;;) {
    if (submitting && threads.size() == kThreads) {
      bool all_done = true;
      {
        std::lock_guard<std::mutex> lock(mutex);
        all_done = submitted.size() + size_t(refused.load()) == size_t(total / kThreads * kThreads);
      }
      if (all_done) {
        for (auto& th : threads) th.join();
        submitting = false;
      }
    }
    events.clear();
    server.poll(&events, 256, 50);
    for (ServerEvent& e : events) {
      ASSERT_FALSE(done.count(e.id)) << "request " << e.id << ": an event after its end";
      if (e.finished) {
        done.emplace(e.id, e.finished);
      } else {
        streamed[e.id].push_back(e.token);
        EXPECT_EQ(e.n_generated, int32_t(streamed[e.id].size()));
      }
    }
    if (!submitting) {
      std::lock_guard<std::mutex> lock(mutex);
      if (done.size() == submitted.size()) break;
    }
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "no progress: " << done.size() << " finished";
  }

  const double serve_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const ServerStats stats = server.stats();
  EXPECT_EQ(stats.running + stats.waiting, 0);
  EXPECT_EQ(stats.kv_blocks_used, 0) << "KV blocks leaked";
  {
    std::lock_guard<std::mutex> lock(engine_mutex);
    EXPECT_EQ(engine.allocator().num_free(), engine.allocator().num_blocks()) << "KV blocks leaked";
  }
  EXPECT_GT(stats.preemptions, 0u) << "the KV budget should force preemption";
  EXPECT_GT(stats.cached_tokens, 0u) << "shared prefixes should hit the prefix cache";
  EXPECT_EQ(stats.submitted, submitted.size());
  EXPECT_EQ(stats.finished, submitted.size());
  EXPECT_EQ(stats.failed, 0u);

  EngineOptions alone_options;
  alone_options.n_threads = 1;
  alone_options.tensor_parallel = tensor_parallel;  // bitwise: the same ranks' sums, alone
  Engine alone(stories(), alone_options);
  size_t cancelled = 0, compared = 0;
  for (const auto& [id, request] : submitted) {
    ASSERT_TRUE(done.count(id)) << "request " << id << " lost";
    const FinishedRequest& f = *done.at(id);
    EXPECT_EQ(f.status, LLMQ_OK) << f.error;
    EXPECT_EQ(streamed[id], f.tokens) << "request " << id << ": the token events are its result, in order";
    const std::vector<int32_t> expected = run_alone(alone, request);
    if (f.reason == FinishReason::Cancelled) {
      EXPECT_TRUE(cancel_accepted.count(id)) << "request " << id << " cancelled without being asked";
      ++cancelled;
      ASSERT_LE(f.tokens.size(), expected.size());
      EXPECT_TRUE(std::equal(f.tokens.begin(), f.tokens.end(), expected.begin())) << "request " << id;
    } else {
      ++compared;
      EXPECT_EQ(f.tokens, expected) << "request " << id << " (temperature " << request.sampling.temperature << ")";
    }
  }
  std::printf("served in %.1f s, alone in %.1f s\n", serve_s,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() - serve_s);
  std::printf("%zu requests (%d refused), %zu cancelled, %zu compared in full, %llu preemptions, %llu prompt tokens "
              "from the prefix cache, %llu steps\n",
              submitted.size(), refused.load(), cancelled, compared, (unsigned long long)stats.preemptions,
              (unsigned long long)stats.cached_tokens, (unsigned long long)stats.steps);
  EXPECT_GT(cancelled, 0u);
  EXPECT_GT(refused.load(), 0);
}

TEST(Server, StressFromFourThreadsMatchesGenerateAlone) { stress(stress_requests(), 1); }

// The same at tensor parallelism 2 (in-process communicator): the scheduler runs once above the
// ranks, and every request equals generate() alone on a tp-2 engine.
TEST(Server, StressAtTensorParallel2) { stress(stress_requests() / 4, 2); }

TEST(Server, HostDrivenWithCallbackAndStats) {
  EngineOptions o;
  o.n_threads = 1;
  Engine engine(stories(), o);
  std::mutex engine_mutex;
  std::vector<ServerEvent> events;
  ServerOptions so;
  so.own_thread = false;
  so.peak_bandwidth = 1e9;
  so.on_event = [&](const ServerEvent& e) { events.push_back(e); };  // on this (the stepping) thread
  Server server(engine, engine_mutex, so);
  EXPECT_THROW(server.poll(&events, 1, 0), Error);

  Request r;
  r.prompt = {1, 403, 407, 261, 378};  // "Once upon a time" (the reference prompt)
  r.sampling.temperature = 0;
  r.max_new_tokens = 20;
  int tag = 0;
  const int64_t id = server.submit(r, &tag);
  size_t steps = 0;
  while (server.step() > 0) ASSERT_LT(++steps, 100u);
  ASSERT_FALSE(events.empty());
  ASSERT_TRUE(events.back().finished);
  EXPECT_EQ(events.back().id, id);
  EXPECT_EQ(events.back().user_data, &tag);
  EXPECT_EQ(events.back().finished->tokens, run_alone(engine, r));
  std::string text;
  for (const ServerEvent& e : events) text += e.text;
  EXPECT_EQ(text, engine.model().tokenizer()->decode(events.back().finished->tokens, false).substr(0, text.size()));
  EXPECT_FALSE(server.cancel(id)) << "a finished request cannot be cancelled";
  EXPECT_FALSE(server.cancel(987654));

  const ServerStats s = server.stats();
  EXPECT_EQ(s.finished, 1u);
  EXPECT_EQ(s.generated_tokens, events.back().finished->tokens.size());
  EXPECT_EQ(s.prompt_tokens, r.prompt.size());
  EXPECT_EQ(s.ttft.total(), 1u);
  EXPECT_GT(s.mean_decode_mbu, 0);
  EXPECT_GT(s.last_decode_mbu, 0);
  // MBU = (weights + KV read) / time / peak: at a 1 GB/s "peak" a step reading ~0.5 MB in well under
  // 10 ms cannot be below 5%; and the definition is checked in the quantities it is made of.
  EXPECT_EQ(s.peak_bandwidth, 1e9);
}

TEST(Server, RefusesBadRequestsWithClearErrors) {
  EngineOptions o;
  o.n_threads = 1;
  o.kv_cache_bytes = 8 * 16 * 1280;  // 8 blocks: 128 tokens
  Engine engine(stories(), o);
  std::mutex engine_mutex;
  ServerOptions so;
  so.peak_bandwidth = 1e9;
  Server server(engine, engine_mutex, so);
  auto refused = [&](Request r, llmq_status status, const char* needle) {
    test::expect_error([&] { server.submit(r, nullptr); }, status, needle);
  };
  Request ok;
  ok.prompt = {1, 403};
  ok.max_new_tokens = 4;
  Request r = ok;
  r.prompt.clear();
  refused(r, LLMQ_ERR_INVALID_ARGUMENT, "prompt is empty");
  r = ok;
  r.prompt[1] = -3;
  refused(r, LLMQ_ERR_INVALID_ARGUMENT, "prompt_ids[1] = -3");
  r = ok;
  r.stop_ids = {512};
  refused(r, LLMQ_ERR_INVALID_ARGUMENT, "stop_ids[0] = 512");
  r = ok;
  r.max_new_tokens = 0;
  refused(r, LLMQ_ERR_INVALID_ARGUMENT, "max_new_tokens");
  r = ok;
  r.max_new_tokens = 600;  // stories260K's context is 512
  refused(r, LLMQ_ERR_CONTEXT_OVERFLOW, "exceed the model's context of 512");
  r = ok;
  r.max_new_tokens = 200;
  refused(r, LLMQ_ERR_KV_CACHE_FULL, "can never fit");
  r = ok;
  r.sampling.top_p = 0;
  refused(r, LLMQ_ERR_INVALID_ARGUMENT, "top_p");
  r = ok;
  r.sampling.temperature = -1;
  refused(r, LLMQ_ERR_INVALID_ARGUMENT, "temperature");
  EXPECT_FALSE(server.cancel(42));
  // The server still serves.
  const int64_t id = server.submit(ok, nullptr);
  std::vector<ServerEvent> events;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (events.empty() || !events.back().finished) {
    server.poll(&events, 16, 100);
    ASSERT_LT(std::chrono::steady_clock::now(), deadline);
  }
  EXPECT_EQ(events.back().id, id);
  EXPECT_EQ(events.back().finished->status, LLMQ_OK);
}

TEST(Server, ARequestStarvedOfBlocksByAnotherUserFailsAlone) {
  EngineOptions o;
  o.n_threads = 1;
  o.kv_cache_bytes = 8 * 16 * 1280;  // 8 blocks
  Engine engine(stories(), o);
  std::mutex engine_mutex;
  ServerOptions so;
  so.own_thread = false;
  so.peak_bandwidth = 1e9;
  Server server(engine, engine_mutex, so);
  auto held = engine.new_sequence();  // another user of the engine (as llmq_generate would be)
  ASSERT_TRUE(held->reserve(7 * 16));
  Request big;
  big.prompt = std::vector<int32_t>(40, 7);  // 3 blocks: fits the cache, not what is left of it
  big.max_new_tokens = 4;
  const int64_t id = server.submit(big, nullptr);
  server.step();
  std::vector<ServerEvent> events;
  ASSERT_EQ(server.poll(&events, 8, 0), 1u);
  ASSERT_TRUE(events[0].finished);
  EXPECT_EQ(events[0].id, id);
  EXPECT_EQ(events[0].finished->reason, FinishReason::Error);
  EXPECT_EQ(events[0].finished->status, LLMQ_ERR_KV_CACHE_FULL);
  held.reset();
  server.submit(big, nullptr);  // the blocks are back: it runs
  while (server.step() > 0) {
  }
  events.clear();
  server.poll(&events, 16, 0);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().finished->status, LLMQ_OK);
  EXPECT_EQ(events.back().finished->tokens.size(), 4u);
}

TEST(Histogram, BucketsAndQuantiles) {
  Histogram h;
  EXPECT_EQ(h.quantile(0.5), 0);
  EXPECT_DOUBLE_EQ(Histogram::upper_bound(0), 1e-4);
  EXPECT_DOUBLE_EQ(Histogram::upper_bound(2), 2e-4);
  EXPECT_TRUE(std::isinf(Histogram::upper_bound(Histogram::kBuckets - 1)));
  for (int i = 0; i < 100; ++i) h.add(0.010);  // 10 ms: bucket [8.0 ms, 11.3 ms)
  h.add(5.0);
  EXPECT_EQ(h.total(), 101u);
  EXPECT_GE(h.quantile(0.5), 0.008);
  EXPECT_LT(h.quantile(0.5), 0.0114);
  EXPECT_GE(h.quantile(1.0), 4.5);  // the 5 s sample's bucket [4.53 s, 6.4 s)
  int bucket_of_10ms = 0;
  while (!(0.010 < Histogram::upper_bound(bucket_of_10ms))) ++bucket_of_10ms;
  EXPECT_EQ(h.counts()[size_t(bucket_of_10ms)], 100u);
}

}  // namespace
}  // namespace llmq
