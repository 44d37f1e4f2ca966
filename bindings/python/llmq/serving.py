"""Serving from Python: many requests at once on one Engine, through llmq_server_* (llmq.h).

    with llmq.Server(engine, prefix_caching=True) as server:
        a = server.submit("Once upon a time", max_tokens=32, temperature=0)
        b = server.submit([1, 403, 407], max_tokens=16, temperature=0.8, seed=7, priority=1)
        for token in a:                  # blocking iteration over a's tokens as they come
            print(token.text, end="")
        print(b.result().tokens)         # blocks until b has finished
        print(await c)                   # in a coroutine: a Request is awaitable
        async for token in c.stream():   # and streams into asyncio

The C server steps on its own thread; a dispatcher thread of this module polls its events
(llmq_server_poll, with the GIL released while it waits) and routes them to Request objects.
submit() and cancel() may be called from any thread, including from asyncio code (neither waits
for a forward pass).
"""

import asyncio
import ctypes
import queue
import threading
from ctypes import byref, c_int64, c_size_t, c_void_p
from dataclasses import dataclass
from typing import Dict, List, Optional

from . import _lib
from ._lib import lib

_END = object()


def _package():
    """The llmq package (its checks, errors and Engine); imported late, as llmq imports this module."""
    import llmq
    return llmq


@dataclass
class RequestResult:
    """How a served request ended: what generate() returns, plus the serving timings."""
    tokens: List[int]
    text: str
    finish_reason: str  # "length", "stop", "cancelled" or "error"
    n_prompt_tokens: int
    n_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    n_preemptions: int
    queue_time_s: float
    time_to_first_token_s: float
    decode_time_s: float


@dataclass(frozen=True)
class ServerStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    requests_submitted: int
    requests_finished: int
    requests_cancelled: int
    requests_failed: int
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int
    steps: int
    preemptions: int
    peak_bandwidth: float
    last_decode_mbu: float
    mean_decode_mbu: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    ttft_histogram: tuple
    tpot_histogram: tuple


class Request:
    """One submitted request. Iterate it for its Tokens (blocking), call result() for the end, or
    await it (and `async for` over stream()) in asyncio. cancel() asks the server to stop it."""

    def __init__(self, server: "Server", request_id: int):
        self.id = request_id
        self._server = server
        self._lock = threading.Lock()
        self._tokens: List = []
        self._queue = queue.Queue()
        self._done = threading.Event()
        self._result: Optional[RequestResult] = None
        self._error = None
        self._async_waiters = []  # (loop, future)
        self._async_queues = []   # (loop, asyncio.Queue)

    # -- fed by the dispatcher thread --
    def _push(self, token):
        with self._lock:
            self._tokens.append(token)
            queues = list(self._async_queues)
        self._queue.put(token)
        for loop, q in queues:
            loop.call_soon_threadsafe(q.put_nowait, token)

    def _finish(self, result, error):
        with self._lock:
            self._result, self._error = result, error
            waiters, queues = list(self._async_waiters), list(self._async_queues)
            self._async_waiters.clear()
        self._done.set()
        self._queue.put(_END)
        for loop, future in waiters:
            loop.call_soon_threadsafe(_settle, future, result, error)
        for loop, q in queues:
            loop.call_soon_threadsafe(q.put_nowait, _END)

    # -- blocking use --
    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _END:
                self._queue.put(_END)  # later iterations end at once too
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: Optional[float] = None) -> RequestResult:
        """Waits for the end (timeout in seconds; TimeoutError when it passes) and returns the
        RequestResult; a request that failed raises its llmq.Error."""
        if not self._done.wait(timeout):
            raise TimeoutError("request %d has not finished after %s s" % (self.id, timeout))
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> bool:
        """Asks the server to end the request (finish_reason "cancelled"). False when it has
        finished already."""
        return self._server._cancel(self)

    # -- asyncio --
    def __await__(self):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if not self._done.is_set():
                self._async_waiters.append((loop, future))
                pending = True
            else:
                pending = False
        if not pending:
            _settle(future, self._result, self._error)
        return future.__await__()

    async def stream(self):
        """The request's Tokens as an async iterator (from the first one, whenever it is called)."""
        loop = asyncio.get_running_loop()
        q = asyncio.Queue()
        with self._lock:
            for token in self._tokens:
                q.put_nowait(token)
            if self._done.is_set():
                q.put_nowait(_END)
            else:
                self._async_queues.append((loop, q))
        while True:
            item = await q.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def __repr__(self):
        return "llmq.Request(%d%s)" % (self.id, ", done" if self.done else "")


