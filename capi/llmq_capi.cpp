// Implements llmq.h: argument checks, params structs by size, handle lifetimes, and the
// translation of C++ exceptions into status codes plus a thread-local message.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <string>

#include "engine/engine.h"
#include "engine/error.h"
#include "engine/model.h"
#include "engine/server.h"
#include "llmq.h"

struct llmq_model {
  std::shared_ptr<const llmq::Model> model;
};

struct llmq_comm {
  std::shared_ptr<llmq::Communicator> comm;
};

namespace {
// Shared by the engine handle and the servers on it, so that either may be destroyed first.
struct EngineState {
  std::shared_ptr<const llmq::Model> model;
  std::unique_ptr<llmq::Engine> engine;
  std::mutex mutex;  // one call (or server step) at a time per engine
};
}  // namespace

struct llmq_engine {
  std::shared_ptr<EngineState> state;
};

struct llmq_server {
  std::shared_ptr<EngineState> engine;  // destroyed after the server (declared first)
  std::unique_ptr<llmq::Server> server;
};

namespace {

thread_local std::string t_last_error;

template <typename Fn>
llmq_status guarded(Fn&& fn) noexcept {
  try {
    fn();
    return LLMQ_OK;
  } catch (const llmq::Error& e) {
    t_last_error = e.what();
    return e.status();
  } catch (const std::bad_alloc&) {
    t_last_error = "out of memory";
    return LLMQ_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    t_last_error = std::string("internal error: ") + e.what();
    return LLMQ_ERR_INTERNAL;
  } catch (...) {
    t_last_error = "internal error: unknown exception";
    return LLMQ_ERR_INTERNAL;
  }
}

void require(const void* pointer, const char* what) {
  if (!pointer) llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "{} must not be NULL", what);
}

void check_struct_size(size_t struct_size, size_t ours, const char* what) {
  if (struct_size < sizeof(size_t))
    llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "{}: struct_size is {}; fill the struct with its _default() function",
               what, struct_size);
  if (struct_size > ours)
    llmq::fail(LLMQ_ERR_INVALID_ARGUMENT,
               "{}: struct_size {} is larger than this library's {} (the caller was built against a newer llmq.h)",
               what, struct_size, ours);
}

// Reads a caller's params struct, which may be an older, smaller version: missing fields keep
// their defaults.
template <typename T>
T read_params(const T* params, void (*set_defaults)(T*), const char* what) {
  T out;
  set_defaults(&out);
  if (!params) return out;
  check_struct_size(params->struct_size, sizeof(T), what);
  std::memcpy(static_cast<void*>(&out), params, params->struct_size);
  out.struct_size = sizeof(T);
  return out;
}

// Writes an output struct into a caller's struct of possibly smaller size.
template <typename T>
void write_result(const T& full, T* out, const char* what) {
  check_struct_size(out->struct_size, sizeof(T), what);
  size_t size = out->struct_size;
  std::memcpy(static_cast<void*>(out), &full, size);
  out->struct_size = size;
}

llmq::SamplingParams to_sampling(const llmq_sampling_params& s) {
  llmq::SamplingParams out;
  out.temperature = s.temperature;
  out.top_k = s.top_k;
  out.top_p = s.top_p;
  out.min_p = s.min_p;
  out.repetition_penalty = s.repetition_penalty;
  out.seed = s.seed == LLMQ_SEED_RANDOM ? (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}() : s.seed;
  return out;
}

// A *_init function: the defaults of this library's struct T, copied into the caller's first
// `struct_size` bytes (its sizeof, from the header it was built with; at most ours).
template <typename T>
void init_params(T* params, size_t struct_size, void (*fill)(T*)) {
  if (!params || struct_size < sizeof(size_t)) return;
  T full;
  fill(&full);
  const size_t size = std::min(struct_size, sizeof(T));
  std::memcpy(static_cast<void*>(params), &full, size);
  params->struct_size = size;
}

// The size of llmq_engine_params in llmq 0.1, before the tensor-parallel fields: bytes 44-47 were
// its tail padding and now hold tensor_parallel, so a struct this small keeps their defaults.
constexpr size_t kEngineParamsSize01 = 48;
static_assert(offsetof(llmq_engine_params, tensor_parallel) == 44, "the 0.1 layout ends at byte 44");

