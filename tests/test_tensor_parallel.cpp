// Tensor parallelism on the CPU with the in-process communicator. First the communicator's own
// guarantees (sums in rank order, the same bits on every rank, timeouts that name the missing
// rank, aborts that release the waiting ones), then tp = 2, 4, 8 against tp = 1: greedy tokens
// equal and logits within 1e-4 (but for rare rows where an 8-bit rounding step flips: see
// expect_close_rows), on stories260K (8 heads, 4 KV heads: tp 8 replicates them; its intermediate
// size 172 splits unevenly at tp 8) and on a synthetic GQA model with q/k/v/o biases, untied
// embeddings and an odd vocabulary, in every quantization mode and 8-bit KV cache, and for
// pre-quantized checkpoints; then bad input, the C ABI and the CLI.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <thread>

#include "engine/communicator.h"
#include "engine/engine.h"
#include "engine/error.h"
#include "engine/synth.h"
#include "engine/tensor_parallel.h"
#include "llmq.h"
#include "test_util.h"

namespace {

using namespace llmq;
using Clock = std::chrono::steady_clock;

struct Outcome {
  llmq_status status = LLMQ_OK;
  std::string message;
};

// Runs fn(rank) on a thread per rank and returns what each one threw.
std::vector<Outcome> on_threads(int n, const std::function<void(int)>& fn) {
  std::vector<Outcome> outcomes(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (const Error& e) {
        outcomes[size_t(r)] = {e.status(), e.what()};
      }
    });
  for (auto& t : threads) t.join();
  return outcomes;
}

bool contains(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }

// ---- The in-process communicator ---------------------------------------------------------------

TEST(InProcessCommunicator, SumsInRankOrderWithTheSameBitsOnEveryRank) {
  constexpr int kRanks = 4;
  auto comms = make_in_process_communicators(kRanks, 10000);
  // Element 0 depends on the order: ((1e8 + 1) - 1e8) + 1 = 1 in float (1e8 + 1 rounds to 1e8),
  // while any order that adds the ones first gives 2 or 3.
  const float first[kRanks] = {1e8f, 1.0f, -1e8f, 1.0f};
  constexpr int kRounds = 200;
  std::vector<std::vector<std::vector<float>>> results(kRanks, std::vector<std::vector<float>>(kRounds));
  auto input = [&](int rank, int round, size_t count) {
    std::mt19937 rng(uint32_t(rank * 1000 + round));
    std::uniform_real_distribution<float> dist(-1e3f, 1e3f);
    std::vector<float> x(count);
    for (float& v : x) v = dist(rng);
    x[0] = first[rank];
    return x;
  };
  auto count_of = [](int round) { return size_t(1 + (round * 37) % 300); };
  auto outcomes = on_threads(kRanks, [&](int r) {
    for (int round = 0; round < kRounds; ++round) {
      std::vector<float> x = input(r, round, count_of(round));
      comms[size_t(r)]->all_reduce_sum(x.data(), x.size(), nullptr);
      results[size_t(r)][size_t(round)] = x;
    }
  });
  for (const Outcome& o : outcomes) ASSERT_EQ(o.status, LLMQ_OK) << o.message;
  for (int round = 0; round < kRounds; ++round) {
    std::vector<float> expected = input(0, round, count_of(round));
    for (int r = 1; r < kRanks; ++r) {
      const std::vector<float> x = input(r, round, count_of(round));
      for (size_t i = 0; i < x.size(); ++i) expected[i] += x[i];
    }
    EXPECT_EQ(expected[0], 1.0f);
    for (int r = 0; r < kRanks; ++r)
      ASSERT_EQ(0, std::memcmp(results[size_t(r)][size_t(round)].data(), expected.data(), expected.size() * sizeof(float)))
          << "rank " << r << " round " << round;
  }
}

TEST(InProcessCommunicator, MaxGatherBroadcastAndBarrier) {
  constexpr int kRanks = 3;
  auto comms = make_in_process_communicators(kRanks, 10000);
  auto outcomes = on_threads(kRanks, [&](int r) {
    Communicator& c = *comms[size_t(r)];
    EXPECT_EQ(c.rank(), r);
    EXPECT_EQ(c.size(), kRanks);
    for (int round = 0; round < 50; ++round) {
      std::vector<float> m = {float(r), float(-r), float(round * (r == 1))};
      c.all_reduce_max(m.data(), m.size(), nullptr);
      EXPECT_EQ(m, (std::vector<float>{2.0f, 0.0f, float(round)}));
      const float send[2] = {float(10 * r), float(10 * r + round)};
      std::vector<float> recv(2 * kRanks, -1.0f);
      c.all_gather(send, 2, recv.data(), nullptr);
      EXPECT_EQ(recv, (std::vector<float>{0, float(round), 10, float(10 + round), 20, float(20 + round)}));
      std::vector<float> b(4, float(r));
      c.broadcast(b.data(), b.size(), round % kRanks, nullptr);
      EXPECT_EQ(b, std::vector<float>(4, float(round % kRanks)));
      c.barrier();
    }
  });
  for (const Outcome& o : outcomes) EXPECT_EQ(o.status, LLMQ_OK) << o.message;
}

