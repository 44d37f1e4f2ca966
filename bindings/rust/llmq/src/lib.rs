//! Safe Rust bindings for libllmq, an inference engine for Llama-family language models.
//!
//! ```no_run
//! use llmq::{Engine, EngineOptions, GenerateOptions, Model};
//! # fn main() -> llmq::Result<()> {
//! let model = Model::load("../shared/models/stories260K")?;
//! let engine = Engine::new(&model, &EngineOptions::default())?;
//! let out = engine.generate("Once upon a time", &GenerateOptions::greedy(32))?;
//! println!("{} ({:?}, {:.0} tokens/s)", out.text, out.finish_reason, out.tokens_per_second());
//! for token in engine.stream("Once upon a time", &GenerateOptions::greedy(32))? {
//!     print!("{}", token?.text);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Every fallible call returns [`Result`], whose [`Error`] carries the status and the library's
//! message (`llmq_last_error()`). Handles are freed on drop. [`Model`] and [`Engine`] are `Send`
//! and `Sync` because llmq.h makes them so: a model is immutable and its functions are
//! thread-safe; an engine serializes its calls internally. Destruction happens in `Drop`, when no
//! other reference exists, which is what llmq.h asks of `llmq_engine_destroy`.
//!
//! Misuse is a compile error where Rust can see it. A dropped engine cannot be used:
//! ```compile_fail,E0382
//! # fn f(model: &llmq::Model) -> llmq::Result<()> {
//! let engine = llmq::Engine::new(model, &llmq::EngineOptions::default())?;
//! drop(engine);
//! engine.generate("Once upon a time", &llmq::GenerateOptions::default())?; // use of a moved value
//! # Ok(()) }
//! ```
//! and a prompt is text or token ids, nothing else:
//! ```compile_fail,E0277
//! # fn f(engine: &llmq::Engine) -> llmq::Result<()> {
//! engine.generate(3.5, &llmq::GenerateOptions::default())?; // the trait `From<f64>` is not implemented
//! # Ok(()) }
//! ```
//! Values that only the library can judge (token ids out of range, bad sampling parameters) are
//! errors with the library's message.
use llmq_sys as sys;
use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::fmt;
use std::mem::MaybeUninit;
use std::ops::ControlFlow;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::{mpsc, Arc};
use std::thread;

// ---- Errors --------------------------------------------------------------------------------------

/// An llmq_status other than LLMQ_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    InvalidArgument,
    Io,
    ModelFormat,
    Unsupported,
    OutOfMemory,
    KvCacheFull,
    BackendUnavailable,
    BufferTooSmall,
    ContextOverflow,
    Internal,
    Device,
    /// A code this crate does not know (from a newer library).
    Other(i32),
}

impl Status {
    fn from_code(code: c_int) -> Status {
        match code {
            sys::LLMQ_ERR_INVALID_ARGUMENT => Status::InvalidArgument,
            sys::LLMQ_ERR_IO => Status::Io,
            sys::LLMQ_ERR_MODEL_FORMAT => Status::ModelFormat,
            sys::LLMQ_ERR_UNSUPPORTED => Status::Unsupported,
            sys::LLMQ_ERR_OUT_OF_MEMORY => Status::OutOfMemory,
            sys::LLMQ_ERR_KV_CACHE_FULL => Status::KvCacheFull,
            sys::LLMQ_ERR_BACKEND_UNAVAILABLE => Status::BackendUnavailable,
            sys::LLMQ_ERR_BUFFER_TOO_SMALL => Status::BufferTooSmall,
            sys::LLMQ_ERR_CONTEXT_OVERFLOW => Status::ContextOverflow,
            sys::LLMQ_ERR_INTERNAL => Status::Internal,
            sys::LLMQ_ERR_DEVICE => Status::Device,
            other => Status::Other(other),
        }
    }

