// llmq-bench: a serving benchmark through the public C ABI, in the style of vLLM's and
// TensorRT-LLM's: N requests with synthetic prompts of L tokens, each generating exactly O tokens,
// kept C at a time in flight (closed loop: a finished request is replaced at once). Prints
// throughput, time to first token, time per output token (both from each request's own timings)
// and the model bandwidth utilization the server measured over its decode-only steps.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/rng.h"
#include "llmq.h"
#include "tools/tool_main.h"

namespace {

using llmq::fail;
using Clock = std::chrono::steady_clock;

const char* kUsage =
    "usage: llmq-bench --model DIR [options]\n"
    "  --requests N            requests in all (default 64)\n"
    "  --concurrency C         requests in flight at once (default 8)\n"
    "  --input-len L           prompt tokens per request (default 128)\n"
    "  --output-len O          generated tokens per request, EOS ignored (default 128)\n"
    "  --quant none|int8wo|fp8 weight quantization (default none)\n"
    "  --kv-dtype auto|f32|f16|bf16|int8|fp8  KV cache element type (default auto)\n"
    "  --backend cpu|cuda      default cpu\n"
    "  --threads T             CPU threads (default: one per core)\n"
    "  --kv-cache-mib M        KV cache size; 0 = the engine's default (default 0)\n"
    "  --max-batched-tokens N  tokens per step, prefill chunk included (default 512)\n"
    "  --max-running N         sequences in flight in the engine (default 64)\n"
    "  --prefix-caching        reuse KV blocks of shared prompt prefixes\n"
    "  --temperature T         sampling temperature (default 0: greedy)\n"
    "  --peak-gbs G            peak memory bandwidth for MBU in GB/s; 0 = measure (default 0)\n"
    "  --seed S                seed of the synthetic prompts (default 1)\n"
    "  --json PATH             also write the results as JSON\n";

void check(llmq_status status, const char* what) {
  if (status != LLMQ_OK) fail(status, "{}: {}", what, llmq_last_error());
}

struct Options {
  std::string model, json;
  int64_t requests = 64, concurrency = 8, input_len = 128, output_len = 128;
  llmq_quant_mode quant = LLMQ_QUANT_NONE;
  llmq_kv_dtype kv_dtype = LLMQ_KV_DTYPE_AUTO;
  llmq_backend backend = LLMQ_BACKEND_CPU;
  int64_t threads = 0, kv_cache_mib = 0, max_batched_tokens = 512, max_running = 64;
  bool prefix_caching = false;
  double temperature = 0, peak_gbs = 0;
  int64_t seed = 1;
};

Options parse(int argc, char** argv) {
  using llmq::tool::parse_int;
  Options o;
  const std::map<std::string, llmq_quant_mode> quants = {
      {"none", LLMQ_QUANT_NONE}, {"int8wo", LLMQ_QUANT_INT8WO}, {"fp8", LLMQ_QUANT_FP8}};
  const std::map<std::string, llmq_kv_dtype> kv_dtypes = {
      {"auto", LLMQ_KV_DTYPE_AUTO}, {"f32", LLMQ_KV_DTYPE_F32},   {"f16", LLMQ_KV_DTYPE_F16},
      {"bf16", LLMQ_KV_DTYPE_BF16}, {"int8", LLMQ_KV_DTYPE_INT8}, {"fp8", LLMQ_KV_DTYPE_FP8}};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (flag == "--prefix-caching") {
      o.prefix_caching = true;
      continue;
    }
    if (i + 1 >= argc) fail(LLMQ_ERR_INVALID_ARGUMENT, "{} needs a value\n{}", flag, kUsage);
    const std::string value = argv[++i];
    if (flag == "--model") o.model = value;
    else if (flag == "--json") o.json = value;
    else if (flag == "--requests") o.requests = parse_int(flag, value, 1, 1000000);
    else if (flag == "--concurrency") o.concurrency = parse_int(flag, value, 1, 100000);
    else if (flag == "--input-len") o.input_len = parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--output-len") o.output_len = parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--threads") o.threads = parse_int(flag, value, 0, 1024);
    else if (flag == "--kv-cache-mib") o.kv_cache_mib = parse_int(flag, value, 0, int64_t(1) << 24);
    else if (flag == "--max-batched-tokens") o.max_batched_tokens = parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--max-running") o.max_running = parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--seed") o.seed = parse_int(flag, value, 0, INT64_MAX);
    else if (flag == "--temperature") o.temperature = llmq::tool::parse_double(flag, value, 0, 100);
    else if (flag == "--peak-gbs") o.peak_gbs = llmq::tool::parse_double(flag, value, 0, 1e6);
    else if (flag == "--quant") {
      if (!quants.count(value)) fail(LLMQ_ERR_INVALID_ARGUMENT, "--quant expects none, int8wo or fp8, got '{}'", value);
      o.quant = quants.at(value);
    } else if (flag == "--kv-dtype") {
      if (!kv_dtypes.count(value))
        fail(LLMQ_ERR_INVALID_ARGUMENT, "--kv-dtype expects auto, f32, f16, bf16, int8 or fp8, got '{}'", value);
      o.kv_dtype = kv_dtypes.at(value);
    } else if (flag == "--backend") {
      if (value != "cpu" && value != "cuda") fail(LLMQ_ERR_INVALID_ARGUMENT, "--backend expects cpu or cuda, got '{}'", value);
      o.backend = value == "cpu" ? LLMQ_BACKEND_CPU : LLMQ_BACKEND_CUDA;
    } else {
      fail(LLMQ_ERR_INVALID_ARGUMENT, "unknown flag {}\n{}", flag, kUsage);
    }
  }
  if (o.model.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "--model DIR is required\n{}", kUsage);
  return o;
}

