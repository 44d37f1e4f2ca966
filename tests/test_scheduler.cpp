// Continuous batching: under preemption and cancellation, every request produces exactly what
// Engine::generate produces for it alone (bitwise on the CPU), and no KV block leaks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>

#include "engine/rng.h"
#include "engine/scheduler.h"
#include "test_util.h"

namespace llmq {
namespace {

std::shared_ptr<const Model> stories() {
  static std::shared_ptr<const Model> model = Model::load(test::stories_dir());
  return model;
}

TEST(Scheduler, MatchesGenerateAloneUnderPreemption) {
  EngineOptions o;
  o.n_threads = 2;
  o.max_batch_tokens = 64;
  o.kv_cache_bytes = 24 * 16 * 1280;  // 24 blocks of 16 tokens: far less than the requests need at once
  Engine engine(stories(), o);
  Scheduler scheduler(engine, SchedulerOptions{48, 12});

  EngineOptions alone_options;
  alone_options.n_threads = 1;
  Engine alone(stories(), alone_options);

  Rng rng(2024);
  int64_t next_id = 1;
  std::map<int64_t, Request> requests;
  std::map<int64_t, std::vector<int32_t>> expected;
  auto submit_random = [&] {
    Request r;
    const int64_t len = 1 + int64_t(rng.next() % 60);
    r.prompt.push_back(1);
    for (int64_t i = 1; i < len; ++i) r.prompt.push_back(int32_t(3 + rng.next() % 500));
    r.max_new_tokens = 1 + int32_t(rng.next() % 40);
    r.ignore_eos = rng.next() % 2 == 0;
    if (rng.next() % 2 == 0) {  // seeded sampling, else greedy
      r.sampling.temperature = 0.8f;
      r.sampling.top_k = 40;
      r.sampling.seed = rng.next() % 1000;
    } else {
      r.sampling.temperature = 0.0f;
    }
    const int64_t id = next_id++;
    scheduler.validate(r);
    scheduler.submit(id, r);
    GenerateOptions g;
    g.sampling = r.sampling;
    g.max_new_tokens = r.max_new_tokens;
    g.ignore_eos = r.ignore_eos;
    expected[id] = alone.generate(r.prompt, g).tokens;
    requests[id] = r;
  };
  for (int i = 0; i < 40; ++i) submit_random();
  // Invalid requests are refused with errors naming the field.
  Request bad;
  bad.prompt = {1, 9999};
  test::expect_error([&] { scheduler.validate(bad); }, LLMQ_ERR_INVALID_ARGUMENT, "prompt_ids[1] = 9999");
  Request huge;
  huge.prompt = std::vector<int32_t>(400, 5);
  huge.max_new_tokens = 100;
  test::expect_error([&] { scheduler.validate(huge); }, LLMQ_ERR_KV_CACHE_FULL, "can never fit");
  EXPECT_FALSE(scheduler.cancel(123456));

  std::map<int64_t, FinishedRequest> done;
  std::map<int64_t, std::vector<int32_t>> streamed;
  std::set<int64_t> cancelled;
  std::vector<RequestEvent> events;
  int steps = 0;
  while (scheduler.step(&events) || !events.empty()) {
    for (RequestEvent& e : events) {
      ASSERT_FALSE(done.count(e.id)) << "event for request " << e.id << " after it finished";
      if (e.finished) {
        done.emplace(e.id, *e.finished);
      } else {
        streamed[e.id].push_back(e.token);
      }
    }
    events.clear();
    if (++steps == 5)
      for (int i = 0; i < 20; ++i) submit_random();  // arrivals while running
    if (steps % 7 == 0 && !requests.empty()) {       // cancel one now and then
      const int64_t victim = requests.begin()->first + int64_t(rng.next() % 60);
      if (!done.count(victim) && requests.count(victim) && scheduler.cancel(victim)) cancelled.insert(victim);
    }
    ASSERT_LT(steps, 20000) << "no progress";
  }
  EXPECT_GT(scheduler.preemptions(), 0) << "the KV budget should force preemption";
  EXPECT_FALSE(cancelled.empty());
  std::printf("%zu requests, %d steps, %lld preemptions, %zu cancelled\n", done.size(), steps,
              (long long)scheduler.preemptions(), cancelled.size());
  EXPECT_EQ(engine.allocator().num_free(), engine.allocator().num_blocks()) << "KV blocks leaked";
  for (const auto& [id, tokens] : expected) {
    ASSERT_TRUE(done.count(id)) << "request " << id << " lost";
    const FinishedRequest& f = done.at(id);
    EXPECT_EQ(f.status, LLMQ_OK);
    EXPECT_EQ(streamed[id], f.tokens) << "the token events are the result, in order";
    if (cancelled.count(id)) {
      EXPECT_EQ(f.reason, FinishReason::Cancelled);
      // What it produced before the cancel is a prefix of what it produces alone.
      EXPECT_LE(f.tokens.size(), tokens.size());
      EXPECT_TRUE(std::equal(f.tokens.begin(), f.tokens.end(), tokens.begin())) << id;
    } else {
      EXPECT_EQ(f.tokens, tokens) << "request " << id;
    }
  }
  EXPECT_EQ(done.size(), expected.size());
}

}  // namespace
}  // namespace llmq
