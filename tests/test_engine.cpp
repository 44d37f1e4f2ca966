// The engine's forward pass over flattened batches: batch and thread-count invariance (bitwise),
// chunked prefill, the paged KV cache running out, context limits and argument errors.
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <string>

#include "engine/device.h"
#include "engine/engine.h"
#include "engine/error.h"
#include "greedy_check.h"
#include "test_util.h"

namespace {

using namespace llmq;

std::shared_ptr<const Model> stories() {
  static std::shared_ptr<const Model> model = Model::load(test::stories_dir());
  return model;
}

EngineOptions options_with(int threads, int max_batch_tokens = 512, uint64_t kv_bytes = 0) {
  EngineOptions o;
  o.n_threads = threads;
  o.max_batch_tokens = max_batch_tokens;
  o.kv_cache_bytes = kv_bytes;
  return o;
}

std::vector<int32_t> story_tokens(int n, int32_t salt) {
  std::vector<int32_t> ids{1};
  for (int i = 1; i < n; ++i) ids.push_back(3 + int32_t((i * 37 + salt * 101) % 500));
  return ids;
}

// Logits of every prefix of `ids`, run alone in one engine.
std::vector<float> logits_alone(Engine& engine, const std::vector<int32_t>& ids) {
  std::vector<float> logits(ids.size() * 512);
  engine.score(ids, logits.data());
  return logits;
}

// The MLP's down projection runs as silu_mul_linear, or as silu_mul then linear when the fp32
// product is needed (a calibration observer sees "down_in"): the same logits to the bit, in every
// weight mode, and the observer sees the product once per layer.
TEST(Engine, DownProjectionPathsGiveTheSameLogits) {
  const std::vector<int32_t> ids = story_tokens(23, 4);
  for (QuantMode quant : {QuantMode::None, QuantMode::Int8WeightOnly, QuantMode::Fp8}) {
    EngineOptions o = options_with(2);
    o.quant = quant;
    Engine fused(stories(), o), observed(stories(), o);
    int down_in = 0;
    observed.set_observer([&](int32_t, const char* site, const Tensor&) { down_in += std::string(site) == "down_in"; });
    const std::vector<float> a = logits_alone(fused, ids), b = logits_alone(observed, ids);
    EXPECT_EQ(down_in, int(stories()->config().num_layers)) << quant_mode_name(quant);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << quant_mode_name(quant);
  }
}

// Greedy decoding (chunked prefill, then one token a step) picks exactly the argmax of the scores
// of the whole sequence (one pass), in every weight and cache mode: the CPU backend is batch
// invariant, so the gap is 0, not small. The GPU end-to-end test judges GPU tokens by these scores.
TEST(Engine, GreedyTokensAreTheArgmaxesOfTheScores) {
  const std::vector<int32_t> prompt = story_tokens(9, 5);
  for (QuantMode quant : {QuantMode::None, QuantMode::Int8WeightOnly, QuantMode::Fp8}) {
    for (llmq_kv_dtype kv : {LLMQ_KV_DTYPE_AUTO, LLMQ_KV_DTYPE_INT8, LLMQ_KV_DTYPE_FP8}) {
      EngineOptions o = options_with(2, 7);
      o.quant = quant;
      o.kv_dtype = kv;
      Engine engine(stories(), o);
      GenerateOptions g;
      g.sampling.temperature = 0.0f;
      g.max_new_tokens = 60;
      const std::vector<int32_t> tokens = engine.generate(prompt, g).tokens;
      ASSERT_EQ(tokens.size(), 60u);
      const std::vector<float> gaps = test::greedy_gaps(engine, prompt, tokens);
      for (size_t i = 0; i < gaps.size(); ++i)
        EXPECT_EQ(gaps[i], 0.0f) << quant_mode_name(quant) << " kv " << int(kv) << ", token " << i;
    }
  }
}

TEST(Engine, BatchInvarianceIsBitwise) {
  const std::vector<int32_t> a = story_tokens(37, 1), b = story_tokens(20, 2), c = story_tokens(5, 3);
  Engine alone(stories(), options_with(2));
  const std::vector<float> expected = logits_alone(alone, a);

  for (int threads : {1, 2, 3}) {
    Engine engine(stories(), options_with(threads));
    auto sa = engine.new_sequence(), sb = engine.new_sequence(), sc = engine.new_sequence();
    std::vector<float> logits;
    // Step 1: prefill b, then a's first 30 tokens, then c, in one flattened batch.
    engine.step({{sb.get(), b.data(), 20, false}, {sa.get(), a.data(), 30, true}, {sc.get(), c.data(), 5, true}},
                &logits);
    ASSERT_EQ(logits.size(), size_t(1 + 30 + 5) * 512);
    for (size_t i = 0; i < 30 * 512; ++i)
      ASSERT_EQ(logits[512 + i], expected[i]) << "threads " << threads << " prefill logit " << i;
    // Then a decodes one token per step beside the others, at different positions.
    for (int p = 30; p < 37; ++p) {
      int32_t next_b = 7, next_c = 9;
      engine.step({{sc.get(), &next_c, 1, false}, {sa.get(), &a[size_t(p)], 1, false}, {sb.get(), &next_b, 1, false}},
                  &logits);
      ASSERT_EQ(logits.size(), size_t(3) * 512);
      for (int v = 0; v < 512; ++v)
        ASSERT_EQ(logits[512 + size_t(v)], expected[size_t(p) * 512 + size_t(v)]) << "threads " << threads << " p " << p;
    }
  }
}

TEST(Engine, ChunkedPrefillEqualsOneChunk) {
  const std::vector<int32_t> ids = story_tokens(100, 4);
  Engine whole(stories(), options_with(2, 512));
  Engine chunked(stories(), options_with(2, 7));
  EXPECT_EQ(logits_alone(whole, ids), logits_alone(chunked, ids));
}

TEST(Engine, GenerateIsDeterministicPerSeed) {
  Engine engine(stories(), options_with(2));
  GenerateOptions o;
  o.sampling.temperature = 0.9f;
  o.sampling.top_p = 0.95f;
  o.max_new_tokens = 40;
  o.ignore_eos = true;
  o.sampling.seed = 42;
  GenerateResult first = engine.generate({1, 403}, o);
  GenerateResult again = engine.generate({1, 403}, o);
  o.sampling.seed = 43;
  GenerateResult other = engine.generate({1, 403}, o);
  EXPECT_EQ(first.tokens.size(), 40u);
  EXPECT_EQ(first.tokens, again.tokens);
  EXPECT_NE(first.tokens, other.tokens);
  EXPECT_EQ(first.finish_reason, FinishReason::Length);
  // Every sequence's blocks went back to the allocator.
  EXPECT_EQ(engine.allocator().num_free(), engine.allocator().num_blocks());
}

// The serving step samples on the backend: the same tokens as copying the logits out and sampling
// them on the host with the same samplers; a sampling row per logits row, or a named error.
TEST(Engine, SampledStepEqualsLogitsThenHostSampling) {
  Engine engine(stories(), options_with(2));
  SamplingParams p;
  p.temperature = 0.8f;
  p.top_k = 20;
  p.min_p = 0.05f;
  p.repetition_penalty = 1.2f;
  std::vector<Sampler> on_backend, on_host;
  for (uint64_t seed : {1, 2, 3}) {
    p.seed = seed;
    on_backend.emplace_back(p);
    on_host.emplace_back(p);
  }
  std::vector<std::unique_ptr<SequenceKv>> a, b;
  std::vector<std::vector<int32_t>> history;
  for (int s = 0; s < 3; ++s) {
    a.push_back(engine.new_sequence());
    b.push_back(engine.new_sequence());
    history.push_back(story_tokens(5 + s, s));
  }
  std::vector<int32_t> tokens;
  std::vector<float> logits;
  for (int step = 0; step < 12; ++step) {
    std::vector<SequenceStep> batch_a, batch_b;
    std::vector<SampleRow> rows;
    for (int s = 0; s < 3; ++s) {
      const std::vector<int32_t>& h = history[size_t(s)];
      const int32_t from = step == 0 ? 0 : int32_t(h.size()) - 1;
      batch_a.push_back(SequenceStep{a[size_t(s)].get(), h.data() + from, int32_t(h.size()) - from, false, true});
      batch_b.push_back(SequenceStep{b[size_t(s)].get(), h.data() + from, int32_t(h.size()) - from, false, true});
      rows.push_back(on_backend[size_t(s)].next_row(h, engine.vocab_size()));
    }
    engine.step(batch_a, rows, &tokens);
    engine.step(batch_b, &logits);
    ASSERT_EQ(tokens.size(), 3u);
    for (int s = 0; s < 3; ++s) {
      const int32_t expected = on_host[size_t(s)].sample(logits.data() + size_t(s) * size_t(engine.vocab_size()),
                                                         engine.vocab_size(), history[size_t(s)]);
      EXPECT_EQ(tokens[size_t(s)], expected) << "step " << step << " sequence " << s;
      history[size_t(s)].push_back(tokens[size_t(s)]);
    }
  }
  std::unique_ptr<SequenceKv> c = engine.new_sequence();
  const std::vector<int32_t> prompt = {1, 403};
  test::expect_error([&] { engine.step({SequenceStep{c.get(), prompt.data(), 2, false, true}}, {}, &tokens); },
                     LLMQ_ERR_INVALID_ARGUMENT, "1 logits rows but 0 sampling rows");
  EXPECT_EQ(c->length(), 0);
}

TEST(Engine, StopIdsAndCallbackCancel) {
  Engine engine(stories(), options_with(1));
  GenerateOptions o;
  o.sampling.temperature = 0;
  o.max_new_tokens = 64;
  GenerateResult greedy = engine.generate({1, 403, 407, 261, 378}, o);
  ASSERT_GE(greedy.tokens.size(), 10u);
  // Stop at the 6th greedy token: the output is the 5 before it.
  o.stop_ids = {greedy.tokens[5]};
  GenerateResult stopped = engine.generate({1, 403, 407, 261, 378}, o);
  EXPECT_EQ(stopped.finish_reason, FinishReason::Stop);
  EXPECT_EQ(stopped.tokens, std::vector<int32_t>(greedy.tokens.begin(), greedy.tokens.begin() + 5));
  o.stop_ids.clear();
  int calls = 0;
  o.on_token = [&](int32_t) { return ++calls < 3; };
  GenerateResult cancelled = engine.generate({1, 403, 407, 261, 378}, o);
  EXPECT_EQ(cancelled.finish_reason, FinishReason::Cancelled);
  EXPECT_EQ(cancelled.tokens.size(), 3u);
}

TEST(Engine, KvCacheFullIsAClearStatusAndLeavesStateIntact) {
  // 4 blocks of 16 tokens: 64 tokens in all.
  const uint64_t per_block = 5 * 2 * 4 * 16 * 8 * sizeof(float);
  Engine engine(stories(), options_with(2, 512, 4 * per_block));
  ASSERT_EQ(engine.allocator().num_blocks(), 4);
  auto s1 = engine.new_sequence(), s2 = engine.new_sequence();
  std::vector<int32_t> ids = story_tokens(40, 5);
  std::vector<float> logits;
  engine.step({{s1.get(), ids.data(), 40, false}}, &logits);  // 3 blocks
  EXPECT_EQ(engine.allocator().num_free(), 1);
  try {
    engine.step({{s2.get(), ids.data(), 20, false}}, &logits);  // needs 2
    FAIL() << "expected LLMQ_ERR_KV_CACHE_FULL";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_KV_CACHE_FULL);
    EXPECT_NE(std::string(e.what()).find("KV cache is full"), std::string::npos) << e.what();
  }
  EXPECT_EQ(engine.allocator().num_free(), 1);
  EXPECT_EQ(s2->length(), 0);
  EXPECT_TRUE(s2->blocks().empty());
  // A batch where the second sequence fails rolls back the first one's new blocks too.
  auto s3 = engine.new_sequence();
  EXPECT_THROW(engine.step({{s3.get(), ids.data(), 10, false}, {s2.get(), ids.data(), 20, false}}, &logits), Error);
  EXPECT_EQ(engine.allocator().num_free(), 1);
  EXPECT_TRUE(s3->blocks().empty());
  // s1 still decodes correctly after the failures.
  std::vector<float> expected(41 * 512);
  Engine reference(stories(), options_with(2));
  ids.push_back(300);
  reference.score(ids, expected.data());
  engine.step({{s1.get(), &ids[40], 1, false}}, &logits);
  EXPECT_EQ(std::vector<float>(expected.end() - 512, expected.end()), logits);