TEST(InProcessCommunicator, AMissingRankIsATimeoutNamingIt) {
  auto comms = make_in_process_communicators(3, 150);
  const auto start = Clock::now();
  // Ranks 0 and 2 meet at a barrier; rank 1 never comes.
  auto outcomes = on_threads(3, [&](int r) {
    if (r != 1) comms[size_t(r)]->barrier();
  });
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
  for (int r : {0, 2}) {
    EXPECT_EQ(outcomes[size_t(r)].status, LLMQ_ERR_TIMEOUT) << r;
    EXPECT_TRUE(contains(outcomes[size_t(r)].message, "rank(s) 1, which never arrived")) << outcomes[size_t(r)].message;
  }
  // The late rank is told at once, not left waiting.
  std::vector<float> x(4, 1.0f);
  try {
    comms[1]->all_reduce_sum(x.data(), x.size(), nullptr);
    FAIL() << "a collective of an aborted group returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_TIMEOUT);
  }
}

TEST(InProcessCommunicator, AbortReleasesRanksWaitingInACollective) {
  auto comms = make_in_process_communicators(2, 60000);
  const auto start = Clock::now();
  auto outcomes = on_threads(2, [&](int r) {
    if (r == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      comms[1]->abort(LLMQ_ERR_DEVICE, "rank 1 failed: boom");
      return;
    }
    std::vector<float> x(8, 1.0f);
    comms[0]->all_reduce_sum(x.data(), x.size(), nullptr);
  });
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
  EXPECT_EQ(outcomes[0].status, LLMQ_ERR_DEVICE);
  EXPECT_EQ(outcomes[0].message, "rank 1 failed: boom");
}

TEST(InProcessCommunicator, MismatchedCollectivesAreAnError) {
  auto comms = make_in_process_communicators(2, 10000);
  auto outcomes = on_threads(2, [&](int r) {
    std::vector<float> x(4, 1.0f), recv(8);
    if (r == 0)
      comms[0]->all_reduce_sum(x.data(), 4, nullptr);
    else
      comms[1]->all_gather(x.data(), 4, recv.data(), nullptr);
  });
  for (const Outcome& o : outcomes) {
    EXPECT_EQ(o.status, LLMQ_ERR_INTERNAL) << o.message;
    EXPECT_TRUE(contains(o.message, "called all_")) << o.message;
  }
}

TEST(RankThreads, TheFirstFailureIsRethrownAndAbortsThePeers) {
  auto comms = make_in_process_communicators(4, 60000);
  RankThreads threads(4);
  int aborts = 0;
  try {
    threads.run(
        [&](int r) {
          if (r == 2) fail(LLMQ_ERR_OUT_OF_MEMORY, "rank 2 ran out");
          std::vector<float> x(4, 1.0f);
          comms[size_t(r)]->all_reduce_sum(x.data(), x.size(), nullptr);  // waits for rank 2, forever but for the abort
        },
        [&](llmq_status status, const std::string& why) {
          ++aborts;
          for (auto& c : comms) c->abort(status, why);
        });
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_OUT_OF_MEMORY);
    EXPECT_STREQ(e.what(), "rank 2 ran out");
  }
  EXPECT_EQ(aborts, 1);
  // The threads are still there for the next job.
  std::vector<int> seen(4, 0);
  threads.run([&](int r) { seen[size_t(r)] = r + 1; }, [](llmq_status, const std::string&) {});
  EXPECT_EQ(seen, (std::vector<int>{1, 2, 3, 4}));
}

// ---- Sharding -------------------------------------------------------------------------------------

