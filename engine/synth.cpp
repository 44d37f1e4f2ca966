#include "engine/synth.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <thread>

#include <fmt/ranges.h>

#include "engine/error.h"
#include "engine/rng.h"

namespace llmq {

namespace {

using nlohmann::json;
using nlohmann::ordered_json;

constexpr float kWeightStd = 0.02f;
constexpr float kBiasStd = 0.01f;
constexpr float kOutlierScale = 10.0f;
constexpr int64_t kOutlierDivisor = 200;  // 0.5% of the input channels (at least one)
// Each block of elements has its own random stream, so blocks can be generated in any order on
// any number of threads and still give the same bytes.
constexpr int64_t kBlock = int64_t(1) << 16;
constexpr int64_t kChunkBlocks = 64;  // elements generated and written at a time: 4M

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// Inverse normal CDF (Acklam's rational approximation, relative error < 1.2e-9).
double normal_quantile(double p) {
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01,  -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  auto tail = [&](double q) {
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
           ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  };
  if (p < 0.02425) return tail(std::sqrt(-2 * std::log(p)));
  if (p > 1 - 0.02425) return -tail(std::sqrt(-2 * std::log(1 - p)));
  const double q = p - 0.5, r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
         (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

// Standard normals by table lookup: the 65536 quantiles at (i + 0.5) / 65536, rescaled to unit
// variance. Four values per 64-bit draw make this ~10x cheaper than Box-Muller (log, sqrt, sin,
// cos), which matters for multi-GB models; tails stop at 4.3 sigma, fine for synthetic weights.
// Pure double arithmetic on exact inputs: the same bytes on every machine.
const float* normal_table() {
  static const std::vector<float> table = [] {
    std::vector<double> q(65536);
    double sum_sq = 0;
    for (size_t i = 0; i < q.size(); ++i) {
      q[i] = normal_quantile((double(i) + 0.5) / 65536.0);
      sum_sq += q[i] * q[i];
    }
    const double scale = 1.0 / std::sqrt(sum_sq / double(q.size()));
    std::vector<float> out(q.size());
    for (size_t i = 0; i < q.size(); ++i) out[i] = float(q[i] * scale);
    return out;
  }();
  return table.data();
}

enum class Kind { Embedding, Linear, Norm, Bias };

struct PlannedTensor {
  std::string name;
  Kind kind;
  int64_t rows, cols;  // rows = 1 for 1-D tensors
  std::string outlier_key;  // linear weights: which input space picks the outlier columns
  int shard = 0;
  uint64_t offset = 0;  // within the shard's data section

  bool one_d() const { return kind == Kind::Norm || kind == Kind::Bias; }
  int64_t numel() const { return rows * cols; }
};

// Per-column scales: 1, or kOutlierScale for a few columns drawn from (seed, key). The residual
// stream's outlier channels are shared by every layer reading it, as in trained models.
std::vector<float> column_scales(uint64_t seed, const std::string& key, int64_t cols) {
  std::vector<float> scales(size_t(cols), 1.0f);
  std::vector<int64_t> order(static_cast<size_t>(cols));
  for (int64_t i = 0; i < cols; ++i) order[size_t(i)] = i;
  Rng rng(splitmix64(seed ^ fnv1a64("outliers:" + key)));
  const int64_t count = std::max<int64_t>(1, cols / kOutlierDivisor);
  for (int64_t i = 0; i < count; ++i) {  // partial Fisher-Yates
    int64_t j = i + int64_t(rng.next() % uint64_t(cols - i));
    std::swap(order[size_t(i)], order[size_t(j)]);
    scales[size_t(order[size_t(i)])] = kOutlierScale;
  }
  return scales;
}

void store(float value, DType dtype, uint8_t* out) {
  if (dtype == DType::F32) {
    std::memcpy(out, &value, 4);
  } else {
    uint16_t bits = dtype == DType::BF16 ? f32_to_bf16(value) : f32_to_f16(value);
    std::memcpy(out, &bits, 2);
  }
}

// Fills block `block` of tensor t (elements [block * kBlock, ...) clipped to numel) into out.
void generate_block(const PlannedTensor& t, uint64_t tensor_seed, const std::vector<float>& scales, int64_t block,
                    DType dtype, uint8_t* out) {
  const int64_t begin = block * kBlock, end = std::min(t.numel(), begin + kBlock);
  const size_t esize = dtype_size(dtype);
  const float* normal = normal_table();
  Rng rng(tensor_seed + uint64_t(block));
  const float stddev = t.kind == Kind::Bias ? kBiasStd : kWeightStd;
  const float mean = t.kind == Kind::Norm ? 1.0f : 0.0f;
  int64_t col = begin % t.cols;
  uint64_t bits = 0;
  for (int64_t i = begin; i < end; ++i) {
    if ((i - begin) % 4 == 0) bits = rng.next();
    float value = mean + stddev * normal[bits >> 48];
    bits <<= 16;
    if (!scales.empty()) value *= scales[size_t(col)];
    store(value, dtype, out + size_t(i - begin) * esize);
    if (++col == t.cols) col = 0;
  }
}

std::string errno_text(int err) { return std::generic_category().message(err); }

// A file written as PATH.tmp and renamed over PATH when done; removed if abandoned. No fsync: a
// synthetic model is cheap to regenerate, and syncing gigabytes would dominate the run time.
class OutFile {
 public:
  explicit OutFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    f_ = std::fopen(tmp_.c_str(), "wb");
    if (!f_) fail(LLMQ_ERR_IO, "{}: cannot create: {}", tmp_, errno_text(errno));
  }
  ~OutFile() {
    if (f_) {
      std::fclose(f_);
      std::remove(tmp_.c_str());
    }
  }
  OutFile(const OutFile&) = delete;
  OutFile& operator=(const OutFile&) = delete;

  void write(const void* data, size_t n) {
    if (n && std::fwrite(data, 1, n, f_) != n) fail(LLMQ_ERR_IO, "{}: cannot write: {}", tmp_, errno_text(errno));
    bytes_ += n;
  }
  uint64_t commit() {
    FILE* f = f_;
    f_ = nullptr;
    if (std::fclose(f) != 0) {
      int err = errno;
      std::remove(tmp_.c_str());
      fail(LLMQ_ERR_IO, "{}: cannot write: {}", tmp_, errno_text(err));
    }
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      int err = errno;
      std::remove(tmp_.c_str());
      fail(LLMQ_ERR_IO, "{}: cannot rename to {}: {}", tmp_, path_, errno_text(err));
    }
    return bytes_;
  }

 private:
  std::string path_, tmp_;
  FILE* f_ = nullptr;
  uint64_t bytes_ = 0;
};

uint64_t write_text(const std::string& path, const std::string& text) {
  OutFile f(path);
  f.write(text.data(), text.size());
  return f.commit();
}

const char* torch_dtype(DType dtype) {
  return dtype == DType::F32 ? "float32" : dtype == DType::F16 ? "float16" : "bfloat16";
}

void check_spec(const SynthSpec& s) {
  auto positive = [](const char* field, int64_t v) {
    if (v < 1) fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.{} must be positive, got {}", field, v);
  };
  if (s.architecture != "LlamaForCausalLM" && s.architecture != "MistralForCausalLM" &&
      s.architecture != "Qwen2ForCausalLM")
    fail(LLMQ_ERR_INVALID_ARGUMENT,
         "SynthSpec.architecture '{}' is not one of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
         s.architecture);
  positive("hidden_size", s.hidden_size);
  positive("intermediate_size", s.intermediate_size);
  positive("num_layers", s.num_layers);
  positive("num_heads", s.num_heads);
  positive("num_kv_heads", s.num_kv_heads);
  positive("vocab_size", s.vocab_size);
  positive("max_position", s.max_position);
  if (s.num_heads % s.num_kv_heads != 0)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.num_heads ({}) must be a multiple of num_kv_heads ({})", s.num_heads,
         s.num_kv_heads);
  if (s.head_dim == 0 && s.hidden_size % s.num_heads != 0)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.hidden_size ({}) is not a multiple of num_heads ({}); set head_dim",
         s.hidden_size, s.num_heads);
  const int64_t head_dim = s.head_dim ? s.head_dim : s.hidden_size / s.num_heads;
  if (head_dim < 2 || head_dim % 2 != 0)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.head_dim must be even and at least 2, got {}", head_dim);
  if (s.dtype != DType::F32 && s.dtype != DType::F16 && s.dtype != DType::BF16)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.dtype must be F32, F16 or BF16, got {}", dtype_name(s.dtype));
  if (s.attention_bias && s.architecture != "LlamaForCausalLM")
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.attention_bias is for LlamaForCausalLM only, not {}", s.architecture);
  if (s.sliding_window < 0 || (s.sliding_window > 0 && s.architecture != "MistralForCausalLM"))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.sliding_window ({}) must be 0, or positive for MistralForCausalLM",
         s.sliding_window);
  if (!s.rope_scaling.is_null() && !s.rope_scaling.is_object())
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.rope_scaling must be null or an object, got {}", s.rope_scaling.dump());
  if (!(s.rope_theta > 0)) fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.rope_theta must be positive");
  if (!(s.rms_norm_eps > 0 && s.rms_norm_eps < 1))
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.rms_norm_eps must be in (0, 1)");
  if (s.shards < 1 || s.shards > 99999)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.shards must be in [1, 99999], got {}", s.shards);
  for (int32_t id : s.eos_ids)
    if (id < 0 || id >= s.vocab_size)
      fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.eos_ids: {} is outside the vocabulary of {}", id, s.vocab_size);
  if (s.bos_id < -1 || s.bos_id >= s.vocab_size)
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.bos_id: {} is outside the vocabulary of {} (-1 for none)", s.bos_id,
         s.vocab_size);
  if (s.threads < 0) fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.threads must be >= 0, got {}", s.threads);
}