  // generate() reports a prompt that cannot fit as KV_CACHE_FULL, and running out while
  // decoding as the end of the context.
  s1.reset();
  s2.reset();
  s3.reset();
  GenerateOptions o;
  o.sampling.temperature = 0;
  o.ignore_eos = true;
  o.max_new_tokens = 100;
  try {
    engine.generate(story_tokens(80, 6), o);
    FAIL() << "expected LLMQ_ERR_KV_CACHE_FULL";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_KV_CACHE_FULL);
  }
  GenerateResult r = engine.generate(story_tokens(50, 6), o);
  EXPECT_EQ(r.finish_reason, FinishReason::Context);
  EXPECT_EQ(r.tokens.size(), 15u);  // 64 slots - 50 prompt tokens, plus the last sampled token
}

TEST(Engine, ContextLimit) {
  Engine engine(stories(), options_with(2));
  GenerateOptions o;
  o.sampling.temperature = 0;
  o.ignore_eos = true;
  o.max_new_tokens = 1000;
  GenerateResult r = engine.generate(story_tokens(500, 7), o);
  EXPECT_EQ(r.finish_reason, FinishReason::Context);
  EXPECT_EQ(r.tokens.size(), 13u);  // positions 500..511 are fed, and the token after 511 is still sampled
  try {
    engine.generate(story_tokens(513, 7), o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_CONTEXT_OVERFLOW);
  }
}