const llmq::Tokenizer& tokenizer_of(const llmq_model* model) {
  const llmq::Tokenizer* tokenizer = model->model->tokenizer();
  if (!tokenizer)
    llmq::fail(LLMQ_ERR_UNSUPPORTED, "{}: the model has no tokenizer.json", model->model->dir());
  return *tokenizer;
}

}  // namespace

extern "C" {

LLMQ_API uint32_t llmq_abi_version(void) { return LLMQ_ABI_VERSION; }

LLMQ_API const char* llmq_version_string(void) {
#define LLMQ_STR2(x) #x
#define LLMQ_STR(x) LLMQ_STR2(x)
  return LLMQ_STR(LLMQ_VERSION_MAJOR) "." LLMQ_STR(LLMQ_VERSION_MINOR) "." LLMQ_STR(LLMQ_VERSION_PATCH);
}

LLMQ_API void llmq_version(int* major, int* minor, int* patch) {
  if (major) *major = LLMQ_VERSION_MAJOR;
  if (minor) *minor = LLMQ_VERSION_MINOR;
  if (patch) *patch = LLMQ_VERSION_PATCH;
}

LLMQ_API const char* llmq_last_error(void) { return t_last_error.c_str(); }

LLMQ_API const char* llmq_status_string(llmq_status status) {
  int code;
  static_assert(sizeof(status) == sizeof(code), "llmq_status is int-sized");
  std::memcpy(&code, &status, sizeof code);  // any integer may arrive from C
  switch (code) {
    case LLMQ_OK: return "LLMQ_OK";
    case LLMQ_ERR_INVALID_ARGUMENT: return "LLMQ_ERR_INVALID_ARGUMENT";
    case LLMQ_ERR_IO: return "LLMQ_ERR_IO";
    case LLMQ_ERR_MODEL_FORMAT: return "LLMQ_ERR_MODEL_FORMAT";
    case LLMQ_ERR_UNSUPPORTED: return "LLMQ_ERR_UNSUPPORTED";
    case LLMQ_ERR_OUT_OF_MEMORY: return "LLMQ_ERR_OUT_OF_MEMORY";
    case LLMQ_ERR_KV_CACHE_FULL: return "LLMQ_ERR_KV_CACHE_FULL";
    case LLMQ_ERR_BACKEND_UNAVAILABLE: return "LLMQ_ERR_BACKEND_UNAVAILABLE";
    case LLMQ_ERR_BUFFER_TOO_SMALL: return "LLMQ_ERR_BUFFER_TOO_SMALL";
    case LLMQ_ERR_CONTEXT_OVERFLOW: return "LLMQ_ERR_CONTEXT_OVERFLOW";
    case LLMQ_ERR_INTERNAL: return "LLMQ_ERR_INTERNAL";
    case LLMQ_ERR_DEVICE: return "LLMQ_ERR_DEVICE";
    case LLMQ_ERR_TIMEOUT: return "LLMQ_ERR_TIMEOUT";
  }
  return "LLMQ_ERR_UNKNOWN";
}

static void fill_model_params(llmq_model_params* params) {
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
}

LLMQ_API llmq_status llmq_model_load(const char* model_dir, const llmq_model_params* params, llmq_model** out_model) {
  return guarded([&] {
    require(out_model, "llmq_model_load: out_model");
    *out_model = nullptr;
    require(model_dir, "llmq_model_load: model_dir");
    read_params(params, fill_model_params, "llmq_model_load: params");
    auto handle = std::make_unique<llmq_model>();
    handle->model = llmq::Model::load(model_dir);
    *out_model = handle.release();
  });
}

LLMQ_API void llmq_model_destroy(llmq_model* model) { delete model; }

LLMQ_API llmq_status llmq_model_get_info(const llmq_model* model, llmq_model_info* info) {
  return guarded([&] {
    require(model, "llmq_model_get_info: model");
    require(info, "llmq_model_get_info: info");
    const llmq::ModelConfig& c = model->model->config();
    llmq_model_info full;
    std::memset(&full, 0, sizeof full);
    full.struct_size = sizeof full;
    full.vocab_size = int32_t(c.vocab_size);
    full.hidden_size = int32_t(c.hidden_size);
    full.num_layers = int32_t(c.num_layers);
    full.num_heads = int32_t(c.num_heads);
    full.num_kv_heads = int32_t(c.num_kv_heads);
    full.head_dim = int32_t(c.head_dim);
    full.max_context = int32_t(c.max_position);
    full.bos_id = c.bos_id;
    for (int32_t id : c.eos_ids)
      if (full.num_eos_ids < 8) full.eos_ids[full.num_eos_ids++] = id;
    full.weight_bytes = model->model->weight_bytes();
    full.weight_bytes_per_step = full.weight_bytes;
    if (!c.tie_word_embeddings) full.weight_bytes_per_step -= model->model->weights().embed.nbytes();
    std::snprintf(full.architecture, sizeof full.architecture, "%s", c.architecture_name.c_str());
    write_result(full, info, "llmq_model_get_info: info");
  });
}

LLMQ_API llmq_status llmq_tokenize(const llmq_model* model, const char* text, size_t text_len, int add_special,
                                   int32_t* ids, size_t ids_capacity, size_t* n_ids) {
  return guarded([&] {
    require(model, "llmq_tokenize: model");
    require(n_ids, "llmq_tokenize: n_ids");
    if (text_len > 0) require(text, "llmq_tokenize: text");
    if (ids_capacity > 0) require(ids, "llmq_tokenize: ids");
    std::vector<int32_t> encoded =
        tokenizer_of(model).encode(std::string_view(text ? text : "", text_len), add_special != 0);
    *n_ids = encoded.size();
    if (encoded.size() > ids_capacity)
      llmq::fail(LLMQ_ERR_BUFFER_TOO_SMALL, "llmq_tokenize: {} ids do not fit in ids_capacity {}", encoded.size(),
                 ids_capacity);
    std::copy(encoded.begin(), encoded.end(), ids);
  });
}

LLMQ_API llmq_status llmq_detokenize(const llmq_model* model, const int32_t* ids, size_t n_ids, int skip_special,
                                     char* text, size_t text_capacity, size_t* text_len) {
  return guarded([&] {
    require(model, "llmq_detokenize: model");
    require(text_len, "llmq_detokenize: text_len");
    if (n_ids > 0) require(ids, "llmq_detokenize: ids");
    if (text_capacity > 0) require(text, "llmq_detokenize: text");
    std::string decoded = tokenizer_of(model).decode(std::vector<int32_t>(ids, ids + n_ids), skip_special != 0);
    *text_len = decoded.size();
    if (decoded.size() > text_capacity)
      llmq::fail(LLMQ_ERR_BUFFER_TOO_SMALL, "llmq_detokenize: {} bytes do not fit in text_capacity {}", decoded.size(),
                 text_capacity);
    if (!decoded.empty()) std::memcpy(text, decoded.data(), decoded.size());
  });
}

static void fill_engine_params(llmq_engine_params* params) {
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
  llmq::EngineOptions defaults;
  params->backend = defaults.backend;
  params->n_threads = defaults.n_threads;
  params->kv_cache_bytes = defaults.kv_cache_bytes;
  params->kv_block_size = defaults.kv_block_size;
  params->max_batch_tokens = defaults.max_batch_tokens;
  params->kv_dtype = defaults.kv_dtype;
  params->quant = LLMQ_QUANT_NONE;
  params->quantize_lm_head = 0;
  params->tensor_parallel = defaults.tensor_parallel;
  params->n_devices = 0;
  params->tp_timeout_ms = defaults.tp_timeout_ms;
  params->comm = nullptr;
}

LLMQ_API llmq_status llmq_engine_create(llmq_model* model, const llmq_engine_params* params,
                                        llmq_engine** out_engine) {
  return guarded([&] {
    require(out_engine, "llmq_engine_create: out_engine");
    *out_engine = nullptr;
    require(model, "llmq_engine_create: model");
    llmq_engine_params p = read_params(params, fill_engine_params, "llmq_engine_create: params");
    if (params && params->struct_size <= kEngineParamsSize01) {  // a 0.1 caller: no tensor-parallel fields
      llmq_engine_params defaults;
      fill_engine_params(&defaults);
      std::memcpy(reinterpret_cast<char*>(&p) + offsetof(llmq_engine_params, tensor_parallel),
                  reinterpret_cast<const char*>(&defaults) + offsetof(llmq_engine_params, tensor_parallel),
                  sizeof p - offsetof(llmq_engine_params, tensor_parallel));
    }
    // A C caller may store any integer in the enum field: check it as an integer first.
    int32_t backend;
    static_assert(sizeof(p.backend) == sizeof(backend), "llmq_backend is int-sized");
    std::memcpy(&backend, &p.backend, sizeof backend);
    if (backend != LLMQ_BACKEND_CPU && backend != LLMQ_BACKEND_CUDA)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_engine_create: params.backend {} is not a known backend", backend);
    llmq::EngineOptions options;
    options.backend = llmq_backend(backend);
    options.n_threads = p.n_threads;
    options.kv_cache_bytes = p.kv_cache_bytes;
    options.kv_block_size = p.kv_block_size;
    options.max_batch_tokens = p.max_batch_tokens;
    int32_t kv_dtype;
    std::memcpy(&kv_dtype, &p.kv_dtype, sizeof kv_dtype);
    if (kv_dtype < LLMQ_KV_DTYPE_AUTO || kv_dtype > LLMQ_KV_DTYPE_FP8)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_engine_create: params.kv_dtype {} is not a known KV dtype", kv_dtype);
    options.kv_dtype = llmq_kv_dtype(kv_dtype);
    int32_t quant;
    std::memcpy(&quant, &p.quant, sizeof quant);
    if (quant < LLMQ_QUANT_NONE || quant > LLMQ_QUANT_FP8)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_engine_create: params.quant {} is not a known quantization mode", quant);
    options.quant = quant == LLMQ_QUANT_INT8WO ? llmq::QuantMode::Int8WeightOnly
                    : quant == LLMQ_QUANT_FP8  ? llmq::QuantMode::Fp8
                                               : llmq::QuantMode::None;
    options.quantize_lm_head = p.quantize_lm_head != 0;
    if (p.n_devices < 0 || p.n_devices > LLMQ_MAX_TENSOR_PARALLEL)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_engine_create: params.n_devices must be in [0, {}], got {}",
                 LLMQ_MAX_TENSOR_PARALLEL, p.n_devices);
    options.tensor_parallel = p.tensor_parallel;
    options.devices.assign(p.devices, p.devices + p.n_devices);
    options.tp_timeout_ms = p.tp_timeout_ms;
    if (p.comm) options.communicator = p.comm->comm;
    auto handle = std::make_unique<llmq_engine>();
    handle->state = std::make_shared<EngineState>();
    handle->state->model = model->model;
    handle->state->engine = std::make_unique<llmq::Engine>(model->model, options);
    *out_engine = handle.release();
  });
}

