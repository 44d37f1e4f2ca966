/*
 * llmq.h: the C ABI of libllmq, an inference engine for Llama-family language models.
 *
 * Conventions (they hold for every function below unless its comment says otherwise):
 * - Every call that can fail returns an llmq_status. On failure, llmq_last_error() returns a
 *   message, valid on the calling thread until its next llmq call, naming the file, tensor,
 *   field or argument at fault. No C++ exception ever crosses this interface.
 * - Objects are opaque handles created by *_create / *_load and freed by *_destroy. Passing
 *   NULL to a destroy function is a no-op.
 * - Params structs start with `struct_size`. Fill them with the matching *_default() function,
 *   then change the fields you need: a library built later accepts an older, smaller struct
 *   and uses defaults for the fields it lacks.
 * - Pointers passed in are borrowed for the duration of the call only, unless stated.
 * - Thread safety: functions taking a const handle may be called from any number of threads
 *   at once. An llmq_model is immutable after loading. An llmq_engine serializes its calls
 *   internally (a mutex), so calls from several threads are safe but run one at a time.
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

/* Returns LLMQ_ABI_VERSION as the library was built. Thread-safe. */
LLMQ_API uint32_t llmq_abi_version(void);

/* Returns the library version as "MAJOR.MINOR.PATCH"; a static string, never freed. Thread-safe. */
LLMQ_API const char* llmq_version_string(void);

/* Writes the library version numbers; any pointer may be NULL. Thread-safe. */
LLMQ_API void llmq_version(int* major, int* minor, int* patch);

/* Returns the message of the last failed call on this thread ("" if none). The string belongs to
 * the library and stays valid until this thread's next llmq call. Thread-safe (thread-local). */
LLMQ_API const char* llmq_last_error(void);

/* Returns a static English name for a status code ("LLMQ_ERR_IO", ...). Thread-safe. */
LLMQ_API const char* llmq_status_string(llmq_status status);

/* ---- Models -------------------------------------------------------------------------------- */

typedef struct llmq_model_params {
  size_t struct_size; /* in: sizeof(llmq_model_params) */
  /* Room for loader options (quantization arrives here later). */
  int32_t reserved;
} llmq_model_params;

/* Fills *params with defaults and sets struct_size. params must not be NULL. Thread-safe. */
LLMQ_API void llmq_model_params_default(llmq_model_params* params);

/* Loads a Hugging Face model directory: config.json (+ generation_config.json), model.safetensors
 * or shards listed in model.safetensors.index.json, and tokenizer.json / tokenizer_config.json if
 * present (without them tokenize/detokenize fail with LLMQ_ERR_UNSUPPORTED).
 * Architectures: LlamaForCausalLM (Llama 2, Llama 3/3.1 rope scaling), MistralForCausalLM,
 * Qwen2ForCausalLM. Weights in F32, F16 or BF16 are memory-mapped and used in place.
 * model_dir: in. params: in, may be NULL for defaults. out_model: out, owned by the caller, free
 * it with llmq_model_destroy. The model stays alive while engines created on it exist.
 * Returns LLMQ_ERR_IO, LLMQ_ERR_MODEL_FORMAT, LLMQ_ERR_UNSUPPORTED or LLMQ_ERR_INVALID_ARGUMENT
 * with a message naming the file and the tensor or field. Thread-safe. */
LLMQ_API llmq_status llmq_model_load(const char* model_dir, const llmq_model_params* params,
                                     llmq_model** out_model);

/* Releases the caller's reference; engines created on the model keep it alive. NULL is a no-op. */
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

/* Fills *info (set info->struct_size first). Thread-safe. */
LLMQ_API llmq_status llmq_model_get_info(const llmq_model* model, llmq_model_info* info);

/* ---- Tokenizer ------------------------------------------------------------------------------ */

/* Encodes UTF-8 text (text_len bytes; text need not be NUL-terminated) into token ids.
 * add_special: 1 adds BOS/EOS as tokenizer_config.json says (add_bos_token), 0 adds none.
 * ids: out, capacity ids_capacity; *n_ids: out, the number of ids. If ids_capacity is too small,
 * nothing is written to ids, *n_ids is set to the size needed and LLMQ_ERR_BUFFER_TOO_SMALL is
 * returned (ids may be NULL with ids_capacity 0 to query the size). Thread-safe. */
LLMQ_API llmq_status llmq_tokenize(const llmq_model* model, const char* text, size_t text_len, int add_special,
                                   int32_t* ids, size_t ids_capacity, size_t* n_ids);

