/* frozen_header_test: a program written and compiled against the first released llmq.h (the frozen
 * copy in tests/abi/llmq-0.1.0/, never edited), run against the current libllmq.so. It is what an
 * application built years ago does, and it proves the struct_size scheme:
 * - the 0.1.0 params structs, as the old header lays them out, still work;
 * - even older, smaller structs (truncated here in exactly-sized heap blocks, so that a read or
 *   write past struct_size is an ASan error) still work, the missing fields taking defaults, and
 *   output structs are written no further than their struct_size;
 * - a struct from a newer header than the library knows is refused with a message.
 *
 * usage: frozen_header_test MODEL_DIR   (MODEL_DIR = shared/models/stories260K) */
#include "llmq.h" /* tests/abi/llmq-0.1.0/llmq.h: the include path holds only the frozen copy */

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if LLMQ_ABI_VERSION != 1
#error "compiled against the wrong llmq.h: the frozen 0.1.0 header has LLMQ_ABI_VERSION 1"
#endif

static int g_failures = 0;
static const char* g_model_dir;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);        \
      ++g_failures;                                                                   \
    }                                                                                 \
  } while (0)

#define CHECK_OK(call)                                                                            \
  do {                                                                                            \
    llmq_status status_ = (call);                                                                 \
    if (status_ != LLMQ_OK) {                                                                     \
      fprintf(stderr, "%s:%d: %s: %s: %s\n", __FILE__, __LINE__, #call, llmq_status_string(status_), \
              llmq_last_error());                                                                 \
      ++g_failures;                                                                               \
    }                                                                                             \
  } while (0)

/* "Once upon a time" with BOS, and llama2.c run.c's greedy continuation (reference_cases.json). */
static const int32_t k_prompt[] = {1, 403, 407, 261, 378};
static const int32_t k_reference[] = {432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337};
#define N_PROMPT (sizeof k_prompt / sizeof k_prompt[0])
#define N_REFERENCE (sizeof k_reference / sizeof k_reference[0])

/* A heap block of exactly `size` bytes holding the first `size` bytes of `full`, with struct_size
 * set to `size`: an older, smaller version of the struct. */
static void* truncated_copy(const void* full, size_t size) {
  void* block = malloc(size);
  if (!block) abort();
  memcpy(block, full, size);
  memcpy(block, &size, sizeof size); /* struct_size is the first field of every params struct */
  return block;
}

static int same_ids(const int32_t* a, const int32_t* b, size_t n) { return memcmp(a, b, n * sizeof *a) == 0; }

/* The structs as the 0.1.0 header defines them. */
static void run_with_frozen_structs(llmq_model* model) {
  llmq_engine_params engine_params;
  llmq_sampling_params sampling;
  llmq_generate_params params;
  llmq_generate_result result;
  llmq_engine* engine = NULL;
  int32_t out[N_REFERENCE];

  llmq_engine_params_default(&engine_params);
  CHECK(engine_params.struct_size == sizeof engine_params);
  engine_params.n_threads = 1;
  CHECK_OK(llmq_engine_create(model, &engine_params, &engine));
  if (!engine) return;

  llmq_sampling_params_default(&sampling);
  sampling.temperature = 0.0f;
  llmq_generate_params_default(&params);
  params.sampling = &sampling;
  params.max_new_tokens = (int32_t)N_REFERENCE;
  result.struct_size = sizeof result;
  CHECK_OK(llmq_generate(engine, k_prompt, N_PROMPT, &params, out, N_REFERENCE, &result));
  CHECK(result.n_generated == (int32_t)N_REFERENCE);
  CHECK(result.finish_reason == LLMQ_FINISH_LENGTH);
  CHECK(same_ids(out, k_reference, N_REFERENCE));
  llmq_engine_destroy(engine);
}