    /// The C status code.
    pub fn code(self) -> i32 {
        match self {
            Status::InvalidArgument => sys::LLMQ_ERR_INVALID_ARGUMENT,
            Status::Io => sys::LLMQ_ERR_IO,
            Status::ModelFormat => sys::LLMQ_ERR_MODEL_FORMAT,
            Status::Unsupported => sys::LLMQ_ERR_UNSUPPORTED,
            Status::OutOfMemory => sys::LLMQ_ERR_OUT_OF_MEMORY,
            Status::KvCacheFull => sys::LLMQ_ERR_KV_CACHE_FULL,
            Status::BackendUnavailable => sys::LLMQ_ERR_BACKEND_UNAVAILABLE,
            Status::BufferTooSmall => sys::LLMQ_ERR_BUFFER_TOO_SMALL,
            Status::ContextOverflow => sys::LLMQ_ERR_CONTEXT_OVERFLOW,
            Status::Internal => sys::LLMQ_ERR_INTERNAL,
            Status::Device => sys::LLMQ_ERR_DEVICE,
            Status::Other(code) => code,
        }
    }

    /// The library's name for the code, e.g. "LLMQ_ERR_IO".
    pub fn name(self) -> &'static str {
        // llmq_status_string returns static strings, valid for the life of the program.
        unsafe { CStr::from_ptr(sys::llmq_status_string(self.code())) }
            .to_str()
            .unwrap_or("LLMQ_ERR_UNKNOWN")
    }
}

/// A failed call: its status and the library's message naming the argument, file or field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: Status,
    message: String,
}