TEST(Engine, BadArgumentsNameTheProblem) {
  Engine engine(stories(), options_with(1));
  GenerateOptions o;
  auto expect_error = [&](const std::vector<int32_t>& prompt, const GenerateOptions& options, const char* needle) {
    try {
      engine.generate(prompt, options);
      ADD_FAILURE() << "expected an error mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), LLMQ_ERR_INVALID_ARGUMENT);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error({}, o, "empty");
  expect_error({1, 512}, o, "prompt_ids[1] = 512");
  expect_error({1, -3}, o, "prompt_ids[1] = -3");
  GenerateOptions bad = o;
  bad.sampling.top_p = 0;
  expect_error({1}, bad, "top_p");
  bad = o;
  bad.sampling.temperature = -1;
  expect_error({1}, bad, "temperature");
  bad = o;
  bad.stop_ids = {9999};
  expect_error({1}, bad, "stop_ids[0]");
  bad = o;
  bad.max_new_tokens = -1;
  expect_error({1}, bad, "max_new_tokens");
  EXPECT_EQ(engine.allocator().num_free(), engine.allocator().num_blocks());

  auto expect_option_error = [&](EngineOptions options, const char* needle) {
    try {
      Engine e(stories(), options);
      ADD_FAILURE() << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  EngineOptions eo;
  eo.kv_cache_bytes = 100;
  expect_option_error(eo, "kv_cache_bytes");
  eo = EngineOptions();
  eo.kv_block_size = 0;
  expect_option_error(eo, "kv_block_size");
  eo = EngineOptions();
  eo.max_batch_tokens = 0;
  expect_option_error(eo, "max_batch_tokens");
  std::string why;
  if (cuda_device_count(&why) == 0) {  // with a GPU, the CUDA backend is tested by test_gpu.cpp
    eo = EngineOptions();
    eo.backend = LLMQ_BACKEND_CUDA;
    expect_option_error(eo, "CUDA");
  }
}

TEST(KvCache, AllocatorRefcountsAndFreeList) {
  BlockAllocator allocator(3);
  EXPECT_EQ(allocator.num_free(), 3);
  int32_t a = allocator.allocate(), b = allocator.allocate(), c = allocator.allocate();
  EXPECT_EQ(a, 0);
  EXPECT_EQ(b, 1);
  EXPECT_EQ(c, 2);
  EXPECT_EQ(allocator.allocate(), -1);
  allocator.retain(b);
  EXPECT_EQ(allocator.refcount(b), 2);
  allocator.release(b);
  EXPECT_EQ(allocator.num_free(), 0);
  allocator.release(b);
  EXPECT_EQ(allocator.num_free(), 1);
  EXPECT_EQ(allocator.allocate(), b);  // the freed block is reused
  try {
    allocator.release(7);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_INTERNAL);
  }
  allocator.release(a);
  EXPECT_THROW(allocator.release(a), Error);  // double free is caught, not corrupting the list

  BlockAllocator pool(4);
  SequenceKv seq(pool, 16);
  EXPECT_TRUE(seq.reserve(33));  // 3 blocks
  EXPECT_EQ(seq.blocks().size(), 3u);
  EXPECT_EQ(seq.slot(17), seq.blocks()[1] * 16 + 1);
  EXPECT_FALSE(seq.reserve(80));  // needs 5 blocks: nothing changes
  EXPECT_EQ(seq.blocks().size(), 3u);
  EXPECT_EQ(pool.num_free(), 1);
  seq.clear();
  EXPECT_EQ(pool.num_free(), 4);
}

}  // namespace

namespace {

using namespace llmq;

TEST(EngineKvDtype, SixteenBitCacheHoldsTwiceTheTokensAndStaysClose) {
  const uint64_t budget = 1 << 20;
  EngineOptions o = options_with(2, 512, budget);
  o.kv_dtype = LLMQ_KV_DTYPE_F32;
  Engine f32(stories(), o);
  EXPECT_EQ(f32.kv_dtype(), DType::F32);
  EXPECT_EQ(f32.kv_bytes_per_token(), 5u * 2 * 4 * 8 * 4);
  o.kv_dtype = LLMQ_KV_DTYPE_AUTO;  // stories260K is stored in F32
  EXPECT_EQ(Engine(stories(), o).kv_dtype(), DType::F32);

  const std::vector<int32_t> ids = story_tokens(120, 8);
  std::vector<float> reference(ids.size() * 512);
  f32.score(ids, reference.data());
  for (llmq_kv_dtype dtype : {LLMQ_KV_DTYPE_F16, LLMQ_KV_DTYPE_BF16}) {
    o.kv_dtype = dtype;
    Engine half(stories(), o);
    EXPECT_EQ(half.kv_bytes_per_token() * 2, f32.kv_bytes_per_token());
    EXPECT_EQ(half.allocator().num_blocks(), 2 * f32.allocator().num_blocks());
    std::vector<float> logits(ids.size() * 512);
    half.score(ids, logits.data());
    double worst = 0;
    for (size_t i = 0; i < logits.size(); ++i) worst = std::max(worst, double(std::fabs(logits[i] - reference[i])));
    // Rounding K and V to 16 bits moves these O(10) logits by up to ~0.02 with F16 (11-bit
    // significand) and ~0.13 with BF16 (8-bit significand) over these 120 positions.
    EXPECT_LT(worst, dtype == LLMQ_KV_DTYPE_F16 ? 0.05 : 0.25) << "kv dtype " << int(dtype);
    EXPECT_GT(worst, 0.0) << "the cache should really be 16-bit";
    // Batch invariance holds for a 16-bit cache too.
    Engine chunked(stories(), [&] {
      EngineOptions c = o;
      c.max_batch_tokens = 9;
      return c;
    }());
    std::vector<float> again(ids.size() * 512);
    chunked.score(ids, again.data());
    EXPECT_EQ(again, logits);
  }
}

// 8-bit caches: codes are written per token, so chunking the prefill changes nothing (bitwise),
// and the logits stay near the F32 cache's.
TEST(EngineKvDtype, EightBitCachesAreBatchInvariantAndClose) {
  EngineOptions o = options_with(2, 512, 1 << 20);
  o.kv_dtype = LLMQ_KV_DTYPE_F32;
  const std::vector<int32_t> ids = story_tokens(120, 8);
  std::vector<float> reference(ids.size() * 512);
  Engine(stories(), o).score(ids, reference.data());
  for (llmq_kv_dtype dtype : {LLMQ_KV_DTYPE_INT8, LLMQ_KV_DTYPE_FP8}) {
    o.kv_dtype = dtype;
    o.max_batch_tokens = 512;
    Engine whole(stories(), o);
    EXPECT_EQ(whole.kv_dtype(), dtype == LLMQ_KV_DTYPE_INT8 ? DType::I8 : DType::F8_E4M3);
    std::vector<float> logits(ids.size() * 512), chunked(ids.size() * 512);
    whole.score(ids, logits.data());
    o.max_batch_tokens = 9;
    Engine(stories(), o).score(ids, chunked.data());
    EXPECT_EQ(chunked, logits) << int(dtype);
    double worst = 0;
    for (size_t i = 0; i < logits.size(); ++i) worst = std::max(worst, double(std::fabs(logits[i] - reference[i])));
    EXPECT_GT(worst, 0.0) << int(dtype);
    // Seen: INT8 (per-token scales) and FP8 with an uncalibrated scale of 1.0 (small values lose
    // precision) over these 120 positions of O(10) logits.
    EXPECT_LT(worst, dtype == LLMQ_KV_DTYPE_INT8 ? 1.0 : 4.0) << int(dtype);
    std::printf("kv %d: worst logit difference %.3f\n", int(dtype), worst);
  }
}

}  // namespace
