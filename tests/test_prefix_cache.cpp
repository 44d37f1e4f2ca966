// Prefix caching: the block allocator's content cache (exact keys, LRU of free cached blocks), and
// the scheduler reusing the blocks of shared prompt prefixes with tokens identical to a run
// without the cache.
#include <gtest/gtest.h>

#include <map>

#include "engine/scheduler.h"
#include "test_util.h"

namespace llmq {
namespace {

std::vector<int32_t> block_of(int32_t first) { return {first, first + 1, first + 2, first + 3}; }

TEST(PrefixCache, LookupTakesAReferenceAndEvictsLeastRecentlyUsed) {
  BlockAllocator a(3);
  const int32_t b0 = a.allocate(), b1 = a.allocate();
  const int64_t e0 = a.register_block(b0, 0, block_of(10));
  const int64_t e1 = a.register_block(b1, e0, block_of(20));
  EXPECT_NE(e0, e1);
  // The same content under another parent is another entry; the same content again is the same.
  int64_t entry = -1;
  EXPECT_EQ(a.lookup(0, block_of(20), &entry), -1);
  EXPECT_EQ(a.lookup(e0, block_of(20), &entry), b1);
  EXPECT_EQ(entry, e1);
  EXPECT_EQ(a.refcount(b1), 2);
  const int32_t b2 = a.allocate();
  EXPECT_EQ(a.register_block(b2, e0, block_of(20)), e1) << "duplicate content keeps the first block's entry";
  a.release(b2);  // unregistered: plain free
  EXPECT_EQ(a.num_free(), 1);
  EXPECT_EQ(a.num_cached_free(), 0);

  a.release(b1);
  a.release(b1);
  a.release(b0);
  EXPECT_EQ(a.num_free(), 3);
  EXPECT_EQ(a.num_cached_free(), 2);  // b1 then b0 on the LRU list, still findable
  EXPECT_EQ(a.lookup(0, block_of(10), &entry), b0);
  a.release(b0);  // b0 is now the most recently used
  // Never-used blocks go first, then the least recently used cached one (b1).
  EXPECT_EQ(a.allocate(), b2);
  EXPECT_EQ(a.allocate(), b1);
  EXPECT_EQ(a.cache_evictions(), 1u);
  EXPECT_EQ(a.lookup(e0, block_of(20), &entry), -1) << "evicted content is gone";
  EXPECT_EQ(a.lookup(0, block_of(10), &entry), b0);
  EXPECT_EQ(a.allocate(), -1);
  EXPECT_EQ(a.cache_hits(), 3u);
}

TEST(PrefixCache, SharedPrefixesReuseBlocksAndGiveIdenticalTokens) {
  auto model = Model::load(test::stories_dir());
  EngineOptions o;
  o.n_threads = 1;
  o.max_batch_tokens = 64;
  std::map<bool, std::map<int64_t, std::vector<int32_t>>> results;
  std::map<bool, uint64_t> cached;
  for (bool caching : {false, true}) {
    Engine engine(model, o);
    Scheduler scheduler(engine, SchedulerOptions{64, 8, caching});
    // A 70-token system prompt shared by every request (4 full blocks of 16, and 6 tokens more),
    // then each request's own question; requests arrive in two waves so that the second finds the
    // first's blocks.
    std::vector<int32_t> system = {1};
    for (int i = 1; i < 70; ++i) system.push_back(int32_t(20 + (i * 37) % 400));
    int64_t id = 1;
    std::vector<RequestEvent> events;
    for (int wave = 0; wave < 2; ++wave) {
      for (int q = 0; q < 4; ++q) {
        Request r;
        r.prompt = system;
        for (int i = 0; i < 5 + q; ++i) r.prompt.push_back(int32_t(100 + 11 * q + i));
        r.max_new_tokens = 12;
        r.ignore_eos = true;
        r.sampling.temperature = wave == 0 ? 0.0f : 0.7f;
        r.sampling.seed = uint64_t(q);
        scheduler.validate(r);
        scheduler.submit(id++, r);
      }
      while (scheduler.step(&events)) {
      }
    }
    for (const RequestEvent& e : events)
      if (e.finished) results[caching][e.id] = e.finished->tokens;
    cached[caching] = scheduler.cached_tokens();
    EXPECT_EQ(engine.allocator().num_free(), engine.allocator().num_blocks());
    if (caching) {
      EXPECT_GT(engine.allocator().cache_hits(), 0u);
    }
  }
  ASSERT_EQ(results[false].size(), 8u);
  EXPECT_EQ(results[true], results[false]) << "the prefix cache changed tokens";
  EXPECT_EQ(cached[false], 0u);
  // Wave 1: the first request computes the 4 shared blocks (64 tokens); the others in the same step
  // compute their own (they were admitted together). Wave 2: all four find them: 4 x 64 tokens.
  EXPECT_GE(cached[true], 4u * 64u);
}

}  // namespace
}  // namespace llmq
