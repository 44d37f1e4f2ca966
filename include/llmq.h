/*
 * llmq.h: the C ABI of libllmq, an inference engine for Llama-family language models.
 *
 * Conventions (they hold for every function below unless its comment says otherwise):
 * - Every call that can fail returns an llmq_status. On failure, llmq_last_error() returns a
 *   message, valid on the calling thread until its next llmq call, naming the file, tensor,
 *   field or argument at fault. No C++ exception ever crosses this interface.
 * - Objects are opaque handles created by *_create / *_load and freed by *_destroy. Passing
 *   NULL to a destroy function is a no-op.
 * - Params structs start with `struct_size`. Fill them with the matching *_default() macro,
 *   which calls *_init(params, sizeof *params), then change the fields you need: a library built
 *   later accepts an older, smaller struct and uses defaults for the fields it lacks, and its
 *   *_init never writes past the size it is given. (Programs built against llmq 0.1 call
 *   *_default functions, which the library keeps exporting with the 0.1 struct sizes.)
 * - Pointers passed in are borrowed for the duration of the call only, unless stated.
 * - Thread safety: functions taking a const handle may be called from any number of threads
 *   at once. An llmq_model is immutable after loading. An llmq_engine serializes its calls
 *   internally (a mutex), so calls from several threads are safe but run one at a time.
 *   A *_destroy function must not run while another thread uses the same handle.
 * - Parameters are marked in (read), out (written) or in/out. Every function below says which
 *   statuses it returns besides LLMQ_OK; any call that allocates may also return
 *   LLMQ_ERR_OUT_OF_MEMORY, and LLMQ_ERR_INTERNAL means a bug in llmq.
 * - docs/c-api.md gives an overview and a complete example.
 */
#ifndef LLMQ_H
#define LLMQ_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define LLMQ_API __declspec(dllexport)
#else
#define LLMQ_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the binary interface. It changes only when an existing struct or function
 * changes incompatibly; additions keep it. */
#define LLMQ_ABI_VERSION 1

typedef enum llmq_status {
  LLMQ_OK = 0,
  LLMQ_ERR_INVALID_ARGUMENT = 1,    /* a NULL pointer, a value out of range, contradictory params */
  LLMQ_ERR_IO = 2,                  /* a file could not be opened, read, mapped or written */
  LLMQ_ERR_MODEL_FORMAT = 3,        /* a model file is malformed or does not match its config */
  LLMQ_ERR_UNSUPPORTED = 4,         /* valid input that this build does not handle (architecture, dtype) */
  LLMQ_ERR_OUT_OF_MEMORY = 5,       /* an allocation failed */
  LLMQ_ERR_KV_CACHE_FULL = 6,       /* the paged KV cache has no free block left for the sequence */
  LLMQ_ERR_BACKEND_UNAVAILABLE = 7, /* the requested backend is not built in, or there is no device */
  LLMQ_ERR_BUFFER_TOO_SMALL = 8,    /* an output buffer is too small; the needed size is reported */
  LLMQ_ERR_CONTEXT_OVERFLOW = 9,    /* the sequence would exceed the model's context length */
  LLMQ_ERR_INTERNAL = 10,           /* a bug in llmq: please report it */
  LLMQ_ERR_DEVICE = 11,             /* the GPU reported an error (a failed kernel or copy, a lost device) */
  LLMQ_ERR_TIMEOUT = 12             /* a tensor-parallel peer rank did not arrive in time (named in the message) */
} llmq_status;

typedef enum llmq_backend {
  LLMQ_BACKEND_CPU = 0,
  LLMQ_BACKEND_CUDA = 1
} llmq_backend;

/* Passed as a seed: draw a fresh random seed for this call. */
#define LLMQ_SEED_RANDOM UINT64_MAX

typedef struct llmq_model llmq_model;
typedef struct llmq_engine llmq_engine;
typedef struct llmq_comm llmq_comm; /* one rank of a tensor-parallel group across processes (NCCL) */

/* ---- Versions and errors ------------------------------------------------------------------ */

/* Returns LLMQ_ABI_VERSION as the library was built; a host compares it with the LLMQ_ABI_VERSION
 * it was compiled against. Cannot fail. Thread-safe. */
LLMQ_API uint32_t llmq_abi_version(void);

/* Returns the library version as "MAJOR.MINOR.PATCH"; a static string owned by the library, never
 * freed. Cannot fail. Thread-safe. */
LLMQ_API const char* llmq_version_string(void);

/* Writes the library version numbers. major, minor, patch: out; any of them may be NULL (not
 * written). Cannot fail. Thread-safe. */