LLMQ_API void llmq_engine_destroy(llmq_engine* engine) { delete engine; }

LLMQ_API llmq_status llmq_engine_saturation(llmq_engine* engine, uint64_t* counts, size_t capacity, size_t* n_counts,
                                            int reset) {
  static_assert(LLMQ_SATURATION_COUNTERS == llmq::kSaturationCounters, "llmq.h and engine/quant.h agree");
  return guarded([&] {
    require(engine, "llmq_engine_saturation: engine");
    require(n_counts, "llmq_engine_saturation: n_counts");
    std::lock_guard<std::mutex> lock(engine->state->mutex);
    const size_t needed = size_t(engine->state->engine->model().config().num_layers) * llmq::kSaturationCounters;
    *n_counts = needed;
    if (capacity < needed)
      llmq::fail(LLMQ_ERR_BUFFER_TOO_SMALL, "llmq_engine_saturation: {} counters do not fit in capacity {}", needed,
                 capacity);
    require(counts, "llmq_engine_saturation: counts");
    const std::vector<uint64_t> values = engine->state->engine->saturation(reset != 0);
    std::copy(values.begin(), values.end(), counts);
  });
}

static void fill_sampling_params(llmq_sampling_params* params) {
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
  llmq::SamplingParams defaults;
  params->temperature = defaults.temperature;
  params->top_k = defaults.top_k;
  params->top_p = defaults.top_p;
  params->min_p = defaults.min_p;
  params->repetition_penalty = defaults.repetition_penalty;
  params->seed = LLMQ_SEED_RANDOM;
}

