// llmq-sweep: the quantization trade-offs as serving people read them, per mode and batch size,
// on whatever machine it runs: 16-bit (weights as loaded), int8wo + INT8 KV, fp8 + FP8 KV.
// For each batch B (static batching, as the seed's TensorRT-LLM runs), run once untimed first:
// B prompts of L tokens are prefilled (TTFT: until every one has its first token), then O - 1
// decode steps run at batch B (TPOT: their mean). Throughput is B * O over the whole. MBU is
// (weight bytes + KV bytes read) per decode step over its time, against a peak bandwidth measured
// on the same device; MFU is the prefill's 2 * parameters * tokens FLOPs (attention not counted)
// over a peak measured likewise on the CPU (or given). The largest batch that fits a memory
// budget (weights + KV of B * (L + O) tokens) is computed per mode, and the sweep runs up to it.
// Writes CSV, JSON, a gnuplot PNG of four panels, and prints the seed's headline ratios.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/host_peak.h"
#include "engine/engine.h"
#include "engine/error.h"
#include "tools/tool_main.h"

namespace {

using namespace llmq;
using Clock = std::chrono::steady_clock;

const char* kUsage =
    "usage: llmq-sweep --model DIR --out DIR [options]\n"
    "  --backend cpu|cuda        default cpu\n"
    "  --modes LIST              of none,int8wo,fp8 (default all three; int8wo and fp8 use their 8-bit KV)\n"
    "  --batches LIST            batch sizes (default 1,2,4,8,16,32,64,128), cut at what fits the budget\n"
    "  --input-len L             prompt tokens (default 128)\n"
    "  --output-len O            generated tokens (default 32)\n"
    "  --memory-budget-mib M     weights + KV cache; 0 = 16-bit weights + KV for 16 sequences (default 0)\n"
    "  --threads T               CPU threads (default: one per core)\n"
    "  --peak-gbs G              peak bandwidth for MBU; 0 = measure (default 0)\n"
    "  --peak-tflops T           peak compute for MFU; 0 = measure on the CPU, none on CUDA (default 0)\n"
    "  --no-plot                 write sweep.gnuplot but do not run gnuplot\n";

using tool::seconds_since;

struct Mode {
  std::string name;
  QuantMode quant;
  llmq_kv_dtype kv;
};

struct Point {
  std::string mode;
  int64_t batch = 0;
  double ttft_s = 0, tpot_s = 0, throughput = 0, mbu = 0, mfu = 0;
};

struct ModeSummary {
  std::string mode;
  uint64_t weight_bytes = 0, kv_bytes_per_token = 0;
  int64_t max_batch = 0;  // under the memory budget
};

// 2 FLOPs per multiply-add of every linear layer and lm_head, per token (attention excluded).
double flops_per_token(const ModelConfig& c) {
  const double h = double(c.hidden_size);
  const double per_layer = h * double(c.q_size() + 2 * c.kv_size()) + double(c.q_size()) * h +
                           3.0 * h * double(c.intermediate_size);
  return 2.0 * (double(c.num_layers) * per_layer + h * double(c.vocab_size));
}

void progress(size_t done, size_t total, const std::string& what) {
  if (!isatty(fileno(stderr))) return;
  const int width = 30;
  const int filled = int(double(width) * double(done) / double(std::max<size_t>(total, 1)));
  std::fprintf(stderr, "\r[%s%s] %zu/%zu %-40s", std::string(size_t(filled), '#').c_str(),
               std::string(size_t(width - filled), '.').c_str(), done, total, what.c_str());
  if (done == total) std::fputc('\n', stderr);
}

// Runs one batch: prefill all prompts (whole prompts packed per step, chunked when longer than
// the step), then O - 1 decode steps.
Point run_batch(Engine& engine, const Mode& mode, int64_t batch, int64_t input_len, int64_t output_len,
                double peak_bytes, double peak_flops) {
  const int32_t vocab = engine.vocab_size();
  std::vector<std::unique_ptr<SequenceKv>> seqs;
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t b = 0; b < batch; ++b) {
    seqs.push_back(engine.new_sequence());
    std::vector<int32_t> ids(static_cast<size_t>(input_len));
    for (int64_t i = 0; i < input_len; ++i) ids[size_t(i)] = int32_t(3 + (i * 7919 + b * 104729) % (vocab - 3));
    prompts.push_back(std::move(ids));
  }
  // Serving steps: greedy sampling on the backend (the synthetic model's tokens are not fed back,
  // so that every mode decodes the same inputs).
  std::vector<int32_t> sampled;
  const std::vector<SampleRow> greedy(static_cast<size_t>(batch));
  std::vector<int64_t> done(static_cast<size_t>(batch), 0);
  const auto start = Clock::now();
  for (int64_t b = 0; b < batch;) {
    std::vector<SequenceStep> step;
    int32_t budget = engine.max_batch_tokens();
    for (int64_t s = b; s < batch && budget > 0; ++s) {
      const int32_t n = int32_t(std::min<int64_t>(input_len - done[size_t(s)], budget));
      const bool last = done[size_t(s)] + n == input_len;
      step.push_back(SequenceStep{seqs[size_t(s)].get(), prompts[size_t(s)].data() + done[size_t(s)], n, false, last});
      done[size_t(s)] += n;
      budget -= n;
    }
    engine.step(step, std::vector<SampleRow>(logit_rows(step)), &sampled);
    while (b < batch && done[size_t(b)] == input_len) ++b;
  }
  Point p{mode.name, batch};
  p.ttft_s = seconds_since(start);
  std::vector<int32_t> next(static_cast<size_t>(batch));
  double decode_s = 0, bytes = 0;
  for (int64_t t = 1; t < output_len; ++t) {
    std::vector<SequenceStep> step;
    for (int64_t b = 0; b < batch; ++b) {
      next[size_t(b)] = int32_t(3 + (t * 31 + b) % (vocab - 3));
      step.push_back(SequenceStep{seqs[size_t(b)].get(), &next[size_t(b)], 1, false, true});
    }
    const auto step_start = Clock::now();
    engine.step(step, greedy, &sampled);
    decode_s += seconds_since(step_start);
    bytes += double(engine.weight_bytes_per_step()) +
             double(batch) * double(input_len + t) * double(engine.kv_bytes_per_token());
  }
  p.tpot_s = output_len > 1 ? decode_s / double(output_len - 1) : 0;
  p.throughput = double(batch * output_len) / (p.ttft_s + decode_s);
  p.mbu = decode_s > 0 ? bytes / decode_s / peak_bytes : 0;
  p.mfu = peak_flops > 0 ? flops_per_token(engine.model().config()) * double(batch * input_len) / p.ttft_s / peak_flops : 0;
  return p;
}

