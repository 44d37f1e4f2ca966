#include "engine/config.h"

#include <cmath>

#include "engine/error.h"
#include "engine/json_file.h"

namespace llmq {

namespace {

using nlohmann::json;

// Bounds on sizes keep a hostile config from asking for absurd allocations; they are far above
// any released Llama-family model.
constexpr int64_t kMaxDim = 1 << 17;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxVocab = 1 << 22;
constexpr int64_t kMaxPositions = 1 << 24;

class Fields {
 public:
  Fields(const json& object, const std::string& source) : object_(object), source_(source) {}

  bool has(const char* key) const { return object_.contains(key) && !object_.at(key).is_null(); }

  int64_t integer(const char* key, int64_t min, int64_t max) const {
    if (!has(key)) fail(LLMQ_ERR_MODEL_FORMAT, "{}: missing field '{}'", source_, key);
    return integer_value(object_.at(key), key, min, max);
  }
  int64_t integer_or(const char* key, int64_t fallback, int64_t min, int64_t max) const {
    return has(key) ? integer(key, min, max) : fallback;
  }
  double number_or(const char* key, double fallback, double min, double max) const {
    if (!has(key)) return fallback;
    const json& value = object_.at(key);
    if (!value.is_number()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: field '{}' must be a number", source_, key);
    double v = value.get<double>();
    if (!(v >= min && v <= max))
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: field '{}' must be in [{}, {}], got {}", source_, key, min, max, v);
    return v;
  }
  bool boolean_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& value = object_.at(key);
    if (!value.is_boolean()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: field '{}' must be true or false", source_, key);
    return value.get<bool>();
  }
  std::string string_or(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& value = object_.at(key);
    if (!value.is_string()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: field '{}' must be a string", source_, key);
    return value.get<std::string>();
  }
  // An id or a list of ids (eos_token_id takes both forms).
  std::vector<int32_t> ids_or_empty(const char* key) const {
    std::vector<int32_t> ids;
    if (!has(key)) return ids;
    const json& value = object_.at(key);
    if (value.is_array()) {
      if (value.size() > 64) fail(LLMQ_ERR_MODEL_FORMAT, "{}: field '{}' has too many ids", source_, key);
      for (const json& item : value) ids.push_back(int32_t(integer_value(item, key, 0, kMaxVocab - 1)));
    } else {
      ids.push_back(int32_t(integer_value(value, key, 0, kMaxVocab - 1)));
    }
    return ids;
  }
  const json& object() const { return object_; }

 private:
  int64_t integer_value(const json& value, const char* key, int64_t min, int64_t max) const {
    if (!value.is_number_integer())
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: field '{}' must be an integer, got {}", source_, key, value.dump());
    // Unsigned values above int64's range are rejected by the range check via the double path.
    if (value.is_number_unsigned() && value.get<uint64_t>() > uint64_t(max))
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: field '{}' must be in [{}, {}], got {}", source_, key, min, max, value.dump());
    int64_t v = value.get<int64_t>();
    if (v < min || v > max)
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: field '{}' must be in [{}, {}], got {}", source_, key, min, max, v);
    return v;
  }

  const json& object_;
  const std::string& source_;
};

void parse_rope_scaling(const json& value, const std::string& source, RopeConfig* rope) {
  if (value.is_null()) return;
  if (!value.is_object()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: field 'rope_scaling' must be an object or null", source);
  Fields fields(value, source);
  std::string type = fields.string_or("rope_type", fields.string_or("type", "default"));
  if (type == "default") return;
  if (type == "linear") {
    rope->type = "linear";
    rope->factor = fields.number_or("factor", 1.0, 1.0, 1e6);
    return;
  }
  if (type == "llama3") {
    rope->type = "llama3";
    rope->factor = fields.number_or("factor", 8.0, 1.0, 1e6);
    rope->low_freq_factor = fields.number_or("low_freq_factor", 1.0, 1e-6, 1e6);
    rope->high_freq_factor = fields.number_or("high_freq_factor", 4.0, 1e-6, 1e6);
    rope->original_max_position = fields.integer("original_max_position_embeddings", 1, kMaxPositions);
    if (!(rope->high_freq_factor > rope->low_freq_factor))
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: rope_scaling.high_freq_factor must exceed low_freq_factor", source);
    return;
  }
  fail(LLMQ_ERR_UNSUPPORTED, "{}: rope_scaling type '{}' is not supported (supported: default, linear, llama3)", source,
       type);
}

// "quantization_config": vLLM's {"quant_method": "fp8", "activation_scheme": ...}, or
// compressed-tensors with 8-bit symmetric int weights per channel and no activation quantization.
void parse_quantization_config(const json& q, const std::string& source, ModelConfig* config) {
  if (q.is_null()) return;
  if (!q.is_object()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: field 'quantization_config' must be an object", source);
  Fields fields(q, source);
  const std::string method = fields.string_or("quant_method", "");
  if (method == "fp8") {
    const std::string scheme = fields.string_or("activation_scheme", "dynamic");
    if (scheme != "dynamic" && scheme != "static")
      fail(LLMQ_ERR_UNSUPPORTED, "{}: quantization_config.activation_scheme '{}' is not supported (dynamic, static)",
           source, scheme);
    config->checkpoint_quant = QuantMode::Fp8;
    config->static_activations = scheme == "static";
    return;
  }
  if (method == "compressed-tensors") {
    auto groups = q.find("config_groups");
    if (groups == q.end() || !groups->is_object() || groups->empty())
      fail(LLMQ_ERR_MODEL_FORMAT, "{}: quantization_config.config_groups must be a non-empty object", source);
    for (const auto& [name, group] : groups->items()) {
      const std::string where = "quantization_config.config_groups." + name;
      const json* weights = group.is_object() && group.contains("weights") ? &group["weights"] : nullptr;
      // Compared as JSON values, so a field of another type is a mismatch, not an exception.
      auto is = [&](const char* key, const json& expected) {
        auto it = weights->find(key);
        return it != weights->end() && *it == expected;
      };
      const bool int8_channel = weights && weights->is_object() && is("num_bits", 8) && is("type", "int") &&
                                is("symmetric", true) && is("strategy", "channel");
      if (!int8_channel)
        fail(LLMQ_ERR_UNSUPPORTED, "{}: {}.weights: only 8-bit symmetric int weights with per-channel scales are "
             "supported (int8wo)", source, where);
      if (group.contains("input_activations") && !group["input_activations"].is_null())
        fail(LLMQ_ERR_UNSUPPORTED, "{}: {}.input_activations: quantized activations are not supported with int8 weights",
             source, where);
    }
    config->checkpoint_quant = QuantMode::Int8WeightOnly;
    return;
  }
  fail(LLMQ_ERR_UNSUPPORTED, "{}: quantization_config.quant_method '{}' is not supported (fp8, compressed-tensors)",
       source, method);
}

}  // namespace

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  json root = parse_json(json_text, source);
  if (!root.is_object()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: expected a JSON object", source);
  Fields fields(root, source);
  ModelConfig config;

  if (!fields.has("architectures") || !root["architectures"].is_array() || root["architectures"].empty() ||
      !root["architectures"][0].is_string())
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: field 'architectures' must be a non-empty list of names", source);
  config.architecture_name = root["architectures"][0].get<std::string>();
  if (config.architecture_name == "LlamaForCausalLM") {
    config.architecture = Architecture::Llama;
  } else if (config.architecture_name == "MistralForCausalLM") {
    config.architecture = Architecture::Mistral;
  } else if (config.architecture_name == "Qwen2ForCausalLM") {
    config.architecture = Architecture::Qwen2;
  } else {
    fail(LLMQ_ERR_UNSUPPORTED,
         "{}: architecture '{}' is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)",
         source, config.architecture_name);
  }

  config.hidden_size = fields.integer("hidden_size", 1, kMaxDim);
  config.intermediate_size = fields.integer("intermediate_size", 1, 4 * kMaxDim);
  config.num_layers = fields.integer("num_hidden_layers", 1, kMaxLayers);
  config.num_heads = fields.integer("num_attention_heads", 1, kMaxDim);
  config.num_kv_heads = fields.integer_or("num_key_value_heads", config.num_heads, 1, config.num_heads);
  if (config.num_heads % config.num_kv_heads != 0)
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", source,
         config.num_heads, config.num_kv_heads);
  int64_t default_head_dim = config.hidden_size / config.num_heads;
  config.head_dim = fields.integer_or("head_dim", default_head_dim, 2, 1024);
  if (config.head_dim % 2 != 0) fail(LLMQ_ERR_MODEL_FORMAT, "{}: head_dim must be even, got {}", source, config.head_dim);
  if (!fields.has("head_dim") && config.hidden_size % config.num_heads != 0)
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: hidden_size ({}) is not a multiple of num_attention_heads ({}) and no head_dim is given",
         source, config.hidden_size, config.num_heads);
  if (config.q_size() > 4 * kMaxDim) fail(LLMQ_ERR_MODEL_FORMAT, "{}: num_attention_heads * head_dim is too large", source);
  config.vocab_size = fields.integer("vocab_size", 1, kMaxVocab);
  config.max_position = fields.integer_or("max_position_embeddings", 2048, 1, kMaxPositions);
  config.rms_norm_eps = fields.number_or("rms_norm_eps", 1e-6, 0.0, 1.0);
  config.rope.theta = fields.number_or("rope_theta", 10000.0, 1.0, 1e12);
  if (fields.has("rope_scaling")) parse_rope_scaling(root["rope_scaling"], source, &config.rope);
  config.tie_word_embeddings = fields.boolean_or("tie_word_embeddings", false);
  if (fields.has("quantization_config")) parse_quantization_config(root["quantization_config"], source, &config);

  std::string act = fields.string_or("hidden_act", "silu");
  if (act != "silu") fail(LLMQ_ERR_UNSUPPORTED, "{}: hidden_act '{}' is not supported (only silu)", source, act);
  if (fields.boolean_or("mlp_bias", false)) fail(LLMQ_ERR_UNSUPPORTED, "{}: mlp_bias true is not supported", source);

  if (config.architecture == Architecture::Qwen2) {
    config.qkv_bias = true;
    if (fields.boolean_or("use_sliding_window", false))
      config.sliding_window = fields.integer_or("sliding_window", 0, 0, kMaxPositions);
  } else {
    config.qkv_bias = config.o_bias = fields.boolean_or("attention_bias", false);
    if (config.architecture == Architecture::Mistral)
      config.sliding_window = fields.integer_or("sliding_window", 0, 0, kMaxPositions);
  }
  if (config.sliding_window >= config.max_position) config.sliding_window = 0;

  std::vector<int32_t> bos = fields.ids_or_empty("bos_token_id");
  config.bos_id = bos.empty() ? -1 : bos[0];
  config.eos_ids = fields.ids_or_empty("eos_token_id");
  for (int32_t id : config.eos_ids)
    if (id >= config.vocab_size) fail(LLMQ_ERR_MODEL_FORMAT, "{}: eos_token_id {} is outside the vocabulary", source, id);
  if (config.bos_id >= config.vocab_size)
    fail(LLMQ_ERR_MODEL_FORMAT, "{}: bos_token_id {} is outside the vocabulary", source, config.bos_id);
  return config;
}

ModelConfig load_model_config(const std::string& model_dir) {
  std::string path = model_dir + "/config.json";
  ModelConfig config = parse_model_config(read_text_file(path, 1 << 20), path);

  std::string gen_path = model_dir + "/generation_config.json";
  if (file_exists(gen_path)) {
    json root = parse_json(read_text_file(gen_path, 1 << 20), gen_path);
    if (!root.is_object()) fail(LLMQ_ERR_MODEL_FORMAT, "{}: expected a JSON object", gen_path);
    Fields fields(root, gen_path);
    std::vector<int32_t> eos = fields.ids_or_empty("eos_token_id");
    for (int32_t id : eos)
      if (id >= config.vocab_size)
        fail(LLMQ_ERR_MODEL_FORMAT, "{}: eos_token_id {} is outside the vocabulary", gen_path, id);
    if (!eos.empty()) config.eos_ids = eos;
    std::vector<int32_t> bos = fields.ids_or_empty("bos_token_id");
    if (!bos.empty() && bos[0] < config.vocab_size) config.bos_id = bos[0];
  }
  return config;
}

}  // namespace llmq