TEST(TensorParallel, ShardsCoverTheModel) {
  ModelConfig c;
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.intermediate_size = 172;
  c.vocab_size = 301;
  for (int size : {1, 2, 4, 8}) {
    check_tensor_parallel(c, size);
    int64_t heads = 0, inter = 0, vocab = 0;
    for (int r = 0; r < size; ++r) {
      const TpShard s = tp_shard(c, r, size);
      EXPECT_EQ(s.first_head, heads);
      EXPECT_EQ(s.first_inter, inter);
      EXPECT_EQ(s.first_vocab, vocab);
      heads += s.heads;
      inter += s.inter;
      vocab += s.vocab;
      EXPECT_LE(s.vocab, s.vocab_stride);
      EXPECT_GE(s.inter, 172 / size);
      EXPECT_LE(s.inter, 172 / size + 1);
      // Each rank's query heads use its KV heads: the same group as the unsharded model.
      EXPECT_EQ(s.first_head / 2, s.first_kv_head) << size;
      EXPECT_EQ(s.heads / s.kv_heads, size <= 4 ? 2 : 1) << size;
      EXPECT_EQ(s.kv_replica, size == 8 && r % 2 == 1);
    }
    EXPECT_EQ(heads, 8);
    EXPECT_EQ(inter, 172);
    EXPECT_EQ(vocab, 301);
  }
}

void expect_shape_error(const ModelConfig& c, int size, const std::string& needle) {
  try {
    check_tensor_parallel(c, size);
    ADD_FAILURE() << "tp " << size << " was accepted; expected " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(contains(e.what(), needle)) << e.what();
  }
}

TEST(TensorParallel, ShapesThatDoNotSplitAreNamed) {
  ModelConfig c;
  c.num_heads = 12;
  c.num_kv_heads = 6;
  c.intermediate_size = 4;
  c.vocab_size = 512;
  expect_shape_error(c, 8, "tensor_parallel 8 does not divide num_attention_heads 12");
  expect_shape_error(c, 4, "tensor_parallel 4 does not divide num_key_value_heads 6");
  c.num_kv_heads = 4;
  expect_shape_error(c, 6, "tensor_parallel 6 exceeds num_key_value_heads 4 but is not a multiple of it");
  c.num_heads = 8;
  c.num_kv_heads = 8;
  expect_shape_error(c, 8, "tensor_parallel 8 exceeds intermediate_size 4");
  c.intermediate_size = 64;
  c.vocab_size = 5;
  expect_shape_error(c, 8, "tensor_parallel 8 exceeds vocab_size 5");
}

// The CPU ops tensor parallelism adds: a vocab-parallel embedding and FP8 activations quantized
// with an amax given from outside.
TEST(TensorParallel, CpuOpsForShards) {
  auto backend = make_cpu_backend(CpuBackendOptions{2});
  const int64_t vocab = 10, dim = 5, T = 4;
  std::vector<float> table(size_t(vocab * dim));
  for (size_t i = 0; i < table.size(); ++i) table[i] = float(i) + 0.5f;
  BatchPlan plan;
  plan.clear();
  plan.tokens = {0, 7, 3, 9};
  plan.positions = {0, 1, 2, 3};
  plan.token_seq = {0, 0, 0, 0};
  plan.slots = {0, 1, 2, 3};
  backend->begin_step(plan);
  std::vector<float> out(size_t(T * dim), -1.0f);
  Tensor out_t{out.data(), DType::F32, T, dim};
  backend->embed(Tensor{table.data() + 3 * dim, DType::F32, 5, dim}, 3, out_t);  // ids 3..7
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < dim; ++i) {
      const int32_t id = plan.tokens[size_t(t)];
      EXPECT_EQ(out[size_t(t * dim + i)], id >= 3 && id < 8 ? table[size_t(id * dim + i)] : 0.0f) << t << " " << i;
    }

  std::vector<float> x = {1, -3, 2, 0.5f, 0, 0, 0, 0, 7, 1, -8, 2};
  Tensor xt{x.data(), DType::F32, 3, 4};
  std::vector<float> amax(3);
  Tensor amax_t{amax.data(), DType::F32, 3, 1};
  backend->row_absmax(xt, amax_t);
  EXPECT_EQ(amax, (std::vector<float>{3, 0, 8}));
  std::vector<float> w(size_t(6 * 4));
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(float(i));
  QuantizedWeight q = quantize_weight(Tensor{w.data(), DType::F32, 6, 4}, QuantMode::Fp8, 1);
  std::vector<float> own(18), given(18), larger(18);
  Tensor own_t{own.data(), DType::F32, 3, 6}, given_t{given.data(), DType::F32, 3, 6}, larger_t{larger.data(), DType::F32, 3, 6};
  backend->linear(xt, q.view(DType::BF16), nullptr, own_t);
  backend->linear(xt, q.view(DType::BF16), nullptr, given_t, &amax_t);
  EXPECT_EQ(own, given);  // the row's own amax: bitwise the same
  std::vector<float> tripled = {9, 0, 24};  // 3x: not a power of two, so the codes round differently
  Tensor tripled_t{tripled.data(), DType::F32, 3, 1};
  backend->linear(xt, q.view(DType::BF16), nullptr, larger_t, &tripled_t);
  EXPECT_NE(own, larger);  // a larger amax (another rank's slice) changes the codes
}