// The tensors in Hugging Face order, as Model::bind_weights expects them.
std::vector<PlannedTensor> plan_tensors(const SynthSpec& s) {
  const int64_t D = s.hidden_size, I = s.intermediate_size;
  const int64_t head_dim = s.head_dim ? s.head_dim : D / s.num_heads;
  const int64_t Q = s.num_heads * head_dim, KV = s.num_kv_heads * head_dim;
  const bool qkv_bias = s.architecture == "Qwen2ForCausalLM" || s.attention_bias;
  std::vector<PlannedTensor> out;
  auto add = [&](std::string name, Kind kind, int64_t rows, int64_t cols, std::string key = "") {
    out.push_back(PlannedTensor{std::move(name), kind, rows, cols, std::move(key)});
  };
  add("model.embed_tokens.weight", Kind::Embedding, s.vocab_size, D);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    add(p + "input_layernorm.weight", Kind::Norm, 1, D);
    add(p + "self_attn.q_proj.weight", Kind::Linear, Q, D, "hidden");
    add(p + "self_attn.k_proj.weight", Kind::Linear, KV, D, "hidden");
    add(p + "self_attn.v_proj.weight", Kind::Linear, KV, D, "hidden");
    add(p + "self_attn.o_proj.weight", Kind::Linear, D, Q, p + "attn_out");
    if (qkv_bias) {
      add(p + "self_attn.q_proj.bias", Kind::Bias, 1, Q);
      add(p + "self_attn.k_proj.bias", Kind::Bias, 1, KV);
      add(p + "self_attn.v_proj.bias", Kind::Bias, 1, KV);
    }
    if (s.attention_bias) add(p + "self_attn.o_proj.bias", Kind::Bias, 1, D);
    add(p + "post_attention_layernorm.weight", Kind::Norm, 1, D);
    add(p + "mlp.gate_proj.weight", Kind::Linear, I, D, "hidden");
    add(p + "mlp.up_proj.weight", Kind::Linear, I, D, "hidden");
    add(p + "mlp.down_proj.weight", Kind::Linear, D, I, p + "mlp_out");
  }
  add("model.norm.weight", Kind::Norm, 1, D);
  if (!s.tie_word_embeddings) add("lm_head.weight", Kind::Embedding, s.vocab_size, D);
  return out;
}

