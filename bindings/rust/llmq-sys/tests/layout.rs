//! Checks src/lib.rs against include/llmq.h: a C program compiled against the header (tests/layout.c,
//! with $CC or cc) prints every struct size, field offset and constant, and they must equal the Rust
//! ones; every function declared here must be declared in llmq.h with as many parameters.
//! LLMQ_INCLUDE_DIR overrides the header's folder (default: the checkout's include/).
use llmq_sys::*;
use std::collections::BTreeMap;
use std::mem::{size_of, MaybeUninit};
use std::path::PathBuf;
use std::process::Command;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn include_dir() -> PathBuf {
    match std::env::var_os("LLMQ_INCLUDE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => manifest_dir().join("../../../include"),
    }
}

/// "KEY VALUE" lines printed by tests/layout.c, compiled against llmq.h.
fn c_layout() -> BTreeMap<String, u64> {
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("llmq_layout");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-I"])
        .arg(include_dir())
        .arg(manifest_dir().join("tests/layout.c"))
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {} (set CC): {}", cc, e));
    assert!(
        status.success(),
        "{} failed to compile tests/layout.c against llmq.h",
        cc
    );
    let out = Command::new(&exe).output().expect("run the layout program");
    assert!(out.status.success());
    let mut map = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let (key, value) = line.rsplit_once(' ').expect("KEY VALUE");
        map.insert(key.to_string(), value.parse().expect("a number"));
    }
    map
}

/// Inserts "sizeof T" and "offsetof T.field" for each listed type and field.
macro_rules! layout {
    ($map:ident; $($t:ident { $($f:ident),* })*) => {$(
        $map.insert(format!("sizeof {}", stringify!($t)), size_of::<$t>() as u64);
        $({
            let value = MaybeUninit::<$t>::uninit();
            let base = value.as_ptr();
            // addr_of! takes the field's address without reading the uninitialized value.
            let field = unsafe { std::ptr::addr_of!((*base).$f) };
            $map.insert(format!("offsetof {}.{}", stringify!($t), stringify!($f)),
                        (field as usize - base as usize) as u64);
        })*
    )*};
}

macro_rules! constants {
    ($map:ident; $($c:ident),*) => { $( $map.insert(format!("const {}", stringify!($c)), $c as u64); )* };
}

fn rust_layout() -> BTreeMap<String, u64> {
    let mut map = BTreeMap::new();
    layout!(map;
        llmq_status {} llmq_backend {} llmq_kv_dtype {} llmq_quant_mode {} llmq_finish_reason {}
        llmq_token_callback {}
        llmq_model_params { struct_size, reserved }
        llmq_model_info { struct_size, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
                          max_context, bos_id, num_eos_ids, eos_ids, weight_bytes, weight_bytes_per_step,
                          architecture }
        llmq_engine_params { struct_size, backend, n_threads, kv_cache_bytes, kv_block_size, max_batch_tokens,
                             kv_dtype, quant, quantize_lm_head, tensor_parallel, n_devices, devices,
                             tp_timeout_ms, comm }
        llmq_sampling_params { struct_size, temperature, top_k, top_p, min_p, repetition_penalty, seed }
        llmq_generate_params { struct_size, sampling, max_new_tokens, stop_ids, n_stop_ids, ignore_eos, on_token,
                               user_data }
        llmq_generate_result { struct_size, finish_reason, n_prompt_tokens, n_generated, time_to_first_token_s,
                               decode_time_s }
    );
    constants!(map;
        LLMQ_ABI_VERSION, LLMQ_SEED_RANDOM, LLMQ_SATURATION_COUNTERS,
        LLMQ_OK, LLMQ_ERR_INVALID_ARGUMENT, LLMQ_ERR_IO, LLMQ_ERR_MODEL_FORMAT, LLMQ_ERR_UNSUPPORTED,
        LLMQ_ERR_OUT_OF_MEMORY, LLMQ_ERR_KV_CACHE_FULL, LLMQ_ERR_BACKEND_UNAVAILABLE, LLMQ_ERR_BUFFER_TOO_SMALL,
        LLMQ_ERR_CONTEXT_OVERFLOW, LLMQ_ERR_INTERNAL, LLMQ_ERR_DEVICE, LLMQ_ERR_TIMEOUT, LLMQ_MAX_TENSOR_PARALLEL,
        LLMQ_BACKEND_CPU, LLMQ_BACKEND_CUDA,
        LLMQ_KV_DTYPE_AUTO, LLMQ_KV_DTYPE_F32, LLMQ_KV_DTYPE_F16, LLMQ_KV_DTYPE_BF16, LLMQ_KV_DTYPE_INT8,
        LLMQ_KV_DTYPE_FP8,
        LLMQ_QUANT_NONE, LLMQ_QUANT_INT8WO, LLMQ_QUANT_FP8,
        LLMQ_FINISH_LENGTH, LLMQ_FINISH_STOP, LLMQ_FINISH_CANCELLED, LLMQ_FINISH_CONTEXT
    );
    map
}

