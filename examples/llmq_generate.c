/* llmq-generate: generate text from a Hugging Face model directory, streaming it to stdout.
 * Written against llmq.h alone. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "llmq.h"

static void usage(FILE* out) {
  fprintf(out,
          "usage: llmq-generate --model DIR (--prompt TEXT | --prompt-ids \"1 2 3\") [--max-tokens N]\n"
          "                     [--temperature T] [--top-k K] [--top-p P] [--min-p P]\n"
          "                     [--repetition-penalty R] [--seed S] [--threads N]\n"
          "                     [--kv-dtype auto|f32|f16|bf16|int8|fp8] [--quant none|int8wo|fp8]\n"
          "                     [--backend cpu|cuda] [--tp N] [--devices 0,1,...] [--print-ids]\n"
          "  --prompt is tokenized as the model's tokenizer config says (BOS added if add_bos_token);\n"
          "  --prompt-ids is taken as the full prompt. Generation stops at --max-tokens (default 256)\n"
          "  or at the model's EOS ids. Text goes to stdout; timings to stderr.\n"
          "  --tp N runs N tensor-parallel ranks (threads; with --backend cuda one GPU each, rank r\n"
          "  on the r-th entry of --devices, default devices 0 .. N-1).\n");
}

/* Values clipped by static quantization scales, when the engine has any (see llmq.h). */
static void report_saturation(llmq_engine* engine) {
  uint64_t* counts = NULL;
  uint64_t total[LLMQ_SATURATION_COUNTERS] = {0, 0, 0, 0, 0};
  size_t n = 0, i;
  if (llmq_engine_saturation(engine, NULL, 0, &n, 0) != LLMQ_ERR_BUFFER_TOO_SMALL || n == 0) return;
  counts = malloc(n * sizeof *counts);
  if (!counts || llmq_engine_saturation(engine, counts, n, &n, 0) != LLMQ_OK) {
    free(counts);
    return;
  }
  for (i = 0; i < n; ++i) total[i % LLMQ_SATURATION_COUNTERS] += counts[i];
  if (total[1] || total[4])
    fprintf(stderr, "saturation: activations clipped %llu of %llu, K clipped %llu and V clipped %llu of %llu each\n",
            (unsigned long long)total[0], (unsigned long long)total[1], (unsigned long long)total[2],
            (unsigned long long)total[3], (unsigned long long)total[4]);
  free(counts);
}

static int fail_status(llmq_status status, const char* what) {
  fprintf(stderr, "llmq-generate: %s: %s: %s\n", what, llmq_status_string(status), llmq_last_error());
  return 1;
}

static int parse_long(const char* text, const char* flag, long min, long max, long* out) {
  char* end = NULL;
  errno = 0;
  long value = strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value < min || value > max) {
    fprintf(stderr, "llmq-generate: %s expects an integer in [%ld, %ld], got '%s'\n", flag, min, max, text);
    return 0;
  }
  *out = value;
  return 1;
}

static int parse_float(const char* text, const char* flag, float* out) {
  char* end = NULL;
  errno = 0;
  float value = strtof(text, &end);
  if (errno != 0 || end == text || *end != '\0') {
    fprintf(stderr, "llmq-generate: %s expects a number, got '%s'\n", flag, text);
    return 0;
  }
  *out = value;
  return 1;
}

/* Parses "0,1,3" into devices[], at most LLMQ_MAX_TENSOR_PARALLEL of them. */
static int parse_devices(const char* text, int32_t* devices, int32_t* n) {
  const char* p = text;
  *n = 0;
  for (;;) {
    char* end = NULL;
    long value;
    errno = 0;
    value = strtol(p, &end, 10);
    if (errno != 0 || end == p || value < 0 || value > 1023 || *n == LLMQ_MAX_TENSOR_PARALLEL || (*end != ',' && *end != '\0')) {
      fprintf(stderr, "llmq-generate: --devices expects up to %d comma-separated device numbers, got '%s'\n",
              LLMQ_MAX_TENSOR_PARALLEL, text);
      return 0;
    }
    devices[(*n)++] = (int32_t)value;
    if (*end == '\0') return 1;
    p = end + 1;
  }
}

