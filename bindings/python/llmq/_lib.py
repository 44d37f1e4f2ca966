"""The ctypes layer: finds libllmq, checks its ABI version and declares every llmq.h function used.

Nothing here is public API: llmq/__init__.py builds the classes on top of `lib` and `check`.
The structs mirror include/llmq.h field for field (tests/test_llmq.py checks their sizes against
the library's own *_init() functions).
"""

import ctypes
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char, c_char_p, c_double, c_float, c_int, c_int32, c_int64,
                    c_size_t, c_uint32, c_uint64, c_void_p)

ABI_VERSION = 1  # LLMQ_ABI_VERSION of the llmq.h these declarations follow

LIBRARY_NAMES = ("libllmq.so.0", "libllmq.so")  # the SONAME first


class LibraryNotFoundError(ImportError):
    """libllmq could not be found or loaded."""


class AbiMismatchError(ImportError):
    """The libllmq that was found speaks another ABI version than this package."""


def _candidates():
    """(description, path) pairs in search order: LLMQ_LIBRARY, the package folder, the build tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    override = os.environ.get("LLMQ_LIBRARY")
    if override:
        # An explicit choice: no fallback, so that a wrong path is reported rather than hidden.
        return [("LLMQ_LIBRARY", override)]
    found = [("package folder", os.path.join(here, name)) for name in LIBRARY_NAMES]
    # The source checkout: bindings/python/llmq -> <checkout>/build/lib.
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    found += [("build tree", os.path.join(checkout, "build", "lib", name)) for name in LIBRARY_NAMES]
    # Last, the dynamic loader's own search (LD_LIBRARY_PATH, an installed prefix in ld.so.conf).
    found.append(("system loader", LIBRARY_NAMES[0]))
    return found


def _load():
    tried = []
    for where, path in _candidates():
        if where not in ("LLMQ_LIBRARY", "system loader") and not os.path.exists(path):
            tried.append("%s: %s (absent)" % (where, path))
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            tried.append("%s: %s (%s)" % (where, path, e))
    raise LibraryNotFoundError(
        "llmq: libllmq was not found; set LLMQ_LIBRARY to the path of libllmq.so, or build the checkout "
        "(cmake -S . -B build && cmake --build build). Tried:\n  " + "\n  ".join(tried))


lib, path = _load()

try:
    lib.llmq_abi_version.restype = c_uint32
    lib.llmq_abi_version.argtypes = []
except AttributeError:
    raise LibraryNotFoundError("llmq: %s does not export llmq_abi_version: it is not libllmq" % path) from None
_found_abi = lib.llmq_abi_version()
if _found_abi != ABI_VERSION:
    raise AbiMismatchError(
        "llmq: %s has ABI version %d, but this Python package was written for ABI version %d; "
        "use the bindings from the same llmq release as the library" % (path, _found_abi, ABI_VERSION))

# ---- Status codes and enums (llmq.h) ---------------------------------------------------------------
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_IO = 2
ERR_MODEL_FORMAT = 3
ERR_UNSUPPORTED = 4
ERR_OUT_OF_MEMORY = 5
ERR_KV_CACHE_FULL = 6
ERR_BACKEND_UNAVAILABLE = 7
ERR_BUFFER_TOO_SMALL = 8
ERR_CONTEXT_OVERFLOW = 9
ERR_INTERNAL = 10
ERR_DEVICE = 11
ERR_TIMEOUT = 12

BACKENDS = {"cpu": 0, "cuda": 1}
KV_DTYPES = {"auto": 0, "f32": 1, "f16": 2, "bf16": 3, "int8": 4, "fp8": 5}
QUANT_MODES = {"none": 0, "int8wo": 1, "fp8": 2}
FINISH_REASONS = {0: "length", 1: "stop", 2: "cancelled", 3: "context", 4: "error"}
EVENT_TOKEN, EVENT_FINISHED = 0, 1
HISTOGRAM_BUCKETS = 40  # LLMQ_HISTOGRAM_BUCKETS
SEED_RANDOM = 2**64 - 1


# ---- Structs ----------------------------------------------------------------------------------------
class ModelParams(Structure):
    _fields_ = [("struct_size", c_size_t), ("reserved", c_int32)]


class ModelInfo(Structure):
    _fields_ = [("struct_size", c_size_t), ("vocab_size", c_int32), ("hidden_size", c_int32),
                ("num_layers", c_int32), ("num_heads", c_int32), ("num_kv_heads", c_int32),
                ("head_dim", c_int32), ("max_context", c_int32), ("bos_id", c_int32),
                ("num_eos_ids", c_int32), ("eos_ids", c_int32 * 8), ("weight_bytes", c_uint64),
                ("weight_bytes_per_step", c_uint64), ("architecture", c_char * 64)]


class EngineParams(Structure):
    _fields_ = [("struct_size", c_size_t), ("backend", c_int), ("n_threads", c_int32),
                ("kv_cache_bytes", c_uint64), ("kv_block_size", c_int32), ("max_batch_tokens", c_int32),
                ("kv_dtype", c_int), ("quant", c_int), ("quantize_lm_head", c_int32),
                ("tensor_parallel", c_int32), ("n_devices", c_int32), ("devices", c_int32 * 8),
                ("tp_timeout_ms", c_int32), ("comm", c_void_p)]


class SamplingParams(Structure):
    _fields_ = [("struct_size", c_size_t), ("temperature", c_float), ("top_k", c_int32), ("top_p", c_float),
                ("min_p", c_float), ("repetition_penalty", c_float), ("seed", c_uint64)]


# int (*)(int32_t token, const char* text, size_t text_len, void* user_data); text is not
# NUL-terminated, so it is taken as a plain pointer and read with ctypes.string_at.
TOKEN_CALLBACK = CFUNCTYPE(c_int, c_int32, c_void_p, c_size_t, c_void_p)


class GenerateParams(Structure):
    _fields_ = [("struct_size", c_size_t), ("sampling", POINTER(SamplingParams)), ("max_new_tokens", c_int32),
                ("stop_ids", POINTER(c_int32)), ("n_stop_ids", c_size_t), ("ignore_eos", c_int),
                ("on_token", TOKEN_CALLBACK), ("user_data", c_void_p)]


class GenerateResult(Structure):
    _fields_ = [("struct_size", c_size_t), ("finish_reason", c_int), ("n_prompt_tokens", c_int32),
                ("n_generated", c_int32), ("time_to_first_token_s", c_double), ("decode_time_s", c_double)]


# The serving API (llmq_server_*).
class ServerParams(Structure):
    _fields_ = [("struct_size", c_size_t), ("max_batched_tokens", c_int32), ("max_running", c_int32),
                ("prefix_caching", c_int32), ("own_thread", c_int32), ("peak_bandwidth", c_double),
                ("on_event", c_void_p), ("user_data", c_void_p)]


class RequestParams(Structure):
    _fields_ = [("struct_size", c_size_t), ("sampling", POINTER(SamplingParams)), ("max_new_tokens", c_int32),
                ("stop_ids", POINTER(c_int32)), ("n_stop_ids", c_size_t), ("ignore_eos", c_int),
                ("priority", c_int32), ("user_data", c_void_p)]


class Event(Structure):
    _fields_ = [("struct_size", c_size_t), ("type", c_int), ("token", c_int32), ("request_id", c_int64),
                ("user_data", c_void_p), ("text", c_void_p), ("text_len", c_size_t), ("n_generated", c_int32),
                ("finish_reason", c_int), ("status", c_int), ("error", c_char_p), ("n_prompt_tokens", c_int32),
                ("n_cached_tokens", c_int32), ("n_preemptions", c_int32), ("queue_time_s", c_double),
                ("time_to_first_token_s", c_double), ("decode_time_s", c_double)]


class ServerStats(Structure):
    _fields_ = [("struct_size", c_size_t), ("running", c_int32), ("waiting", c_int32),
                ("kv_blocks_total", c_int32), ("kv_blocks_used", c_int32), ("kv_blocks_cached", c_int32),
                ("requests_submitted", c_uint64), ("requests_finished", c_uint64),
                ("requests_cancelled", c_uint64), ("requests_failed", c_uint64), ("prompt_tokens", c_uint64),
                ("generated_tokens", c_uint64), ("cached_prompt_tokens", c_uint64), ("steps", c_uint64),
                ("preemptions", c_uint64), ("peak_bandwidth", c_double), ("last_decode_mbu", c_double),
                ("mean_decode_mbu", c_double), ("ttft_p50_s", c_double), ("ttft_p99_s", c_double),
                ("tpot_p50_s", c_double), ("tpot_p99_s", c_double),
                ("ttft_histogram", c_uint64 * HISTOGRAM_BUCKETS), ("tpot_histogram", c_uint64 * HISTOGRAM_BUCKETS)]


# ---- Functions ------------------------------------------------------------------------------------
def _declare(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_status = c_int
_declare("llmq_version_string", c_char_p)
_declare("llmq_version", None, POINTER(c_int), POINTER(c_int), POINTER(c_int))
_declare("llmq_last_error", c_char_p)
_declare("llmq_status_string", c_char_p, c_int)
_declare("llmq_model_params_init", None, POINTER(ModelParams), c_size_t)
_declare("llmq_model_load", _status, c_char_p, POINTER(ModelParams), POINTER(c_void_p))
_declare("llmq_model_destroy", None, c_void_p)
_declare("llmq_model_get_info", _status, c_void_p, POINTER(ModelInfo))
_declare("llmq_tokenize", _status, c_void_p, c_char_p, c_size_t, c_int, POINTER(c_int32), c_size_t,
         POINTER(c_size_t))
_declare("llmq_detokenize", _status, c_void_p, POINTER(c_int32), c_size_t, c_int, c_void_p, c_size_t,
         POINTER(c_size_t))
_declare("llmq_engine_params_init", None, POINTER(EngineParams), c_size_t)
_declare("llmq_engine_create", _status, c_void_p, POINTER(EngineParams), POINTER(c_void_p))
_declare("llmq_engine_destroy", None, c_void_p)
_declare("llmq_engine_saturation", _status, c_void_p, POINTER(c_uint64), c_size_t, POINTER(c_size_t), c_int)
_declare("llmq_sampling_params_init", None, POINTER(SamplingParams), c_size_t)
_declare("llmq_generate_params_init", None, POINTER(GenerateParams), c_size_t)
_declare("llmq_generate", _status, c_void_p, POINTER(c_int32), c_size_t, POINTER(GenerateParams),
         POINTER(c_int32), c_size_t, POINTER(GenerateResult))
_declare("llmq_score", _status, c_void_p, POINTER(c_int32), c_size_t, POINTER(c_float), c_size_t)

_declare("llmq_server_params_init", None, POINTER(ServerParams), c_size_t)
_declare("llmq_server_create", _status, c_void_p, POINTER(ServerParams), POINTER(c_void_p))
_declare("llmq_server_destroy", None, c_void_p)
_declare("llmq_request_params_init", None, POINTER(RequestParams), c_size_t)
_declare("llmq_server_submit", _status, c_void_p, POINTER(c_int32), c_size_t, POINTER(RequestParams),
         POINTER(c_int64))
_declare("llmq_server_cancel", _status, c_void_p, c_int64)
_declare("llmq_server_poll", _status, c_void_p, POINTER(Event), c_size_t, POINTER(c_size_t), c_int32)
_declare("llmq_server_get_stats", _status, c_void_p, POINTER(ServerStats))
_declare("llmq_histogram_bound", c_double, c_int32)


def defaults(struct_type, init):
    """A struct of struct_type filled by the library's *_init() function `init` (which writes at
    most our sizeof: a library with a larger struct fills only the fields we know)."""
    value = struct_type()
    init(ctypes.byref(value), ctypes.sizeof(struct_type))
    return value


def library_struct_size(init):
    """The library's sizeof of a params struct: what its *_init() function `init` sets struct_size
    to when offered more room than any version of the struct needs."""
    buffer = ctypes.create_string_buffer(4096)
    init(ctypes.cast(buffer, init.argtypes[0]), 4096)
    return c_size_t.from_buffer(buffer).value