// Splits the tensors in order into `shards` groups of about equal bytes, none empty.
void assign_shards(std::vector<PlannedTensor>& tensors, int shards, size_t esize) {
  if (size_t(shards) > tensors.size())
    fail(LLMQ_ERR_INVALID_ARGUMENT, "SynthSpec.shards ({}) exceeds the number of tensors ({})", shards, tensors.size());
  uint64_t total = 0;
  for (const auto& t : tensors) total += uint64_t(t.numel()) * esize;
  uint64_t before = 0, offset = 0;
  int shard = 0;
  bool shard_empty = true;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t left = tensors.size() - i;
    const bool past_share = double(before) >= double(total) * (shard + 1) / shards;
    if (!shard_empty && shard + 1 < shards && (past_share || left <= size_t(shards - shard - 1))) {
      ++shard;
      offset = 0;
    }
    tensors[i].shard = shard;
    tensors[i].offset = offset;
    const uint64_t nbytes = uint64_t(tensors[i].numel()) * esize;
    offset += nbytes;
    before += nbytes;
    shard_empty = false;
  }
}

std::string header_json(const std::vector<const PlannedTensor*>& tensors, DType dtype) {
  ordered_json header = ordered_json::object();
  header["__metadata__"] = {{"format", "pt"}};
  const uint64_t esize = dtype_size(dtype);
  for (const PlannedTensor* t : tensors) {
    ordered_json entry = ordered_json::object();
    entry["dtype"] = dtype_name(dtype);
    entry["shape"] = t->one_d() ? std::vector<int64_t>{t->cols} : std::vector<int64_t>{t->rows, t->cols};
    entry["data_offsets"] = {t->offset, t->offset + uint64_t(t->numel()) * esize};
    header[t->name] = std::move(entry);
  }
  std::string text = header.dump();
  text.append((64 - (8 + text.size()) % 64) % 64, ' ');  // data starts 64-byte aligned
  return text;
}