impl Error {
    pub fn status(&self) -> Status {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    fn invalid_argument(message: String) -> Error {
        Error {
            status: Status::InvalidArgument,
            message,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.name(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Turns a status into a Result with this thread's llmq_last_error().
fn check(status: sys::llmq_status) -> Result<()> {
    if status == sys::LLMQ_OK {
        return Ok(());
    }
    // The message belongs to the library and is valid until this thread's next llmq call.
    let message = unsafe { CStr::from_ptr(sys::llmq_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(Error {
        status: Status::from_code(status),
        message,
    })
}

/// The library's LLMQ_ABI_VERSION.
pub fn abi_version() -> u32 {
    unsafe { sys::llmq_abi_version() }
}

/// The library's version, "MAJOR.MINOR.PATCH".
pub fn version() -> String {
    unsafe { CStr::from_ptr(sys::llmq_version_string()) }
        .to_string_lossy()
        .into_owned()
}

/// Fills a params struct with the library's *_init() function, given our size of the struct (a
/// library with a larger struct fills only the fields we know; zeroed first, so every byte is set).
fn defaults<T>(init: unsafe extern "C" fn(*mut T, usize)) -> T {
    let mut value = MaybeUninit::<T>::zeroed();
    unsafe {
        init(value.as_mut_ptr(), std::mem::size_of::<T>());
        value.assume_init()
    }
}

// ---- Model ---------------------------------------------------------------------------------------

struct ModelHandle(NonNull<sys::llmq_model>);

// SAFETY: llmq.h: an llmq_model is immutable after loading and functions taking a const handle may
// be called from any number of threads at once; it is destroyed once, when the last Arc goes.
unsafe impl Send for ModelHandle {}
unsafe impl Sync for ModelHandle {}

impl Drop for ModelHandle {
    fn drop(&mut self) {
        unsafe { sys::llmq_model_destroy(self.0.as_ptr()) }
    }
}

/// What llmq_model_get_info reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub architecture: String,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub num_layers: i32,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub max_context: i32,
    pub bos_id: i32,
    pub eos_ids: Vec<i32>,
    pub weight_bytes: u64,
    pub weight_bytes_per_step: u64,
}

/// A loaded Hugging Face model directory. Cloning shares the same loaded model.
#[derive(Clone)]
pub struct Model {
    handle: Arc<ModelHandle>,
    info: Arc<ModelInfo>,
}

impl Model {
    /// Loads config.json, the safetensors weights and tokenizer.json from `dir`.
    pub fn load<P: AsRef<Path>>(dir: P) -> Result<Model> {
        let path = CString::new(dir.as_ref().as_os_str().as_bytes()).map_err(|_| {
            Error::invalid_argument(format!(
                "{}: the path contains a NUL byte",
                dir.as_ref().display()
            ))
        })?;
        let mut raw = ptr::null_mut();
        check(unsafe { sys::llmq_model_load(path.as_ptr(), ptr::null(), &mut raw) })?;
        let handle = Arc::new(ModelHandle(
            NonNull::new(raw).expect("llmq_model_load returned OK and NULL"),
        ));
        let mut info: sys::llmq_model_info = unsafe { std::mem::zeroed() };
        info.struct_size = std::mem::size_of::<sys::llmq_model_info>();
        check(unsafe { sys::llmq_model_get_info(handle.0.as_ptr(), &mut info) })?;
        let architecture = unsafe { CStr::from_ptr(info.architecture.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let n_eos = info.num_eos_ids.clamp(0, 8) as usize;
        let info = ModelInfo {
            architecture,
            vocab_size: info.vocab_size,
            hidden_size: info.hidden_size,
            num_layers: info.num_layers,
            num_heads: info.num_heads,
            num_kv_heads: info.num_kv_heads,
            head_dim: info.head_dim,
            max_context: info.max_context,
            bos_id: info.bos_id,
            eos_ids: info.eos_ids[..n_eos].to_vec(),
            weight_bytes: info.weight_bytes,
            weight_bytes_per_step: info.weight_bytes_per_step,
        };
        Ok(Model {
            handle,
            info: Arc::new(info),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Token ids of `text`; `add_special` adds BOS as tokenizer_config.json says.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<i32>> {
        let mut ids = vec![0i32; text.len() + 2];
        loop {
            let mut n = 0usize;
            let status = unsafe {
                sys::llmq_tokenize(
                    self.handle.0.as_ptr(),
                    text.as_ptr() as *const c_char,
                    text.len(),
                    add_special as c_int,
                    ids.as_mut_ptr(),
                    ids.len(),
                    &mut n,
                )
            };
            if status == sys::LLMQ_ERR_BUFFER_TOO_SMALL && n > ids.len() {
                ids.resize(n, 0);
                continue;
            }
            check(status)?;
            ids.truncate(n);
            return Ok(ids);
        }
    }

    /// The text of `ids`; `skip_special` drops BOS, EOS and the like. Invalid UTF-8 becomes U+FFFD.
    pub fn detokenize(&self, ids: &[i32], skip_special: bool) -> Result<String> {
        let mut text = vec![0u8; 16 * ids.len() + 16];
        loop {
            let mut n = 0usize;
            let status = unsafe {
                sys::llmq_detokenize(
                    self.handle.0.as_ptr(),
                    ids.as_ptr(),
                    ids.len(),
                    skip_special as c_int,
                    text.as_mut_ptr() as *mut c_char,
                    text.len(),
                    &mut n,
                )
            };
            if status == sys::LLMQ_ERR_BUFFER_TOO_SMALL && n > text.len() {
                text.resize(n, 0);
                continue;
            }
            check(status)?;
            text.truncate(n);
            return Ok(String::from_utf8_lossy(&text).into_owned());
        }
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("architecture", &self.info.architecture)
            .finish()
    }
}

// ---- Engine --------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// The dtype of the model's weights.
    Auto,
    F32,
    F16,
    Bf16,
    Int8,
    Fp8,
}

/// Weight quantization, done when the engine is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    None,
    Int8WeightOnly,
    Fp8,
}

/// llmq_engine_params; `Default` gives the library's defaults.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub backend: Backend,
    /// CPU worker threads; 0 = one per core.
    pub n_threads: i32,
    /// KV cache capacity; 0 = one full context, at most 2 GiB.
    pub kv_cache_bytes: u64,
    pub kv_block_size: i32,
    pub max_batch_tokens: i32,
    pub kv_dtype: KvDtype,
    pub quant: Quant,
    pub quantize_lm_head: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        let p = defaults(sys::llmq_engine_params_init);
        EngineOptions {
            backend: if p.backend == sys::LLMQ_BACKEND_CUDA {
                Backend::Cuda
            } else {
                Backend::Cpu
            },
            n_threads: p.n_threads,
            kv_cache_bytes: p.kv_cache_bytes,
            kv_block_size: p.kv_block_size,
            max_batch_tokens: p.max_batch_tokens,
            kv_dtype: KvDtype::Auto,
            quant: Quant::None,
            quantize_lm_head: p.quantize_lm_head != 0,
        }
    }
}

struct EngineHandle(NonNull<sys::llmq_engine>);

// SAFETY: llmq.h: an llmq_engine serializes its calls internally (a mutex), so calls from several
// threads are safe; llmq_engine_destroy must not race with a call, and it runs in Drop, when the
// last Arc (held by the Engine and by running streams) goes.
unsafe impl Send for EngineHandle {}
unsafe impl Sync for EngineHandle {}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        unsafe { sys::llmq_engine_destroy(self.0.as_ptr()) }
    }
}

/// A prompt: text (tokenized with the model's tokenizer) or token ids (used as given).
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    Text(&'a str),
    Ids(&'a [i32]),
}

impl<'a> From<&'a str> for Prompt<'a> {
    fn from(text: &'a str) -> Self {
        Prompt::Text(text)
    }
}

impl<'a> From<&'a String> for Prompt<'a> {
    fn from(text: &'a String) -> Self {
        Prompt::Text(text)
    }
}

impl<'a> From<&'a [i32]> for Prompt<'a> {
    fn from(ids: &'a [i32]) -> Self {
        Prompt::Ids(ids)
    }
}

impl<'a> From<&'a Vec<i32>> for Prompt<'a> {
    fn from(ids: &'a Vec<i32>) -> Self {
        Prompt::Ids(ids)
    }
}

impl<'a, const N: usize> From<&'a [i32; N]> for Prompt<'a> {
    fn from(ids: &'a [i32; N]) -> Self {
        Prompt::Ids(ids)
    }
}

/// llmq_generate_params and llmq_sampling_params; `Default` gives the library's defaults
/// (temperature 1, a random seed, 256 tokens).
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: i32,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: i32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    /// None draws a random seed.
    pub seed: Option<u64>,
    /// Extra ids that end generation (not emitted).
    pub stop_ids: Vec<i32>,
    /// Do not stop at the model's EOS ids.
    pub ignore_eos: bool,
    /// For text prompts: add BOS as tokenizer_config.json says.
    pub add_special: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        let g = defaults(sys::llmq_generate_params_init);
        let s = defaults(sys::llmq_sampling_params_init);
        GenerateOptions {
            max_tokens: g.max_new_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            seed: None,
            stop_ids: Vec::new(),
            ignore_eos: g.ignore_eos != 0,
            add_special: true,
        }
    }
}