// ---- Engines: tp > 1 against tp = 1 ---------------------------------------------------------------

std::shared_ptr<const Model> stories() {
  static std::shared_ptr<const Model> model = Model::load(test::stories_dir());
  return model;
}

// A synthetic GQA model: 8 heads over 2 KV heads (tp 4 and 8 replicate them), q/k/v/o biases,
// untied embeddings, BF16 weights, an intermediate size (100) and vocabulary (301) that 8 does not
// divide.
std::shared_ptr<const Model> synthetic() {
  static test::TempDir dir;
  static std::shared_ptr<const Model> model = [] {
    SynthSpec spec;
    spec.hidden_size = 64;
    spec.num_heads = 8;
    spec.num_kv_heads = 2;
    spec.intermediate_size = 100;
    spec.num_layers = 2;
    spec.vocab_size = 301;
    spec.max_position = 256;
    spec.attention_bias = true;
    spec.dtype = DType::BF16;
    spec.seed = 7;
    spec.threads = 1;
    write_synthetic_model(dir.path(), spec);
    return Model::load(dir.path());
  }();
  return model;
}

struct Mode {
  QuantMode quant;
  llmq_kv_dtype kv;
  bool quantize_lm_head = false;
};

std::string name_of(const Mode& m) {
  return std::string(quant_mode_name(m.quant)) + " kv " + std::to_string(int(m.kv)) + (m.quantize_lm_head ? " +lm_head" : "");
}

EngineOptions options_for(const Mode& m, int tp) {
  EngineOptions o;
  o.n_threads = 2;
  o.quant = m.quant;
  o.kv_dtype = m.kv;
  o.quantize_lm_head = m.quantize_lm_head;
  o.tensor_parallel = tp;
  o.kv_cache_bytes = 1 << 20;
  return o;
}

std::vector<int32_t> token_ids(int n, int32_t vocab, int32_t salt) {
  std::vector<int32_t> ids{1};
  for (int i = 1; i < n; ++i) ids.push_back(3 + int32_t((i * 37 + salt * 101) % (vocab - 3)));
  return ids;
}

struct Outputs {
  std::vector<float> logits;   // score() of a prompt
  std::vector<int32_t> greedy;  // tokens generated greedily after another prompt
};

Outputs run(Engine& engine, int32_t salt) {
  Outputs r;
  const int32_t vocab = engine.vocab_size();
  const std::vector<int32_t> ids = token_ids(40, vocab, salt);
  r.logits.resize(ids.size() * size_t(vocab));
  engine.score(ids, r.logits.data());
  GenerateOptions g;
  g.sampling.temperature = 0;
  g.max_new_tokens = 16;
  g.ignore_eos = true;
  r.greedy = engine.generate(token_ids(6, vocab, salt + 1), g).tokens;
  return r;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, double(std::fabs(a[i] - b[i])));
  return worst;
}

// Whether the mode rounds activations or K/V to 8 bits (FP8 activations, INT8 / FP8 KV cache).
bool rounds_to_8_bits(const Mode& m) {
  return m.quant == QuantMode::Fp8 || m.kv == LLMQ_KV_DTYPE_INT8 || m.kv == LLMQ_KV_DTYPE_FP8;
}