LLMQ_API void llmq_version(int* major, int* minor, int* patch);

/* Returns the message of the last failed call on this thread ("" if none). A successful call does
 * not clear it. The string belongs to the library (never free it) and stays valid until this
 * thread's next llmq call. Cannot fail. Thread-safe (thread-local). */
LLMQ_API const char* llmq_last_error(void);

/* Returns a static English name for a status code ("LLMQ_ERR_IO", ...). status: in, any integer
 * (an unknown code gives "LLMQ_ERR_UNKNOWN"). The string is owned by the library, never freed.
 * Cannot fail. Thread-safe. */
LLMQ_API const char* llmq_status_string(llmq_status status);

/* ---- Models -------------------------------------------------------------------------------- */

typedef struct llmq_model_params {
  size_t struct_size; /* in: sizeof(llmq_model_params) */
  /* Room for loader options (quantization arrives here later). */
  int32_t reserved;
} llmq_model_params;

/* Fills the first struct_size bytes of *params with defaults and sets params->struct_size (at
 * most this library's size of the struct). Call it as llmq_model_params_default(&params), which passes
 * sizeof params. params may be NULL (nothing happens). Thread-safe. */
LLMQ_API void llmq_model_params_init(llmq_model_params* params, size_t struct_size);
#define llmq_model_params_default(params) llmq_model_params_init((params), sizeof *(params))

/* Loads a Hugging Face model directory: config.json (+ generation_config.json), model.safetensors
 * or shards listed in model.safetensors.index.json, and tokenizer.json / tokenizer_config.json if
 * present (without them tokenize/detokenize fail with LLMQ_ERR_UNSUPPORTED).
 * Architectures: LlamaForCausalLM (Llama 2, Llama 3/3.1 rope scaling), MistralForCausalLM,
 * Qwen2ForCausalLM. Weights in F32, F16 or BF16 are memory-mapped and used in place.
 * model_dir: in. params: in, may be NULL for defaults. out_model: out, owned by the caller, free
 * it with llmq_model_destroy. The model stays alive while engines created on it exist.
 * Returns LLMQ_ERR_IO, LLMQ_ERR_MODEL_FORMAT, LLMQ_ERR_UNSUPPORTED or LLMQ_ERR_INVALID_ARGUMENT
 * with a message naming the file and the tensor or field; LLMQ_ERR_INVALID_ARGUMENT also for a
 * NULL model_dir or out_model, or a params struct_size this library does not accept. On failure
 * *out_model is set to NULL. Thread-safe. */
LLMQ_API llmq_status llmq_model_load(const char* model_dir, const llmq_model_params* params,
                                     llmq_model** out_model);

/* Releases the caller's reference to the model; engines created on it keep the weights alive, and
 * the memory goes with the last of them. model: in, owned by the caller until this call; NULL is a
 * no-op. Cannot fail. Must not run while another thread uses the same handle. */
LLMQ_API void llmq_model_destroy(llmq_model* model);

typedef struct llmq_model_info {
  size_t struct_size;           /* in: sizeof(llmq_model_info) */
  int32_t vocab_size;
  int32_t hidden_size;
  int32_t num_layers;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t max_context;          /* max_position_embeddings */
  int32_t bos_id;               /* -1 if none */
  int32_t num_eos_ids;          /* how many of eos_ids are used */
  int32_t eos_ids[8];           /* generation stops at any of these (generation_config.json) */
  uint64_t weight_bytes;        /* bytes of all weight tensors as stored */
  uint64_t weight_bytes_per_step; /* weight bytes one decode step reads: all but an untied embedding table */
  char architecture[64];        /* e.g. "LlamaForCausalLM", NUL-terminated */
} llmq_model_info;

/* Describes a loaded model. model: in. info: in/out: set info->struct_size first (to
 * sizeof(llmq_model_info)); the library writes no more than struct_size bytes, so an older, smaller
 * struct gets the fields it has. Returns LLMQ_ERR_INVALID_ARGUMENT for a NULL pointer or a
 * struct_size smaller than sizeof(size_t) or larger than this library's. Thread-safe. */
LLMQ_API llmq_status llmq_model_get_info(const llmq_model* model, llmq_model_info* info);

/* ---- Tokenizer ------------------------------------------------------------------------------ */