static void fill_generate_params(llmq_generate_params* params) {
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
  params->max_new_tokens = llmq::GenerateOptions().max_new_tokens;
}

LLMQ_API llmq_status llmq_generate(llmq_engine* engine, const int32_t* prompt_ids, size_t n_prompt,
                                   const llmq_generate_params* params, int32_t* out_ids, size_t out_capacity,
                                   llmq_generate_result* result) {
  return guarded([&] {
    require(engine, "llmq_generate: engine");
    if (n_prompt > 0) require(prompt_ids, "llmq_generate: prompt_ids");
    if (out_capacity > 0) require(out_ids, "llmq_generate: out_ids");
    if (result) check_struct_size(result->struct_size, sizeof(llmq_generate_result), "llmq_generate: result");
    llmq_generate_params p = read_params(params, fill_generate_params, "llmq_generate: params");
    llmq_sampling_params s = read_params(p.sampling, fill_sampling_params, "llmq_generate: params.sampling");
    if (p.n_stop_ids > 0) require(p.stop_ids, "llmq_generate: params.stop_ids");
    if (p.n_stop_ids > 4096) llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_generate: more than 4096 stop ids");

    llmq::GenerateOptions options;
    options.sampling = to_sampling(s);
    options.max_new_tokens = p.max_new_tokens;
    options.stop_ids.assign(p.stop_ids, p.stop_ids + p.n_stop_ids);
    options.ignore_eos = p.ignore_eos != 0;

    const llmq::Tokenizer* tokenizer = engine->state->model->tokenizer();
    llmq::Utf8Stream stream;
    int32_t previous = n_prompt > 0 ? prompt_ids[n_prompt - 1] : -1;
    size_t written = 0;
    options.on_token = [&](int32_t token) {
      if (written < out_capacity) out_ids[written] = token;
      ++written;
      bool keep_going = true;
      if (p.on_token) {
        std::string text = tokenizer ? stream.push(tokenizer->token_bytes(previous, token)) : std::string();
        keep_going = p.on_token(token, text.data(), text.size(), p.user_data) == 0;
      }
      previous = token;
      return keep_going;
    };

    std::lock_guard<std::mutex> lock(engine->state->mutex);
    llmq::GenerateResult r = engine->state->engine->generate(std::vector<int32_t>(prompt_ids, prompt_ids + n_prompt), options);
    if (result) {
      llmq_generate_result full;
      std::memset(&full, 0, sizeof full);
      full.struct_size = sizeof full;
      full.finish_reason = llmq_finish_reason(int(r.finish_reason));
      full.n_prompt_tokens = int32_t(n_prompt);
      full.n_generated = int32_t(r.tokens.size());
      full.time_to_first_token_s = r.time_to_first_token_s;
      full.decode_time_s = r.decode_time_s;
      write_result(full, result, "llmq_generate: result");
    }
  });
}