// Logits of tp > 1 against tp = 1, row by row (one row per position): within `tolerance` (1e-4
// for stories260K's O(10) logits). The all-reduce sums the row-parallel partial products in
// another order than tp = 1's one dot product, so values differ in their last bits; when such a
// value lies on a rounding boundary of a later 8-bit quantization (an FP8 activation or KV code),
// it lands one code away, which moves that row's logits by up to ~1e-2. Such rows are allowed, at
// most `flip_rows` of them, within 100 x tolerance; returns the largest difference.
double expect_close_rows(const std::vector<float>& got, const std::vector<float>& expected, size_t vocab, int flip_rows,
                         const std::string& label, double tolerance = 1e-4) {
  EXPECT_EQ(got.size(), expected.size()) << label;
  int flipped = 0;
  double worst = 0;
  for (size_t row = 0; row * vocab < std::min(got.size(), expected.size()); ++row) {
    double diff = 0;
    for (size_t v = row * vocab; v < (row + 1) * vocab; ++v) diff = std::max(diff, double(std::fabs(got[v] - expected[v])));
    worst = std::max(worst, diff);
    if (diff <= tolerance) continue;
    ++flipped;
    EXPECT_LE(diff, 100 * tolerance) << label << " row " << row;
    std::printf("  %s: row %zu differs by %.3g (an 8-bit rounding step)\n", label.c_str(), row, diff);
  }
  EXPECT_LE(flipped, flip_rows) << label << ": rows beyond " << tolerance;
  return worst;
}

void expect_tp_matches_tp1(const std::shared_ptr<const Model>& model, const Mode& mode, std::initializer_list<int> tps,
                           double tolerance) {
  Engine reference(model, options_for(mode, 1));
  const Outputs expected = run(reference, 5);
  ASSERT_EQ(expected.greedy.size(), 16u);
  for (int tp : tps) {
    Engine engine(model, options_for(mode, tp));
    EXPECT_EQ(engine.tensor_parallel(), tp);
    EXPECT_EQ(engine.quant(), reference.quant());
    const Outputs got = run(engine, 5);
    const std::string label = name_of(mode) + " tp " + std::to_string(tp);
    const double diff = expect_close_rows(got.logits, expected.logits, size_t(engine.vocab_size()),
                                          rounds_to_8_bits(mode) ? 2 : 0, label, tolerance);
    EXPECT_EQ(got.greedy, expected.greedy) << label;
    std::printf("%s: %s: logits max |diff| %.3g vs tp 1\n", model->config().architecture_name.c_str(), label.c_str(), diff);
    // Every sequence's blocks went back: the one allocator serves all ranks.
    EXPECT_EQ(engine.allocator().num_free(), engine.allocator().num_blocks());
  }
}

TEST(TensorParallelEngine, StoriesEveryModeMatchesTp1) {
  for (const Mode& m : {Mode{QuantMode::None, LLMQ_KV_DTYPE_AUTO}, Mode{QuantMode::Int8WeightOnly, LLMQ_KV_DTYPE_AUTO},
                        Mode{QuantMode::Fp8, LLMQ_KV_DTYPE_AUTO}, Mode{QuantMode::None, LLMQ_KV_DTYPE_INT8},
                        Mode{QuantMode::None, LLMQ_KV_DTYPE_FP8}, Mode{QuantMode::Fp8, LLMQ_KV_DTYPE_FP8, true},
                        Mode{QuantMode::Int8WeightOnly, LLMQ_KV_DTYPE_INT8, true}})
    expect_tp_matches_tp1(stories(), m, {2, 4, 8}, 1e-4);
}

TEST(TensorParallelEngine, SyntheticGqaWithBiasesMatchesTp1) {
  for (const Mode& m : {Mode{QuantMode::None, LLMQ_KV_DTYPE_AUTO}, Mode{QuantMode::Int8WeightOnly, LLMQ_KV_DTYPE_AUTO},
                        Mode{QuantMode::Fp8, LLMQ_KV_DTYPE_FP8}, Mode{QuantMode::None, LLMQ_KV_DTYPE_INT8}})
    expect_tp_matches_tp1(synthetic(), m, {2, 4, 8}, 5e-6);  // its logits are at most 0.5: the same relative bound
}