/* Encodes UTF-8 text (text_len bytes; text need not be NUL-terminated) into token ids.
 * add_special: 1 adds BOS/EOS as tokenizer_config.json says (add_bos_token), 0 adds none.
 * ids: out, capacity ids_capacity; *n_ids: out, the number of ids. If ids_capacity is too small,
 * nothing is written to ids, *n_ids is set to the size needed and LLMQ_ERR_BUFFER_TOO_SMALL is
 * returned (ids may be NULL with ids_capacity 0 to query the size). model, text: in.
 * Other statuses: LLMQ_ERR_INVALID_ARGUMENT for a NULL model or n_ids, NULL text with text_len > 0,
 * or NULL ids with ids_capacity > 0; LLMQ_ERR_UNSUPPORTED when the model has no tokenizer.
 * Thread-safe. */
LLMQ_API llmq_status llmq_tokenize(const llmq_model* model, const char* text, size_t text_len, int add_special,
                                   int32_t* ids, size_t ids_capacity, size_t* n_ids);

/* Decodes token ids into UTF-8 text, without a terminating NUL. skip_special: 1 drops special
 * tokens (BOS, EOS, ...). text: out, capacity text_capacity; *text_len: out, the byte count, or the
 * size needed with LLMQ_ERR_BUFFER_TOO_SMALL (text may be NULL with text_capacity 0 to query the
 * size). model, ids: in. Ids out of range give LLMQ_ERR_INVALID_ARGUMENT, as do a NULL model or
 * text_len, NULL ids with n_ids > 0, and NULL text with text_capacity > 0; LLMQ_ERR_UNSUPPORTED
 * when the model has no tokenizer. Thread-safe. */
LLMQ_API llmq_status llmq_detokenize(const llmq_model* model, const int32_t* ids, size_t n_ids, int skip_special,
                                     char* text, size_t text_capacity, size_t* text_len);

/* ---- Engines -------------------------------------------------------------------------------- */

typedef enum llmq_kv_dtype {
  LLMQ_KV_DTYPE_AUTO = 0, /* the dtype of the model's weights (F32, F16 or BF16) */
  LLMQ_KV_DTYPE_F32 = 1,
  LLMQ_KV_DTYPE_F16 = 2,
  LLMQ_KV_DTYPE_BF16 = 3,
  LLMQ_KV_DTYPE_INT8 = 4, /* INT8 with a dynamic fp32 scale per token and KV head (stored beside the blocks) */
  LLMQ_KV_DTYPE_FP8 = 5   /* FP8 E4M3 with static per-layer K and V scales (1.0 until calibrated) */
} llmq_kv_dtype;

/* Quantization of the layers' linear weights, done when the engine is created (engine/quant.h and
 * the README give the exact formats). lm_head and the embeddings stay as loaded. */
typedef enum llmq_quant_mode {
  LLMQ_QUANT_NONE = 0,   /* weights as loaded */
  LLMQ_QUANT_INT8WO = 1, /* INT8 weights with per-channel scales; activations 16-bit */
  LLMQ_QUANT_FP8 = 2     /* FP8 E4M3 weights (per-tensor scale) and activations (dynamic per-token scale) */
} llmq_quant_mode;

/* The most ranks of tensor parallelism within one process (one per GPU of a node). */
#define LLMQ_MAX_TENSOR_PARALLEL 8

typedef struct llmq_engine_params {
  size_t struct_size;        /* in: sizeof(llmq_engine_params) */
  llmq_backend backend;      /* default LLMQ_BACKEND_CPU */
  int32_t n_threads;         /* CPU worker threads; 0 = one per core (default) */
  uint64_t kv_cache_bytes;   /* capacity of the paged KV cache; 0 = one full context, at most 2 GiB */
  int32_t kv_block_size;     /* tokens per KV block (default 16) */
  int32_t max_batch_tokens;  /* most tokens in one forward step, i.e. the prefill chunk (default 512) */
  llmq_kv_dtype kv_dtype;    /* element type of the KV cache (default LLMQ_KV_DTYPE_AUTO) */
  llmq_quant_mode quant;     /* weight quantization (default LLMQ_QUANT_NONE) */
  int32_t quantize_lm_head;  /* nonzero: quantize lm_head too, as the layers (default 0: keep it as loaded) */
  /* Tensor parallelism (Megatron-style; README "Tensor parallelism"): */
  int32_t tensor_parallel;   /* ranks in this process, one thread each, 1 to LLMQ_MAX_TENSOR_PARALLEL (default 1).
                              * CPU: the ranks share n_threads. CUDA: one GPU per rank; libnccl.so.2 is opened
                              * (dlopen) only when this is > 1. The heads must split evenly over the ranks;
                              * kv_cache_bytes sizes the whole cache, each rank holding its heads' part. */
  int32_t n_devices;         /* 0 (default): rank r uses CUDA device r; else the first n_devices entries of
                              * devices are used, rank r on devices[r] (at least tensor_parallel of them) */
  int32_t devices[LLMQ_MAX_TENSOR_PARALLEL];
  int32_t tp_timeout_ms;     /* how long a rank waits for its peers at start-up and at each collective of the
                              * in-process group; 0 = 60000 (default). A peer that never comes: LLMQ_ERR_TIMEOUT */
  llmq_comm* comm;           /* multi-process: this engine is one rank of comm (llmq_comm_init_rank), with
                              * tensor_parallel 1 and the CUDA backend on comm's device; every rank's process
                              * must then make the same engine calls in the same order. The engine keeps its
                              * own reference. NULL (default): all ranks in this process */
} llmq_engine_params;