// Generates and streams one tensor, chunk by chunk, using `threads` threads per chunk.
void write_tensor(OutFile& file, const PlannedTensor& t, const SynthSpec& s, int threads,
                  std::vector<uint8_t>& buffer) {
  const uint64_t tensor_seed = splitmix64(s.seed ^ fnv1a64(t.name));
  const std::vector<float> scales =
      t.kind == Kind::Linear ? column_scales(s.seed, t.outlier_key, t.cols) : std::vector<float>{};
  const size_t esize = dtype_size(s.dtype);
  const int64_t blocks = (t.numel() + kBlock - 1) / kBlock;
  for (int64_t first = 0; first < blocks; first += kChunkBlocks) {
    const int64_t count = std::min(kChunkBlocks, blocks - first);
    const int64_t begin = first * kBlock, end = std::min(t.numel(), (first + count) * kBlock);
    buffer.resize(size_t(end - begin) * esize);
    auto run = [&](int worker, int workers) {
      for (int64_t b = first + worker; b < first + count; b += workers)
        generate_block(t, tensor_seed, scales, b, s.dtype, buffer.data() + size_t((b - first) * kBlock) * esize);
    };
    const int workers = int(std::min<int64_t>(threads, count));
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; ++w) pool.emplace_back(run, w, workers);
    run(0, workers);
    for (auto& thread : pool) thread.join();
    file.write(buffer.data(), buffer.size());
  }
}