// Several sequences in one flattened step (prefill chunks beside decodes), as the scheduler runs
// them: the same logits at tp 4 as at tp 1, and KV-cache-full leaves every rank's state intact.
TEST(TensorParallelEngine, BatchedStepsMatchTp1) {
  const Mode mode{QuantMode::None, LLMQ_KV_DTYPE_AUTO};
  Engine one(stories(), options_for(mode, 1)), four(stories(), options_for(mode, 4));
  const std::vector<int32_t> a = token_ids(30, 512, 1), b = token_ids(20, 512, 2), c = token_ids(5, 512, 3);
  std::vector<float> expected, got;
  std::vector<std::unique_ptr<SequenceKv>> seqs;
  for (Engine* e : {&one, &four})
    for (int i = 0; i < 3; ++i) seqs.push_back(e->new_sequence());
  one.step({{seqs[1].get(), b.data(), 20, false}, {seqs[0].get(), a.data(), 30, true}, {seqs[2].get(), c.data(), 5, true}},
           &expected);
  four.step({{seqs[4].get(), b.data(), 20, false}, {seqs[3].get(), a.data(), 30, true}, {seqs[5].get(), c.data(), 5, true}},
            &got);
  ASSERT_EQ(got.size(), size_t(1 + 30 + 5) * 512);
  EXPECT_LE(max_abs_diff(got, expected), 1e-4);
  for (int p = 0; p < 6; ++p) {
    int32_t next[3] = {7, int32_t(11 + p), 9};
    one.step({{seqs[2].get(), &next[0], 1, false}, {seqs[0].get(), &next[1], 1, false}, {seqs[1].get(), &next[2], 1, false}},
             &expected);
    four.step({{seqs[5].get(), &next[0], 1, false}, {seqs[3].get(), &next[1], 1, false}, {seqs[4].get(), &next[2], 1, false}},
              &got);
    ASSERT_EQ(got.size(), size_t(3) * 512);
    EXPECT_LE(max_abs_diff(got, expected), 1e-4) << p;
  }
}

// ---- Pre-quantized checkpoints: their scales shard as the issue says -----------------------------

TEST(TensorParallelEngine, PreQuantizedCheckpointsMatchTp1WithTheSameSaturationCounts) {
  test::TempDir dir;
  const std::string data = test::shared_dir() + "/data/tinystories_valid_sample.txt";
  // int8wo: per-channel scales [N, 1] (sliced with q/k/v/gate/up, whole for o/down); fp8 with
  // calibrated static activation scales and KV scales (replicated).
  for (const std::string& args : {std::string("--mode int8wo"), "--mode fp8 --calib " + data + " --tokens 256"}) {
    const std::string out = dir / (args.substr(7, 6) == "int8wo" ? "int8" : "fp8");
    auto r = test::run_command(test::bin_dir() + "/llmq-quantize --threads 2 --model " + test::stories_dir() + " --out " +
                               out + " " + args + " 2>&1");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    auto model = Model::load(out);
    ASSERT_NE(model->config().checkpoint_quant, QuantMode::None);
    const bool fp8 = model->config().checkpoint_quant == QuantMode::Fp8;
    EXPECT_EQ(fp8, model->config().static_activations);
    const Mode mode{QuantMode::None, fp8 ? LLMQ_KV_DTYPE_FP8 : LLMQ_KV_DTYPE_INT8};
    Engine reference(model, options_for(mode, 1));
    const Outputs expected = run(reference, 9);
    const std::vector<uint64_t> counts = reference.saturation(true);
    if (fp8) {
      ASSERT_GT(counts[kActivationsStatic], 0u);
    }
    for (int tp : {2, 8}) {
      Engine engine(model, options_for(mode, tp));
      const Outputs got = run(engine, 9);
      expect_close_rows(got.logits, expected.logits, 512, 2, args + " tp " + std::to_string(tp));
      EXPECT_EQ(got.greedy, expected.greedy) << args << " tp " << tp;
      // Each value is counted once: by rank 0 for replicated inputs, by every rank for its part
      // of a row-parallel input, by the first holder of a replicated KV head.
      EXPECT_EQ(engine.saturation(false), counts) << args << " tp " << tp;
    }
  }
}

// ---- One rank per engine, the ranks' engines on their own threads (as processes would be) -------

TEST(TensorParallelEngine, EnginesHoldingOneRankEachMatchTp1) {
  const Mode mode{QuantMode::Fp8, LLMQ_KV_DTYPE_AUTO};
  Engine reference(stories(), options_for(mode, 1));
  const Outputs expected = run(reference, 3);
  auto comms = make_in_process_communicators(2, 30000);
  std::vector<std::shared_ptr<Communicator>> shared;
  for (auto& c : comms) shared.push_back(std::move(c));
  std::vector<Outputs> runs(2);
  auto outcomes = on_threads(2, [&](int r) {
    EngineOptions o = options_for(mode, 1);
    o.communicator = shared[size_t(r)];
    Engine engine(stories(), o);
    EXPECT_EQ(engine.tensor_parallel(), 2);
    runs[size_t(r)] = run(engine, 3);  // the same calls on both: every rank sees every logit
  });
  for (const Outcome& o : outcomes) ASSERT_EQ(o.status, LLMQ_OK) << o.message;
  for (const Outputs& got : runs) {
    expect_close_rows(got.logits, expected.logits, 512, 2, "fp8, one rank per engine");
    EXPECT_EQ(got.greedy, expected.greedy);
  }
  EXPECT_EQ(runs[0].logits, runs[1].logits);
}