#[test]
fn struct_layouts_and_constants_match_llmq_h() {
    let c = c_layout();
    let rust = rust_layout();
    let mut errors = Vec::new();
    for (key, value) in &c {
        match rust.get(key) {
            Some(r) if r == value => {}
            Some(r) => errors.push(format!("{}: llmq.h {} != Rust {}", key, value, r)),
            None => errors.push(format!(
                "{}: in tests/layout.c but not checked in Rust",
                key
            )),
        }
    }
    for key in rust.keys().filter(|k| !c.contains_key(*k)) {
        errors.push(format!(
            "{}: checked in Rust but not printed by tests/layout.c",
            key
        ));
    }
    assert!(
        errors.is_empty(),
        "llmq-sys does not match llmq.h:\n  {}",
        errors.join("\n  ")
    );
    assert!(c.len() > 60, "only {} entries compared", c.len());
}

/// Removes /* */ and // comments.
fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |end| &after[end + 2..]);
        } else if rest.starts_with("//") {
            rest = rest.find('\n').map_or("", |end| &rest[end..]);
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn top_level_commas(text: &str) -> usize {
    let mut depth = 0;
    let mut commas = 0;
    for c in text.chars() {
        match c {
            '(' | '<' => depth += 1,
            ')' | '>' => depth -= 1,
            ',' if depth == 0 => commas += 1,
            _ => {}
        }
    }
    commas
}

/// name -> number of parameters, for every "NAME(PARAMS)" that follows `marker` in text.
fn functions(text: &str, marker: &str) -> BTreeMap<String, usize> {
    let mut found = BTreeMap::new();
    for piece in text.split(marker).skip(1) {
        let open = match piece.find('(') {
            Some(open) => open,
            None => continue,
        };
        let name = piece[..open]
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .last()
            .unwrap_or("");
        if !name.starts_with("llmq_") {
            continue;
        }
        let mut depth = 0;
        let mut end = piece.len();
        for (i, c) in piece[open..].char_indices() {
            depth += match c {
                '(' => 1,
                ')' => -1,
                _ => 0,
            };
            if depth == 0 {
                end = open + i;
                break;
            }
        }
        let params = piece[open + 1..end].trim().trim_end_matches(',').trim();
        let n = if params.is_empty() || params == "void" {
            0
        } else {
            top_level_commas(params) + 1
        };
        found.insert(name.to_string(), n);
    }
    found
}

#[test]
fn functions_are_declared_in_llmq_h_with_as_many_parameters() {
    let header = std::fs::read_to_string(include_dir().join("llmq.h")).expect("read llmq.h");
    let declared = functions(&strip_comments(&header), "LLMQ_API ");
    let source = std::fs::read_to_string(manifest_dir().join("src/lib.rs")).unwrap();
    let ours = functions(&strip_comments(&source), "pub fn ");
    assert!(
        declared.len() >= 19 && ours.len() >= 19,
        "parsed {} and {} functions",
        declared.len(),
        ours.len()
    );
    for (name, n) in &ours {
        assert_eq!(
            declared.get(name),
            Some(n),
            "{}: llmq.h parameters vs. llmq-sys",
            name
        );
    }
    // Functions that llmq.h gained after this crate was written are reported, not failed: the
    // crate stays usable, and the golden symbol list (tests/abi/) is where additions are signed off.
    for name in declared.keys().filter(|name| !ours.contains_key(*name)) {
        eprintln!(
            "note: {} is declared in llmq.h but not yet in llmq-sys",
            name
        );
    }
}

#[test]
fn the_library_is_the_one_declared() {
    unsafe {
        assert_eq!(llmq_abi_version(), LLMQ_ABI_VERSION);
        let mut params = MaybeUninit::<llmq_engine_params>::uninit();
        llmq_engine_params_init(params.as_mut_ptr(), size_of::<llmq_engine_params>());
        assert_eq!(
            params.assume_init().struct_size,
            size_of::<llmq_engine_params>()
        );
        let name = std::ffi::CStr::from_ptr(llmq_status_string(LLMQ_ERR_KV_CACHE_FULL));
        assert_eq!(name.to_str().unwrap(), "LLMQ_ERR_KV_CACHE_FULL");
    }
}
