//! Raw declarations of libllmq's C ABI, transcribed from `include/llmq.h` (whose comments are the
//! documentation: purpose, ownership, thread safety of every function).
//!
//! C enums are `c_int` here, with their values as constants: a library built later may return a
//! value this crate does not know, which a Rust `enum` could not hold. `tests/layout.rs` compiles
//! a C program against llmq.h and checks every struct size, field offset and constant below.
#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_void};

pub const LLMQ_ABI_VERSION: u32 = 1;
pub const LLMQ_SEED_RANDOM: u64 = u64::MAX;
pub const LLMQ_SATURATION_COUNTERS: usize = 5;

pub type llmq_status = c_int;
pub const LLMQ_OK: llmq_status = 0;
pub const LLMQ_ERR_INVALID_ARGUMENT: llmq_status = 1;
pub const LLMQ_ERR_IO: llmq_status = 2;
pub const LLMQ_ERR_MODEL_FORMAT: llmq_status = 3;
pub const LLMQ_ERR_UNSUPPORTED: llmq_status = 4;
pub const LLMQ_ERR_OUT_OF_MEMORY: llmq_status = 5;
pub const LLMQ_ERR_KV_CACHE_FULL: llmq_status = 6;
pub const LLMQ_ERR_BACKEND_UNAVAILABLE: llmq_status = 7;
pub const LLMQ_ERR_BUFFER_TOO_SMALL: llmq_status = 8;
pub const LLMQ_ERR_CONTEXT_OVERFLOW: llmq_status = 9;
pub const LLMQ_ERR_INTERNAL: llmq_status = 10;
pub const LLMQ_ERR_DEVICE: llmq_status = 11;
pub const LLMQ_ERR_TIMEOUT: llmq_status = 12;
pub const LLMQ_MAX_TENSOR_PARALLEL: usize = 8;

pub type llmq_backend = c_int;
pub const LLMQ_BACKEND_CPU: llmq_backend = 0;
pub const LLMQ_BACKEND_CUDA: llmq_backend = 1;

pub type llmq_kv_dtype = c_int;
pub const LLMQ_KV_DTYPE_AUTO: llmq_kv_dtype = 0;
pub const LLMQ_KV_DTYPE_F32: llmq_kv_dtype = 1;
pub const LLMQ_KV_DTYPE_F16: llmq_kv_dtype = 2;
pub const LLMQ_KV_DTYPE_BF16: llmq_kv_dtype = 3;
pub const LLMQ_KV_DTYPE_INT8: llmq_kv_dtype = 4;
pub const LLMQ_KV_DTYPE_FP8: llmq_kv_dtype = 5;

pub type llmq_quant_mode = c_int;
pub const LLMQ_QUANT_NONE: llmq_quant_mode = 0;
pub const LLMQ_QUANT_INT8WO: llmq_quant_mode = 1;
pub const LLMQ_QUANT_FP8: llmq_quant_mode = 2;

pub type llmq_finish_reason = c_int;
pub const LLMQ_FINISH_LENGTH: llmq_finish_reason = 0;
pub const LLMQ_FINISH_STOP: llmq_finish_reason = 1;
pub const LLMQ_FINISH_CANCELLED: llmq_finish_reason = 2;
pub const LLMQ_FINISH_CONTEXT: llmq_finish_reason = 3;

/// Opaque model handle.
#[repr(C)]
pub struct llmq_model {
    _private: [u8; 0],
}

/// Opaque engine handle.
#[repr(C)]
pub struct llmq_engine {
    _private: [u8; 0],
}