// ---- Bad input: each a status and a message naming the problem, before any weight is loaded ----

void expect_engine_error(const std::shared_ptr<const Model>& model, const EngineOptions& o, llmq_status status,
                         const std::string& needle) {
  const auto start = Clock::now();
  try {
    Engine engine(model, o);
    ADD_FAILURE() << "expected an error mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    EXPECT_TRUE(contains(e.what(), needle)) << e.what();
  }
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(10));
}

TEST(TensorParallelEngine, BadInputIsNamed) {
  EngineOptions o = options_for(Mode{QuantMode::None, LLMQ_KV_DTYPE_AUTO}, 3);
  expect_engine_error(stories(), o, LLMQ_ERR_INVALID_ARGUMENT, "tensor_parallel 3 does not divide num_attention_heads 8");
  for (int tp : {0, 9, -1}) {
    o.tensor_parallel = tp;
    expect_engine_error(stories(), o, LLMQ_ERR_INVALID_ARGUMENT, "tensor_parallel must be in [1, 8]");
  }
  // Fewer devices than ranks, or one device twice.
  o.tensor_parallel = 2;
  o.devices = {0};
  expect_engine_error(stories(), o, LLMQ_ERR_INVALID_ARGUMENT, "tensor_parallel 2 needs 2 devices; the device list has 1 (0)");
  o.devices = {1, 1};
  expect_engine_error(stories(), o, LLMQ_ERR_INVALID_ARGUMENT, "devices[0] and devices[1] are both device 1");
  o.devices.clear();
  o.tp_timeout_ms = -5;
  expect_engine_error(stories(), o, LLMQ_ERR_INVALID_ARGUMENT, "tp_timeout_ms");
  o.tp_timeout_ms = 0;

  // NCCL missing when tp > 1 on CUDA (checked before the devices, so it shows on machines
  // without a GPU too; CPU-only builds have no NCCL at all).
  setenv("LLMQ_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
  EngineOptions cuda = o;
  cuda.backend = LLMQ_BACKEND_CUDA;
  expect_engine_error(stories(), cuda, LLMQ_ERR_BACKEND_UNAVAILABLE, "tensor_parallel 2 on CUDA needs NCCL");
  unsetenv("LLMQ_NCCL_LIBRARY");

  // A peer rank that never arrives: this engine holds rank 0 of 2 and nobody holds rank 1.
  auto comms = make_in_process_communicators(2, 200);
  o.tensor_parallel = 1;
  o.communicator = std::move(comms[0]);
  expect_engine_error(stories(), o, LLMQ_ERR_TIMEOUT, "rank(s) 1, which never arrived");
  o.communicator = std::move(comms[1]);
  o.tensor_parallel = 2;
  expect_engine_error(stories(), o, LLMQ_ERR_INVALID_ARGUMENT, "tensor_parallel must be 1 with a communicator");
  o.tensor_parallel = 1;
  o.backend = LLMQ_BACKEND_CUDA;
  expect_engine_error(stories(), o, LLMQ_ERR_INVALID_ARGUMENT, "a CUDA engine needs an NCCL communicator");

  // Calibration sees whole activations only without tensor parallelism.
  Engine two(stories(), options_for(Mode{QuantMode::None, LLMQ_KV_DTYPE_AUTO}, 2));
  try {
    two.set_observer([](int32_t, const char*, const Tensor&) {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), LLMQ_ERR_UNSUPPORTED);
  }
}

// ---- The C ABI and the CLI -------------------------------------------------------------------------

TEST(TensorParallelCApi, ParamsSelectTensorParallelism) {
  llmq_model* model = nullptr;
  ASSERT_EQ(llmq_model_load(test::stories_dir().c_str(), nullptr, &model), LLMQ_OK) << llmq_last_error();
  auto generate = [&](const llmq_engine_params& p, std::vector<int32_t>* out) {
    llmq_engine* engine = nullptr;
    llmq_status status = llmq_engine_create(model, &p, &engine);
    if (status != LLMQ_OK) return status;
    llmq_sampling_params s;
    llmq_sampling_params_default(&s);
    s.temperature = 0;
    llmq_generate_params g;
    llmq_generate_params_default(&g);
    g.sampling = &s;
    g.max_new_tokens = 12;
    g.ignore_eos = 1;
    const int32_t prompt[] = {1, 403, 407};
    out->assign(12, -1);
    status = llmq_generate(engine, prompt, 3, &g, out->data(), out->size(), nullptr);
    llmq_engine_destroy(engine);
    return status;
  };
  llmq_engine_params p;
  llmq_engine_params_default(&p);
  EXPECT_EQ(p.tensor_parallel, 1);
  EXPECT_EQ(p.n_devices, 0);
  EXPECT_EQ(p.tp_timeout_ms, 0);
  EXPECT_EQ(p.comm, nullptr);
  p.n_threads = 2;
  std::vector<int32_t> one, two, old;
  ASSERT_EQ(generate(p, &one), LLMQ_OK) << llmq_last_error();
  p.tensor_parallel = 2;
  p.n_devices = 2;  // ignored by the CPU backend but checked
  p.devices[0] = 0;
  p.devices[1] = 1;
  ASSERT_EQ(generate(p, &two), LLMQ_OK) << llmq_last_error();
  EXPECT_EQ(one, two);
  // A caller built before these fields existed gets tp 1.
  p.struct_size = offsetof(llmq_engine_params, tensor_parallel);
  ASSERT_EQ(generate(p, &old), LLMQ_OK) << llmq_last_error();
  EXPECT_EQ(one, old);

  p.struct_size = sizeof p;
  p.tensor_parallel = 3;
  EXPECT_EQ(generate(p, &two), LLMQ_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(llmq_last_error(), "tensor_parallel 3 does not divide num_attention_heads 8")) << llmq_last_error();
  p.tensor_parallel = 2;
  p.n_devices = 1;
  EXPECT_EQ(generate(p, &two), LLMQ_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(llmq_last_error(), "needs 2 devices")) << llmq_last_error();
  p.n_devices = 9;
  EXPECT_EQ(generate(p, &two), LLMQ_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(llmq_last_error(), "n_devices")) << llmq_last_error();
  llmq_model_destroy(model);
  EXPECT_STREQ(llmq_status_string(LLMQ_ERR_TIMEOUT), "LLMQ_ERR_TIMEOUT");

  // Multi-process NCCL needs the CUDA backend's NCCL: without it, a clear error.
  llmq_nccl_id id;
  llmq_comm* comm = nullptr;
  setenv("LLMQ_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
  EXPECT_EQ(llmq_nccl_get_unique_id(&id), LLMQ_ERR_BACKEND_UNAVAILABLE);
  EXPECT_TRUE(contains(llmq_last_error(), "NCCL")) << llmq_last_error();
  EXPECT_EQ(llmq_comm_init_rank(&id, 2, 0, 0, 100, &comm), LLMQ_ERR_BACKEND_UNAVAILABLE);
  EXPECT_EQ(comm, nullptr);
  unsetenv("LLMQ_NCCL_LIBRARY");
  EXPECT_EQ(llmq_comm_init_rank(&id, 2, 2, 0, 100, &comm), LLMQ_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(llmq_last_error(), "rank 2")) << llmq_last_error();
  EXPECT_EQ(llmq_comm_init_rank(nullptr, 2, 0, 0, 100, &comm), LLMQ_ERR_INVALID_ARGUMENT);
  llmq_comm_destroy(nullptr);
}

TEST(TensorParallelCli, GenerateWithTpGivesTheSameIds) {
  auto generate = [](const std::string& flags) {
    return test::run_command(test::bin_dir() + "/llmq-generate --model " + test::stories_dir() +
                             " --prompt-ids '1 403 407' --temperature 0 --max-tokens 10 --print-ids --threads 2 " + flags +
                             " 2>&1");
  };
  auto ids_of = [](const std::string& out) { return out.substr(out.rfind("ids:")); };
  const auto one = generate(""), two = generate("--tp 2 --devices 0,1"), eight = generate("--tp 8 --quant int8wo");
  ASSERT_EQ(one.exit_code, 0) << one.out;
  ASSERT_EQ(two.exit_code, 0) << two.out;
  ASSERT_EQ(eight.exit_code, 0) << eight.out;
  EXPECT_EQ(ids_of(one.out), ids_of(two.out));
  EXPECT_EQ(ids_of(generate("--quant int8wo").out), ids_of(eight.out));
  const auto bad = generate("--tp 3");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_TRUE(contains(bad.out, "tensor_parallel 3 does not divide num_attention_heads 8")) << bad.out;
  const auto bad_devices = generate("--tp 2 --devices 0,x");
  EXPECT_NE(bad_devices.exit_code, 0);
  EXPECT_TRUE(contains(bad_devices.out, "--devices")) << bad_devices.out;
}

}  // namespace