/* Parses "1 2 3" (spaces or commas) into a malloc'd array. */
static int parse_ids(const char* text, int32_t** ids, size_t* n) {
  size_t capacity = 16, count = 0;
  int32_t* out = malloc(capacity * sizeof *out);
  const char* p = text;
  if (!out) return 0;
  for (;;) {
    char* end = NULL;
    long value;
    while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n') ++p;
    if (*p == '\0') break;
    errno = 0;
    value = strtol(p, &end, 10);
    if (errno != 0 || end == p || value < 0 || value > INT32_MAX) {
      fprintf(stderr, "llmq-generate: --prompt-ids: '%s' is not a list of non-negative token ids\n", text);
      free(out);
      return 0;
    }
    if (count == capacity) {
      int32_t* grown = realloc(out, 2 * capacity * sizeof *out);
      if (!grown) {
        free(out);
        return 0;
      }
      out = grown;
      capacity *= 2;
    }
    out[count++] = (int32_t)value;
    p = end;
  }
  *ids = out;
  *n = count;
  return 1;
}

static int on_token(int32_t token, const char* text, size_t text_len, void* user_data) {
  (void)token;
  (void)user_data;
  fwrite(text, 1, text_len, stdout);
  fflush(stdout);
  return 0;
}

int main(int argc, char** argv) {
  const char* model_dir = NULL;
  const char* prompt = NULL;
  const char* prompt_ids_text = NULL;
  long max_tokens = 256, top_k = 0, threads = 0, tensor_parallel = 1;
  int32_t devices[LLMQ_MAX_TENSOR_PARALLEL];
  int32_t n_devices = 0;
  float temperature = 1.0f, top_p = 1.0f, min_p = 0.0f, repetition_penalty = 1.0f;
  unsigned long long seed = LLMQ_SEED_RANDOM;
  int print_ids = 0, i, exit_code = 1;
  llmq_kv_dtype kv_dtype = LLMQ_KV_DTYPE_AUTO;
  llmq_quant_mode quant = LLMQ_QUANT_NONE;
  llmq_backend backend = LLMQ_BACKEND_CPU;
  llmq_model* model = NULL;
  llmq_engine* engine = NULL;
  int32_t* prompt_ids = NULL;
  int32_t* out_ids = NULL;
  size_t n_prompt = 0;
  llmq_status status;
  llmq_engine_params engine_params;
  llmq_sampling_params sampling;
  llmq_generate_params params;
  llmq_generate_result result;

  for (i = 1; i < argc; ++i) {
    const char* arg = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : NULL;
    int takes_value = 1, ok = 1;
    long parsed;
    if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
      usage(stdout);
      return 0;
    } else if (strcmp(arg, "--print-ids") == 0) {
      print_ids = 1;
      takes_value = 0;
    } else if (!value) {
      fprintf(stderr, "llmq-generate: %s needs a value (or is unknown)\n", arg);
      usage(stderr);
      return 2;
    } else if (strcmp(arg, "--model") == 0) {
      model_dir = value;
    } else if (strcmp(arg, "--prompt") == 0) {
      prompt = value;
    } else if (strcmp(arg, "--prompt-ids") == 0) {
      prompt_ids_text = value;
    } else if (strcmp(arg, "--max-tokens") == 0) {
      ok = parse_long(value, arg, 0, INT32_MAX, &max_tokens);
    } else if (strcmp(arg, "--temperature") == 0) {
      ok = parse_float(value, arg, &temperature);
    } else if (strcmp(arg, "--top-k") == 0) {
      ok = parse_long(value, arg, 0, INT32_MAX, &top_k);
    } else if (strcmp(arg, "--top-p") == 0) {
      ok = parse_float(value, arg, &top_p);
    } else if (strcmp(arg, "--min-p") == 0) {
      ok = parse_float(value, arg, &min_p);
    } else if (strcmp(arg, "--repetition-penalty") == 0) {
      ok = parse_float(value, arg, &repetition_penalty);
    } else if (strcmp(arg, "--seed") == 0) {
      char* end = NULL;
      errno = 0;
      seed = strtoull(value, &end, 10);
      ok = errno == 0 && end != value && *end == '\0' && value[0] != '-';
      if (!ok) fprintf(stderr, "llmq-generate: --seed expects a non-negative integer, got '%s'\n", value);
    } else if (strcmp(arg, "--kv-dtype") == 0) {
      static const char* const names[] = {"auto", "f32", "f16", "bf16", "int8", "fp8"};
      int k;
      ok = 0;
      for (k = 0; k < 6; ++k)
        if (strcmp(value, names[k]) == 0) {
          kv_dtype = (llmq_kv_dtype)k;
          ok = 1;
        }
      if (!ok) fprintf(stderr, "llmq-generate: --kv-dtype expects auto, f32, f16, bf16, int8 or fp8, got '%s'\n", value);
    } else if (strcmp(arg, "--quant") == 0) {
      static const char* const names[] = {"none", "int8wo", "fp8"};
      int k;
      ok = 0;
      for (k = 0; k < 3; ++k)
        if (strcmp(value, names[k]) == 0) {
          quant = (llmq_quant_mode)k;
          ok = 1;
        }
      if (!ok) fprintf(stderr, "llmq-generate: --quant expects none, int8wo or fp8, got '%s'\n", value);
    } else if (strcmp(arg, "--backend") == 0) {
      ok = strcmp(value, "cpu") == 0 || strcmp(value, "cuda") == 0;
      backend = strcmp(value, "cuda") == 0 ? LLMQ_BACKEND_CUDA : LLMQ_BACKEND_CPU;
      if (!ok) fprintf(stderr, "llmq-generate: --backend expects cpu or cuda, got '%s'\n", value);
    } else if (strcmp(arg, "--threads") == 0) {
      ok = parse_long(value, arg, 0, 1024, &threads);
    } else if (strcmp(arg, "--tp") == 0) {
      ok = parse_long(value, arg, 1, LLMQ_MAX_TENSOR_PARALLEL, &tensor_parallel);
    } else if (strcmp(arg, "--devices") == 0) {
      ok = parse_devices(value, devices, &n_devices);
    } else {
      fprintf(stderr, "llmq-generate: unknown option %s\n", arg);
      usage(stderr);
      return 2;
    }
    if (!ok) return 2;
    (void)parsed;
    if (takes_value) ++i;
  }
  if (!model_dir || (!prompt == !prompt_ids_text)) {
    fprintf(stderr, "llmq-generate: give --model and exactly one of --prompt / --prompt-ids\n");
    usage(stderr);
    return 2;
  }

  status = llmq_model_load(model_dir, NULL, &model);
  if (status != LLMQ_OK) return fail_status(status, "loading the model");

  if (prompt_ids_text) {
    if (!parse_ids(prompt_ids_text, &prompt_ids, &n_prompt)) goto done;
  } else {
    status = llmq_tokenize(model, prompt, strlen(prompt), 1, NULL, 0, &n_prompt);
    if (status != LLMQ_OK && status != LLMQ_ERR_BUFFER_TOO_SMALL) {
      fail_status(status, "tokenizing the prompt");
      goto done;
    }
    prompt_ids = malloc((n_prompt ? n_prompt : 1) * sizeof *prompt_ids);
    if (!prompt_ids) goto done;
    status = llmq_tokenize(model, prompt, strlen(prompt), 1, prompt_ids, n_prompt, &n_prompt);
    if (status != LLMQ_OK) {
      fail_status(status, "tokenizing the prompt");
      goto done;
    }
  }

  llmq_engine_params_default(&engine_params);
  engine_params.n_threads = (int32_t)threads;
  engine_params.kv_dtype = kv_dtype;
  engine_params.quant = quant;
  engine_params.backend = backend;
  engine_params.tensor_parallel = (int32_t)tensor_parallel;
  engine_params.n_devices = n_devices;
  memcpy(engine_params.devices, devices, (size_t)n_devices * sizeof devices[0]);
  status = llmq_engine_create(model, &engine_params, &engine);
  if (status != LLMQ_OK) {
    fail_status(status, "creating the engine");
    goto done;
  }

  llmq_sampling_params_default(&sampling);
  sampling.temperature = temperature;
  sampling.top_k = (int32_t)top_k;
  sampling.top_p = top_p;
  sampling.min_p = min_p;
  sampling.repetition_penalty = repetition_penalty;
  sampling.seed = (uint64_t)seed;
  llmq_generate_params_default(&params);
  params.sampling = &sampling;
  params.max_new_tokens = (int32_t)max_tokens;
  params.on_token = on_token;
  out_ids = malloc((max_tokens > 0 ? (size_t)max_tokens : 1) * sizeof *out_ids);
  if (!out_ids) goto done;
  result.struct_size = sizeof result;
  status = llmq_generate(engine, prompt_ids, n_prompt, &params, out_ids, (size_t)max_tokens, &result);
  if (status != LLMQ_OK) {
    fail_status(status, "generating");
    goto done;
  }
  printf("\n");
  if (print_ids) {
    int32_t k;
    printf("ids:");
    for (k = 0; k < result.n_generated; ++k) printf(" %d", out_ids[k]);
    printf("\n");
  }
  fprintf(stderr, "prompt tokens: %d, generated: %d, time to first token: %.2f ms, %.2f tokens/s\n",
          result.n_prompt_tokens, result.n_generated, result.time_to_first_token_s * 1e3,
          result.n_generated > 1 && result.decode_time_s > 0 ? (result.n_generated - 1) / result.decode_time_s : 0.0);
  report_saturation(engine);
  exit_code = 0;

done:
  free(out_ids);
  free(prompt_ids);
  llmq_engine_destroy(engine);
  llmq_model_destroy(model);
  return exit_code;
}