#[repr(C)]
pub struct llmq_comm {
    _private: [u8; 0],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct llmq_model_params {
    pub struct_size: usize,
    pub reserved: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct llmq_model_info {
    pub struct_size: usize,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub num_layers: i32,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub max_context: i32,
    pub bos_id: i32,
    pub num_eos_ids: i32,
    pub eos_ids: [i32; 8],
    pub weight_bytes: u64,
    pub weight_bytes_per_step: u64,
    pub architecture: [c_char; 64],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct llmq_engine_params {
    pub struct_size: usize,
    pub backend: llmq_backend,
    pub n_threads: i32,
    pub kv_cache_bytes: u64,
    pub kv_block_size: i32,
    pub max_batch_tokens: i32,
    pub kv_dtype: llmq_kv_dtype,
    pub quant: llmq_quant_mode,
    pub quantize_lm_head: i32,
    pub tensor_parallel: i32,
    pub n_devices: i32,
    pub devices: [i32; LLMQ_MAX_TENSOR_PARALLEL],
    pub tp_timeout_ms: i32,
    pub comm: *mut llmq_comm,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct llmq_sampling_params {
    pub struct_size: usize,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// Called once per generated token on the thread that called `llmq_generate`; `text` is not
/// NUL-terminated and is valid during the call only. Return 0 to continue, non-zero to stop.
pub type llmq_token_callback = Option<
    unsafe extern "C" fn(
        token: i32,
        text: *const c_char,
        text_len: usize,
        user_data: *mut c_void,
    ) -> c_int,
>;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct llmq_generate_params {
    pub struct_size: usize,
    pub sampling: *const llmq_sampling_params,
    pub max_new_tokens: i32,
    pub stop_ids: *const i32,
    pub n_stop_ids: usize,
    pub ignore_eos: c_int,
    pub on_token: llmq_token_callback,
    pub user_data: *mut c_void,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct llmq_generate_result {
    pub struct_size: usize,
    pub finish_reason: llmq_finish_reason,
    pub n_prompt_tokens: i32,
    pub n_generated: i32,
    pub time_to_first_token_s: f64,
    pub decode_time_s: f64,
}

extern "C" {
    pub fn llmq_abi_version() -> u32;
    pub fn llmq_version_string() -> *const c_char;
    pub fn llmq_version(major: *mut c_int, minor: *mut c_int, patch: *mut c_int);
    pub fn llmq_last_error() -> *const c_char;
    pub fn llmq_status_string(status: llmq_status) -> *const c_char;

    pub fn llmq_model_params_init(params: *mut llmq_model_params, struct_size: usize);
    pub fn llmq_model_load(
        model_dir: *const c_char,
        params: *const llmq_model_params,
        out_model: *mut *mut llmq_model,
    ) -> llmq_status;
    pub fn llmq_model_destroy(model: *mut llmq_model);
    pub fn llmq_model_get_info(model: *const llmq_model, info: *mut llmq_model_info)
        -> llmq_status;

    pub fn llmq_tokenize(
        model: *const llmq_model,
        text: *const c_char,
        text_len: usize,
        add_special: c_int,
        ids: *mut i32,
        ids_capacity: usize,
        n_ids: *mut usize,
    ) -> llmq_status;
    pub fn llmq_detokenize(
        model: *const llmq_model,
        ids: *const i32,
        n_ids: usize,
        skip_special: c_int,
        text: *mut c_char,
        text_capacity: usize,
        text_len: *mut usize,
    ) -> llmq_status;

    pub fn llmq_engine_params_init(params: *mut llmq_engine_params, struct_size: usize);
    pub fn llmq_engine_create(
        model: *mut llmq_model,
        params: *const llmq_engine_params,
        out_engine: *mut *mut llmq_engine,
    ) -> llmq_status;
    pub fn llmq_engine_destroy(engine: *mut llmq_engine);
    pub fn llmq_engine_saturation(
        engine: *mut llmq_engine,
        counts: *mut u64,
        capacity: usize,
        n_counts: *mut usize,
        reset: c_int,
    ) -> llmq_status;

    pub fn llmq_sampling_params_init(params: *mut llmq_sampling_params, struct_size: usize);
    pub fn llmq_generate_params_init(params: *mut llmq_generate_params, struct_size: usize);
    pub fn llmq_generate(
        engine: *mut llmq_engine,
        prompt_ids: *const i32,
        n_prompt: usize,
        params: *const llmq_generate_params,
        out_ids: *mut i32,
        out_capacity: usize,
        result: *mut llmq_generate_result,
    ) -> llmq_status;
    pub fn llmq_score(
        engine: *mut llmq_engine,
        ids: *const i32,
        n_ids: usize,
        logits: *mut f32,
        logits_capacity: usize,
    ) -> llmq_status;
}
