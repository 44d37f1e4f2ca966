// llmq-step-bench: what serving people read, per quantization mode: prefill tokens/s for one long
// prompt, and decode tokens/s at several batch sizes (continuous-batching steps of one token per
// sequence), with the bytes each decode step must read (weights + KV) over its time. Uses the
// engine's step() directly; each timed decode step is a serving step: greedy sampling on the
// backend, its tokens copied back and fed in.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "engine/engine.h"
#include "engine/error.h"
#include "tools/tool_main.h"

namespace {

using namespace llmq;
using Clock = std::chrono::steady_clock;

const char* kUsage =
    "usage: llmq-step-bench --model DIR [options]\n"
    "  --backend cpu|cuda     default cuda\n"
    "  --quant LIST           comma-separated modes: none,int8wo,fp8 (default none)\n"
    "  --batches LIST         decode batch sizes (default 1,16,64); "" skips decode\n"
    "  --prompt-len N         tokens per sequence before decode is timed (default 128)\n"
    "  --decode-steps N       timed decode steps per batch size (default 32)\n"
    "  --prefill N            prompt length for the prefill timing; 0 skips it (default 2048)\n"
    "  --kv-cache-gib N       KV cache size (default 16)\n"
    "  --tp N                 tensor-parallel ranks (CUDA: GPUs 0 .. N-1; default 1)\n"
    "  --json PATH            also write the results as JSON\n";

using tool::seconds_since;

struct Row {
  std::string mode, phase;
  int64_t tokens = 0;
  double step_ms = 0, tokens_per_s = 0, read_gbs = 0, weight_gb = 0, kv_gb = 0, load_s = 0;
};

// Deterministic prompt ids, away from the special tokens.
std::vector<int32_t> prompt_ids(int64_t n, int32_t vocab, int64_t salt) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = int32_t(3 + (i * 7919 + salt * 104729) % (vocab - 3));
  return ids;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int run(int argc, char** argv) {
  std::string model_dir, json_path, backend = "cuda";
  std::vector<std::string> modes{"none"};
  std::vector<int64_t> batches{1, 16, 64};
  int64_t prompt_len = 128, decode_steps = 32, prefill = 2048, kv_gib = 16, tp = 1;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) fail(LLMQ_ERR_INVALID_ARGUMENT, "{} needs a value\n{}", flag, kUsage);
    std::string value = argv[++i];
    if (flag == "--model") model_dir = value;
    else if (flag == "--backend") backend = value;
    else if (flag == "--quant") modes = tool::split_list(value);
    else if (flag == "--batches") {
      batches.clear();
      for (const std::string& b : tool::split_list(value)) batches.push_back(tool::parse_int(flag, b, 1, 4096));
    } else if (flag == "--prompt-len") prompt_len = tool::parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--decode-steps") decode_steps = tool::parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--prefill") prefill = tool::parse_int(flag, value, 0, 65536);
    else if (flag == "--kv-cache-gib") kv_gib = tool::parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--tp") tp = tool::parse_int(flag, value, 1, 8);
    else if (flag == "--json") json_path = value;
    else fail(LLMQ_ERR_INVALID_ARGUMENT, "unknown option {}\n{}", flag, kUsage);
  }
  if (model_dir.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "--model is required\n{}", kUsage);
  if (backend != "cpu" && backend != "cuda") fail(LLMQ_ERR_INVALID_ARGUMENT, "--backend must be cpu or cuda");

  auto model = Model::load(model_dir);
  const int32_t vocab = int32_t(model->config().vocab_size);
  std::vector<Row> rows;
  std::string device_name;
  for (const std::string& mode : modes) {
    EngineOptions options;
    options.backend = backend == "cuda" ? LLMQ_BACKEND_CUDA : LLMQ_BACKEND_CPU;
    options.kv_cache_bytes = uint64_t(kv_gib) << 30;
    options.tensor_parallel = int32_t(tp);
    int64_t max_batch = 1;
    for (int64_t b : batches) max_batch = std::max(max_batch, b);
    options.max_batch_tokens = int32_t(std::max<int64_t>({prefill, max_batch, 512}));
    if (mode == "none") options.quant = QuantMode::None;
    else if (mode == "int8wo") options.quant = QuantMode::Int8WeightOnly;
    else if (mode == "fp8") options.quant = QuantMode::Fp8;
    else fail(LLMQ_ERR_INVALID_ARGUMENT, "--quant: unknown mode '{}' (none, int8wo, fp8)", mode);
    const auto load_start = Clock::now();
    Engine engine(model, options);
    const double load_s = seconds_since(load_start);
    device_name = engine.backend_name();
    const double weight_gb = double(engine.weight_bytes_per_step()) / 1e9;
    std::fprintf(stderr, "%s: engine ready in %.1f s on %s, %.3f GB of weights per step, KV %.0f bytes/token\n",
                 mode.c_str(), load_s, device_name.c_str(), weight_gb, double(engine.kv_bytes_per_token()));
    std::vector<float> logits;

    if (prefill > 0) {
      std::vector<double> times;
      for (int rep = 0; rep < 4; ++rep) {  // the first is a warm-up
        auto seq = engine.new_sequence();
        std::vector<int32_t> ids = prompt_ids(prefill, vocab, rep);
        const auto start = Clock::now();
        engine.step({SequenceStep{seq.get(), ids.data(), int32_t(prefill), false, true}}, &logits);
        if (rep > 0) times.push_back(seconds_since(start));
      }
      Row r{mode, "prefill", prefill};
      r.step_ms = median(times) * 1e3;
      r.tokens_per_s = double(prefill) / median(times);
      r.weight_gb = weight_gb;
      r.load_s = load_s;
      rows.push_back(r);
      std::fprintf(stderr, "%s: prefill %lld tokens: %.1f ms, %.0f tokens/s\n", mode.c_str(), (long long)prefill,
                   r.step_ms, r.tokens_per_s);
    }

    for (int64_t batch : batches) {
      std::vector<std::unique_ptr<SequenceKv>> seqs;
      std::vector<std::vector<int32_t>> prompts;
      for (int64_t b = 0; b < batch; ++b) {
        seqs.push_back(engine.new_sequence());
        prompts.push_back(prompt_ids(prompt_len, vocab, 100 + b));
      }
      // Prefill every sequence, as many whole prompts per step as fit.
      for (int64_t b = 0; b < batch;) {
        std::vector<SequenceStep> step;
        int64_t tokens = 0;
        for (; b < batch && (step.empty() || tokens + prompt_len <= engine.max_batch_tokens()); ++b) {
          const int32_t n = int32_t(std::min<int64_t>(prompt_len, engine.max_batch_tokens()));
          step.push_back(SequenceStep{seqs[size_t(b)].get(), prompts[size_t(b)].data(), n, false, true});
          tokens += n;
        }
        engine.step(step, &logits);
      }
      std::vector<int32_t> next(static_cast<size_t>(batch));
      for (int64_t b = 0; b < batch; ++b) next[size_t(b)] = int32_t(3 + b % (vocab - 3));
      // A serving step: greedy sampling on the backend, its tokens fed back.
      std::vector<int32_t> sampled;
      const std::vector<SampleRow> greedy(static_cast<size_t>(batch));
      auto decode_step = [&] {
        std::vector<SequenceStep> step;
        for (int64_t b = 0; b < batch; ++b) step.push_back(SequenceStep{seqs[size_t(b)].get(), &next[size_t(b)], 1, false, true});
        engine.step(step, greedy, &sampled);
        next = sampled;
      };
      for (int w = 0; w < 2; ++w) decode_step();
      const int64_t context_start = seqs[0]->length();
      const auto start = Clock::now();
      for (int64_t s = 0; s < decode_steps; ++s) decode_step();
      const double step_s = seconds_since(start) / double(decode_steps);
      const double mean_context = double(context_start) + double(decode_steps + 1) / 2.0;
      Row r{mode, "decode", batch};
      r.step_ms = step_s * 1e3;
      r.tokens_per_s = double(batch) / step_s;
      r.weight_gb = weight_gb;
      r.kv_gb = double(batch) * mean_context * double(engine.kv_bytes_per_token()) / 1e9;
      r.read_gbs = (r.weight_gb + r.kv_gb) / step_s;
      r.load_s = load_s;
      rows.push_back(r);
      std::fprintf(stderr, "%s: decode batch %lld: %.2f ms/step, %.0f tokens/s, %.0f GB/s read (weights %.2f GB + KV %.2f GB)\n",
                   mode.c_str(), (long long)batch, r.step_ms, r.tokens_per_s, r.read_gbs, r.weight_gb, r.kv_gb);
    }
  }

  std::string json = fmt::format("{{\"device\": \"{}\", \"model\": \"{}\", \"prompt_len\": {}, \"rows\": [", device_name,
                                 model_dir, prompt_len);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    json += fmt::format(
        "{}{{\"mode\": \"{}\", \"phase\": \"{}\", \"tokens\": {}, \"step_ms\": {:.4f}, \"tokens_per_s\": {:.2f}, "
        "\"read_gbs\": {:.2f}, \"weight_gb\": {:.4f}, \"kv_gb\": {:.4f}, \"load_s\": {:.2f}}}",
        i ? ", " : "", r.mode, r.phase, r.tokens, r.step_ms, r.tokens_per_s, r.read_gbs, r.weight_gb, r.kv_gb, r.load_s);
  }
  json += "]}\n";
  std::fputs(json.c_str(), stdout);
  if (!json_path.empty()) std::ofstream(json_path) << json;
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return llmq::tool::run_main("llmq-step-bench", run, argc, argv); }