/* Fills the first struct_size bytes of *params with defaults and sets params->struct_size (at
 * most this library's size of the struct). Call it as llmq_engine_params_default(&params), which passes
 * sizeof params. params may be NULL (nothing happens). Thread-safe. */
LLMQ_API void llmq_engine_params_init(llmq_engine_params* params, size_t struct_size);
#define llmq_engine_params_default(params) llmq_engine_params_init((params), sizeof *(params))

/* Creates an engine (backend, KV cache, scratch buffers) on a loaded model.
 * model: in; the engine keeps its own reference to the weights, so the model may be destroyed
 * first. params: in, may be NULL for defaults. *out_engine: out, owned by the caller, free it with
 * llmq_engine_destroy; NULL on failure. LLMQ_ERR_BACKEND_UNAVAILABLE when the backend is not built
 * in or has no device; LLMQ_ERR_OUT_OF_MEMORY when the KV cache cannot be allocated;
 * LLMQ_ERR_INVALID_ARGUMENT for NULL pointers, unknown enum values, out-of-range sizes or a
 * struct_size this library does not accept; LLMQ_ERR_UNSUPPORTED for a quantization or KV dtype
 * the model or device cannot use; LLMQ_ERR_DEVICE for a GPU failure. Thread-safe. */
LLMQ_API llmq_status llmq_engine_create(llmq_model* model, const llmq_engine_params* params,
                                        llmq_engine** out_engine);

/* Frees the engine and its KV cache. engine: in, owned by the caller until this call; NULL is a
 * no-op. Cannot fail. It must not be in use on another thread, nor called from its own token
 * callback. */
LLMQ_API void llmq_engine_destroy(llmq_engine* engine);

/* Saturation counters: values clipped by a static quantization scale, per layer, since the engine
 * was created or last reset. For layer i, counts[5 * i + j] holds:
 *   j = 0  FP8 activation values beyond +-448 after their static input scale (clipped)
 *   j = 1  activation values quantized with a static scale
 *   j = 2  K values clipped by the layer's FP8 KV scale
 *   j = 3  V values clipped likewise
 *   j = 4  K values (as many V) written to an FP8 KV cache
 * Dynamic scales (per-token FP8 activations, the INT8 KV cache) cannot clip and count nothing.
 * *n_counts: out, 5 * layers; LLMQ_ERR_BUFFER_TOO_SMALL (with *n_counts set) when capacity is
 * less (counts may be NULL with capacity 0 to query the size). engine: in. counts: out. reset: in,
 * != 0 zeroes the counters after reading them. LLMQ_ERR_INVALID_ARGUMENT for a NULL engine or
 * n_counts. Locks the engine for the duration of the call; thread-safe. */
#define LLMQ_SATURATION_COUNTERS 5
LLMQ_API llmq_status llmq_engine_saturation(llmq_engine* engine, uint64_t* counts, size_t capacity, size_t* n_counts,
                                            int reset);

typedef struct llmq_sampling_params {
  size_t struct_size;       /* in: sizeof(llmq_sampling_params) */
  float temperature;        /* 0 = greedy (argmax; the lowest id wins ties). Default 1 */
  int32_t top_k;            /* 0 = off (default) */
  float top_p;              /* in (0, 1]; 1 = off (default) */
  float min_p;              /* in [0, 1]; 0 = off (default) */
  float repetition_penalty; /* > 0; 1 = off (default); applies to the prompt and generated ids */
  uint64_t seed;            /* same seed, same output; LLMQ_SEED_RANDOM (default) draws one */
} llmq_sampling_params;

/* Fills the first struct_size bytes of *params with defaults and sets params->struct_size (at
 * most this library's size of the struct). Call it as llmq_sampling_params_default(&params), which passes
 * sizeof params. params may be NULL (nothing happens). Thread-safe. */
LLMQ_API void llmq_sampling_params_init(llmq_sampling_params* params, size_t struct_size);
#define llmq_sampling_params_default(params) llmq_sampling_params_init((params), sizeof *(params))

