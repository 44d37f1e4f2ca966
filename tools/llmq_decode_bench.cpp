// llmq-decode-bench: batch-1 decode speed against this machine's own memory bandwidth.
// Decoding one token reads every weight once, so tokens/s x weight bytes/step is the weight
// bandwidth achieved; comparing it with a plain streaming read of memory by the same number of
// threads says how close the engine comes to the hardware limit.
#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "engine/host_peak.h"
#include "engine/error.h"
#include "llmq.h"

namespace {

const char* kUsage =
    "usage: llmq-decode-bench --model DIR [--tokens N] [--threads T] [--prompt-len L] [--bw-bytes BYTES]\n"
    "  --tokens N       tokens generated per run (default 32; decode speed uses N - 1)\n"
    "  --threads T      engine threads and memory-read threads (default: one per core)\n"
    "  --prompt-len L   synthetic prompt length (default 16)\n"
    "  --bw-bytes B     buffer for the memory bandwidth test; K, M, G suffixes (default 1G)\n";

struct BenchError {
  std::string message;
};

[[noreturn]] void die(const std::string& message) { throw BenchError{message}; }

void check(llmq_status status, const char* what) {
  if (status != LLMQ_OK) die(fmt::format("{}: {}: {}", what, llmq_status_string(status), llmq_last_error()));
}

int64_t parse_int(const std::string& flag, const std::string& text, int64_t min, int64_t max, bool suffixes = false) {
  int64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  int64_t unit = 1;
  if (suffixes && ec == std::errc() && end + 1 == text.data() + text.size()) {
    const char s = *end++;
    unit = s == 'K' || s == 'k' ? 1 << 10 : s == 'M' || s == 'm' ? 1 << 20 : s == 'G' || s == 'g' ? 1 << 30 : 0;
  }
  if (ec != std::errc() || end != text.data() + text.size() || unit == 0 || value > max / unit ||
      value * unit < min)
    die(fmt::format("{} expects an integer in [{}, {}], got '{}'", flag, min, max, text));
  return value * unit;
}


// ---- Decode speed ---------------------------------------------------------------------------

struct Handles {
  llmq_model* model = nullptr;
  llmq_engine* engine = nullptr;
  ~Handles() {
    llmq_engine_destroy(engine);
    llmq_model_destroy(model);
  }
};

std::string join(const std::vector<double>& values, const char* format) {
  std::string out;
  for (double v : values) out += (out.empty() ? "" : " ") + fmt::format(fmt::runtime(format), v);
  return out;
}

int run(int argc, char** argv) {
  std::string model_dir;
  int64_t tokens = 32, prompt_len = 16, threads = 0, bw_bytes = int64_t(1) << 30;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) die(fmt::format("{}: missing value (or unknown flag)\n{}", flag, kUsage));
    const std::string value = argv[++i];
    if (flag == "--model") model_dir = value;
    else if (flag == "--tokens") tokens = parse_int(flag, value, 2, 1 << 20);
    else if (flag == "--threads") threads = parse_int(flag, value, 1, 1024);
    else if (flag == "--prompt-len") prompt_len = parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--bw-bytes") bw_bytes = parse_int(flag, value, 1 << 20, int64_t(1) << 40, true);
    else die(fmt::format("unknown flag '{}'\n{}", flag, kUsage));
  }
  if (model_dir.empty()) die(fmt::format("--model DIR is required\n{}", kUsage));
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());

  // (a) Memory bandwidth first, so its buffer is gone before the model is mapped.
  llmq::MemoryBandwidth bw;
  try {
    bw = llmq::measure_read_bandwidth(size_t(bw_bytes), int(threads), 5);
  } catch (const llmq::Error& e) {
    die(fmt::format("--bw-bytes: {}", e.what()));
  }
  const double bw_best_gbs = bw.best_bytes_per_s / 1e9;
  for (double& pass : bw.passes) pass /= 1e9;

  // (b) Decode speed through the C API.
  Handles h;
  check(llmq_model_load(model_dir.c_str(), nullptr, &h.model), "llmq_model_load");
  llmq_model_info info;
  info.struct_size = sizeof info;
  check(llmq_model_get_info(h.model, &info), "llmq_model_get_info");
  if (prompt_len + tokens > info.max_context)
    die(fmt::format("--prompt-len {} + --tokens {} exceed the model's context of {}", prompt_len, tokens,
                    info.max_context));
  llmq_engine_params engine_params;
  llmq_engine_params_default(&engine_params);
  engine_params.n_threads = int32_t(threads);
  check(llmq_engine_create(h.model, &engine_params, &h.engine), "llmq_engine_create");

  std::vector<int32_t> prompt;
  if (info.bos_id >= 0) prompt.push_back(info.bos_id);
  while (int64_t(prompt.size()) < prompt_len) prompt.push_back(int32_t((prompt.size() * 7919 + 13) % info.vocab_size));
  llmq_sampling_params sampling;
  llmq_sampling_params_default(&sampling);
  sampling.temperature = 0;
  sampling.seed = 0;
  llmq_generate_params params;
  llmq_generate_params_default(&params);
  params.sampling = &sampling;
  params.max_new_tokens = int32_t(tokens);
  params.ignore_eos = 1;

  std::vector<double> runs;
  double best = 0, ttft = 0;
  std::vector<int32_t> out(size_t(tokens), 0);
  for (int r = 0; r < 3; ++r) {
    llmq_generate_result result;
    result.struct_size = sizeof result;
    check(llmq_generate(h.engine, prompt.data(), prompt.size(), &params, out.data(), out.size(), &result),
          "llmq_generate");
    if (result.n_generated < 2 || !(result.decode_time_s > 0))
      die(fmt::format("llmq_generate produced {} tokens; need at least 2 to time decoding", result.n_generated));
    runs.push_back((result.n_generated - 1) / result.decode_time_s);
    if (runs.back() > best) {
      best = runs.back();
      ttft = result.time_to_first_token_s;
    }
  }

  // (c) The table.
  const double bytes_per_step = double(info.weight_bytes_per_step);
  const double achieved = bytes_per_step * best / 1e9;
  auto row = [](const char* name, const std::string& value) { fmt::print("  {:<34} {}\n", name, value); };
  fmt::print("llmq-decode-bench: {} ({}, {} layers, hidden {}, {} heads / {} kv, vocab {})\n", model_dir,
             info.architecture, info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads,
             info.vocab_size);
  row("threads", fmt::format("{}", threads));
  row("model weight bytes / step", fmt::format("{} ({:.3f} GB)", info.weight_bytes_per_step, bytes_per_step / 1e9));
  row("prompt / generated tokens", fmt::format("{} / {}", prompt.size(), tokens));
  row("prefill (time to first token)", fmt::format("{:.1f} ms", ttft * 1e3));
  row("decode runs, tokens/s", join(runs, "{:.2f}"));
  row("decode tokens/s (batch 1, best)", fmt::format("{:.2f}", best));
  row("ms / token", fmt::format("{:.1f}", 1e3 / best));
  row("achieved weight bandwidth", fmt::format("{:.2f} GB/s", achieved));
  row("memory read passes, GB/s", join(bw.passes, "{:.2f}"));
  row("measured memory bandwidth (best)",
      fmt::format("{:.2f} GB/s ({} sum, {} MiB, {} threads)", bw_best_gbs, bw.avx2 ? "AVX2" : "scalar",
                  bw_bytes >> 20, threads));
  row("fraction of measured bandwidth", fmt::format("{:.1f} %", 100.0 * achieved / bw_best_gbs));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const BenchError& e) {
    std::fprintf(stderr, "llmq-decode-bench: %s\n", e.message.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llmq-decode-bench: %s\n", e.what());
    return 1;
  }
}
