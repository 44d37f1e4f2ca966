// llmq-synth: writes a random-weight model in the Hugging Face layout (see engine/synth.h).
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "engine/error.h"
#include "engine/model.h"
#include "engine/quant_checkpoint.h"
#include "engine/synth.h"

namespace {

const char* kUsage =
    "usage: llmq-synth --out DIR (--shape NAME | --hidden N --intermediate N --layers N --heads N\n"
    "                  --kv-heads N --vocab N ...) [options]\n"
    "  --shape NAME         a named shape: {}\n"
    "                       (dimension flags given with --shape override the shape's values)\n"
    "  --hidden N  --intermediate N  --layers N  --heads N  --kv-heads N  --vocab N\n"
    "  --head-dim N         explicit head_dim (default hidden / heads, not written)\n"
    "  --max-position N     max_position_embeddings\n"
    "  --rope-theta X\n"
    "  --arch NAME          LlamaForCausalLM (llama), MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2)\n"
    "  --tie                tie lm_head to the embedding\n"
    "  --attention-bias     q/k/v/o biases (Llama)\n"
    "  --sliding-window N   (Mistral)\n"
    "  --dtype f32|f16|bf16 default bf16\n"
    "  --quant fp8|int8wo   write the checkpoint pre-quantized (as llmq-quantize does, without calibration)\n"
    "  --shards N           split into N files with model.safetensors.index.json\n"
    "  --seed S             default 1\n"
    "  --threads N          generation threads (default one per core)\n";

[[noreturn]] void usage_error(const std::string& message) {
  llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "{}\n{}", message, fmt::format(fmt::runtime(kUsage), fmt::join(llmq::synth_preset_names(), ", ")));
}

template <typename T>
T parse_number(std::string_view flag, std::string_view text) {
  T value{};
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size())
    usage_error(fmt::format("{}: '{}' is not a valid number", flag, text));
  return value;
}

std::string architecture_name(const std::string& name) {
  if (name == "llama" || name == "LlamaForCausalLM") return "LlamaForCausalLM";
  if (name == "mistral" || name == "MistralForCausalLM") return "MistralForCausalLM";
  if (name == "qwen2" || name == "Qwen2ForCausalLM") return "Qwen2ForCausalLM";
  usage_error(fmt::format("--arch: unknown architecture '{}'", name));
}

llmq::DType parse_dtype_flag(const std::string& name) {
  if (name == "f32") return llmq::DType::F32;
  if (name == "f16") return llmq::DType::F16;
  if (name == "bf16") return llmq::DType::BF16;
  usage_error(fmt::format("--dtype: expected f32, f16 or bf16, got '{}'", name));
}