/* Called once per generated token, on the thread that called llmq_generate.
 * token: the new id. text/text_len: the new UTF-8 text it completes (may be empty when a token
 * holds part of a multi-byte character; not NUL-terminated; valid during the call only).
 * Return 0 to continue, non-zero to stop generating (finish reason LLMQ_FINISH_CANCELLED).
 * If generation ends inside a multi-byte character, its incomplete bytes are never passed to the
 * callback (llmq_detokenize of the ids shows them as U+FFFD).
 * The engine is locked while the callback runs: it must not call llmq functions on the same engine
 * (they would wait for themselves); functions on the model are fine. It must not unwind (a C++
 * exception, a Rust panic) into the library: catch, return non-zero, and rethrow after
 * llmq_generate returns. */
typedef int (*llmq_token_callback)(int32_t token, const char* text, size_t text_len, void* user_data);

typedef struct llmq_generate_params {
  size_t struct_size;                    /* in: sizeof(llmq_generate_params) */
  const llmq_sampling_params* sampling;  /* NULL = defaults */
  int32_t max_new_tokens;                /* default 256; generation also stops at the context end */
  const int32_t* stop_ids;               /* extra ids that end generation (not emitted); may be NULL */
  size_t n_stop_ids;
  int ignore_eos;                        /* 1: do not stop at the model's EOS ids. Default 0 */
  llmq_token_callback on_token;          /* may be NULL; called only during llmq_generate */
  void* user_data;                       /* passed to on_token; borrowed, never freed by llmq */
} llmq_generate_params;

/* Fills the first struct_size bytes of *params with defaults and sets params->struct_size (at
 * most this library's size of the struct). Call it as llmq_generate_params_default(&params), which passes
 * sizeof params. params may be NULL (nothing happens). Thread-safe. */
LLMQ_API void llmq_generate_params_init(llmq_generate_params* params, size_t struct_size);
#define llmq_generate_params_default(params) llmq_generate_params_init((params), sizeof *(params))

typedef enum llmq_finish_reason {
  LLMQ_FINISH_LENGTH = 0,   /* max_new_tokens reached */
  LLMQ_FINISH_STOP = 1,     /* an EOS or stop id was sampled (it is not part of the output) */
  LLMQ_FINISH_CANCELLED = 2,/* the callback asked to stop */
  LLMQ_FINISH_CONTEXT = 3,  /* the model's context length was reached */
  LLMQ_FINISH_ERROR = 4     /* a served request failed; its event carries the status and message */
} llmq_finish_reason;

typedef struct llmq_generate_result {
  size_t struct_size;            /* in: sizeof(llmq_generate_result) */
  llmq_finish_reason finish_reason;
  int32_t n_prompt_tokens;
  int32_t n_generated;           /* tokens produced; only the first out_capacity are written to out_ids */
  double time_to_first_token_s;  /* from the call until the first new token was sampled */
  double decode_time_s;          /* from the first new token to the last */
} llmq_generate_result;

/* Generates a continuation of prompt_ids (the full prompt: include BOS if wanted).
 * engine: in. prompt_ids: in, n_prompt ids. params: in, may be NULL for defaults; it, its sampling
 * struct, stop ids and callback are borrowed for the call only.
 * out_ids: out, may be NULL; up to out_capacity new ids are written (the prompt is not).
 * result: in/out, may be NULL (set result->struct_size first; no more than it is written).
 * Errors: LLMQ_ERR_INVALID_ARGUMENT for an empty prompt, an id out of range or bad sampling
 * params (named); LLMQ_ERR_CONTEXT_OVERFLOW when the prompt does not fit the context;
 * LLMQ_ERR_KV_CACHE_FULL when the KV cache cannot hold the prompt. Running out of KV cache or
 * context during decoding ends generation normally (finish reason LLMQ_FINISH_CONTEXT).
 * LLMQ_ERR_INVALID_ARGUMENT also for a NULL engine, NULL prompt_ids with n_prompt > 0, NULL out_ids
 * with out_capacity > 0, or a struct_size this library does not accept; LLMQ_ERR_DEVICE for a GPU
 * failure. A cancelled generation (the callback returned non-zero) is LLMQ_OK.
 * The engine is locked for the duration of the call: calls from several threads run one at a
 * time. */
LLMQ_API llmq_status llmq_generate(llmq_engine* engine, const int32_t* prompt_ids, size_t n_prompt,
                                   const llmq_generate_params* params, int32_t* out_ids, size_t out_capacity,
                                   llmq_generate_result* result);