const Point* find(const std::vector<Point>& points, const std::string& mode, int64_t batch) {
  for (const Point& p : points)
    if (p.mode == mode && p.batch == batch) return &p;
  return nullptr;
}

// The mean over batches 1..7 of mode's TPOT over none's (the seed: ~0.7 for int8wo and fp8).
double small_batch_tpot_ratio(const std::vector<Point>& points, const std::string& mode) {
  double sum = 0;
  int n = 0;
  for (const Point& p : points) {
    const Point* base = find(points, "none", p.batch);
    if (p.mode == mode && p.batch < 8 && base && base->tpot_s > 0) {
      sum += p.tpot_s / base->tpot_s;
      ++n;
    }
  }
  return n ? sum / n : NAN;
}

// Writes sweep.gnuplot beside sweep.csv, with paths relative to that folder, so that
// `cd OUT && gnuplot sweep.gnuplot` redraws sweep.png anywhere (e.g. from a GPU run's CSV).
void write_plot_script(const std::string& out_dir, const std::string& title, const std::vector<std::string>& modes) {
  std::ofstream g(out_dir + "/sweep.gnuplot");
  g << "# Draws sweep.png from sweep.csv (written by llmq-sweep): cd to this folder, then gnuplot sweep.gnuplot\n"
    << "set terminal pngcairo size 1400,1000 font ',11'\n"
    << "set output 'sweep.png'\n"
    << "set datafile separator ','\n"
    << "set datafile columnheaders\n"
    << "set key top left\nset grid\n"
    << "set multiplot layout 2,2 title '" << title << "'\n";
  // Columns: mode,batch,ttft_ms,tpot_ms,throughput,mbu,mfu; a mode's rows are picked by column 1.
  auto panel = [&](int ycol, const std::string& ylabel, int xcol, const std::string& xlabel, bool logx) {
    g << (logx ? "set logscale x 2\n" : "unset logscale x\n") << "set xlabel '" << xlabel << "'\nset ylabel '"
      << ylabel << "'\nplot ";
    for (size_t i = 0; i < modes.size(); ++i)
      g << (i ? ", " : "") << "'sweep.csv' using (strcol(1) eq '" << modes[i] << "' ? $" << xcol << " : NaN):" << ycol
        << " with linespoints lw 2 title '" << modes[i] << "'";
    g << "\n";
  };
  panel(5, "output tokens/s", 2, "batch size", true);
  panel(4, "TPOT (ms)", 2, "batch size", true);
  panel(3, "TTFT (ms)", 2, "batch size", true);
  panel(5, "output tokens/s", 4, "TPOT (ms): latency per token", false);
  g << "unset multiplot\n";
  if (!g) fail(LLMQ_ERR_IO, "--out {}: cannot write sweep.gnuplot", out_dir);
}