LLMQ_API llmq_status llmq_score(llmq_engine* engine, const int32_t* ids, size_t n_ids, float* logits,
                                size_t logits_capacity) {
  return guarded([&] {
    require(engine, "llmq_score: engine");
    if (n_ids > 0) require(ids, "llmq_score: ids");
    size_t vocab = size_t(engine->state->engine->vocab_size());
    if (n_ids > SIZE_MAX / vocab || logits_capacity < n_ids * vocab)
      llmq::fail(LLMQ_ERR_BUFFER_TOO_SMALL, "llmq_score: logits_capacity {} is less than n_ids * vocab_size = {} * {}",
                 logits_capacity, n_ids, vocab);
    require(logits, "llmq_score: logits");
    std::lock_guard<std::mutex> lock(engine->state->mutex);
    engine->state->engine->score(std::vector<int32_t>(ids, ids + n_ids), logits);
  });
}

// ---- Serving -----------------------------------------------------------------------------------

namespace {

// The public form of an event; text and error point into `e`, which must outlive the result.
llmq_event to_c_event(const llmq::ServerEvent& e) {
  llmq_event out;
  std::memset(&out, 0, sizeof out);
  out.struct_size = sizeof out;
  out.request_id = e.id;
  out.user_data = e.user_data;
  out.n_generated = e.n_generated;
  out.text = e.text.c_str();
  out.text_len = e.text.size();
  out.error = "";
  if (!e.finished) {
    out.type = LLMQ_EVENT_TOKEN;
    out.token = e.token;
    out.finish_reason = LLMQ_FINISH_LENGTH;
    out.status = LLMQ_OK;
    return out;
  }
  const llmq::FinishedRequest& f = *e.finished;
  out.type = LLMQ_EVENT_FINISHED;
  out.token = -1;
  out.finish_reason = llmq_finish_reason(int(f.reason));
  out.status = f.status;
  out.error = f.error.c_str();
  out.n_prompt_tokens = f.prompt_tokens;
  out.n_cached_tokens = f.cached_tokens;
  out.n_preemptions = f.preemptions;
  out.queue_time_s = f.queue_time_s;
  out.time_to_first_token_s = f.time_to_first_token_s;
  out.decode_time_s = f.decode_time_s;
  return out;
}

// Keeps the strings of the events last polled on this thread alive (llmq.h promises that).
thread_local std::vector<llmq::ServerEvent> t_polled;

}  // namespace