/* Runs the model over ids (one sequence, from position 0) and writes the logits of every position:
 * logits[p * vocab_size + v] scores token v following ids[0..p]. logits_capacity counts floats and
 * must be at least n_ids * vocab_size (else LLMQ_ERR_BUFFER_TOO_SMALL). Used for perplexity and
 * for checking logits against references. engine: in. ids: in, n_ids ids. logits: out, owned by the
 * caller. Other statuses: LLMQ_ERR_INVALID_ARGUMENT for a NULL engine, ids or logits, no ids, or an
 * id out of range; LLMQ_ERR_CONTEXT_OVERFLOW when n_ids exceeds the model's context;
 * LLMQ_ERR_KV_CACHE_FULL when the KV cache cannot hold them. The engine is locked for the duration
 * of the call: calls from several threads run one at a time. */
LLMQ_API llmq_status llmq_score(llmq_engine* engine, const int32_t* ids, size_t n_ids, float* logits,
                                size_t logits_capacity);


/* ---- Serving: asynchronous requests with continuous batching -------------------------------
 *
 * A server runs many requests on one engine at once. Each step of the engine mixes the running
 * requests' next tokens (decode) with chunks of new prompts (chunked prefill) under a token budget,
 * so a long prompt never stalls the others. Requests are admitted by priority, then first come,
 * first served, while KV blocks are free; when the cache runs out, the running request of lowest
 * priority that arrived last is preempted: its blocks are freed and its tokens recomputed later.
 * Every request produces the tokens it would produce alone (bitwise on the CPU backend).
 *
 * Threads: llmq_server_submit, llmq_server_cancel, llmq_server_poll and llmq_server_stats may be
 * called from any number of threads at once; none of them waits for a forward pass. The steps run
 * either on a thread the server owns (own_thread = 1, the default) or on whichever host thread
 * calls llmq_server_step (own_thread = 0). Events (each new token, then the end of the request)
 * go to the on_event callback, called on the stepping thread, or to a queue read by
 * llmq_server_poll. The server takes the engine's lock around each step, so llmq_generate and
 * llmq_score on the same engine still work (one call at a time) and share its KV cache.
 */

typedef struct llmq_server llmq_server;
typedef int64_t llmq_request_id;

typedef enum llmq_event_type {
  LLMQ_EVENT_TOKEN = 0,   /* a new token of a request */
  LLMQ_EVENT_FINISHED = 1 /* the request ended: its last event */
} llmq_event_type;

typedef struct llmq_event {
  size_t struct_size;               /* in: sizeof(llmq_event) (see llmq_server_poll) */
  llmq_event_type type;
  int32_t token;                    /* TOKEN: the new id. FINISHED: -1 */
  llmq_request_id request_id;
  void* user_data;                  /* the request's llmq_request_params.user_data */
  const char* text;                 /* TOKEN: the UTF-8 text the token completes; may be empty (part of a
                                       character, a special token, no tokenizer). Not NUL-terminated */
  size_t text_len;
  int32_t n_generated;              /* tokens generated so far (the stop token is never counted) */
  llmq_finish_reason finish_reason; /* FINISHED: why */
  llmq_status status;               /* FINISHED: LLMQ_OK, or the failure (finish_reason LLMQ_FINISH_ERROR) */
  const char* error;                /* FINISHED: "" or the message; NUL-terminated */
  int32_t n_prompt_tokens;          /* FINISHED, and the timings below */
  int32_t n_cached_tokens;          /* prompt tokens whose KV came from the prefix cache */
  int32_t n_preemptions;            /* times the request was preempted and recomputed */
  double queue_time_s;              /* from submit to first scheduled */
  double time_to_first_token_s;     /* from submit to the first token (0 if none) */
  double decode_time_s;             /* from the first token to the end */
} llmq_event;

/* Called for each event on the stepping thread, with no lock of the server held: it may call
 * llmq_server_submit, _cancel and _stats, but not _destroy or _step. event and its strings are
 * valid during the call only. */
typedef void (*llmq_event_callback)(const llmq_event* event, void* user_data);

typedef struct llmq_server_params {
  size_t struct_size;           /* in: sizeof(llmq_server_params) */
  int32_t max_batched_tokens;   /* tokens per step, decode plus prefill chunks; 0 (default) = the
                                   engine's max_batch_tokens, which is also the upper limit */
  int32_t max_running;          /* requests holding KV blocks at once (default 64) */
  int32_t prefix_caching;       /* nonzero: full KV blocks of a prompt prefix already computed are reused
                                   (kept, least recently used first out, while the cache has room). Default 0 */
  int32_t own_thread;           /* nonzero (default): the server steps on its own thread; 0: the host calls
                                   llmq_server_step */
  double peak_bandwidth;        /* bytes/s taken as 100% model bandwidth utilization; 0 (default) =
                                   measured once by llmq_server_create (a large read or copy, < 1 s;
                                   smaller when memory is short; if nothing can be allocated the
                                   stats report peak_bandwidth 0 and no MBU) */
  llmq_event_callback on_event; /* NULL (default): events queue for llmq_server_poll */
  void* user_data;              /* passed to on_event */
} llmq_server_params;