ordered_json config_json(const SynthSpec& s) {
  ordered_json c = ordered_json::object();
  c["architectures"] = {s.architecture};
  c["model_type"] = s.architecture == "MistralForCausalLM" ? "mistral"
                    : s.architecture == "Qwen2ForCausalLM" ? "qwen2"
                                                           : "llama";
  c["hidden_size"] = s.hidden_size;
  c["intermediate_size"] = s.intermediate_size;
  c["num_hidden_layers"] = s.num_layers;
  c["num_attention_heads"] = s.num_heads;
  c["num_key_value_heads"] = s.num_kv_heads;
  if (s.head_dim) c["head_dim"] = s.head_dim;
  c["vocab_size"] = s.vocab_size;
  c["max_position_embeddings"] = s.max_position;
  c["rms_norm_eps"] = s.rms_norm_eps;
  c["rope_theta"] = s.rope_theta;
  c["rope_scaling"] = s.rope_scaling;
  c["hidden_act"] = "silu";
  c["tie_word_embeddings"] = s.tie_word_embeddings;
  if (s.architecture == "LlamaForCausalLM") {
    c["attention_bias"] = s.attention_bias;
    c["mlp_bias"] = false;
  }
  if (s.architecture == "MistralForCausalLM")
    c["sliding_window"] = s.sliding_window > 0 ? json(s.sliding_window) : json(nullptr);
  if (s.architecture == "Qwen2ForCausalLM") c["use_sliding_window"] = false;
  if (s.bos_id >= 0) c["bos_token_id"] = s.bos_id;
  if (!s.eos_ids.empty()) c["eos_token_id"] = s.eos_ids.size() == 1 ? json(s.eos_ids[0]) : json(s.eos_ids);
  c["initializer_range"] = 0.02;
  c["torch_dtype"] = torch_dtype(s.dtype);
  c["llmq_synthetic"] = {{"seed", s.seed}, {"note", "random weights written by llmq::write_synthetic_model"}};
  return c;
}

}  // namespace

std::vector<std::string> synth_preset_names() {
  return {"tiny", "llama2-7b", "llama3-8b", "llama2-70b-tp8-shard", "cpu-2048", "cpu-512"};
}

SynthSpec synth_preset(const std::string& name) {
  SynthSpec s;
  if (name == "tiny") return s;
  s.max_position = 4096;
  s.vocab_size = 32000;
  s.hidden_size = 4096;
  s.num_layers = 32;
  s.num_heads = 32;
  if (name == "llama2-7b") {
    s.intermediate_size = 11008;
    s.num_kv_heads = 32;
  } else if (name == "llama3-8b") {
    s.intermediate_size = 14336;
    s.num_kv_heads = 8;
    s.vocab_size = 128256;
    s.max_position = 131072;  // as Llama 3.1's config.json: 8192 trained, rope-scaled to 128K
    s.rope_theta = 500000.0;
    s.rope_scaling = {{"factor", 8.0},
                      {"low_freq_factor", 1.0},
                      {"high_freq_factor", 4.0},
                      {"original_max_position_embeddings", 8192},
                      {"rope_type", "llama3"}};
    s.bos_id = 128000;
    s.eos_ids = {128001, 128008, 128009};
  } else if (name == "llama2-70b-tp8-shard") {
    // One rank of Llama-2-70B under tensor parallelism 8: attention heads and the MLP are split
    // 8 ways (64 -> 8 heads, 8 -> 1 KV head, 28672 -> 3584), so head_dim 128 must be explicit.
    // A real rank's embedding and lm_head are vocab-parallel (32000 / 8 rows each) or replicated;
    // this keeps the full vocabulary so the shard is a complete, loadable model.
    s.hidden_size = 8192;
    s.intermediate_size = 28672 / 8;
    s.num_layers = 80;
    s.num_heads = 64 / 8;
    s.num_kv_heads = 8 / 8;
    s.head_dim = 128;
  } else if (name == "cpu-2048") {
    s.hidden_size = 2048;
    s.intermediate_size = 5632;
    s.num_layers = 16;
    s.num_heads = 16;
    s.num_kv_heads = 16;
    s.max_position = 2048;
  } else if (name == "cpu-512") {
    // Llama-2-shaped (MHA, 32K vocabulary) at 1/8 the width: 58M parameters, 117 MB in BF16, for
    // serving sweeps that finish in minutes on a laptop-class CPU.
    s.hidden_size = 512;
    s.intermediate_size = 1408;
    s.num_layers = 8;
    s.num_heads = 8;
    s.num_kv_heads = 8;
    s.max_position = 2048;
  } else {
    fail(LLMQ_ERR_INVALID_ARGUMENT, "unknown synthetic model shape '{}' (known: {})", name,
         fmt::join(synth_preset_names(), ", "));
  }
  return s;
}