static void fill_server_params(llmq_server_params* params) {
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
  params->max_batched_tokens = 0;
  params->max_running = llmq::SchedulerOptions().max_running;
  params->prefix_caching = 0;
  params->own_thread = 1;
  params->peak_bandwidth = 0;
}

LLMQ_API llmq_status llmq_server_create(llmq_engine* engine, const llmq_server_params* params,
                                        llmq_server** out_server) {
  return guarded([&] {
    require(out_server, "llmq_server_create: out_server");
    *out_server = nullptr;
    require(engine, "llmq_server_create: engine");
    llmq_server_params p = read_params(params, fill_server_params, "llmq_server_create: params");
    const int32_t engine_max = engine->state->engine->max_batch_tokens();
    if (p.max_batched_tokens < 0 || p.max_batched_tokens > engine_max)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT,
                 "llmq_server_create: params.max_batched_tokens must be in [0, {}] (the engine's max_batch_tokens), got {}",
                 engine_max, p.max_batched_tokens);
    if (p.max_running < 1)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_server_create: params.max_running must be >= 1, got {}", p.max_running);
    if (!(p.peak_bandwidth >= 0) || p.peak_bandwidth > 1e18)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_server_create: params.peak_bandwidth must be in [0, 1e18] bytes/s, got {}",
                 p.peak_bandwidth);
    llmq::ServerOptions options;
    options.scheduler.max_batched_tokens = p.max_batched_tokens == 0 ? engine_max : p.max_batched_tokens;
    options.scheduler.max_running = p.max_running;
    options.scheduler.prefix_caching = p.prefix_caching != 0;
    options.own_thread = p.own_thread != 0;
    options.peak_bandwidth = p.peak_bandwidth;
    if (p.on_event) {
      const llmq_event_callback callback = p.on_event;
      void* user_data = p.user_data;
      options.on_event = [callback, user_data](const llmq::ServerEvent& e) {
        const llmq_event event = to_c_event(e);
        callback(&event, user_data);
      };
    }
    auto handle = std::make_unique<llmq_server>();
    handle->engine = engine->state;
    handle->server = std::make_unique<llmq::Server>(*engine->state->engine, engine->state->mutex, std::move(options));
    *out_server = handle.release();
  });
}

LLMQ_API void llmq_server_destroy(llmq_server* server) { delete server; }

static void fill_request_params(llmq_request_params* params) {
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
  params->max_new_tokens = llmq::Request().max_new_tokens;
}

LLMQ_API llmq_status llmq_server_submit(llmq_server* server, const int32_t* prompt_ids, size_t n_prompt,
                                        const llmq_request_params* params, llmq_request_id* out_id) {
  return guarded([&] {
    require(server, "llmq_server_submit: server");
    require(out_id, "llmq_server_submit: out_id");
    if (n_prompt > 0) require(prompt_ids, "llmq_server_submit: prompt_ids");
    llmq_request_params p = read_params(params, fill_request_params, "llmq_server_submit: params");
    llmq_sampling_params s = read_params(p.sampling, fill_sampling_params, "llmq_server_submit: params.sampling");
    if (p.n_stop_ids > 0) require(p.stop_ids, "llmq_server_submit: params.stop_ids");
    if (p.n_stop_ids > 4096) llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_server_submit: more than 4096 stop ids");
    llmq::Request request;
    request.prompt.assign(prompt_ids, prompt_ids + n_prompt);
    request.sampling = to_sampling(s);
    request.max_new_tokens = p.max_new_tokens;
    request.stop_ids.assign(p.stop_ids, p.stop_ids + p.n_stop_ids);
    request.ignore_eos = p.ignore_eos != 0;
    request.priority = p.priority;
    *out_id = server->server->submit(std::move(request), p.user_data);
  });
}