/* Structs smaller than 0.1.0's, as a still older header could have had them. */
static void run_with_older_structs(llmq_model* model) {
  llmq_engine_params engine_full;
  llmq_sampling_params sampling_full;
  llmq_generate_params params_full;
  llmq_model_params model_full;
  llmq_engine_params* engine_params;
  llmq_sampling_params* sampling;
  llmq_generate_params* params;
  llmq_model_params* model_params;
  llmq_engine* engine = NULL;
  llmq_model* model2 = NULL;
  int32_t out[N_REFERENCE];
  /* Output structs with room after them: what lies past struct_size must stay untouched. */
  struct {
    llmq_generate_result result;
    unsigned char after[16];
  } result_block;
  struct {
    llmq_model_info info;
    unsigned char after[16];
  } info_block;
  const unsigned char* bytes;
  const size_t result_size = offsetof(llmq_generate_result, time_to_first_token_s);
  const size_t info_size = offsetof(llmq_model_info, weight_bytes);
  llmq_generate_result result;
  llmq_model_info info;
  size_t i;

  /* Model params with nothing but struct_size. */
  llmq_model_params_default(&model_full);
  model_params = truncated_copy(&model_full, sizeof(size_t));
  CHECK_OK(llmq_model_load(g_model_dir, model_params, &model2));
  llmq_model_destroy(model2);
  free(model_params);

  /* Engine params without the quantization fields (kv_dtype and after). */
  llmq_engine_params_default(&engine_full);
  engine_full.n_threads = 1;
  engine_params = truncated_copy(&engine_full, offsetof(llmq_engine_params, kv_dtype));
  CHECK_OK(llmq_engine_create(model, engine_params, &engine));
  free(engine_params);
  if (!engine) return;

  /* Sampling params that end after temperature; generate params that end before the callback. */
  llmq_sampling_params_default(&sampling_full);
  sampling_full.temperature = 0.0f;
  sampling = truncated_copy(&sampling_full, offsetof(llmq_sampling_params, top_k));
  llmq_generate_params_default(&params_full);
  params_full.sampling = sampling;
  params_full.max_new_tokens = (int32_t)N_REFERENCE;
  params = truncated_copy(&params_full, offsetof(llmq_generate_params, ignore_eos));

  /* A result struct that ends before the timings, followed by bytes that must stay untouched. */
  memset(&result_block, 0xab, sizeof result_block);
  result_block.result.struct_size = result_size;
  CHECK_OK(llmq_generate(engine, k_prompt, N_PROMPT, params, out, N_REFERENCE, &result_block.result));
  memcpy(&result, &result_block, result_size);
  CHECK(result.struct_size == result_size);
  CHECK(result.n_generated == (int32_t)N_REFERENCE);
  CHECK(result.n_prompt_tokens == (int32_t)N_PROMPT);
  CHECK(same_ids(out, k_reference, N_REFERENCE));
  bytes = (const unsigned char*)&result_block;
  for (i = result_size; i < sizeof result_block; ++i) CHECK(bytes[i] == 0xab);

  /* Model info that ends before the byte counts. */
  memset(&info_block, 0xcd, sizeof info_block);
  info_block.info.struct_size = info_size;
  CHECK_OK(llmq_model_get_info(model, &info_block.info));
  memcpy(&info, &info_block, info_size);
  CHECK(info.vocab_size == 512 && info.num_layers == 5 && info.num_eos_ids == 2);
  bytes = (const unsigned char*)&info_block;
  for (i = info_size; i < sizeof info_block; ++i) CHECK(bytes[i] == 0xcd);

  free(params);
  free(sampling);
  llmq_engine_destroy(engine);
}

/* A struct_size larger than the library's: a program built against a newer header. */
static void newer_struct_is_refused(llmq_model* model) {
  struct {
    llmq_engine_params params; /* followed by fields this library does not know */
    unsigned char newer[64];
  } block;
  llmq_engine* engine = NULL;
  memset(&block, 0, sizeof block);
  llmq_engine_params_default(&block.params);
  block.params.struct_size = sizeof block;
  CHECK(llmq_engine_create(model, &block.params, &engine) == LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(engine == NULL);
  CHECK(strstr(llmq_last_error(), "newer llmq.h") != NULL);
}

int main(int argc, char** argv) {
  llmq_model* model = NULL;
  if (argc != 2) {
    fprintf(stderr, "usage: frozen_header_test MODEL_DIR\n");
    return 2;
  }
  g_model_dir = argv[1];
  CHECK(llmq_abi_version() == LLMQ_ABI_VERSION);
  CHECK_OK(llmq_model_load(g_model_dir, NULL, &model));
  if (!model) return 1;
  run_with_frozen_structs(model);
  run_with_older_structs(model);
  newer_struct_is_refused(model);
  llmq_model_destroy(model);
  if (g_failures) {
    fprintf(stderr, "frozen_header_test: %d checks failed\n", g_failures);
    return 1;
  }
  printf("frozen_header_test: the 0.1.0 header's program runs against libllmq %s\n", llmq_version_string());
  return 0;
}