impl GenerateOptions {
    /// Greedy decoding (temperature 0) of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: i32) -> Self {
        GenerateOptions {
            max_tokens,
            temperature: 0.0,
            ..GenerateOptions::default()
        }
    }
}

/// One generated token and the text it completes ("" inside a multi-byte character).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: i32,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// max_tokens reached.
    Length,
    /// An EOS or stop id was sampled (not part of the output).
    Stop,
    /// The callback asked to stop, or the stream was dropped.
    Cancelled,
    /// The model's context length or the KV cache was exhausted.
    Context,
    /// A reason this crate does not know (from a newer library).
    Other(i32),
}

/// The outcome of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<i32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub n_prompt_tokens: usize,
    pub time_to_first_token_s: f64,
    pub decode_time_s: f64,
}

impl Generation {
    /// Tokens after the first per second of decode time (0 when there is nothing to measure).
    pub fn tokens_per_second(&self) -> f64 {
        if self.tokens.len() < 2 || self.decode_time_s <= 0.0 {
            0.0
        } else {
            (self.tokens.len() - 1) as f64 / self.decode_time_s
        }
    }
}

/// An inference engine on a model: backend, KV cache, scratch buffers.
pub struct Engine {
    handle: Arc<EngineHandle>,
    model: Model,
}

type Sink<'a> = &'a mut dyn FnMut(&Token) -> ControlFlow<()>;