LLMQ_API llmq_status llmq_server_cancel(llmq_server* server, llmq_request_id id) {
  return guarded([&] {
    require(server, "llmq_server_cancel: server");
    if (!server->server->cancel(id))
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_server_cancel: no unfinished request has id {}", id);
  });
}

LLMQ_API llmq_status llmq_server_step(llmq_server* server, size_t* n_unfinished) {
  return guarded([&] {
    require(server, "llmq_server_step: server");
    const size_t n = server->server->step();
    if (n_unfinished) *n_unfinished = n;
  });
}

LLMQ_API llmq_status llmq_server_poll(llmq_server* server, llmq_event* events, size_t capacity, size_t* n_events,
                                      int32_t timeout_ms) {
  return guarded([&] {
    require(server, "llmq_server_poll: server");
    require(n_events, "llmq_server_poll: n_events");
    *n_events = 0;
    if (capacity == 0) llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_server_poll: capacity must be >= 1");
    require(events, "llmq_server_poll: events");
    const size_t stride = events[0].struct_size;
    check_struct_size(stride, sizeof(llmq_event), "llmq_server_poll: events[0]");
    if (timeout_ms < -1) llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_server_poll: timeout_ms must be >= -1, got {}", timeout_ms);
    t_polled.clear();
    const size_t n = server->server->poll(&t_polled, capacity, timeout_ms);
    for (size_t i = 0; i < n; ++i) {
      const llmq_event full = to_c_event(t_polled[i]);
      auto* slot = reinterpret_cast<llmq_event*>(reinterpret_cast<char*>(events) + i * stride);
      std::memcpy(static_cast<void*>(slot), &full, stride);
      slot->struct_size = stride;
    }
    *n_events = n;
  });
}

LLMQ_API double llmq_histogram_bound(int32_t bucket) {
  static_assert(LLMQ_HISTOGRAM_BUCKETS == llmq::Histogram::kBuckets, "llmq.h and engine/server.h agree");
  if (bucket < 0 || bucket >= LLMQ_HISTOGRAM_BUCKETS) return std::numeric_limits<double>::quiet_NaN();
  return llmq::Histogram::upper_bound(bucket);
}

LLMQ_API llmq_status llmq_server_get_stats(llmq_server* server, llmq_server_stats* stats) {
  return guarded([&] {
    require(server, "llmq_server_get_stats: server");
    require(stats, "llmq_server_get_stats: stats");
    check_struct_size(stats->struct_size, sizeof(llmq_server_stats), "llmq_server_get_stats: stats");
    const llmq::ServerStats s = server->server->stats();
    llmq_server_stats full;
    std::memset(&full, 0, sizeof full);
    full.struct_size = sizeof full;
    full.running = s.running;
    full.waiting = s.waiting;
    full.kv_blocks_total = s.kv_blocks_total;
    full.kv_blocks_used = s.kv_blocks_used;
    full.kv_blocks_cached = s.kv_blocks_cached_free;
    full.requests_submitted = s.submitted;
    full.requests_finished = s.finished;
    full.requests_cancelled = s.cancelled;
    full.requests_failed = s.failed;
    full.prompt_tokens = s.prompt_tokens;
    full.generated_tokens = s.generated_tokens;
    full.cached_prompt_tokens = s.cached_tokens;
    full.steps = s.steps;
    full.preemptions = s.preemptions;
    full.peak_bandwidth = s.peak_bandwidth;
    full.last_decode_mbu = s.last_decode_mbu;
    full.mean_decode_mbu = s.mean_decode_mbu;
    full.ttft_p50_s = s.ttft.quantile(0.5);
    full.ttft_p99_s = s.ttft.quantile(0.99);
    full.tpot_p50_s = s.tpot.quantile(0.5);
    full.tpot_p99_s = s.tpot.quantile(0.99);
    std::copy(s.ttft.counts().begin(), s.ttft.counts().end(), full.ttft_histogram);
    std::copy(s.tpot.counts().begin(), s.tpot.counts().end(), full.tpot_histogram);
    write_result(full, stats, "llmq_server_get_stats: stats");
  });
}

