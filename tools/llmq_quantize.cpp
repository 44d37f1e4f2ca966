// llmq-quantize: writes a pre-quantized checkpoint in the conventions vLLM reads, from a 16/32-bit
// one (the formats: engine/quant_checkpoint.h).
// Calibration runs text through the unquantized model (CPU backend) and sets each scale from the
// amax over the calibration tokens: input_scale = amax / 448, k_scale / v_scale = amax / 448.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "engine/quant_checkpoint.h"
#include "engine/error.h"
#include "tools/tool_main.h"
#include "engine/fp8.h"
#include "engine/json_file.h"
#include "engine/quant.h"
#include "engine/safetensors.h"
#include "engine/text_data.h"

namespace {

using namespace llmq;

const char* kUsage =
    "usage: llmq-quantize --model IN --out OUT --mode fp8|int8wo [--calib FILE] [--tokens N] [--threads T]\n"
    "  --calib FILE   text (UTF-8, documents separated by blank lines) to set static activation\n"
    "                 scales (fp8) and FP8 KV-cache scales from; without it fp8 activations are dynamic\n"
    "  --tokens N     calibration tokens to use at most (default 8192)\n"
    "  --threads T    CPU threads (default one per core)\n";

CalibrationAmax calibrate(const std::shared_ptr<const Model>& model, const std::string& path, int64_t max_tokens, int threads) {
  const std::string text = read_corpus(path, "calibration file");
  const Tokenizer* tokenizer = model->tokenizer();
  if (!tokenizer) fail(LLMQ_ERR_UNSUPPORTED, "{}: calibration needs the model's tokenizer.json", model->dir());
  EngineOptions options;
  options.n_threads = threads;
  options.max_batch_tokens = 512;
  Engine engine(model, options);
  CalibrationAmax amax;
  engine.set_observer([&](int32_t layer, const char* site, const Tensor& t) {
    float& a = amax[{layer, site}];
    for (int64_t i = 0; i < t.numel(); ++i) a = std::max(a, std::fabs(t.as<float>()[i]));
  });
  const int32_t bos = tokenizer->bos_id() >= 0 ? tokenizer->bos_id() : model->config().bos_id;
  int64_t used = 0, docs = 0;
  std::vector<float> logits(size_t(engine.max_batch_tokens()) * size_t(engine.vocab_size()));
  for (std::string_view doc : split_documents(text)) {
    if (used >= max_tokens) break;
    std::vector<int32_t> ids;
    if (bos >= 0) ids.push_back(bos);
    const std::vector<int32_t> encoded = tokenizer->encode(doc, false);
    ids.insert(ids.end(), encoded.begin(), encoded.end());
    ids.resize(size_t(std::min<int64_t>({int64_t(ids.size()), max_tokens - used, model->config().max_position})));
    if (ids.empty()) continue;
    logits.resize(ids.size() * size_t(engine.vocab_size()));
    engine.score(ids, logits.data());
    used += int64_t(ids.size());
    ++docs;
    std::fprintf(stderr, "\rcalibration: %lld tokens from %lld documents", (long long)used, (long long)docs);
  }
  std::fprintf(stderr, "\n");
  if (used == 0) fail(LLMQ_ERR_INVALID_ARGUMENT, "calibration file '{}' gives no tokens", path);
  return amax;
}

int run(int argc, char** argv) {
  std::string in_dir, out_dir, mode_name, calib;
  int64_t max_tokens = 8192;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) fail(LLMQ_ERR_INVALID_ARGUMENT, "{}: unknown flag or missing value\n{}", flag, kUsage);
    const std::string value = argv[++i];
    if (flag == "--model") in_dir = value;
    else if (flag == "--out") out_dir = value;
    else if (flag == "--mode") mode_name = value;
    else if (flag == "--calib") calib = value;
    else if (flag == "--tokens") max_tokens = tool::parse_int(flag, value, 1, int64_t(1) << 30);
    else if (flag == "--threads") threads = int(tool::parse_int(flag, value, 0, 1024));
    else fail(LLMQ_ERR_INVALID_ARGUMENT, "unknown flag '{}'\n{}", flag, kUsage);
  }
  if (in_dir.empty() || out_dir.empty()) fail(LLMQ_ERR_INVALID_ARGUMENT, "--model and --out are required\n{}", kUsage);
  const QuantMode mode = mode_name == "fp8" ? QuantMode::Fp8 : mode_name == "int8wo" ? QuantMode::Int8WeightOnly
                                                                                      : QuantMode::None;
  if (mode == QuantMode::None) fail(LLMQ_ERR_INVALID_ARGUMENT, "--mode must be fp8 or int8wo, got '{}'", mode_name);

  auto model = Model::load(in_dir);
  CalibrationAmax amax;
  if (!calib.empty()) amax = calibrate(model, calib, max_tokens, threads);
  const bool calibrated = !calib.empty();
  const QuantizedCheckpointSummary written =
      write_quantized_checkpoint(*model, out_dir, mode, calibrated ? &amax : nullptr, threads);
  std::printf("wrote %s: %s, %zu tensors%s\n", out_dir.c_str(), quant_mode_name(mode), written.tensors,
              calibrated ? ", static activation and KV scales from calibration" : "");
  if (calibrated) {
    // The scales are the calibration amax, so nothing clips on the calibration text itself; text
    // beyond it can, and is reported by the engine's saturation counters.
    std::printf("calibration amax per layer (scale = amax / 448); saturation on the calibration text: 0 values\n%s",
                written.calibration.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return llmq::tool::run_main("llmq-quantize", run, argc, argv); }