/// The callback's state during one llmq_generate call.
struct Collector<'a> {
    sink: Sink<'a>,
    tokens: Vec<i32>,
    text: Vec<u8>,
    panic: Option<Box<dyn Any + Send>>,
}

unsafe extern "C" fn on_token(
    token: i32,
    text: *const c_char,
    text_len: usize,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is the &mut Collector that run() passed, alive for the whole call.
    let collector = &mut *(user_data as *mut Collector);
    let bytes: &[u8] = if text_len == 0 || text.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(text as *const u8, text_len)
    };
    // A panic must not unwind into C: it is kept, generation stops, and run() resumes it.
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        collector.tokens.push(token);
        collector.text.extend_from_slice(bytes);
        (collector.sink)(&Token {
            id: token,
            text: String::from_utf8_lossy(bytes).into_owned(),
        })
    }));
    match outcome {
        Ok(ControlFlow::Continue(())) => 0,
        Ok(ControlFlow::Break(())) => 1,
        Err(payload) => {
            collector.panic = Some(payload);
            1
        }
    }
}

thread_local! {
    /// The engines whose llmq_generate runs on this thread, i.e. whose callbacks may be running.
    static GENERATING: RefCell<Vec<usize>> = RefCell::new(Vec::new());
}

/// An engine is locked while its callback runs: calling it again from there would wait forever.
fn check_not_in_own_callback(handle: &EngineHandle) -> Result<()> {
    let key = handle.0.as_ptr() as usize;
    if GENERATING.with(|engines| engines.borrow().contains(&key)) {
        return Err(Error::invalid_argument(
            "the engine was called from inside its own token callback; it runs one call at a time, so this would \
             wait for itself"
                .to_string(),
        ));
    }
    Ok(())
}

/// Marks an engine as generating on this thread while it lives.
struct Generating(usize);

impl Generating {
    fn new(handle: &EngineHandle) -> Generating {
        let key = handle.0.as_ptr() as usize;
        GENERATING.with(|engines| engines.borrow_mut().push(key));
        Generating(key)
    }
}

impl Drop for Generating {
    fn drop(&mut self) {
        GENERATING.with(|engines| {
            let mut engines = engines.borrow_mut();
            if let Some(i) = engines.iter().rposition(|key| *key == self.0) {
                engines.remove(i);
            }
        });
    }
}

/// Runs llmq_generate on `handle`, passing each token to `sink`.
fn run(
    handle: &EngineHandle,
    prompt: &[i32],
    options: &GenerateOptions,
    sink: Sink<'_>,
) -> Result<Generation> {
    check_not_in_own_callback(handle)?;
    let mut sampling = defaults(sys::llmq_sampling_params_init);
    sampling.temperature = options.temperature;
    sampling.top_k = options.top_k;
    sampling.top_p = options.top_p;
    sampling.min_p = options.min_p;
    sampling.repetition_penalty = options.repetition_penalty;
    sampling.seed = options.seed.unwrap_or(sys::LLMQ_SEED_RANDOM);
    let mut collector = Collector {
        sink,
        tokens: Vec::new(),
        text: Vec::new(),
        panic: None,
    };
    let mut params = defaults(sys::llmq_generate_params_init);
    params.sampling = &sampling;
    params.max_new_tokens = options.max_tokens;
    params.stop_ids = options.stop_ids.as_ptr();
    params.n_stop_ids = options.stop_ids.len();
    params.ignore_eos = options.ignore_eos as c_int;
    params.on_token = Some(on_token);
    params.user_data = &mut collector as *mut Collector as *mut c_void;
    let mut result: sys::llmq_generate_result = unsafe { std::mem::zeroed() };
    result.struct_size = std::mem::size_of::<sys::llmq_generate_result>();
    let generating = Generating::new(handle);
    let status = unsafe {
        sys::llmq_generate(
            handle.0.as_ptr(),
            prompt.as_ptr(),
            prompt.len(),
            &params,
            ptr::null_mut(),
            0,
            &mut result,
        )
    };
    drop(generating);
    if let Some(payload) = collector.panic {
        panic::resume_unwind(payload);
    }
    check(status)?;
    Ok(Generation {
        tokens: collector.tokens,
        text: String::from_utf8_lossy(&collector.text).into_owned(),
        finish_reason: match result.finish_reason {
            sys::LLMQ_FINISH_LENGTH => FinishReason::Length,
            sys::LLMQ_FINISH_STOP => FinishReason::Stop,
            sys::LLMQ_FINISH_CANCELLED => FinishReason::Cancelled,
            sys::LLMQ_FINISH_CONTEXT => FinishReason::Context,
            other => FinishReason::Other(other),
        },
        n_prompt_tokens: result.n_prompt_tokens.max(0) as usize,
        time_to_first_token_s: result.time_to_first_token_s,
        decode_time_s: result.decode_time_s,
    })
}

