// llmq-eval, the quality tool: the perplexity protocol of shared/data/README.md on stories260K
// against llama2.c's run.c, the candidate-vs-reference comparison, and its error messages.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#include "test_util.h"

#if defined(__SANITIZE_ADDRESS__)
#define LLMQ_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LLMQ_TEST_SANITIZED 1
#endif
#endif

namespace {

using llmq::test::run_command;

std::string data_file() { return llmq::test::shared_dir() + "/data/tinystories_valid_sample.txt"; }

// llmq-eval on stories260K; `redirect` says where stderr goes ("2>/dev/null" or "2>&1").
llmq::test::CommandResult eval(const std::string& args, const std::string& redirect = "2>/dev/null") {
  return run_command(llmq::test::bin_dir() + "/llmq-eval --model " + llmq::test::stories_dir() + " " + args + " " +
                     redirect);
}

struct Summary {
  double ppl = 0, ppl_ratio = 0, top1 = 0, kl = 0, reference_ppl = 0;
  long long tokens = -1;
};

// The last stdout line "ppl=... ppl_ratio=... top1=... kl=... tokens=..." and the "reference ppl=" line.
Summary parse(const std::string& out) {
  Summary s;
  const size_t line = out.rfind("\nppl=");
  EXPECT_NE(line, std::string::npos) << out;
  if (line == std::string::npos) return s;
  EXPECT_EQ(std::sscanf(out.c_str() + line + 1, "ppl=%lf ppl_ratio=%lf top1=%lf kl=%lf tokens=%lld", &s.ppl,
                        &s.ppl_ratio, &s.top1, &s.kl, &s.tokens),
            5)
      << out;
  const size_t reference = out.find("reference ppl=");
  EXPECT_NE(reference, std::string::npos) << out;
  if (reference != std::string::npos) std::sscanf(out.c_str() + reference, "reference ppl=%lf", &s.reference_ppl);
  return s;
}

void expect_candidate_is_reference(const Summary& s) {
  EXPECT_EQ(s.ppl_ratio, 1.0);
  EXPECT_EQ(s.top1, 1.0);
  EXPECT_EQ(s.kl, 0.0);
  EXPECT_EQ(s.ppl, s.reference_ppl);
}

// The first 100 paragraphs. Pinned from llmq's Release build (batch 2048, any thread count: the
// engine is batch and thread invariant), whose full-file run matches run.c (FullFileMatchesRunC).
const std::string kSubset = "--data " + data_file() + " --max-docs 100";
constexpr long long kSubsetTokens = 9619;
constexpr double kSubsetPpl = 4.185682;

TEST(Eval, FullFileMatchesRunC) {
#if defined(LLMQ_TEST_SANITIZED)
  GTEST_SKIP() << "the full file takes minutes under sanitizers; SubsetPinned runs the same code";
#else
  // From the issue: the unquantized stories260K gives ppl 5.37496 over 381,598 scored tokens, as
  // computed with llama2.c's run.c (float32). run.c's figure has 5 decimals (rounding <= 5e-6), and
  // float32 engines differ in the last bits of the logits, far below the remaining margin.
  auto result = eval("--data " + data_file());
  ASSERT_EQ(result.exit_code, 0) << result.out;
  const Summary s = parse(result.out);
  EXPECT_EQ(s.tokens, 381598);
  EXPECT_NEAR(s.ppl, 5.37496, 5e-5);
  expect_candidate_is_reference(s);
  EXPECT_NE(result.out.find("4300 documents, 385898 ids, 381598 scored tokens"), std::string::npos) << result.out;
  EXPECT_NE(result.out.find("model_bytes=1040128 kv_bytes_per_token=1280"), std::string::npos) << result.out;
#endif
}

TEST(Eval, SubsetPinned) {
  auto result = eval(kSubset + " --quant none --kv-dtype auto --threads 2");
  ASSERT_EQ(result.exit_code, 0) << result.out;
  const Summary s = parse(result.out);
  EXPECT_EQ(s.tokens, kSubsetTokens);
  EXPECT_NEAR(s.ppl, kSubsetPpl, 1e-6 * kSubsetPpl);
  expect_candidate_is_reference(s);
}

// Small steps: documents longer than the budget are scored in chunks, the others packed a few per
// step. The logits are bitwise those of the default batching, so the summary line is identical.
TEST(Eval, BatchingDoesNotChangeTheResult) {
  auto packed = eval(kSubset);
  auto small = eval(kSubset + " --batch-tokens 48 --threads 1");
  ASSERT_EQ(packed.exit_code, 0) << packed.out;
  ASSERT_EQ(small.exit_code, 0) << small.out;
  EXPECT_EQ(packed.out.substr(packed.out.rfind("\nppl=")), small.out.substr(small.out.rfind("\nppl=")));
}

// A 16-bit KV cache is a real candidate: a second engine, compared position by position.
TEST(Eval, KvDtypeCandidate) {
  auto result = eval(kSubset + " --kv-dtype f16");
  ASSERT_EQ(result.exit_code, 0) << result.out;
  const Summary s = parse(result.out);
  EXPECT_EQ(s.tokens, kSubsetTokens);
  EXPECT_NEAR(s.reference_ppl, kSubsetPpl, 1e-6 * kSubsetPpl);
  EXPECT_NEAR(s.ppl_ratio, s.ppl / s.reference_ppl, 1e-5);
  EXPECT_NEAR(s.ppl_ratio, 1.0, 1e-3);
  EXPECT_GT(s.top1, 0.99);
  EXPECT_LE(s.top1, 1.0);
  EXPECT_GT(s.kl, 0.0);
  EXPECT_LT(s.kl, 1e-4);
  EXPECT_NE(result.out.find("kv-dtype=f16 (F16): model_bytes=1040128 kv_bytes_per_token=640"), std::string::npos)
      << result.out;

  // f32 is what auto means for this F32 model: the reference itself.
  auto same = eval(kSubset + " --kv-dtype f32");
  ASSERT_EQ(same.exit_code, 0) << same.out;
  expect_candidate_is_reference(parse(same.out));
}

// Weight quantization on the CPU backend, pinned on the subset (the CPU results are bitwise
// reproducible, so the bounds only leave room for a deliberate change of rounding). The whole
// file gives int8wo ppl_ratio 1.000176 top1 0.9878 KL 0.00049 and fp8 1.013440 / 0.9392 / 0.0132;
// with 8-bit KV caches, int8wo + int8 1.001340 / 0.9736 / 0.0028 and fp8 + fp8 1.026222 / 0.9104 /
// 0.0321 (FP8 KV scales are 1.0 until calibration exists).
TEST(Eval, QuantizedModesArePinned) {
  struct Pin {
    const char* args;
    double ppl_ratio, top1, kl;
    const char* mode;
  };
  for (const Pin& pin :
       {Pin{"--quant int8wo", 1.000389, 0.989292, 0.00044355,
            "quant=int8wo kv-dtype=auto (F32): model_bytes=372448 kv_bytes_per_token=1280"},
        Pin{"--quant fp8", 1.009166, 0.945005, 0.01188428,
            "quant=fp8 kv-dtype=auto (F32): model_bytes=360588 kv_bytes_per_token=1280"},
        Pin{"--quant int8wo --kv-dtype int8", 1.002069, 0.978792, 0.00227052,
            "quant=int8wo kv-dtype=int8 (I8): model_bytes=372448 kv_bytes_per_token=480"},
        Pin{"--quant fp8 --kv-dtype fp8", 1.027866, 0.922029, 0.02755258,
            "quant=fp8 kv-dtype=fp8 (F8_E4M3): model_bytes=360588 kv_bytes_per_token=320"}}) {
    auto result = eval(kSubset + " " + pin.args);
    ASSERT_EQ(result.exit_code, 0) << result.out;
    const Summary s = parse(result.out);
    EXPECT_EQ(s.tokens, kSubsetTokens);
    EXPECT_NEAR(s.reference_ppl, kSubsetPpl, 1e-6 * kSubsetPpl);
    EXPECT_NEAR(s.ppl_ratio, pin.ppl_ratio, 5e-5) << pin.args;
    EXPECT_NEAR(s.top1, pin.top1, 2e-3) << pin.args;
    EXPECT_NEAR(s.kl, pin.kl, 0.05 * pin.kl) << pin.args;
    EXPECT_NE(result.out.find(pin.mode), std::string::npos) << result.out;
  }
}

// ---- Errors: a message on stderr naming the problem, and a non-zero exit code ------------------

void expect_failure(const std::string& args, const std::string& message) {
  auto result = eval(args, "2>&1");
  EXPECT_NE(result.exit_code, 0) << result.out;
  EXPECT_NE(result.out.find(message), std::string::npos) << "expected '" << message << "' in:\n" << result.out;
  EXPECT_EQ(result.out.find("ppl="), std::string::npos) << result.out;
}

TEST(Eval, MissingDataFile) {
  llmq::test::TempDir dir;
  expect_failure("--data " + dir / "absent.txt", "cannot open data file '" + dir / "absent.txt" + "'");
}

TEST(Eval, EmptyDataFile) {
  llmq::test::TempDir dir;
  llmq::test::write_text(dir / "empty.txt", "");
  expect_failure("--data " + dir / "empty.txt", "is empty");
  llmq::test::write_text(dir / "blank.txt", "\n\n\n\n");
  expect_failure("--data " + dir / "blank.txt", "has no documents");
}

TEST(Eval, InvalidUtf8NamesTheOffset) {
  llmq::test::TempDir dir;
  llmq::test::write_text(dir / "bad.txt", "Hello\n\nab\xFF" "cd\n\n");
  expect_failure("--data " + dir / "bad.txt", "not valid UTF-8: bad byte 0xFF at byte offset 9");
  // An overlong encoding of '/' and a lone surrogate are invalid too.
  llmq::test::write_text(dir / "overlong.txt", "ok \xC0\xAF");
  expect_failure("--data " + dir / "overlong.txt", "bad byte 0xC0 at byte offset 3");
  llmq::test::write_text(dir / "surrogate.txt", "\xED\xA0\x80");
  expect_failure("--data " + dir / "surrogate.txt", "bad byte 0xED at byte offset 0");
  llmq::test::write_text(dir / "truncated.txt", "caf\xC3");
  expect_failure("--data " + dir / "truncated.txt", "bad byte 0xC3 at byte offset 3");
}

TEST(Eval, UnknownModes) {
  expect_failure("--data " + data_file() + " --quant int4", "--quant: unknown mode 'int4' (none, int8wo, fp8)");
  expect_failure("--data " + data_file() + " --kv-dtype int4", "--kv-dtype: unknown dtype 'int4'");
}

TEST(Eval, BadArguments) {
  expect_failure("", "--data FILE is required");
  expect_failure("--data " + data_file() + " --max-docs 0", "--max-docs expects an integer");
  expect_failure("--data " + data_file() + " --batch-tokens x", "--batch-tokens expects an integer");
  expect_failure("--data " + data_file() + " --bogus 1", "unknown flag '--bogus'");
}

TEST(Eval, ModelWithoutTokenizer) {
  llmq::test::TempDir dir;
  for (const char* file : {"config.json", "generation_config.json", "model.safetensors"})
    std::filesystem::copy_file(llmq::test::stories_dir() + "/" + file, dir / file);
  auto result = run_command(llmq::test::bin_dir() + "/llmq-eval --model " + dir.path() + " --data " + data_file() +
                            " 2>&1");
  EXPECT_NE(result.exit_code, 0) << result.out;
  EXPECT_NE(result.out.find("has no tokenizer"), std::string::npos) << result.out;
}

}  // namespace