/* Decodes token ids into UTF-8 text, without a terminating NUL. skip_special: 1 drops special
 * tokens (BOS, EOS, ...). text: out, capacity text_capacity; *text_len: out, the byte count, or the
 * size needed with LLMQ_ERR_BUFFER_TOO_SMALL. Ids out of range give LLMQ_ERR_INVALID_ARGUMENT.
 * Thread-safe. */
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

/* Fills *params with defaults and sets struct_size. Thread-safe. */
LLMQ_API void llmq_engine_params_default(llmq_engine_params* params);

/* Creates an engine (backend, KV cache, scratch buffers) on a loaded model.
 * params may be NULL for defaults. *out_engine: out, owned by the caller, free it with
 * llmq_engine_destroy. LLMQ_ERR_BACKEND_UNAVAILABLE when the backend is not built in or has no
 * device; LLMQ_ERR_OUT_OF_MEMORY when the KV cache cannot be allocated. Thread-safe. */
LLMQ_API llmq_status llmq_engine_create(llmq_model* model, const llmq_engine_params* params,
                                        llmq_engine** out_engine);

/* Frees the engine; it must not be in use on another thread. NULL is a no-op. */
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
 * less. reset != 0 zeroes the counters after reading them. */
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

/* Fills *params with defaults and sets struct_size. Thread-safe. */
LLMQ_API void llmq_sampling_params_default(llmq_sampling_params* params);

/* Called once per generated token, on the thread that called llmq_generate.
 * token: the new id. text/text_len: the new UTF-8 text it completes (may be empty when a token
 * holds part of a multi-byte character; not NUL-terminated; valid during the call only).
 * Return 0 to continue, non-zero to stop generating (finish reason LLMQ_FINISH_CANCELLED).
 * If generation ends inside a multi-byte character, its incomplete bytes are never passed to the
 * callback (llmq_detokenize of the ids shows them as U+FFFD). */
typedef int (*llmq_token_callback)(int32_t token, const char* text, size_t text_len, void* user_data);

typedef struct llmq_generate_params {
  size_t struct_size;                    /* in: sizeof(llmq_generate_params) */
  const llmq_sampling_params* sampling;  /* NULL = defaults */
  int32_t max_new_tokens;                /* default 256; generation also stops at the context end */
  const int32_t* stop_ids;               /* extra ids that end generation (not emitted); may be NULL */
  size_t n_stop_ids;
  int ignore_eos;                        /* 1: do not stop at the model's EOS ids. Default 0 */
  llmq_token_callback on_token;          /* may be NULL */
  void* user_data;                       /* passed to on_token */
} llmq_generate_params;

/* Fills *params with defaults and sets struct_size. Thread-safe. */
LLMQ_API void llmq_generate_params_default(llmq_generate_params* params);

typedef enum llmq_finish_reason {
  LLMQ_FINISH_LENGTH = 0,   /* max_new_tokens reached */
  LLMQ_FINISH_STOP = 1,     /* an EOS or stop id was sampled (it is not part of the output) */
  LLMQ_FINISH_CANCELLED = 2,/* the callback asked to stop */
  LLMQ_FINISH_CONTEXT = 3   /* the model's context length was reached */
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
 * out_ids: out, may be NULL; up to out_capacity new ids are written (the prompt is not).
 * result: out, may be NULL (set result->struct_size first).
 * Errors: LLMQ_ERR_INVALID_ARGUMENT for an empty prompt, an id out of range or bad sampling
 * params (named); LLMQ_ERR_CONTEXT_OVERFLOW when the prompt does not fit the context;
 * LLMQ_ERR_KV_CACHE_FULL when the KV cache cannot hold the prompt. Running out of KV cache or
 * context during decoding ends generation normally (finish reason LLMQ_FINISH_CONTEXT).
 * The engine is locked for the duration of the call. */
LLMQ_API llmq_status llmq_generate(llmq_engine* engine, const int32_t* prompt_ids, size_t n_prompt,
                                   const llmq_generate_params* params, int32_t* out_ids, size_t out_capacity,
                                   llmq_generate_result* result);

/* Runs the model over ids (one sequence, from position 0) and writes the logits of every position:
 * logits[p * vocab_size + v] scores token v following ids[0..p]. logits_capacity counts floats and
 * must be at least n_ids * vocab_size (else LLMQ_ERR_BUFFER_TOO_SMALL). Used for perplexity and
 * for checking logits against references. The engine is locked for the duration of the call. */
LLMQ_API llmq_status llmq_score(llmq_engine* engine, const int32_t* ids, size_t n_ids, float* logits,
                                size_t logits_capacity);

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