impl Engine {
    pub fn new(model: &Model, options: &EngineOptions) -> Result<Engine> {
        let mut params = defaults(sys::llmq_engine_params_init);
        params.backend = match options.backend {
            Backend::Cpu => sys::LLMQ_BACKEND_CPU,
            Backend::Cuda => sys::LLMQ_BACKEND_CUDA,
        };
        params.n_threads = options.n_threads;
        params.kv_cache_bytes = options.kv_cache_bytes;
        params.kv_block_size = options.kv_block_size;
        params.max_batch_tokens = options.max_batch_tokens;
        params.kv_dtype = match options.kv_dtype {
            KvDtype::Auto => sys::LLMQ_KV_DTYPE_AUTO,
            KvDtype::F32 => sys::LLMQ_KV_DTYPE_F32,
            KvDtype::F16 => sys::LLMQ_KV_DTYPE_F16,
            KvDtype::Bf16 => sys::LLMQ_KV_DTYPE_BF16,
            KvDtype::Int8 => sys::LLMQ_KV_DTYPE_INT8,
            KvDtype::Fp8 => sys::LLMQ_KV_DTYPE_FP8,
        };
        params.quant = match options.quant {
            Quant::None => sys::LLMQ_QUANT_NONE,
            Quant::Int8WeightOnly => sys::LLMQ_QUANT_INT8WO,
            Quant::Fp8 => sys::LLMQ_QUANT_FP8,
        };
        params.quantize_lm_head = options.quantize_lm_head as i32;
        let mut raw = ptr::null_mut();
        check(unsafe { sys::llmq_engine_create(model.handle.0.as_ptr(), &params, &mut raw) })?;
        let handle = Arc::new(EngineHandle(
            NonNull::new(raw).expect("llmq_engine_create returned OK and NULL"),
        ));
        Ok(Engine {
            handle,
            model: model.clone(),
        })
    }

    /// The model the engine runs (it keeps it alive).
    pub fn model(&self) -> &Model {
        &self.model
    }

    fn prompt_ids(&self, prompt: Prompt<'_>, add_special: bool) -> Result<Vec<i32>> {
        match prompt {
            Prompt::Text(text) => self.model.tokenize(text, add_special),
            Prompt::Ids(ids) => Ok(ids.to_vec()),
        }
    }

