/* c_api_test: the C ABI driven from C11, compiled with -std=c11 -pedantic against llmq.h alone and
 * linked to the shared library, the way an application uses it.
 *
 * usage: c_api_test MODEL_DIR   (MODEL_DIR = shared/models/stories260K)
 *
 * Checks versions, model info, the tokenizer, greedy generation with a streaming callback against
 * llama2.c's reference tokens, and the error paths (NULL arguments, a missing directory, destroy
 * of NULL, every status string). Prints each failed check with its line to stderr; exits 0 when
 * every check passes, 1 otherwise. */
#include "llmq.h" /* first, so that the header is shown to compile on its own as C11 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef EXPECTED_VERSION
#error "compile with -DEXPECTED_VERSION=\"MAJOR.MINOR.PATCH\""
#endif

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond)                                                       \
  do {                                                                    \
    ++g_checks;                                                           \
    if (!(cond)) {                                                        \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                       \
    }                                                                     \
  } while (0)

/* A call that must succeed; prints the status and llmq_last_error() if it does not. */
#define CHECK_OK(call)                                                                          \
  do {                                                                                          \
    llmq_status check_ok_status_ = (call);                                                      \
    ++g_checks;                                                                                 \
    if (check_ok_status_ != LLMQ_OK) {                                                          \
      fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call,                 \
              llmq_status_string(check_ok_status_), llmq_last_error());                         \
      ++g_failures;                                                                             \
    }                                                                                           \
  } while (0)