/* Fills the first struct_size bytes of *params with defaults and sets params->struct_size (at
 * most this library's size of the struct). Call it as llmq_server_params_default(&params), which passes
 * sizeof params. params may be NULL (nothing happens). Thread-safe. */
LLMQ_API void llmq_server_params_init(llmq_server_params* params, size_t struct_size);
#define llmq_server_params_default(params) llmq_server_params_init((params), sizeof *(params))

/* Creates a server on an engine. params may be NULL for defaults. *out_server: out, owned by the
 * caller, free it with llmq_server_destroy; the server keeps the engine alive (destroying the
 * engine first is allowed). LLMQ_ERR_INVALID_ARGUMENT names a bad field. Thread-safe. */
LLMQ_API llmq_status llmq_server_create(llmq_engine* engine, const llmq_server_params* params,
                                        llmq_server** out_server);

/* Stops the server: its thread is joined and unfinished requests are dropped without events.
 * Must not run while another thread uses the server, nor from the callback. NULL is a no-op. */
LLMQ_API void llmq_server_destroy(llmq_server* server);

typedef struct llmq_request_params {
  size_t struct_size;                    /* in: sizeof(llmq_request_params) */
  const llmq_sampling_params* sampling;  /* NULL = defaults; LLMQ_SEED_RANDOM draws a seed at submit */
  int32_t max_new_tokens;                /* default 256; prompt + max_new_tokens must fit the context */
  const int32_t* stop_ids;               /* extra ids that end the request (not emitted); may be NULL */
  size_t n_stop_ids;
  int ignore_eos;                        /* 1: do not stop at the model's EOS ids. Default 0 */
  int32_t priority;                      /* higher is admitted first and preempted last. Default 0 */
  void* user_data;                       /* returned in each of the request's events */
} llmq_request_params;

/* Fills the first struct_size bytes of *params with defaults and sets params->struct_size (at
 * most this library's size of the struct). Call it as llmq_request_params_default(&params), which passes
 * sizeof params. params may be NULL (nothing happens). Thread-safe. */
LLMQ_API void llmq_request_params_init(llmq_request_params* params, size_t struct_size);
#define llmq_request_params_default(params) llmq_request_params_init((params), sizeof *(params))

/* Queues a request: prompt_ids (n_prompt ids, copied) with params (NULL for defaults).
 * *out_id: out, the request's id for its events and for llmq_server_cancel.
 * A request that can never run is refused here, and the server goes on serving the others:
 * LLMQ_ERR_INVALID_ARGUMENT for an empty prompt, an id out of range, max_new_tokens < 1 or
 * contradictory sampling params (named); LLMQ_ERR_CONTEXT_OVERFLOW when prompt + max_new_tokens
 * exceed the context; LLMQ_ERR_KV_CACHE_FULL when the request could not fit in the KV cache even
 * alone. Thread-safe; never waits for a step. */
LLMQ_API llmq_status llmq_server_submit(llmq_server* server, const int32_t* prompt_ids, size_t n_prompt,
                                        const llmq_request_params* params, llmq_request_id* out_id);

/* Cancels a request: it ends with finish reason LLMQ_FINISH_CANCELLED at the next step, unless it
 * finished in the meantime (then its FINISHED event says why). LLMQ_ERR_INVALID_ARGUMENT when the
 * id is unknown or its request has finished already. Thread-safe. */
LLMQ_API llmq_status llmq_server_cancel(llmq_server* server, llmq_request_id id);

/* For a server created with own_thread = 0: runs one step on the calling thread (steps from
 * several threads run one at a time); a step with nothing to do returns at once. *n_unfinished:
 * out, may be NULL, the requests not finished yet (0: idle). LLMQ_ERR_INVALID_ARGUMENT on a
 * server with its own thread. Failures of the engine end the affected requests with
 * LLMQ_FINISH_ERROR events rather than failing this call. */
LLMQ_API llmq_status llmq_server_step(llmq_server* server, size_t* n_unfinished);