    /// Generates a continuation of `prompt` (text or token ids).
    pub fn generate<'a>(
        &self,
        prompt: impl Into<Prompt<'a>>,
        options: &GenerateOptions,
    ) -> Result<Generation> {
        self.generate_with(prompt, options, |_| ControlFlow::Continue(()))
    }

    /// Like [`Engine::generate`], calling `on_token` for each new token on this thread;
    /// `ControlFlow::Break(())` stops generation (finish reason `Cancelled`). A panic in `on_token`
    /// stops generation and is resumed after the library has returned.
    pub fn generate_with<'a, F>(
        &self,
        prompt: impl Into<Prompt<'a>>,
        options: &GenerateOptions,
        mut on_token: F,
    ) -> Result<Generation>
    where
        F: FnMut(&Token) -> ControlFlow<()>,
    {
        let ids = self.prompt_ids(prompt.into(), options.add_special)?;
        run(&self.handle, &ids, options, &mut on_token)
    }

    /// Generates on a background thread and returns the tokens as an iterator. The engine runs at
    /// its own pace (tokens queue up); dropping the stream, or [`Stream::finish`] before the end,
    /// cancels the generation at its next token.
    pub fn stream<'a>(
        &self,
        prompt: impl Into<Prompt<'a>>,
        options: &GenerateOptions,
    ) -> Result<Stream> {
        let ids = self.prompt_ids(prompt.into(), options.add_special)?;
        let options = options.clone();
        let handle = Arc::clone(&self.handle);
        let (sender, receiver) = mpsc::channel();
        let worker = thread::Builder::new()
            .name("llmq-stream".to_string())
            .spawn(move || {
                let out = run(&handle, &ids, &options, &mut |token: &Token| match sender
                    .send(Ok(token.clone()))
                {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()), // the stream was dropped
                });
                if let Err(error) = &out {
                    let _ = sender.send(Err(error.clone()));
                }
                out
            })
            .map_err(|e| Error {
                status: Status::OutOfMemory,
                message: format!("cannot start a thread: {}", e),
            })?;
        Ok(Stream {
            receiver: Some(receiver),
            worker: Some(worker),
        })
    }

    /// Logits of every position of `ids`, run from position 0: `vocab_size` floats per position;
    /// position p scores the token that follows `ids[..=p]`.
    pub fn score(&self, ids: &[i32]) -> Result<Vec<f32>> {
        let vocab = self.model.info.vocab_size.max(0) as usize;
        let n = ids.len().checked_mul(vocab).ok_or_else(|| {
            Error::invalid_argument(format!("score: {} ids are too many", ids.len()))
        })?;
        check_not_in_own_callback(&self.handle)?;
        let mut logits = vec![0f32; n];
        check(unsafe {
            sys::llmq_score(
                self.handle.0.as_ptr(),
                ids.as_ptr(),
                ids.len(),
                logits.as_mut_ptr(),
                n,
            )
        })?;
        Ok(logits)
    }

    /// The saturation counters of llmq_engine_saturation, one array per layer.
    pub fn saturation(&self, reset: bool) -> Result<Vec<[u64; sys::LLMQ_SATURATION_COUNTERS]>> {
        const K: usize = sys::LLMQ_SATURATION_COUNTERS;
        check_not_in_own_callback(&self.handle)?;
        let mut n = 0usize;
        let status = unsafe {
            sys::llmq_engine_saturation(self.handle.0.as_ptr(), ptr::null_mut(), 0, &mut n, 0)
        };
        if status != sys::LLMQ_ERR_BUFFER_TOO_SMALL {
            check(status)?;
        }
        let mut counts = vec![0u64; n];
        check(unsafe {
            sys::llmq_engine_saturation(
                self.handle.0.as_ptr(),
                counts.as_mut_ptr(),
                n,
                &mut n,
                reset as c_int,
            )
        })?;
        Ok(counts
            .chunks(K)
            .map(|c| {
                let mut row = [0u64; K];
                row.copy_from_slice(c);
                row
            })
            .collect())
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .finish()
    }
}

/// The tokens of a generation running on a background thread ([`Engine::stream`]). Yields
/// `Ok(token)` for each token, then `Err(error)` once if the generation failed.
pub struct Stream {
    receiver: Option<mpsc::Receiver<Result<Token>>>,
    worker: Option<thread::JoinHandle<Result<Generation>>>,
}

impl Iterator for Stream {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Result<Token>> {
        self.receiver.as_ref()?.recv().ok()
    }
}

impl Stream {
    /// Cancels the generation if it is still running and returns its outcome (finish reason
    /// `Cancelled` if it was cut short, with the tokens produced so far).
    pub fn finish(mut self) -> Result<Generation> {
        self.stop().expect("the worker is joined once")
    }

    fn stop(&mut self) -> Option<Result<Generation>> {
        self.receiver = None; // the worker's next send fails: it stops at its next token
        let worker = self.worker.take()?;
        match worker.join() {
            Ok(out) => Some(out),
            Err(payload) => panic::resume_unwind(payload),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !thread::panicking() {
            self.stop();
        }
    }
}