SynthSummary write_synthetic_model(const std::string& dir, const SynthSpec& spec) {
  check_spec(spec);
  std::vector<PlannedTensor> tensors = plan_tensors(spec);
  const size_t esize = dtype_size(spec.dtype);
  assign_shards(tensors, spec.shards, esize);

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir))
    fail(LLMQ_ERR_IO, "{}: cannot create the directory: {}", dir, ec ? ec.message() : "not a directory");

  SynthSummary summary;
  const int threads = spec.threads > 0 ? spec.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<uint8_t> buffer;
  json weight_map = json::object();
  for (int shard = 0; shard < spec.shards; ++shard) {
    const std::string file_name = spec.shards == 1
                                      ? std::string("model.safetensors")
                                      : fmt::format("model-{:05d}-of-{:05d}.safetensors", shard + 1, spec.shards);
    std::vector<const PlannedTensor*> members;
    for (const auto& t : tensors)
      if (t.shard == shard) members.push_back(&t);
    const std::string header = header_json(members, spec.dtype);
    uint8_t length[8];
    for (int i = 0; i < 8; ++i) length[i] = uint8_t(uint64_t(header.size()) >> (8 * i));

    const std::string path = dir + "/" + file_name;
    OutFile file(path);
    file.write(length, 8);
    file.write(header.data(), header.size());
    for (const PlannedTensor* t : members) {
      write_tensor(file, *t, spec, threads, buffer);
      weight_map[t->name] = file_name;
      summary.tensors += 1;
      summary.parameters += t->numel();
      summary.tensor_bytes += uint64_t(t->numel()) * esize;
    }
    summary.file_bytes += file.commit();
    summary.files.push_back(path);
  }

  // Model::load prefers the index, so a stale one would shadow a freshly written single file.
  const std::string stale = dir + (spec.shards == 1 ? "/model.safetensors.index.json" : "/model.safetensors");
  std::filesystem::remove(stale, ec);
  if (ec) fail(LLMQ_ERR_IO, "{}: cannot remove the stale file: {}", stale, ec.message());

  if (spec.shards > 1) {
    json index = {{"metadata", {{"total_size", summary.tensor_bytes}}}, {"weight_map", weight_map}};
    const std::string path = dir + "/model.safetensors.index.json";
    summary.file_bytes += write_text(path, index.dump(2) + "\n");
    summary.files.push_back(path);
  }

  const std::string config_path = dir + "/config.json";
  summary.file_bytes += write_text(config_path, config_json(spec).dump(2) + "\n");
  summary.files.push_back(config_path);

  ordered_json gen = ordered_json::object();
  if (spec.bos_id >= 0) gen["bos_token_id"] = spec.bos_id;
  if (!spec.eos_ids.empty())
    gen["eos_token_id"] = spec.eos_ids.size() == 1 ? json(spec.eos_ids[0]) : json(spec.eos_ids);
  gen["do_sample"] = false;
  const std::string gen_path = dir + "/generation_config.json";
  summary.file_bytes += write_text(gen_path, gen.dump(2) + "\n");
  summary.files.push_back(gen_path);
  return summary;
}

}  // namespace llmq