int run(int argc, char** argv) {
  // Collect the flags first: the shape they start from may come last.
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      fmt::print(fmt::runtime(kUsage), fmt::join(llmq::synth_preset_names(), ", "));
      return 0;
    }
    if (flag == "--tie" || flag == "--attention-bias") {
      flags[flag] = "";
      continue;
    }
    if (flag.rfind("--", 0) != 0 || i + 1 >= argc)
      usage_error(fmt::format("'{}': unknown flag or missing value", flag));
    flags[flag] = argv[++i];
  }
  auto take = [&](const char* flag, auto apply) {
    auto it = flags.find(flag);
    if (it == flags.end()) return false;
    apply(it->first, it->second);
    flags.erase(it);
    return true;
  };
  std::string out, shape;
  llmq::QuantMode quant = llmq::QuantMode::None;
  take("--out", [&](auto&, const std::string& v) { out = v; });
  take("--quant", [&](auto&, const std::string& v) {
    if (v != "fp8" && v != "int8wo") usage_error(fmt::format("--quant: expected fp8 or int8wo, got '{}'", v));
    quant = v == "fp8" ? llmq::QuantMode::Fp8 : llmq::QuantMode::Int8WeightOnly;
  });
  take("--shape", [&](auto&, const std::string& v) { shape = v; });
  if (out.empty()) usage_error("--out DIR is required");

  // Start from the named shape (or the tiny defaults) and apply the flags given.
  llmq::SynthSpec spec = llmq::synth_preset(shape.empty() ? "tiny" : shape);
  auto i64 = [](int64_t* field) { return [=](auto& f, const std::string& v) { *field = parse_number<int64_t>(f, v); }; };
  auto i32 = [](int* field) { return [=](auto& f, const std::string& v) { *field = parse_number<int>(f, v); }; };
  bool any_dim = false;
  any_dim |= take("--hidden", i64(&spec.hidden_size));
  any_dim |= take("--intermediate", i64(&spec.intermediate_size));
  any_dim |= take("--layers", i64(&spec.num_layers));
  any_dim |= take("--heads", i64(&spec.num_heads));
  any_dim |= take("--kv-heads", i64(&spec.num_kv_heads));
  any_dim |= take("--vocab", i64(&spec.vocab_size));
  if (shape.empty() && !any_dim) usage_error("give --shape NAME or the model dimensions");
  take("--head-dim", i64(&spec.head_dim));
  take("--max-position", i64(&spec.max_position));
  take("--sliding-window", i64(&spec.sliding_window));
  take("--shards", i32(&spec.shards));
  take("--threads", i32(&spec.threads));
  take("--rope-theta", [&](auto& f, const std::string& v) { spec.rope_theta = parse_number<double>(f, v); });
  take("--seed", [&](auto& f, const std::string& v) { spec.seed = parse_number<uint64_t>(f, v); });
  take("--arch", [&](auto&, const std::string& v) { spec.architecture = architecture_name(v); });
  take("--dtype", [&](auto&, const std::string& v) { spec.dtype = parse_dtype_flag(v); });
  take("--tie", [&](auto&, auto&) { spec.tie_word_embeddings = true; });
  take("--attention-bias", [&](auto&, auto&) { spec.attention_bias = true; });
  if (!flags.empty()) usage_error(fmt::format("unknown flag '{}'", flags.begin()->first));

  const auto start = std::chrono::steady_clock::now();
  // Pre-quantized: the 16/32-bit checkpoint goes to a scratch folder beside OUT, then is quantized
  // into OUT exactly as quantize-on-load would.
  const std::string written_to = quant == llmq::QuantMode::None ? out : out + ".unquantized.tmp";
  const llmq::SynthSummary summary = llmq::write_synthetic_model(written_to, spec);
  if (quant != llmq::QuantMode::None) {
    {
      auto model = llmq::Model::load(written_to);
      const llmq::QuantizedCheckpointSummary q =
          llmq::write_quantized_checkpoint(*model, out, quant, nullptr, spec.threads);
      fmt::print("quantized ({}) into {}: {} tensors\n", llmq::quant_mode_name(quant), out, q.tensors);
    }
    std::filesystem::remove_all(written_to);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  fmt::print("{} {}: hidden {}, intermediate {}, {} layers, {} heads / {} kv heads, vocab {}, {}{}\n",
             shape.empty() ? "custom" : shape, spec.architecture, spec.hidden_size, spec.intermediate_size,
             spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.vocab_size, llmq::dtype_name(spec.dtype),
             spec.tie_word_embeddings ? ", tied embeddings" : "");
  if (quant == llmq::QuantMode::None)
    for (const std::string& file : summary.files) fmt::print("  wrote {}\n", file);
  fmt::print("{} tensors, {} parameters, {} weight bytes ({:.2f} GiB), {} bytes on disk\n", summary.tensors,
             summary.parameters, summary.tensor_bytes, double(summary.tensor_bytes) / double(1ull << 30),
             summary.file_bytes);
  fmt::print("{:.2f} s ({:.2f} GB/s)\n", seconds, double(summary.file_bytes) / 1e9 / std::max(seconds, 1e-9));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const llmq::Error& e) {
    std::fprintf(stderr, "llmq-synth: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llmq-synth: %s\n", e.what());
    return 1;
  }
}
