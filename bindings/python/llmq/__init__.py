"""llmq for Python: ctypes bindings over the C ABI of libllmq (include/llmq.h).

    import llmq
    with llmq.Model("models/stories260K") as model, llmq.Engine(model) as engine:
        out = engine.generate("Once upon a time", max_tokens=32, temperature=0)
        print(out.text, out.tokens, out.tokens_per_s)
        for token in engine.stream("Once upon a time", max_tokens=32, temperature=0):
            print(token.text, end="", flush=True)

The library is found through LLMQ_LIBRARY, then this package's folder, then the build tree of the
checkout that holds this package, then the dynamic loader (llmq.library_path says which one).
Failed calls raise llmq.Error subclasses that carry the status and llmq_last_error(); wrong Python
types raise TypeError; a closed Model or Engine raises llmq.ClosedError.

Thread safety follows llmq.h: a Model may be used from any number of threads; an Engine too, with
its calls running one at a time. close() waits for the calls in flight on other threads.
"""

import array
import collections
import contextlib
import ctypes
import operator
import os
import queue
import threading
import weakref
from ctypes import byref, c_float, c_int32, c_size_t, c_uint64, c_void_p
from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import _lib
from ._lib import AbiMismatchError, LibraryNotFoundError, lib

__version__ = "0.1.0"
library_path = _lib.path

__all__ = ["Model", "Engine", "Stream", "ModelInfo", "Generation", "Token", "Error", "ClosedError",
           "InvalidArgumentError", "IoError", "ModelFormatError", "UnsupportedError", "OutOfMemoryError",
           "KvCacheFullError", "BackendUnavailableError", "BufferTooSmallError", "ContextOverflowError",
           "InternalError", "DeviceError", "PeerTimeoutError", "LibraryNotFoundError", "AbiMismatchError", "abi_version",
           "library_version", "library_path", "Server", "Request", "RequestResult", "ServerStats"]

_INT32_MAX = 2**31 - 1


def abi_version() -> int:
    """The library's LLMQ_ABI_VERSION (checked at import to be the one this package was written for)."""
    return lib.llmq_abi_version()


def library_version() -> str:
    """The library's version, "MAJOR.MINOR.PATCH"."""
    return lib.llmq_version_string().decode()


# ---- Errors ---------------------------------------------------------------------------------------
class Error(Exception):
    """A failed llmq call. `status` is the llmq_status code (None for errors found before any call),
    `message` is llmq_last_error() or the Python-side explanation."""

    status: Optional[int] = None

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    @property
    def status_name(self) -> Optional[str]:
        return None if self.status is None else lib.llmq_status_string(self.status).decode()

    def __str__(self):
        return self.message if self.status is None else "%s: %s" % (self.status_name, self.message)


class ClosedError(Error, ValueError):
    """The Model, Engine or Stream was closed."""


class InvalidArgumentError(Error, ValueError):
    status = _lib.ERR_INVALID_ARGUMENT


class IoError(Error):
    status = _lib.ERR_IO


class ModelFormatError(Error):
    status = _lib.ERR_MODEL_FORMAT


class UnsupportedError(Error):
    status = _lib.ERR_UNSUPPORTED


class OutOfMemoryError(Error):
    status = _lib.ERR_OUT_OF_MEMORY


class KvCacheFullError(Error):
    status = _lib.ERR_KV_CACHE_FULL


class BackendUnavailableError(Error):
    status = _lib.ERR_BACKEND_UNAVAILABLE


class BufferTooSmallError(Error):
    status = _lib.ERR_BUFFER_TOO_SMALL


class ContextOverflowError(Error):
    status = _lib.ERR_CONTEXT_OVERFLOW


class InternalError(Error):
    status = _lib.ERR_INTERNAL


class DeviceError(Error):
    status = _lib.ERR_DEVICE


class PeerTimeoutError(Error):
    """A tensor-parallel peer did not arrive in time (LLMQ_ERR_TIMEOUT)."""
    status = _lib.ERR_TIMEOUT


_ERRORS = {cls.status: cls for cls in Error.__subclasses__() if cls.status is not None}