LLMQ_API llmq_status llmq_nccl_get_unique_id(llmq_nccl_id* id) {
  static_assert(sizeof(id->bytes) == std::tuple_size<llmq::NcclId>::value, "llmq_nccl_id holds an ncclUniqueId");
  return guarded([&] {
    require(id, "llmq_nccl_get_unique_id: id");
    const llmq::NcclId made = llmq::nccl_unique_id();
    std::memcpy(id->bytes, made.data(), made.size());
  });
}

LLMQ_API llmq_status llmq_comm_init_rank(const llmq_nccl_id* id, int32_t n_ranks, int32_t rank, int32_t device,
                                         int32_t timeout_ms, llmq_comm** out_comm) {
  return guarded([&] {
    require(out_comm, "llmq_comm_init_rank: out_comm");
    *out_comm = nullptr;
    require(id, "llmq_comm_init_rank: id");
    if (n_ranks < 1 || n_ranks > 65536)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_comm_init_rank: n_ranks must be in [1, 65536], got {}", n_ranks);
    if (rank < 0 || rank >= n_ranks)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_comm_init_rank: rank {} is not in [0, {})", rank, n_ranks);
    if (device < 0) llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_comm_init_rank: device {} is negative", device);
    if (timeout_ms < 0)
      llmq::fail(LLMQ_ERR_INVALID_ARGUMENT, "llmq_comm_init_rank: timeout_ms must be >= 0, got {}", timeout_ms);
    llmq::NcclId nccl_id;
    std::memcpy(nccl_id.data(), id->bytes, nccl_id.size());
    auto handle = std::make_unique<llmq_comm>();
    handle->comm = llmq::make_nccl_communicator(nccl_id, n_ranks, rank, device,
                                                timeout_ms > 0 ? timeout_ms : llmq::kDefaultTpTimeoutMs);
    *out_comm = handle.release();
  });
}

LLMQ_API void llmq_comm_destroy(llmq_comm* comm) { delete comm; }

// ---- Params structs: *_init, and the 0.1 *_default symbols -------------------------------------

LLMQ_API void llmq_model_params_init(llmq_model_params* params, size_t struct_size) {
  init_params(params, struct_size, fill_model_params);
}
LLMQ_API void llmq_engine_params_init(llmq_engine_params* params, size_t struct_size) {
  init_params(params, struct_size, fill_engine_params);
}
LLMQ_API void llmq_sampling_params_init(llmq_sampling_params* params, size_t struct_size) {
  init_params(params, struct_size, fill_sampling_params);
}
LLMQ_API void llmq_generate_params_init(llmq_generate_params* params, size_t struct_size) {
  init_params(params, struct_size, fill_generate_params);
}
LLMQ_API void llmq_server_params_init(llmq_server_params* params, size_t struct_size) {
  init_params(params, struct_size, fill_server_params);
}
LLMQ_API void llmq_request_params_init(llmq_request_params* params, size_t struct_size) {
  init_params(params, struct_size, fill_request_params);
}

// Programs built against llmq 0.1 call these functions (llmq.h now makes the names macros over
// *_init): each fills exactly the struct that 0.1 had, never more.
#undef llmq_model_params_default
#undef llmq_engine_params_default
#undef llmq_sampling_params_default
#undef llmq_generate_params_default
LLMQ_API void llmq_model_params_default(llmq_model_params* params);
LLMQ_API void llmq_engine_params_default(llmq_engine_params* params);
LLMQ_API void llmq_sampling_params_default(llmq_sampling_params* params);
LLMQ_API void llmq_generate_params_default(llmq_generate_params* params);
LLMQ_API void llmq_model_params_default(llmq_model_params* params) {
  init_params(params, sizeof(llmq_model_params), fill_model_params);  // unchanged since 0.1
}
LLMQ_API void llmq_engine_params_default(llmq_engine_params* params) {
  init_params(params, kEngineParamsSize01, fill_engine_params);
}
LLMQ_API void llmq_sampling_params_default(llmq_sampling_params* params) {
  init_params(params, sizeof(llmq_sampling_params), fill_sampling_params);  // unchanged since 0.1
}
LLMQ_API void llmq_generate_params_default(llmq_generate_params* params) {
  init_params(params, sizeof(llmq_generate_params), fill_generate_params);  // unchanged since 0.1
}

}  // extern "C"