/* A call that must fail with `expected` and leave a non-empty message. */
#define CHECK_STATUS(call, expected)                                                            \
  do {                                                                                          \
    llmq_status check_status_ = (call);                                                         \
    ++g_checks;                                                                                 \
    if (check_status_ != (expected)) {                                                          \
      fprintf(stderr, "%s:%d: %s returned %s, expected %s (message: %s)\n", __FILE__, __LINE__, \
              #call, llmq_status_string(check_status_), llmq_status_string(expected),           \
              llmq_last_error());                                                               \
      ++g_failures;                                                                             \
    } else if ((expected) != LLMQ_OK && llmq_last_error()[0] == '\0') {                         \
      fprintf(stderr, "%s:%d: %s failed with an empty llmq_last_error()\n", __FILE__, __LINE__, \
              #call);                                                                           \
      ++g_failures;                                                                             \
    }                                                                                           \
  } while (0)

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* The streaming callback's state: the concatenated text and the ids it saw. */
typedef struct stream_state {
  char text[4096];
  size_t text_len;
  int32_t ids[64];
  size_t n_ids;
  int overflow;
  int stop_after; /* return non-zero once this many tokens were seen; 0 = never */
} stream_state;

static int on_token(int32_t token, const char* text, size_t text_len, void* user_data) {
  stream_state* s = (stream_state*)user_data;
  if (s->n_ids < ARRAY_LEN(s->ids)) s->ids[s->n_ids] = token;
  ++s->n_ids;
  if (text_len > 0 && text == NULL) s->overflow = 1;
  if (s->text_len + text_len > sizeof s->text) {
    s->overflow = 1;
  } else if (text_len > 0) {
    memcpy(s->text + s->text_len, text, text_len);
    s->text_len += text_len;
  }
  return s->stop_after > 0 && s->n_ids >= (size_t)s->stop_after;
}

static int contains(const char* haystack, const char* needle) { return strstr(haystack, needle) != NULL; }

/* Decodes ids into buf (NUL-terminated); returns the length, or (size_t)-1 on failure. */
static size_t detokenize(const llmq_model* model, const int32_t* ids, size_t n, char* buf, size_t cap) {
  size_t len = 0;
  llmq_status status = llmq_detokenize(model, ids, n, 1, buf, cap - 1, &len);
  if (status != LLMQ_OK) {
    fprintf(stderr, "llmq_detokenize: %s: %s\n", llmq_status_string(status), llmq_last_error());
    return (size_t)-1;
  }
  buf[len] = '\0';
  return len;
}

static void check_versions(void) {
  int major = -1, minor = -1, patch = -1;
  char expected[64];
  CHECK(llmq_abi_version() == LLMQ_ABI_VERSION);
  CHECK(llmq_version_string() != NULL);
  CHECK(strcmp(llmq_version_string(), EXPECTED_VERSION) == 0);
  llmq_version(&major, &minor, &patch);
  snprintf(expected, sizeof expected, "%d.%d.%d", major, minor, patch);
  CHECK(strcmp(expected, llmq_version_string()) == 0);
  llmq_version(NULL, NULL, NULL); /* any pointer may be NULL */
  llmq_version(&major, NULL, NULL);
  CHECK(major >= 0);
}

static void check_status_strings(void) {
  static const struct {
    llmq_status status;
    const char* name;
  } names[] = {
      {LLMQ_OK, "LLMQ_OK"},
      {LLMQ_ERR_INVALID_ARGUMENT, "LLMQ_ERR_INVALID_ARGUMENT"},
      {LLMQ_ERR_IO, "LLMQ_ERR_IO"},
      {LLMQ_ERR_MODEL_FORMAT, "LLMQ_ERR_MODEL_FORMAT"},
      {LLMQ_ERR_UNSUPPORTED, "LLMQ_ERR_UNSUPPORTED"},
      {LLMQ_ERR_OUT_OF_MEMORY, "LLMQ_ERR_OUT_OF_MEMORY"},
      {LLMQ_ERR_KV_CACHE_FULL, "LLMQ_ERR_KV_CACHE_FULL"},
      {LLMQ_ERR_BACKEND_UNAVAILABLE, "LLMQ_ERR_BACKEND_UNAVAILABLE"},
      {LLMQ_ERR_BUFFER_TOO_SMALL, "LLMQ_ERR_BUFFER_TOO_SMALL"},
      {LLMQ_ERR_CONTEXT_OVERFLOW, "LLMQ_ERR_CONTEXT_OVERFLOW"},
      {LLMQ_ERR_INTERNAL, "LLMQ_ERR_INTERNAL"},
      {LLMQ_ERR_DEVICE, "LLMQ_ERR_DEVICE"},
      {LLMQ_ERR_TIMEOUT, "LLMQ_ERR_TIMEOUT"},
  };
  size_t i;
  const char* unknown;
  for (i = 0; i < ARRAY_LEN(names); ++i) {
    const char* s = llmq_status_string(names[i].status);
    CHECK(s != NULL);
    if (s != NULL && strcmp(s, names[i].name) != 0) {
      fprintf(stderr, "%s:%d: llmq_status_string(%d) is \"%s\", expected \"%s\"\n", __FILE__, __LINE__,
              (int)names[i].status, s, names[i].name);
      ++g_failures;
    }
  }
  /* A code from a newer library still gets a printable string. */
  unknown = llmq_status_string((llmq_status)999);
  CHECK(unknown != NULL && unknown[0] != '\0');
}

static void check_error_paths(const char* model_dir) {
  llmq_model* model = (llmq_model*)&model; /* must be overwritten with NULL on failure */
  llmq_engine* engine = (llmq_engine*)&engine;
  static const char missing[] = "/nonexistent/llmq-c-api-test-dir";
  llmq_model_info info;
  size_t n = 0;
  int32_t ids[4] = {1, 2, 3, 4};
  char text[16];
  float logits[4];

  /* Destroying NULL is a no-op. */
  llmq_model_destroy(NULL);
  llmq_engine_destroy(NULL);
  /* *_default with NULL does not crash (the header requires non-NULL, the library tolerates it). */

  CHECK_STATUS(llmq_model_load(NULL, NULL, &model), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(model == NULL);
  CHECK(contains(llmq_last_error(), "model_dir"));

  model = (llmq_model*)&model;
  CHECK_STATUS(llmq_model_load(missing, NULL, &model), LLMQ_ERR_IO);
  CHECK(model == NULL);
  CHECK(llmq_last_error()[0] != '\0');
  if (!contains(llmq_last_error(), missing)) {
    fprintf(stderr, "%s:%d: llmq_last_error() does not name %s: \"%s\"\n", __FILE__, __LINE__, missing,
            llmq_last_error());
    ++g_failures;
  }

  /* NULL out pointers. */
  CHECK_STATUS(llmq_model_load(model_dir, NULL, NULL), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "out_model"));
  CHECK_STATUS(llmq_engine_create(NULL, NULL, &engine), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(engine == NULL);
  CHECK_STATUS(llmq_engine_create(NULL, NULL, NULL), LLMQ_ERR_INVALID_ARGUMENT);
  info.struct_size = sizeof info;
  CHECK_STATUS(llmq_model_get_info(NULL, &info), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(llmq_tokenize(NULL, "a", 1, 1, ids, 4, &n), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(llmq_detokenize(NULL, ids, 1, 1, text, sizeof text, &n), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(llmq_generate(NULL, ids, 1, NULL, NULL, 0, NULL), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "engine"));
  CHECK_STATUS(llmq_score(NULL, ids, 1, logits, 4), LLMQ_ERR_INVALID_ARGUMENT);
}

/* Error paths that need a loaded model and an engine. */
static void check_error_paths_with_model(llmq_model* model, llmq_engine* engine) {
  size_t n = 0;
  int32_t ids[8];
  char text[16];
  int32_t prompt[2] = {1, 403};

  CHECK_STATUS(llmq_model_get_info(model, NULL), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "info"));
  CHECK_STATUS(llmq_tokenize(model, "a", 1, 1, ids, 8, NULL), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "n_ids"));
  CHECK_STATUS(llmq_tokenize(model, NULL, 3, 1, ids, 8, &n), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "text"));
  CHECK_STATUS(llmq_tokenize(model, "abc", 3, 1, NULL, 8, &n), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(llmq_detokenize(model, prompt, 2, 1, text, sizeof text, NULL), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "text_len"));
  CHECK_STATUS(llmq_detokenize(model, NULL, 2, 1, text, sizeof text, &n), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(llmq_detokenize(model, prompt, 2, 1, NULL, 8, &n), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(llmq_generate(engine, NULL, 2, NULL, NULL, 0, NULL), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "prompt_ids"));
  CHECK_STATUS(llmq_generate(engine, prompt, 2, NULL, NULL, 4, NULL), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "out_ids"));
  CHECK_STATUS(llmq_score(engine, prompt, 2, NULL, 2 * 512), LLMQ_ERR_INVALID_ARGUMENT);
  CHECK(contains(llmq_last_error(), "logits"));

  /* The thread's message stays until its next failing call; a later success does not matter. */
  CHECK_STATUS(llmq_model_load(NULL, NULL, NULL), LLMQ_ERR_INVALID_ARGUMENT);
}

static void check_model_info(llmq_model* model) {
  llmq_model_info info;
  memset(&info, 0xff, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(llmq_model_get_info(model, &info));
  CHECK(info.struct_size == sizeof info);
  CHECK(info.vocab_size == 512);
  CHECK(info.hidden_size == 64);
  CHECK(info.num_layers == 5);
  CHECK(info.num_heads == 8);
  CHECK(info.num_kv_heads == 4);
  CHECK(info.head_dim == 8);
  CHECK(info.max_context == 512);
  CHECK(info.bos_id == 1);
  CHECK(info.num_eos_ids == 2);
  CHECK(info.eos_ids[0] == 2);
  CHECK(info.eos_ids[1] == 1);
  CHECK(info.weight_bytes == 260032u * 4u); /* 260,032 F32 parameters, embeddings tied */
  CHECK(info.weight_bytes_per_step == info.weight_bytes); /* tied: the table is the LM head */
  CHECK(memchr(info.architecture, '\0', sizeof info.architecture) != NULL);
  CHECK(strcmp(info.architecture, "LlamaForCausalLM") == 0);
}

static const int32_t k_prompt[] = {1, 403, 407, 261, 378}; /* "Once upon a time" with BOS */
/* llama2.c run.c's greedy continuation of k_prompt (reference/reference_cases.json). */
static const int32_t k_reference[] = {432, 383, 286, 261, 376, 298, 315, 421,
                                      395, 317, 426, 338, 401, 396, 267, 337};

static void check_tokenizer(llmq_model* model) {
  static const char prompt[] = "Once upon a time";
  int32_t ids[16];
  size_t n = 0, i, len = 0;
  char text[64];

  CHECK_OK(llmq_tokenize(model, prompt, strlen(prompt), 1, ids, ARRAY_LEN(ids), &n));
  CHECK(n == ARRAY_LEN(k_prompt));
  for (i = 0; i < n && i < ARRAY_LEN(k_prompt); ++i) CHECK(ids[i] == k_prompt[i]);

  /* add_special 0: no BOS. */
  CHECK_OK(llmq_tokenize(model, prompt, strlen(prompt), 0, ids, ARRAY_LEN(ids), &n));
  CHECK(n == ARRAY_LEN(k_prompt) - 1);
  for (i = 0; i + 1 < ARRAY_LEN(k_prompt) && i < n; ++i) CHECK(ids[i] == k_prompt[i + 1]);

  /* text need not be NUL-terminated: only text_len bytes are read ("Once" of "Once upon..."). */
  CHECK_OK(llmq_tokenize(model, prompt, 4, 1, ids, ARRAY_LEN(ids), &n));
  CHECK(n == 2 && ids[0] == 1 && ids[1] == 403);

  /* The empty text is just BOS. */
  CHECK_OK(llmq_tokenize(model, "", 0, 1, ids, ARRAY_LEN(ids), &n));
  CHECK(n == 1 && ids[0] == 1);

  /* Size query: ids NULL, capacity 0. */
  n = 0;
  CHECK_STATUS(llmq_tokenize(model, prompt, strlen(prompt), 1, NULL, 0, &n), LLMQ_ERR_BUFFER_TOO_SMALL);
  CHECK(n == ARRAY_LEN(k_prompt));

  /* Decoding drops BOS (skip_special 1) and the one leading space. */
  CHECK_OK(llmq_detokenize(model, k_prompt, ARRAY_LEN(k_prompt), 1, text, sizeof text, &len));
  CHECK(len == strlen(prompt) && memcmp(text, prompt, len) == 0);
  len = 0;
  CHECK_STATUS(llmq_detokenize(model, k_prompt, ARRAY_LEN(k_prompt), 1, NULL, 0, &len), LLMQ_ERR_BUFFER_TOO_SMALL);
  CHECK(len == strlen(prompt));
  /* skip_special 0 keeps "<s>". */
  CHECK_OK(llmq_detokenize(model, k_prompt, ARRAY_LEN(k_prompt), 0, text, sizeof text - 1, &len));
  text[len] = '\0';
  CHECK(contains(text, "<s>") && contains(text, prompt));
  {
    int32_t bad[2] = {1, 512};
    CHECK_STATUS(llmq_detokenize(model, bad, 2, 1, text, sizeof text, &len), LLMQ_ERR_INVALID_ARGUMENT);
    bad[1] = -1;
    CHECK_STATUS(llmq_detokenize(model, bad, 2, 1, text, sizeof text, &len), LLMQ_ERR_INVALID_ARGUMENT);
  }
}

static void greedy_params(llmq_sampling_params* sampling, llmq_generate_params* params, int32_t max_new_tokens,
                          stream_state* state) {
  llmq_sampling_params_default(sampling);
  sampling->temperature = 0.0f;
  llmq_generate_params_default(params);
  params->sampling = sampling;
  params->max_new_tokens = max_new_tokens;
  params->on_token = on_token;
  params->user_data = state;
}

static void check_generate(llmq_model* model, llmq_engine* engine) {
  llmq_sampling_params sampling;
  llmq_generate_params params;
  llmq_generate_result result;
  stream_state state;
  int32_t out[16];
  size_t i;
  char decoded[4096], prompt_text[256], full_text[4096];
  size_t decoded_len, prompt_len, full_len;

  memset(&state, 0, sizeof state);
  memset(out, 0xff, sizeof out);
  greedy_params(&sampling, &params, 16, &state);
  memset(&result, 0, sizeof result);
  result.struct_size = sizeof result;
  CHECK_OK(llmq_generate(engine, k_prompt, ARRAY_LEN(k_prompt), &params, out, ARRAY_LEN(out), &result));
  CHECK(result.struct_size == sizeof result);
  CHECK(result.finish_reason == LLMQ_FINISH_LENGTH);
  CHECK(result.n_prompt_tokens == (int32_t)ARRAY_LEN(k_prompt));
  CHECK(result.n_generated == 16);
  CHECK(result.time_to_first_token_s >= 0.0 && result.decode_time_s >= 0.0);
  CHECK(state.n_ids == 16);
  CHECK(!state.overflow);
  for (i = 0; i < 16; ++i) {
    if (out[i] != k_reference[i]) {
      fprintf(stderr, "%s:%d: generated id %u is %d, the reference says %d\n", __FILE__, __LINE__, (unsigned)i,
              (int)out[i], (int)k_reference[i]);
      ++g_failures;
    }
    CHECK(state.ids[i] == out[i]); /* the callback saw the same ids, in order */
  }

  /* The streamed text against llmq_detokenize.
   *
   * The callback gives the text each token adds to what came before it, the prompt included: a
   * token that follows a non-BOS token keeps its leading space (" there" after "time,"), because
   * in the full text that space separates it from the prompt. llmq_detokenize(generated ids)
   * decodes the ids as a text of their own, and the tokenizer's decoder strips one leading space
   * at the start of a text (Strip(1) after "▁" -> " "). So the streamed text equals the decoded
   * generated ids, except that it may start with one more space; and, exactly, decoded(prompt) +
   * streamed == decoded(prompt + generated). Here the first new token is "," (id 432), which has
   * no leading space, so both are equal; check_streaming_space below covers a leading space. */
  decoded_len = detokenize(model, out, 16, decoded, sizeof decoded);
  CHECK(decoded_len != (size_t)-1);
  if (decoded_len != (size_t)-1) {
    const char* streamed = state.text;
    size_t streamed_len = state.text_len;
    if (streamed_len == decoded_len + 1 && streamed[0] == ' ') {
      ++streamed;
      --streamed_len;
    }
    if (!(streamed_len == decoded_len && memcmp(streamed, decoded, decoded_len) == 0)) {
      fprintf(stderr, "%s:%d: streamed text \"%.*s\" != detokenized \"%s\"\n", __FILE__, __LINE__,
              (int)state.text_len, state.text, decoded);
      ++g_failures;
    }
    CHECK(strncmp(decoded, ", there was a little girl named Lily.", 37) == 0);
  }
  {
    int32_t all[ARRAY_LEN(k_prompt) + 16];
    memcpy(all, k_prompt, sizeof k_prompt);
    memcpy(all + ARRAY_LEN(k_prompt), out, sizeof out);
    prompt_len = detokenize(model, k_prompt, ARRAY_LEN(k_prompt), prompt_text, sizeof prompt_text);
    full_len = detokenize(model, all, ARRAY_LEN(all), full_text, sizeof full_text);
    CHECK(prompt_len != (size_t)-1 && full_len != (size_t)-1);
    if (prompt_len != (size_t)-1 && full_len != (size_t)-1) {
      CHECK(full_len == prompt_len + state.text_len);
      CHECK(memcmp(full_text, prompt_text, prompt_len) == 0);
      CHECK(full_len == prompt_len + state.text_len &&
            memcmp(full_text + prompt_len, state.text, state.text_len) == 0);
    }
  }

  /* Without a callback, out_ids and result may be NULL. */
  params.on_token = NULL;
  params.user_data = NULL;
  CHECK_OK(llmq_generate(engine, k_prompt, ARRAY_LEN(k_prompt), &params, NULL, 0, NULL));
  /* NULL params: the defaults (sampling at temperature 1 with a random seed, 256 new tokens). */
  CHECK_OK(llmq_generate(engine, k_prompt, ARRAY_LEN(k_prompt), NULL, NULL, 0, NULL));
}

/* The first new token after the prompt "Once upon a time," is " there": the callback keeps the
 * space (it follows "," in the text), llmq_detokenize of the new ids alone strips it. After BOS,
 * the callback strips it too, like the decoder at the start of a text. */
static void check_streaming_space(llmq_model* model, llmq_engine* engine) {
  static const int32_t prompt[] = {1, 403, 407, 261, 378, 432}; /* "Once upon a time," */
  static const int32_t bos_only[] = {1};
  llmq_sampling_params sampling;
  llmq_generate_params params;
  stream_state state;
  int32_t out[4];
  char decoded[256];
  size_t decoded_len;

  memset(&state, 0, sizeof state);
  greedy_params(&sampling, &params, 4, &state);
  CHECK_OK(llmq_generate(engine, prompt, ARRAY_LEN(prompt), &params, out, ARRAY_LEN(out), NULL));
  CHECK(state.n_ids == 4 && out[0] == k_reference[1] && out[3] == k_reference[4]);
  decoded_len = detokenize(model, out, 4, decoded, sizeof decoded);
  CHECK(decoded_len != (size_t)-1);
  CHECK(strcmp(decoded, "there was a little") == 0);
  CHECK(state.text_len == decoded_len + 1 && state.text[0] == ' ' &&
        memcmp(state.text + 1, decoded, decoded_len) == 0);

  memset(&state, 0, sizeof state);
  CHECK_OK(llmq_generate(engine, bos_only, 1, &params, out, ARRAY_LEN(out), NULL));
  decoded_len = detokenize(model, out, 4, decoded, sizeof decoded);
  CHECK(strcmp(decoded, "Once upon a time") == 0);
  CHECK(state.text_len == decoded_len && memcmp(state.text, decoded, decoded_len) == 0);

  /* A callback returning non-zero cancels: it is not called again. */
  memset(&state, 0, sizeof state);
  state.stop_after = 2;
  {
    llmq_generate_result result;
    result.struct_size = sizeof result;
    CHECK_OK(llmq_generate(engine, k_prompt, ARRAY_LEN(k_prompt), &params, out, ARRAY_LEN(out), &result));
    CHECK(result.finish_reason == LLMQ_FINISH_CANCELLED);
    CHECK(result.n_generated == 2);
    CHECK(state.n_ids == 2);
  }

  /* Stop ids end generation and are not emitted. */
  memset(&state, 0, sizeof state);
  {
    llmq_generate_result result;
    int32_t stop = k_reference[2];
    params.stop_ids = &stop;
    params.n_stop_ids = 1;
    result.struct_size = sizeof result;
    CHECK_OK(llmq_generate(engine, k_prompt, ARRAY_LEN(k_prompt), &params, out, ARRAY_LEN(out), &result));
    CHECK(result.finish_reason == LLMQ_FINISH_STOP);
    CHECK(result.n_generated == 2);
    CHECK(state.n_ids == 2);
    params.stop_ids = NULL;
    params.n_stop_ids = 0;
  }
}

int main(int argc, char** argv) {
  llmq_model* model = NULL;
  llmq_engine* engine = NULL;
  llmq_engine_params engine_params;
  llmq_status status;

  if (argc != 2) {
    fprintf(stderr, "usage: %s MODEL_DIR (shared/models/stories260K)\n", argv[0]);
    return 2;
  }

  check_versions();
  check_status_strings();
  check_error_paths(argv[1]);
  CHECK(llmq_last_error()[0] != '\0');

  status = llmq_model_load(argv[1], NULL, &model);
  if (status != LLMQ_OK) {
    fprintf(stderr, "%s:%d: llmq_model_load(%s): %s: %s\n", __FILE__, __LINE__, argv[1], llmq_status_string(status),
            llmq_last_error());
    return 1;
  }
  llmq_engine_params_default(&engine_params);
  CHECK(engine_params.struct_size == sizeof engine_params);
  CHECK(engine_params.backend == LLMQ_BACKEND_CPU);
  engine_params.n_threads = 2;
  status = llmq_engine_create(model, &engine_params, &engine);
  if (status != LLMQ_OK) {
    fprintf(stderr, "%s:%d: llmq_engine_create: %s: %s\n", __FILE__, __LINE__, llmq_status_string(status),
            llmq_last_error());
    llmq_model_destroy(model);
    return 1;
  }

  check_model_info(model);
  check_tokenizer(model);
  check_generate(model, engine);
  check_streaming_space(model, engine);
  check_error_paths_with_model(model, engine);

  llmq_engine_destroy(engine);
  llmq_model_destroy(model);

  if (g_failures > 0) {
    fprintf(stderr, "c_api_test: %d of %d checks failed\n", g_failures, g_checks);
    return 1;
  }
  return 0;
}