def _check(status: int) -> None:
    """Raises the Error subclass for a failed status, with this thread's llmq_last_error()."""
    if status != _lib.OK:
        message = lib.llmq_last_error().decode("utf-8", "replace")
        raise _ERRORS.get(status, Error)(message, status)


# ---- Argument checks --------------------------------------------------------------------------------
def _integer(name, value, low, high):
    if isinstance(value, bool):
        raise TypeError("%s must be an int, not bool" % name)
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError("%s must be an int, not %s" % (name, type(value).__name__)) from None
    if not low <= value <= high:
        raise InvalidArgumentError("%s %d is out of range [%d, %d]" % (name, value, low, high))
    return value


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number, not %s" % (name, type(value).__name__))
    return float(value)


def _choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError("%s must be a str, one of %s" % (name, ", ".join(choices)))
    if value not in choices:
        raise InvalidArgumentError("%s must be one of %s, not %r" % (name, ", ".join(choices), value))
    return choices[value]


def _id_array(name, ids):
    """A ctypes int32 array of token ids, from any iterable of ints (not str or bytes)."""
    if isinstance(ids, (str, bytes, bytearray)):
        raise TypeError("%s must be a sequence of int token ids, not %s" % (name, type(ids).__name__))
    try:
        items = list(ids)
    except TypeError:
        raise TypeError("%s must be a sequence of int token ids, not %s" % (name, type(ids).__name__)) from None
    values = [_integer("token id", v, -2**31, _INT32_MAX) for v in items]
    return (c_int32 * len(values))(*values)


class _Handle:
    """A C handle that several threads may use: close() refuses new calls, waits for those in flight
    and refuses to run inside one of them (it would wait for itself)."""

    def __init__(self, pointer, destroy, what):
        self._pointer = pointer
        self._destroy = destroy
        self._what = what
        self._users = collections.Counter()  # thread id -> calls in flight
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def use(self):
        me = threading.get_ident()
        with self._cond:
            if self._pointer is None:
                raise ClosedError("%s is closed" % self._what)
            self._users[me] += 1
        try:
            yield self._pointer
        finally:
            with self._cond:
                self._users[me] -= 1
                if not self._users[me]:
                    del self._users[me]
                self._cond.notify_all()

    def in_use_here(self):
        return threading.get_ident() in self._users

    @property
    def closed(self):
        return self._pointer is None

    def close(self):
        with self._cond:
            if self._pointer is None:
                return
            if self.in_use_here():
                raise Error("%s cannot be closed from inside one of its own calls (an on_token callback)" % self._what)
            pointer, self._pointer = self._pointer, None
            while self._users:
                self._cond.wait()
        self._destroy(pointer)


class _Closable:
    _handle: _Handle

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def close(self) -> None:
        """Frees the C object; later calls raise ClosedError. Closing twice is a no-op."""
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()


# ---- Model ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    bos_id: int
    eos_ids: Tuple[int, ...]
    weight_bytes: int
    weight_bytes_per_step: int


