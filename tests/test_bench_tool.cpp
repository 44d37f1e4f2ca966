// llmq-bench end to end on stories260K: the run finishes, its JSON has every field with sane
// values (positive rates, p99 >= p50, MBU in (0, 1] at a peak set high), and bad flags are named.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <vector>

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

namespace {

// llmq-sweep's CI smoke run: a small sweep over the three modes on stories260K writes CSV, JSON
// and the PNG, every number is positive, MBU and MFU are fractions, and the max batch under the
// budget grows as the model and KV shrink (the point of quantizing).
TEST(SweepTool, SmokeRunWritesWellFormedOutputs) {
  llmq::test::TempDir dir;
  const auto r = run_command(llmq::test::bin_dir() + "/llmq-sweep --model " + llmq::test::stories_dir() +
                             " --out " + dir.path() + " --batches 1,2,4,32 --input-len 24 --output-len 6 --threads 1 "
                             "--peak-gbs 1000 --peak-tflops 100");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const nlohmann::json j = llmq::test::read_json(dir / "sweep.json");
  ASSERT_EQ(j.at("modes").size(), 3u);
  std::map<std::string, int64_t> max_batch;
  for (const auto& m : j.at("modes")) {
    max_batch[m.at("mode")] = m.at("max_batch_under_budget");
    EXPECT_GT(m.at("weight_bytes").get<double>(), 0);
  }
  EXPECT_EQ(max_batch["none"], 16) << "the default budget: 16-bit weights + KV for 16 sequences";
  EXPECT_GT(max_batch["int8wo"], 2 * max_batch["none"]);
  EXPECT_GT(max_batch["fp8"], max_batch["int8wo"]);
  size_t points = 0;
  std::vector<int64_t> none_batches;
  for (const auto& p : j.at("points")) {
    ++points;
    if (p.at("mode") == "none") none_batches.push_back(p.at("batch"));
    for (const char* key : {"ttft_s", "tpot_s", "throughput", "mbu", "mfu"}) {
      EXPECT_GT(p.at(key).get<double>(), 0) << key;
      if (std::string(key) == "mbu" || std::string(key) == "mfu") {
        EXPECT_LT(p.at(key).get<double>(), 1) << key;
      }
    }
  }
  EXPECT_EQ(points, 4u + 4u + 4u);
  EXPECT_EQ(none_batches, (std::vector<int64_t>{1, 2, 4, 16})) << "32 does not fit 16-bit's budget; its max, 16, is run";
  for (const char* ratio : {"fp8_vs_16bit_throughput_at_max_batch", "int8wo_vs_16bit_tpot_batch_lt_8",
                            "fp8_vs_16bit_tpot_batch_lt_8", "fp8_vs_16bit_ttft", "int8wo_vs_16bit_prefill_time"})
    EXPECT_TRUE(j.at("ratios").contains(ratio)) << ratio;
  std::ifstream csv(dir / "sweep.csv");
  std::string header;
  std::getline(csv, header);
  EXPECT_EQ(header, "mode,batch,ttft_ms,tpot_ms,throughput,mbu,mfu");
  std::ifstream png(dir / "sweep.png", std::ios::binary);
  char magic[8] = {};
  png.read(magic, 8);
  EXPECT_EQ(std::string(magic + 1, 3), "PNG") << "gnuplot wrote no PNG";
}

}  // namespace