def _settle(future, result, error):
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Server:
    """A continuous-batching server on an Engine (llmq_server_create): requests run together,
    decode and prefill chunks mixed under a token budget, preempted and recomputed when the KV
    cache runs out, optionally reusing the KV of shared prompt prefixes. Each request produces the
    tokens it would produce alone. close() (or leaving a `with` block) stops the server; requests
    still running end with llmq.ClosedError."""

    def __init__(self, engine, *, max_batched_tokens: int = 0, max_running: int = 64, prefix_caching: bool = False,
                 peak_bandwidth: float = 0.0):
        pkg = _package()
        if not isinstance(engine, pkg.Engine):
            raise TypeError("engine must be an llmq.Engine, not %s" % type(engine).__name__)
        params = _lib.defaults(_lib.ServerParams, lib.llmq_server_params_init)
        params.max_batched_tokens = pkg._integer("max_batched_tokens", max_batched_tokens, -2**31, 2**31 - 1)
        params.max_running = pkg._integer("max_running", max_running, -2**31, 2**31 - 1)
        params.prefix_caching = int(bool(prefix_caching))
        params.own_thread = 1
        params.peak_bandwidth = pkg._number("peak_bandwidth", peak_bandwidth)
        pointer = c_void_p()
        with engine._handle.use() as e:
            pkg._check(lib.llmq_server_create(e, byref(params), byref(pointer)))
        self._handle = pkg._Handle(pointer.value, self._destroy, "the server")
        self.engine = engine
        self._requests: Dict[int, Request] = {}
        self._lock = threading.Lock()  # submit and the dispatcher agree on _requests
        self._stop = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch, name="llmq-server-events", daemon=True)
        self._dispatcher.start()

    # -- requests --
    def submit(self, prompt, max_tokens: int = 256, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
               stop_ids=(), ignore_eos: bool = False, add_special: bool = True, priority: int = 0) -> Request:
        """Queues a request (arguments as Engine.generate, plus priority: higher runs first) and
        returns its Request at once. Bad input raises here: an empty prompt, an id out of range,
        max_tokens beyond the context, contradictory sampling params."""
        pkg = _package()
        if self._handle.closed:
            raise pkg.ClosedError("the server is closed")
        # The engine handle may be closed already: the C server keeps what it needs of the engine.
        args = pkg._Request(self.engine._prompt_ids(prompt, add_special), max_tokens, temperature, top_k, top_p,
                            min_p, repetition_penalty, seed, stop_ids, ignore_eos)
        params = _lib.defaults(_lib.RequestParams, lib.llmq_request_params_init)
        params.sampling = ctypes.pointer(args.sampling)
        params.max_new_tokens = args.params.max_new_tokens
        params.stop_ids = args.stop_ids
        params.n_stop_ids = len(args.stop_ids)
        params.ignore_eos = args.params.ignore_eos
        params.priority = pkg._integer("priority", priority, -2**31, 2**31 - 1)
        request_id = c_int64()
        with self._handle.use() as s, self._lock:
            # Under the lock: the dispatcher cannot see this id's events before it is registered.
            pkg._check(lib.llmq_server_submit(s, args.prompt, len(args.prompt), byref(params), byref(request_id)))
            request = Request(self, request_id.value)
            self._requests[request.id] = request
        return request

    def _cancel(self, request: Request) -> bool:
        with self._handle.use() as s:
            status = lib.llmq_server_cancel(s, request.id)
        if status == _lib.ERR_INVALID_ARGUMENT and request.done:
            return False
        _package()._check(status)
        return True

    def stats(self) -> ServerStats:
        """llmq_server_get_stats: counters, KV blocks, TTFT/TPOT percentiles and histograms, MBU."""
        raw = _lib.ServerStats()
        raw.struct_size = ctypes.sizeof(raw)
        with self._handle.use() as s:
            _package()._check(lib.llmq_server_get_stats(s, byref(raw)))
        values = {}
        for name, _ in _lib.ServerStats._fields_[1:]:
            value = getattr(raw, name)
            values[name] = tuple(value) if name.endswith("histogram") else value
        return ServerStats(**values)

    # -- events --
    def _dispatch(self):
        pkg = _package()
        events = (_lib.Event * 64)()
        events[0].struct_size = ctypes.sizeof(_lib.Event)
        n = c_size_t(0)
        texts: Dict[int, List[bytes]] = {}
        while not self._stop.is_set():
            with self._handle.use() as s:
                status = lib.llmq_server_poll(s, events, len(events), byref(n), 50)
            if status != _lib.OK:
                return
            for i in range(n.value):
                e = events[i]
                with self._lock:
                    request = self._requests.get(e.request_id)
                if request is None:
                    continue
                if e.type == _lib.EVENT_TOKEN:
                    piece = ctypes.string_at(e.text, e.text_len) if e.text_len else b""
                    texts.setdefault(e.request_id, []).append(piece)
                    request._push(pkg.Token(e.token, piece.decode("utf-8", "replace")))
                    continue
                pieces = texts.pop(e.request_id, [])
                with self._lock:
                    del self._requests[e.request_id]
                error = None
                if e.status != _lib.OK:
                    error = pkg._ERRORS.get(e.status, pkg.Error)((e.error or b"").decode("utf-8", "replace"), e.status)
                result = RequestResult([t.id for t in request._tokens], b"".join(pieces).decode("utf-8", "replace"),
                                       _lib.FINISH_REASONS.get(e.finish_reason, str(e.finish_reason)),
                                       e.n_prompt_tokens, e.n_cached_tokens, e.n_preemptions, e.queue_time_s,
                                       e.time_to_first_token_s, e.decode_time_s)
                request._finish(result, error)

    # -- lifetime --
    def _destroy(self, pointer):
        lib.llmq_server_destroy(pointer)

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def close(self) -> None:
        """Stops the server; requests not finished end with llmq.ClosedError. Closing twice is a no-op."""
        if self._handle.closed:
            return
        self._stop.set()
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join()
        self._handle.close()
        with self._lock:
            left, self._requests = list(self._requests.values()), {}
        for request in left:
            request._finish(None, _package().ClosedError("the server was closed before request %d finished" % request.id))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: interpreter shutdown
            pass

    def __repr__(self):
        return "llmq.Server(%r%s)" % (self.engine, ", closed" if self.closed else "")