// The value below which a fraction q of the sorted values lie (linear interpolation).
double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * double(v.size() - 1);
  const size_t lo = size_t(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - double(lo));
}

double mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0 : sum / double(v.size());
}

int run(int argc, char** argv) {
  const Options o = parse(argc, argv);

  llmq_model* model = nullptr;
  check(llmq_model_load(o.model.c_str(), nullptr, &model), "llmq_model_load");
  llmq_model_info info;
  info.struct_size = sizeof info;
  check(llmq_model_get_info(model, &info), "llmq_model_get_info");
  if (o.input_len + o.output_len > info.max_context)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "--input-len {} + --output-len {} exceed the model's context of {}", o.input_len,
         o.output_len, info.max_context);

  llmq_engine_params ep;
  llmq_engine_params_default(&ep);
  ep.backend = o.backend;
  ep.n_threads = int32_t(o.threads);
  ep.kv_cache_bytes = uint64_t(o.kv_cache_mib) << 20;
  ep.max_batch_tokens = int32_t(o.max_batched_tokens);
  ep.kv_dtype = o.kv_dtype;
  ep.quant = o.quant;
  llmq_engine* engine = nullptr;
  check(llmq_engine_create(model, &ep, &engine), "llmq_engine_create");

  llmq_server_params sp;
  llmq_server_params_default(&sp);
  sp.max_running = int32_t(o.max_running);
  sp.prefix_caching = o.prefix_caching ? 1 : 0;
  sp.peak_bandwidth = o.peak_gbs * 1e9;
  llmq_server* server = nullptr;
  check(llmq_server_create(engine, &sp, &server), "llmq_server_create");
  llmq_engine_destroy(engine);  // the server keeps it

  llmq_sampling_params sampling;
  llmq_sampling_params_default(&sampling);
  sampling.temperature = float(o.temperature);
  llmq_request_params rp;
  llmq_request_params_default(&rp);
  rp.sampling = &sampling;
  rp.max_new_tokens = int32_t(o.output_len);
  rp.ignore_eos = 1;

  // Synthetic prompts: BOS (when the model has one), then seeded random ids of the vocabulary.
  llmq::Rng rng(uint64_t(o.seed));
  auto make_prompt = [&] {
    std::vector<int32_t> ids;
    if (info.bos_id >= 0) ids.push_back(info.bos_id);
    while (int64_t(ids.size()) < o.input_len) ids.push_back(int32_t(rng.next() % uint64_t(info.vocab_size)));
    return ids;
  };

  int64_t submitted = 0, finished = 0, failed = 0;
  uint64_t generated = 0;
  std::vector<double> ttft, tpot, e2e;
  std::string first_error;
  const Clock::time_point start = Clock::now();
  auto submit_next = [&] {
    const std::vector<int32_t> prompt = make_prompt();
    llmq_request_id id = 0;
    sampling.seed = uint64_t(o.seed) * 1000003u + uint64_t(submitted);  // one seed per request
    check(llmq_server_submit(server, prompt.data(), prompt.size(), &rp, &id), "llmq_server_submit");
    ++submitted;
  };
  while (submitted < std::min(o.requests, o.concurrency)) submit_next();

  std::vector<llmq_event> events(256);
  const bool tty = isatty(fileno(stderr));
  while (finished < o.requests) {
    events[0].struct_size = sizeof(llmq_event);
    size_t n = 0;
    check(llmq_server_poll(server, events.data(), events.size(), &n, 1000), "llmq_server_poll");
    for (size_t i = 0; i < n; ++i) {
      const llmq_event& e = events[i];
      if (e.type != LLMQ_EVENT_FINISHED) continue;
      ++finished;
      if (e.status != LLMQ_OK) {
        ++failed;
        if (first_error.empty()) first_error = e.error;
      } else {
        generated += uint64_t(e.n_generated);
        ttft.push_back(e.time_to_first_token_s);
        if (e.n_generated > 1) tpot.push_back(e.decode_time_s / double(e.n_generated - 1));
        e2e.push_back(e.time_to_first_token_s + e.decode_time_s);
      }
      if (submitted < o.requests) submit_next();
    }
    if (tty) std::fprintf(stderr, "\r%lld/%lld requests finished", (long long)finished, (long long)o.requests);
  }
  const double duration = std::chrono::duration<double>(Clock::now() - start).count();
  if (tty) std::fputc('\n', stderr);
  llmq_server_stats stats;
  stats.struct_size = sizeof stats;
  check(llmq_server_get_stats(server, &stats), "llmq_server_get_stats");
  llmq_server_destroy(server);
  llmq_model_destroy(model);
  if (failed > 0) fail(LLMQ_ERR_INTERNAL, "{} of {} requests failed; the first: {}", failed, o.requests, first_error);

  const double input_tokens = double(o.requests * o.input_len);
  const double ms = 1e3;
  std::printf("============ llmq serving benchmark ============\n");
  std::printf("%-40s %s\n", "Model:", o.model.c_str());
  std::printf("%-40s %lld x (%lld in, %lld out), concurrency %lld\n", "Requests:", (long long)o.requests,
              (long long)o.input_len, (long long)o.output_len, (long long)o.concurrency);
  std::printf("%-40s %.3f\n", "Benchmark duration (s):", duration);
  std::printf("%-40s %.0f\n", "Total input tokens:", input_tokens);
  std::printf("%-40s %llu\n", "Total generated tokens:", (unsigned long long)generated);
  std::printf("%-40s %.3f\n", "Request throughput (req/s):", double(o.requests) / duration);
  std::printf("%-40s %.2f\n", "Output token throughput (tok/s):", double(generated) / duration);
  std::printf("%-40s %.2f\n", "Total token throughput (tok/s):", (input_tokens + double(generated)) / duration);
  std::printf("---------------Time to First Token---------------\n");
  std::printf("%-40s %.3f\n", "Mean TTFT (ms):", ms * mean(ttft));
  std::printf("%-40s %.3f\n", "Median TTFT (ms):", ms * quantile(ttft, 0.5));
  std::printf("%-40s %.3f\n", "P99 TTFT (ms):", ms * quantile(ttft, 0.99));
  std::printf("-----Time per Output Token (excl. 1st token)-----\n");
  std::printf("%-40s %.3f\n", "Mean TPOT (ms):", ms * mean(tpot));
  std::printf("%-40s %.3f\n", "Median TPOT (ms):", ms * quantile(tpot, 0.5));
  std::printf("%-40s %.3f\n", "P99 TPOT (ms):", ms * quantile(tpot, 0.99));
  std::printf("------------Model bandwidth utilization----------\n");
  std::printf("%-40s %.2f\n", "Peak bandwidth (GB/s):", stats.peak_bandwidth / 1e9);
  std::printf("%-40s %.2f\n", "Mean decode MBU (%):", 100 * stats.mean_decode_mbu);
  std::printf("%-40s %.2f\n", "Tokens per step (mean):", double(stats.prompt_tokens + stats.generated_tokens) /
                                                           double(std::max<uint64_t>(stats.steps, 1)));
  std::printf("%-40s %llu\n", "Preemptions:", (unsigned long long)stats.preemptions);
  std::printf("%-40s %llu\n", "Prompt tokens from the prefix cache:", (unsigned long long)stats.cached_prompt_tokens);
  std::printf("=================================================\n");

  if (!o.json.empty()) {
    const nlohmann::json result = {
        {"model", o.model},
        {"requests", o.requests},
        {"concurrency", o.concurrency},
        {"input_len", o.input_len},
        {"output_len", o.output_len},
        {"duration_s", duration},
        {"generated_tokens", generated},
        {"request_throughput", double(o.requests) / duration},
        {"output_throughput", double(generated) / duration},
        {"ttft_mean_s", mean(ttft)},
        {"ttft_p50_s", quantile(ttft, 0.5)},
        {"ttft_p99_s", quantile(ttft, 0.99)},
        {"tpot_mean_s", mean(tpot)},
        {"tpot_p50_s", quantile(tpot, 0.5)},
        {"tpot_p99_s", quantile(tpot, 0.99)},
        {"peak_bandwidth", stats.peak_bandwidth},
        {"mean_decode_mbu", stats.mean_decode_mbu},
        {"preemptions", stats.preemptions},
        {"cached_prompt_tokens", stats.cached_prompt_tokens}};
    std::ofstream out(o.json);
    out << result.dump(2) << "\n";
    if (!out) fail(LLMQ_ERR_IO, "--json {}: cannot write", o.json);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return llmq::tool::run_main("llmq-bench", run, argc, argv); }
