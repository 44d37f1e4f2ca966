/* An outside C program against an installed llmq, built with pkg-config: greedy tokens of
 * "Once upon a time" on stories260K must be llama2.c run.c's. usage: consumer MODEL_DIR */
#include <llmq.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char** argv) {
  static const int32_t prompt[] = {1, 403, 407, 261, 378};
  static const int32_t reference[] = {432, 383, 286, 261, 376, 298, 315, 421};
  int32_t out[8];
  llmq_model* model = NULL;
  llmq_engine* engine = NULL;
  llmq_sampling_params sampling;
  llmq_generate_params params;
  llmq_status status;
  if (argc != 2) return 2;
  status = llmq_model_load(argv[1], NULL, &model);
  if (status == LLMQ_OK) status = llmq_engine_create(model, NULL, &engine);
  if (status == LLMQ_OK) {
    llmq_sampling_params_default(&sampling);
    sampling.temperature = 0.0f;
    llmq_generate_params_default(&params);
    params.sampling = &sampling;
    params.max_new_tokens = 8;
    status = llmq_generate(engine, prompt, 5, &params, out, 8, NULL);
  }
  if (status != LLMQ_OK) fprintf(stderr, "consumer: %s: %s\n", llmq_status_string(status), llmq_last_error());
  llmq_engine_destroy(engine);
  llmq_model_destroy(model);
  if (status != LLMQ_OK) return 1;
  if (memcmp(out, reference, sizeof out) != 0) {
    fprintf(stderr, "consumer: unexpected tokens\n");
    return 1;
  }
  printf("consumer (C, pkg-config): llmq %s\n", llmq_version_string());
  return 0;
}
