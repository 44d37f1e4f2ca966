// llmq-bench end to end on stories260K: the run finishes, its JSON has every field with sane
// values (positive rates, p99 >= p50, MBU in (0, 1] at a peak set high), and bad flags are named.
#include <gtest/gtest.h>

#include "test_util.h"

namespace {

using llmq::test::run_command;

std::string bench(const std::string& flags) {
  return llmq::test::bin_dir() + "/llmq-bench --model " + llmq::test::stories_dir() + " --threads 1 " + flags;
}

TEST(BenchTool, ServesAndReportsWellFormedNumbers) {
  llmq::test::TempDir dir;
  const auto r = run_command(bench("--requests 12 --concurrency 4 --input-len 20 --output-len 10 --prefix-caching "
                                   "--peak-gbs 1000 --json " + dir / "out.json"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("Output token throughput (tok/s):"), std::string::npos) << r.out;
  const nlohmann::json j = llmq::test::read_json(dir / "out.json");
  EXPECT_EQ(j.at("requests"), 12);
  EXPECT_EQ(j.at("generated_tokens"), 12 * 10) << "EOS is ignored: every request makes output-len tokens";
  for (const char* key : {"duration_s", "request_throughput", "output_throughput", "ttft_mean_s", "ttft_p50_s",
                          "tpot_mean_s", "tpot_p50_s", "mean_decode_mbu"})
    EXPECT_GT(j.at(key).get<double>(), 0) << key;
  EXPECT_GE(j.at("ttft_p99_s").get<double>(), j.at("ttft_p50_s").get<double>());
  EXPECT_GE(j.at("tpot_p99_s").get<double>(), j.at("tpot_p50_s").get<double>());
  EXPECT_EQ(j.at("peak_bandwidth").get<double>(), 1e12);
  EXPECT_LE(j.at("mean_decode_mbu").get<double>(), 1.0);
}

TEST(BenchTool, BadFlagsAreNamed) {
  auto r = run_command(bench("--requests 0") + " 2>&1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("--requests expects an integer in [1, 1000000], got '0'"), std::string::npos) << r.out;
  r = run_command(bench("--input-len 500 --output-len 100") + " 2>&1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("exceed the model's context of 512"), std::string::npos) << r.out;
  r = run_command(bench("--quant int4") + " 2>&1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("--quant expects none, int8wo or fp8, got 'int4'"), std::string::npos) << r.out;
}

}  // namespace