void draw_plot(const std::string& out_dir) {
  const int rc = std::system(("cd '" + out_dir + "' && gnuplot sweep.gnuplot 2>&1").c_str());
  if (rc != 0)
    fail(LLMQ_ERR_IO, "gnuplot failed on {}/sweep.gnuplot (exit {}); install gnuplot-nox or pass --no-plot", out_dir, rc);
}

int run(int argc, char** argv) {
  std::string model_dir, out_dir, backend = "cpu";
  std::vector<std::string> mode_names{"none", "int8wo", "fp8"};
  std::vector<int64_t> batches{1, 2, 4, 8, 16, 32, 64, 128};
  int64_t input_len = 128, output_len = 32, budget_mib = 0, threads = 0;
  double peak_gbs = 0, peak_tflops = 0;
  bool plot = true;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (flag == "--no-plot") {
      plot = false;
      continue;
    }
    if (i + 1 >= argc) fail(LLMQ_ERR_INVALID_ARGUMENT, "{} needs a value\n{}", flag, kUsage);
    const std::string value = argv[++i];
    if (flag == "--model") model_dir = value;
    else if (flag == "--out") out_dir = value;
    else if (flag == "--backend") backend = value;
    else if (flag == "--modes") mode_names = tool::split_list(value);
    else if (flag == "--batches") {
      batches.clear();
      for (const std::string& b : tool::split_list(value)) batches.push_back(tool::parse_int(flag, b, 1, 4096));
    } else if (flag == "--input-len") input_len = tool::parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--output-len") output_len = tool::parse_int(flag, value, 1, 1 << 20);
    else if (flag == "--memory-budget-mib") budget_mib = tool::parse_int(flag, value, 0, int64_t(1) << 30);
    else if (flag == "--threads") threads = tool::parse_int(flag, value, 0, 1024);
    else if (flag == "--peak-gbs") peak_gbs = tool::parse_double(flag, value, 0, 1e6);
    else if (flag == "--peak-tflops") peak_tflops = tool::parse_double(flag, value, 0, 1e6);
    else fail(LLMQ_ERR_INVALID_ARGUMENT, "unknown option {}\n{}", flag, kUsage);
  }
  if (model_dir.empty() || out_dir.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "--model and --out are required\n{}", kUsage);
  if (backend != "cpu" && backend != "cuda") fail(LLMQ_ERR_INVALID_ARGUMENT, "--backend expects cpu or cuda, got '{}'", backend);
  if (out_dir.find('\'') != std::string::npos)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "--out {}: a quote in the path is not supported (gnuplot runs through the shell)", out_dir);
  if (batches.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "--batches is empty");
  std::vector<Mode> modes;
  for (const std::string& m : mode_names) {
    if (m == "none") modes.push_back({m, QuantMode::None, LLMQ_KV_DTYPE_AUTO});
    else if (m == "int8wo") modes.push_back({m, QuantMode::Int8WeightOnly, LLMQ_KV_DTYPE_INT8});
    else if (m == "fp8") modes.push_back({m, QuantMode::Fp8, LLMQ_KV_DTYPE_FP8});
    else fail(LLMQ_ERR_INVALID_ARGUMENT, "--modes: unknown mode '{}' (none, int8wo, fp8)", m);
  }
  std::sort(batches.begin(), batches.end());
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) fail(LLMQ_ERR_IO, "--out {}: {}", out_dir, ec.message());

  auto model = Model::load(model_dir);
  const ModelConfig& config = model->config();
  if (input_len + output_len > config.max_position)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "--input-len {} + --output-len {} exceed the model's context of {}", input_len,
         output_len, config.max_position);
  const int32_t block = EngineOptions().kv_block_size;
  const int64_t blocks_per_seq = (input_len + output_len + block - 1) / block;

  // The default budget: what the 16-bit model needs for 16 sequences.
  uint64_t budget = uint64_t(budget_mib) << 20;
  if (budget == 0) {
    const DType kv16 = resolve_kv_dtype(*model, LLMQ_KV_DTYPE_AUTO);
    budget = model->weight_bytes() + 16 * uint64_t(blocks_per_seq * block) * kv_bytes_per_token(config, kv16);
  }

  std::vector<Point> points;
  std::vector<ModeSummary> summaries;
  std::string device;
  double peak_bytes = peak_gbs * 1e9, peak_flops = peak_tflops * 1e12;
  size_t planned = modes.size() * batches.size(), finished = 0;
  for (const Mode& mode : modes) {
    EngineOptions options;
    options.backend = backend == "cuda" ? LLMQ_BACKEND_CUDA : LLMQ_BACKEND_CPU;
    options.n_threads = int32_t(threads);
    options.quant = mode.quant;
    options.kv_dtype = mode.kv;
    options.max_batch_tokens = 512;
    // Enough KV for the largest swept batch, and never more than the budget (weights come on top).
    const uint64_t kv_token_bytes = kv_bytes_per_token(config, resolve_kv_dtype(*model, mode.kv));
    options.kv_cache_bytes = std::min<uint64_t>(budget, uint64_t(batches.back() * blocks_per_seq * block) * kv_token_bytes);
    progress(finished, planned, mode.name + ": loading");
    Engine engine(model, options);
    device = engine.backend_name();
    if (peak_bytes == 0) peak_bytes = engine.measure_peak_bandwidth();
    if (peak_flops == 0 && backend == "cpu") peak_flops = measure_peak_flops(threads > 0 ? int(threads) : 0);
    ModeSummary s{mode.name, engine.weight_bytes(), engine.kv_bytes_per_token(), 0};
    if (budget > s.weight_bytes)
      s.max_batch = int64_t((budget - s.weight_bytes) / (uint64_t(blocks_per_seq * block) * s.kv_bytes_per_token));
    summaries.push_back(s);
    const int64_t capacity = engine.allocator().num_blocks() / blocks_per_seq;
    // The listed batches that fit, and the largest batch that fits itself (the seed compares each
    // mode at its own max batch) when it is within the list's range.
    std::vector<int64_t> mode_batches;
    for (int64_t batch : batches)
      if (batch <= s.max_batch && batch <= capacity) mode_batches.push_back(batch);
    const int64_t fit = std::min(s.max_batch, capacity);
    if (fit >= 1 && fit <= batches.back() && (mode_batches.empty() || mode_batches.back() != fit))
      mode_batches.push_back(fit);
    planned = planned - batches.size() + mode_batches.size();
    for (int64_t batch : mode_batches) {
      progress(finished, planned, fmt::format("{}: batch {}", mode.name, batch));
      // Untimed first: a backend's first run of a shape times its candidate kernels (the CUDA
      // backend's cuBLASLt algorithms and linear paths), which is no part of serving a request.
      run_batch(engine, mode, batch, input_len, output_len, peak_bytes, peak_flops);
      points.push_back(run_batch(engine, mode, batch, input_len, output_len, peak_bytes, peak_flops));
      ++finished;
    }
    progress(finished, planned, mode.name + ": done");
  }

  // Files: CSV (one row per point), JSON (everything), PNG.
  const std::string csv_path = out_dir + "/sweep.csv", json_path = out_dir + "/sweep.json";
  {
    std::ofstream csv(csv_path);
    csv << "mode,batch,ttft_ms,tpot_ms,throughput,mbu,mfu\n";
    for (const Point& p : points)
      csv << fmt::format("{},{},{:.4f},{:.4f},{:.3f},{:.5f},{:.5f}\n", p.mode, p.batch, p.ttft_s * 1e3, p.tpot_s * 1e3,
                         p.throughput, p.mbu, p.mfu);
    if (!csv) fail(LLMQ_ERR_IO, "--out {}: cannot write {}", out_dir, csv_path);
  }

  // The seed's four headline ratios, for this machine.
  auto at_max = [&](const std::string& mode) -> const Point* {
    const Point* best = nullptr;
    for (const Point& p : points)
      if (p.mode == mode && (!best || p.batch > best->batch)) best = &p;
    return best;
  };
  nlohmann::json ratios;
  const Point *none_max = at_max("none"), *fp8_max = at_max("fp8");
  if (none_max && fp8_max)
    ratios["fp8_vs_16bit_throughput_at_max_batch"] = {{"ratio", fp8_max->throughput / none_max->throughput},
                                                      {"fp8_batch", fp8_max->batch},
                                                      {"16bit_batch", none_max->batch}};
  for (const std::string m : {"int8wo", "fp8"}) {
    const double r = small_batch_tpot_ratio(points, m);
    if (!std::isnan(r)) ratios[m + "_vs_16bit_tpot_batch_lt_8"] = r;
  }
  const Point *none1 = find(points, "none", batches.front()), *fp81 = find(points, "fp8", batches.front()),
              *int81 = find(points, "int8wo", batches.front());
  if (none1 && fp81) ratios["fp8_vs_16bit_ttft"] = {{"ratio", fp81->ttft_s / none1->ttft_s}, {"batch", none1->batch}};
  if (none1 && int81)
    ratios["int8wo_vs_16bit_prefill_time"] = {{"ratio", int81->ttft_s / none1->ttft_s}, {"batch", none1->batch}};

  nlohmann::json j;
  j["model"] = model_dir;
  j["device"] = device;
  j["input_len"] = input_len;
  j["output_len"] = output_len;
  j["memory_budget_bytes"] = budget;
  j["peak_bandwidth_bytes_per_s"] = peak_bytes;
  j["peak_flops"] = peak_flops;
  for (const ModeSummary& s : summaries)
    j["modes"].push_back({{"mode", s.mode},
                          {"weight_bytes", s.weight_bytes},
                          {"kv_bytes_per_token", s.kv_bytes_per_token},
                          {"max_batch_under_budget", s.max_batch}});
  for (const Point& p : points)
    j["points"].push_back({{"mode", p.mode},
                           {"batch", p.batch},
                           {"ttft_s", p.ttft_s},
                           {"tpot_s", p.tpot_s},
                           {"throughput", p.throughput},
                           {"mbu", p.mbu},
                           {"mfu", p.mfu}});
  j["ratios"] = ratios;
  std::ofstream(json_path) << j.dump(2) << "\n";

  std::printf("llmq-sweep on %s: %s, input %lld, output %lld, budget %.1f MiB\n", device.c_str(), model_dir.c_str(),
              (long long)input_len, (long long)output_len, double(budget) / (1 << 20));
  std::printf("peak bandwidth %.1f GB/s, peak compute %.3f TFLOPS\n", peak_bytes / 1e9, peak_flops / 1e12);
  for (const ModeSummary& s : summaries)
    std::printf("  %-7s weights %.1f MiB, KV %llu bytes/token, max batch under the budget %lld\n", s.mode.c_str(),
                double(s.weight_bytes) / (1 << 20), (unsigned long long)s.kv_bytes_per_token, (long long)s.max_batch);
  std::printf("%-7s %6s %10s %10s %12s %7s %7s\n", "mode", "batch", "TTFT ms", "TPOT ms", "tokens/s", "MBU", "MFU");
  for (const Point& p : points)
    std::printf("%-7s %6lld %10.2f %10.3f %12.1f %6.1f%% %6.1f%%\n", p.mode.c_str(), (long long)p.batch, p.ttft_s * 1e3,
                p.tpot_s * 1e3, p.throughput, 100 * p.mbu, 100 * p.mfu);
  std::printf("headline ratios (the seed, Llama2-70B on H100 with TensorRT-LLM: 2.2, ~0.7, ~0.7, ~0.7, > 1):\n");
  if (ratios.contains("fp8_vs_16bit_throughput_at_max_batch")) {
    const auto& r = ratios["fp8_vs_16bit_throughput_at_max_batch"];
    std::printf("  fp8 vs 16-bit throughput, each at its max batch (%lld vs %lld): %.2f\n",
                (long long)r["fp8_batch"].get<int64_t>(), (long long)r["16bit_batch"].get<int64_t>(),
                r["ratio"].get<double>());
  }
  for (const std::string m : {"int8wo", "fp8"})
    if (ratios.contains(m + "_vs_16bit_tpot_batch_lt_8"))
      std::printf("  %s vs 16-bit TPOT at batch < 8: %.2f\n", m.c_str(), ratios[m + "_vs_16bit_tpot_batch_lt_8"].get<double>());
  if (ratios.contains("fp8_vs_16bit_ttft"))
    std::printf("  fp8 vs 16-bit TTFT: %.2f\n", ratios["fp8_vs_16bit_ttft"]["ratio"].get<double>());
  if (ratios.contains("int8wo_vs_16bit_prefill_time"))
    std::printf("  int8wo vs 16-bit prefill time: %.2f\n", ratios["int8wo_vs_16bit_prefill_time"]["ratio"].get<double>());
  write_plot_script(out_dir, fmt::format("llmq-sweep on {} (input {}, output {})", device, input_len, output_len),
                    mode_names);
  if (plot) {
    draw_plot(out_dir);
    std::printf("wrote %s, %s and %s/sweep.png\n", csv_path.c_str(), json_path.c_str(), out_dir.c_str());
  } else {
    std::printf("wrote %s and %s\n", csv_path.c_str(), json_path.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return llmq::tool::run_main("llmq-sweep", run, argc, argv); }