/* Reads queued events, waiting up to timeout_ms for the first one (0: do not wait; -1: no limit).
 * events: out, room for capacity events laid out every events[0].struct_size bytes (set
 * events[0].struct_size = sizeof(llmq_event) first; an older, smaller struct gets the fields it
 * has). *n_events: out, how many were written (0 after a timeout, which is not an error).
 * The text and error strings stay valid until this thread's next llmq_server_poll call.
 * A request's events come in order, FINISHED last. LLMQ_ERR_INVALID_ARGUMENT on a server with
 * an on_event callback. Thread-safe. */
LLMQ_API llmq_status llmq_server_poll(llmq_server* server, llmq_event* events, size_t capacity, size_t* n_events,
                                      int32_t timeout_ms);

/* Durations are counted in LLMQ_HISTOGRAM_BUCKETS log-spaced buckets: bucket 0 holds [0, 100 us),
 * bucket i holds [llmq_histogram_bound(i - 1), llmq_histogram_bound(i)) with
 * llmq_histogram_bound(i) = 100 us * 2^(i/2), and the last bucket everything above. */
#define LLMQ_HISTOGRAM_BUCKETS 40

/* The upper bound of a histogram bucket in seconds (+infinity for the last; NaN when out of
 * range). Thread-safe. */
LLMQ_API double llmq_histogram_bound(int32_t bucket);

typedef struct llmq_server_stats {
  size_t struct_size;               /* in: sizeof(llmq_server_stats) */
  int32_t running;                  /* requests holding KV blocks */
  int32_t waiting;                  /* requests queued (submitted, or preempted) */
  int32_t kv_blocks_total;
  int32_t kv_blocks_used;           /* referenced by a sequence */
  int32_t kv_blocks_cached;         /* free, but holding prefix-cache content that may be reused */
  uint64_t requests_submitted;
  uint64_t requests_finished;       /* all ends, cancelled and failed included */
  uint64_t requests_cancelled;
  uint64_t requests_failed;
  uint64_t prompt_tokens;           /* computed in prefill, recomputation after preemption included */
  uint64_t generated_tokens;
  uint64_t cached_prompt_tokens;    /* prompt tokens whose KV came from the prefix cache */
  uint64_t steps;
  uint64_t preemptions;
  double peak_bandwidth;            /* bytes/s: configured or measured at creation */
  double last_decode_mbu;           /* model bandwidth utilization of the last decode-only step: (weight
                                       bytes + KV bytes read) / step time / peak_bandwidth */
  double mean_decode_mbu;           /* the same over all decode-only steps (total bytes / total time) */
  double ttft_p50_s, ttft_p99_s;    /* time to first token, estimated from the histogram */
  double tpot_p50_s, tpot_p99_s;    /* time per output token after the first, per request */
  uint64_t ttft_histogram[LLMQ_HISTOGRAM_BUCKETS];
  uint64_t tpot_histogram[LLMQ_HISTOGRAM_BUCKETS];
} llmq_server_stats;

/* Fills *stats (set stats->struct_size first) with the counters since creation. Thread-safe. */
LLMQ_API llmq_status llmq_server_get_stats(llmq_server* server, llmq_server_stats* stats);

/* ---- Tensor parallelism across processes (NCCL) ----------------------------------------------
 * Within one process, llmq_engine_params.tensor_parallel is all it takes. For ranks in several
 * processes (or nodes), one process makes an id, the host passes its bytes to the others by its
 * own means (a socket, a file, MPI), and every process joins with its rank and GPU, then creates
 * its engine with params.comm. These calls load libnccl.so.2 with dlopen (LLMQ_NCCL_LIBRARY
 * overrides the name); without it they return LLMQ_ERR_BACKEND_UNAVAILABLE. */

typedef struct llmq_nccl_id {
  char bytes[128]; /* an ncclUniqueId: opaque, copied as is between processes */
} llmq_nccl_id;

/* Makes a new id (ncclGetUniqueId) into *id. Thread-safe. */
LLMQ_API llmq_status llmq_nccl_get_unique_id(llmq_nccl_id* id);

/* Joins the group of id as rank `rank` of `n_ranks`, on CUDA device `device` (ncclCommInitRank).
 * Waits at most timeout_ms (0 = 60000) for every rank to join; then LLMQ_ERR_TIMEOUT, never a hang.
 * *out_comm: out, owned by the caller, free it with llmq_comm_destroy (engines created with it keep
 * their own reference). Thread-safe. */
LLMQ_API llmq_status llmq_comm_init_rank(const llmq_nccl_id* id, int32_t n_ranks, int32_t rank, int32_t device,
                                         int32_t timeout_ms, llmq_comm** out_comm);

/* Releases the caller's reference. NULL is a no-op. */
LLMQ_API void llmq_comm_destroy(llmq_comm* comm);

#ifdef __cplusplus
}
#endif

#endif /* LLMQ_H */