class Model(_Closable):
    """A loaded Hugging Face model directory (llmq_model_load). Immutable; usable from any thread."""

    def __init__(self, path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError("path must be a str or os.PathLike, not %s" % type(path).__name__)
        encoded = os.fsencode(path)
        if b"\0" in encoded:
            raise InvalidArgumentError("path contains a NUL character")
        pointer = c_void_p()
        _check(lib.llmq_model_load(encoded, None, byref(pointer)))
        self._handle = _Handle(pointer.value, lib.llmq_model_destroy, "the model")
        self.path = os.fsdecode(path)
        raw = _lib.ModelInfo()
        raw.struct_size = ctypes.sizeof(raw)
        with self._handle.use() as p:
            _check(lib.llmq_model_get_info(p, byref(raw)))
        self.info = ModelInfo(raw.architecture.decode(), raw.vocab_size, raw.hidden_size, raw.num_layers,
                              raw.num_heads, raw.num_kv_heads, raw.head_dim, raw.max_context, raw.bos_id,
                              tuple(raw.eos_ids[:raw.num_eos_ids]), raw.weight_bytes, raw.weight_bytes_per_step)

    def tokenize(self, text: str, add_special: bool = True) -> List[int]:
        """Token ids of text; add_special adds BOS (as tokenizer_config.json says)."""
        if not isinstance(text, str):
            raise TypeError("text must be a str, not %s" % type(text).__name__)
        data = text.encode("utf-8")
        n = c_size_t(len(data) + 2)
        with self._handle.use() as p:
            while True:
                ids = (c_int32 * n.value)()
                status = lib.llmq_tokenize(p, data, len(data), int(bool(add_special)), ids, n.value, byref(n))
                if status != _lib.ERR_BUFFER_TOO_SMALL:
                    _check(status)
                    return list(ids[:n.value])

    def detokenize(self, ids, skip_special: bool = True) -> str:
        """The text of token ids; skip_special drops BOS, EOS and the like."""
        id_array = _id_array("ids", ids)
        n = c_size_t(16 * len(id_array) + 16)
        with self._handle.use() as p:
            while True:
                text = ctypes.create_string_buffer(n.value)
                status = lib.llmq_detokenize(p, id_array, len(id_array), int(bool(skip_special)), text, n.value,
                                             byref(n))
                if status != _lib.ERR_BUFFER_TOO_SMALL:
                    _check(status)
                    return text.raw[:n.value].decode("utf-8", "replace")

    def __repr__(self):
        return "llmq.Model(%r%s)" % (self.path, ", closed" if self.closed else "")


# ---- Engine -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    """One generated token: its id and the text it completes ("" inside a multi-byte character)."""
    id: int
    text: str


@dataclass
class Generation:
    """What generate() returns, and Stream.result once a stream has ended."""
    tokens: List[int]
    text: str
    finish_reason: str  # "length", "stop" (EOS or a stop id), "cancelled" or "context"
    n_prompt_tokens: int
    time_to_first_token_s: float
    decode_time_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first per second of decode time (0 if unmeasurable)."""
        if len(self.tokens) < 2 or self.decode_time_s <= 0:
            return 0.0
        return (len(self.tokens) - 1) / self.decode_time_s


class _Request:
    """A generate call's arguments, checked and converted to ctypes on the caller's thread."""

    def __init__(self, prompt_ids, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                 stop_ids, ignore_eos):
        self.prompt = prompt_ids
        self.sampling = _lib.defaults(_lib.SamplingParams, lib.llmq_sampling_params_init)
        self.sampling.temperature = _number("temperature", temperature)
        self.sampling.top_k = _integer("top_k", top_k, 0, _INT32_MAX)
        self.sampling.top_p = _number("top_p", top_p)
        self.sampling.min_p = _number("min_p", min_p)
        self.sampling.repetition_penalty = _number("repetition_penalty", repetition_penalty)
        self.sampling.seed = _lib.SEED_RANDOM if seed is None else _integer("seed", seed, 0, _lib.SEED_RANDOM - 1)
        self.stop_ids = _id_array("stop_ids", stop_ids)
        self.params = _lib.defaults(_lib.GenerateParams, lib.llmq_generate_params_init)
        self.params.sampling = ctypes.pointer(self.sampling)
        self.params.max_new_tokens = _integer("max_tokens", max_tokens, 0, _INT32_MAX)
        self.params.stop_ids = self.stop_ids
        self.params.n_stop_ids = len(self.stop_ids)
        self.params.ignore_eos = int(bool(ignore_eos))


class Engine(_Closable):
    """An inference engine on a Model (llmq_engine_create): backend, KV cache, scratch buffers.

    Calls from several threads are safe and run one at a time (llmq.h). Options left as None keep
    the library's defaults; enums are given by name: backend "cpu" | "cuda", kv_dtype "auto" |
    "f32" | "f16" | "bf16" | "int8" | "fp8", quant "none" | "int8wo" | "fp8".
    """

    def __init__(self, model: Model, *, backend="cpu", n_threads=None, kv_cache_bytes=None, kv_block_size=None,
                 max_batch_tokens=None, kv_dtype="auto", quant="none", quantize_lm_head=False):
        if not isinstance(model, Model):
            raise TypeError("model must be an llmq.Model, not %s" % type(model).__name__)
        params = _lib.defaults(_lib.EngineParams, lib.llmq_engine_params_init)
        params.backend = _choice("backend", backend, _lib.BACKENDS)
        params.kv_dtype = _choice("kv_dtype", kv_dtype, _lib.KV_DTYPES)
        params.quant = _choice("quant", quant, _lib.QUANT_MODES)
        params.quantize_lm_head = int(bool(quantize_lm_head))
        if n_threads is not None:
            params.n_threads = _integer("n_threads", n_threads, -2**31, _INT32_MAX)
        if kv_cache_bytes is not None:
            params.kv_cache_bytes = _integer("kv_cache_bytes", kv_cache_bytes, 0, 2**64 - 1)
        if kv_block_size is not None:
            params.kv_block_size = _integer("kv_block_size", kv_block_size, -2**31, _INT32_MAX)
        if max_batch_tokens is not None:
            params.max_batch_tokens = _integer("max_batch_tokens", max_batch_tokens, -2**31, _INT32_MAX)
        pointer = c_void_p()
        with model._handle.use() as m:
            _check(lib.llmq_engine_create(m, byref(params), byref(pointer)))
        self._handle = _Handle(pointer.value, lib.llmq_engine_destroy, "the engine")
        self.model = model  # tokenizes text prompts; the C engine keeps its own reference to the weights
        self._streams = weakref.WeakSet()

    def close(self) -> None:
        """Cancels this engine's open streams, waits for calls in flight, then frees the engine."""
        for stream in list(self._streams):
            stream.cancel()
        super().close()

    def _prompt_ids(self, prompt, add_special):
        if isinstance(prompt, str):
            return _id_array("prompt", self.model.tokenize(prompt, add_special))
        return _id_array("prompt", prompt)

    def _request(self, prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_ids,
                 ignore_eos, add_special):
        if self._handle.closed:
            raise ClosedError("the engine is closed")
        return _Request(self._prompt_ids(prompt, add_special), max_tokens, temperature, top_k, top_p, min_p,
                        repetition_penalty, seed, stop_ids, ignore_eos)

    def _check_not_in_own_callback(self):
        if self._handle.in_use_here():
            raise Error("the engine was called from inside its own on_token callback; an engine runs one call "
                        "at a time, so this would wait for itself")

    def _run(self, request, on_token):
        """Runs llmq_generate; on_token(Token) -> truthy stops. Returns a Generation."""
        self._check_not_in_own_callback()
        tokens, pieces, raised = [], [], []

        def trampoline(token, text, text_len, _user_data):
            # Runs inside llmq_generate: no exception may unwind into C, so it is kept and re-raised.
            try:
                piece = ctypes.string_at(text, text_len) if text_len else b""
                tokens.append(token)
                pieces.append(piece)
                return 1 if on_token is not None and on_token(Token(token, piece.decode("utf-8", "replace"))) else 0
            except BaseException as e:  # noqa: B036 (KeyboardInterrupt too: stop, then re-raise)
                raised.append(e)
                return 1

        # The C side calls the callback only during llmq_generate: `callback` lives that long.
        callback = _lib.TOKEN_CALLBACK(trampoline)
        request.params.on_token = callback
        result = _lib.GenerateResult()
        result.struct_size = ctypes.sizeof(result)
        with self._handle.use() as p:
            status = lib.llmq_generate(p, request.prompt, len(request.prompt), byref(request.params), None, 0,
                                       byref(result))
        request.params.on_token = _lib.TOKEN_CALLBACK()
        if raised:
            raise raised[0]
        _check(status)
        return Generation(tokens, b"".join(pieces).decode("utf-8", "replace"),
                          _lib.FINISH_REASONS.get(result.finish_reason, str(result.finish_reason)),
                          result.n_prompt_tokens, result.time_to_first_token_s, result.decode_time_s)

    def generate(self, prompt, max_tokens: int = 256, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 stop_ids=(), ignore_eos: bool = False, add_special: bool = True, on_token=None) -> Generation:
        """Generates a continuation of prompt: a str (tokenized with BOS when add_special) or a sequence
        of token ids (used as given). temperature 0 is greedy; seed None draws a random seed.
        on_token(Token), if given, is called for each new token on this thread; a truthy return stops
        generation (finish_reason "cancelled"); an exception it raises stops generation and is re-raised."""
        if on_token is not None and not callable(on_token):
            raise TypeError("on_token must be callable")
        request = self._request(prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                                stop_ids, ignore_eos, add_special)
        return self._run(request, on_token)

    def stream(self, prompt, max_tokens: int = 256, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
               stop_ids=(), ignore_eos: bool = False, add_special: bool = True) -> "Stream":
        """Like generate(), as an iterator of Tokens; generation runs on a background thread.
        Stream.close() (or leaving a `with` block, or close() of the engine) cancels it."""
        request = self._request(prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                                stop_ids, ignore_eos, add_special)
        stream = Stream(self, request)
        self._streams.add(stream)
        return stream

    def score(self, ids) -> List[array.array]:
        """Logits of every position of ids (run from position 0): row p scores the token after ids[:p+1]."""
        self._check_not_in_own_callback()
        id_array = _id_array("ids", ids)
        vocab = self.model.info.vocab_size
        logits = (c_float * (len(id_array) * vocab))()
        with self._handle.use() as p:
            _check(lib.llmq_score(p, id_array, len(id_array), logits, len(logits)))
        flat = array.array("f", bytes(logits))
        return [flat[i * vocab:(i + 1) * vocab] for i in range(len(id_array))]

    def saturation(self, reset: bool = False) -> List[Tuple[int, ...]]:
        """Per layer, the 5 static-scale saturation counters of llmq_engine_saturation."""
        self._check_not_in_own_callback()
        n = c_size_t(0)
        with self._handle.use() as p:
            status = lib.llmq_engine_saturation(p, None, 0, byref(n), 0)
            if status != _lib.ERR_BUFFER_TOO_SMALL:
                _check(status)
            counts = (c_uint64 * n.value)()
            _check(lib.llmq_engine_saturation(p, counts, n.value, byref(n), int(bool(reset))))
        k = 5  # LLMQ_SATURATION_COUNTERS
        return [tuple(counts[i:i + k]) for i in range(0, n.value, k)]

    def __repr__(self):
        return "llmq.Engine(%r%s)" % (self.model, ", closed" if self.closed else "")


_END = object()


class Stream:
    """The Tokens of one generation as an iterator. Generation runs on a background thread; tokens
    queue up as they are produced. `result` holds the Generation once the iterator is exhausted;
    an error of the call is raised from next(). close() cancels the generation (finish_reason
    "cancelled") and waits for the thread."""

    def __init__(self, engine: Engine, request: _Request):
        self.result: Optional[Generation] = None
        self._queue = queue.Queue()
        self._cancelled = threading.Event()
        self._error = None
        self._done = False
        self._thread = threading.Thread(target=self._work, args=(engine, request), daemon=True)
        self._thread.start()

    def _work(self, engine, request):
        try:
            self.result = engine._run(request, self._push)
        except BaseException as e:  # noqa: B036 (handed to the consumer)
            self._error = e
        finally:
            self._queue.put(_END)

    def _push(self, token):
        if self._cancelled.is_set():
            return True
        self._queue.put(token)
        return False

    def __iter__(self):
        return self

    def __next__(self) -> Token:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            self._thread.join()
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def cancel(self) -> None:
        """Asks the generation to stop at its next token; does not wait."""
        self._cancelled.set()

    def close(self) -> Optional[Generation]:
        """Cancels the generation if it is still running, waits for it, and returns `result`
        (None if the call failed)."""
        self.cancel()
        self._thread.join()
        self._done = True
        return self.result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.cancel()


from .serving import Request, RequestResult, Server, ServerStats  # noqa: E402 (built on the classes above)
