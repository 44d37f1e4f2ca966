/* Prints the layout of llmq.h's types and its constants, one "KEY VALUE" line each, for
 * tests/layout.rs to compare with the Rust declarations. */
#include <stddef.h>
#include <stdio.h>

#include "llmq.h"

#define SIZE(T) printf("sizeof %s %zu\n", #T, sizeof(T));
#define FIELD(T, f) printf("offsetof %s.%s %zu\n", #T, #f, offsetof(T, f));
#define CONST(c) printf("const %s %llu\n", #c, (unsigned long long)(c));

int main(void) {
  SIZE(llmq_status) SIZE(llmq_backend) SIZE(llmq_kv_dtype) SIZE(llmq_quant_mode) SIZE(llmq_finish_reason)
  SIZE(llmq_token_callback)

  SIZE(llmq_model_params) FIELD(llmq_model_params, struct_size) FIELD(llmq_model_params, reserved)

  SIZE(llmq_model_info) FIELD(llmq_model_info, struct_size) FIELD(llmq_model_info, vocab_size)
  FIELD(llmq_model_info, hidden_size) FIELD(llmq_model_info, num_layers) FIELD(llmq_model_info, num_heads)
  FIELD(llmq_model_info, num_kv_heads) FIELD(llmq_model_info, head_dim) FIELD(llmq_model_info, max_context)
  FIELD(llmq_model_info, bos_id) FIELD(llmq_model_info, num_eos_ids) FIELD(llmq_model_info, eos_ids)
  FIELD(llmq_model_info, weight_bytes) FIELD(llmq_model_info, weight_bytes_per_step)
  FIELD(llmq_model_info, architecture)

  SIZE(llmq_engine_params) FIELD(llmq_engine_params, struct_size) FIELD(llmq_engine_params, backend)
  FIELD(llmq_engine_params, n_threads) FIELD(llmq_engine_params, kv_cache_bytes)
  FIELD(llmq_engine_params, kv_block_size) FIELD(llmq_engine_params, max_batch_tokens)
  FIELD(llmq_engine_params, kv_dtype) FIELD(llmq_engine_params, quant) FIELD(llmq_engine_params, quantize_lm_head)
  FIELD(llmq_engine_params, tensor_parallel) FIELD(llmq_engine_params, n_devices) FIELD(llmq_engine_params, devices)
  FIELD(llmq_engine_params, tp_timeout_ms) FIELD(llmq_engine_params, comm)

  SIZE(llmq_sampling_params) FIELD(llmq_sampling_params, struct_size) FIELD(llmq_sampling_params, temperature)
  FIELD(llmq_sampling_params, top_k) FIELD(llmq_sampling_params, top_p) FIELD(llmq_sampling_params, min_p)
  FIELD(llmq_sampling_params, repetition_penalty) FIELD(llmq_sampling_params, seed)

  SIZE(llmq_generate_params) FIELD(llmq_generate_params, struct_size) FIELD(llmq_generate_params, sampling)
  FIELD(llmq_generate_params, max_new_tokens) FIELD(llmq_generate_params, stop_ids)
  FIELD(llmq_generate_params, n_stop_ids) FIELD(llmq_generate_params, ignore_eos)
  FIELD(llmq_generate_params, on_token) FIELD(llmq_generate_params, user_data)

  SIZE(llmq_generate_result) FIELD(llmq_generate_result, struct_size) FIELD(llmq_generate_result, finish_reason)
  FIELD(llmq_generate_result, n_prompt_tokens) FIELD(llmq_generate_result, n_generated)
  FIELD(llmq_generate_result, time_to_first_token_s) FIELD(llmq_generate_result, decode_time_s)

  CONST(LLMQ_ABI_VERSION) CONST(LLMQ_SEED_RANDOM) CONST(LLMQ_SATURATION_COUNTERS)
  CONST(LLMQ_OK) CONST(LLMQ_ERR_INVALID_ARGUMENT) CONST(LLMQ_ERR_IO) CONST(LLMQ_ERR_MODEL_FORMAT)
  CONST(LLMQ_ERR_UNSUPPORTED) CONST(LLMQ_ERR_OUT_OF_MEMORY) CONST(LLMQ_ERR_KV_CACHE_FULL)
  CONST(LLMQ_ERR_BACKEND_UNAVAILABLE) CONST(LLMQ_ERR_BUFFER_TOO_SMALL) CONST(LLMQ_ERR_CONTEXT_OVERFLOW)
  CONST(LLMQ_ERR_INTERNAL) CONST(LLMQ_ERR_DEVICE) CONST(LLMQ_ERR_TIMEOUT) CONST(LLMQ_MAX_TENSOR_PARALLEL)
  CONST(LLMQ_BACKEND_CPU) CONST(LLMQ_BACKEND_CUDA)
  CONST(LLMQ_KV_DTYPE_AUTO) CONST(LLMQ_KV_DTYPE_F32) CONST(LLMQ_KV_DTYPE_F16) CONST(LLMQ_KV_DTYPE_BF16)
  CONST(LLMQ_KV_DTYPE_INT8) CONST(LLMQ_KV_DTYPE_FP8)
  CONST(LLMQ_QUANT_NONE) CONST(LLMQ_QUANT_INT8WO) CONST(LLMQ_QUANT_FP8)
  CONST(LLMQ_FINISH_LENGTH) CONST(LLMQ_FINISH_STOP) CONST(LLMQ_FINISH_CANCELLED) CONST(LLMQ_FINISH_CONTEXT)
  return 0;
}
