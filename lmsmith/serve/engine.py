"""The serving engine: `Engine.step()` = schedule → run the model → record tokens → detokenize.

`Engine` is the synchronous core. `add_request`, `abort` and `stats` may be called from any thread
(they take a lock that `step` holds only around bookkeeping, never around the forward); `step`
itself must always be called from one and the same thread.

`AsyncEngine` runs `Engine.step()` in one background thread (the model is not thread-safe) and
gives an asyncio front for the HTTP server: `generate()` enqueues synchronously (so a full queue or
a bad request raises at the call) and returns a `RequestStream` that yields `RequestOutput`s;
cancelling or closing the stream aborts the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..generation import held_back
from ..tokenizer import StreamDecoder
from .kv_blocks import KVBlockManager, blocks_for_tokens
from .request import FINISH_STATUS_BY_REASON, Request, SamplingParams
from .runner import ModelRunner, _kv_dtype, kv_bytes_per_block
from .scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "EngineDrainingError", "QueueFullError",
           "RequestOutput", "RequestStream"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: as many as kv_cache_memory_mb holds (capped at what can be used)
    kv_cache_memory_mb: float = 512.0
    max_num_seqs: int = 32  # requests running at once
    max_num_batched_tokens: int = 2048  # token budget per step
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1 << 20
    aging_interval_s: float | None = 10.0
    priority_preemption: bool = True
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None  # prompt + output tokens; None = the model's context window

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"EngineConfig.block_size={self.block_size!r} must be an int >= 1")
        blocks = self.num_blocks
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
            raise ValueError(f"EngineConfig.num_blocks={blocks!r} must be None or an int >= 1")
        mb = self.kv_cache_memory_mb
        if not isinstance(mb, (int, float)) or not 0 < mb < math.inf:
            raise ValueError(f"EngineConfig.kv_cache_memory_mb={mb!r} must be a number > 0")
        self.scheduler_config(None)  # validates the scheduler's fields now, not at Engine()

    def scheduler_config(self, max_model_len: int | None) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting_requests=self.max_waiting_requests, max_waiting_tokens=self.max_waiting_tokens,
            enable_chunked_prefill=self.enable_chunked_prefill, aging_interval_s=self.aging_interval_s,
            priority_preemption=self.priority_preemption, max_model_len=max_model_len)


@dataclass
class RequestOutput:
    """What one step did for one request. `text` is everything streamed so far (= the concatenation
    of every `new_text`); text that may be the start of a stop string is held back until it is not."""

    request_id: str
    new_token_ids: list[int]  # includes a final stop token (eos), whose text is not shown
    new_text: str
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (the forward failed) | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache at first admission
    arrival_time: float  # times on the engine clock (time.monotonic by default)
    # first admission to the running batch; kept across preemptions, so arrival → this = queue time
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    priority: int
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None  # with finish_reason "error": what went wrong


@dataclass
class _Tracked:
    """The engine's per-request detokenization state."""

    request: Request
    decoder: StreamDecoder
    text: str = ""  # decoded so far, including held-back text
    sent: int = 0  # characters of `text` already streamed
    cached_tokens: int | None = None


def resolve_num_blocks(config: EngineConfig, model: nn.Module, max_model_len: int) -> int:
    """config.num_blocks, or what the memory budget holds, capped at what max_num_seqs full requests use."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_block = kv_bytes_per_block(model.config, config.block_size, _kv_dtype(model))
    budget = int(config.kv_cache_memory_mb * 2**20) // per_block
    if budget < 1:
        raise ValueError(
            f"kv_cache_memory_mb={config.kv_cache_memory_mb} holds no block of {per_block} bytes")
    return min(budget, config.max_num_seqs * blocks_for_tokens(max_model_len, config.block_size))


def eos_ids_of(tokenizer) -> tuple[int, ...]:
    ids = getattr(tokenizer, "eos_ids", None) or {getattr(tokenizer, "eos_id", None)} - {None}
    return tuple(sorted(ids))


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in text[start:], or None."""
    hits = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


class Engine:
    """Continuous-batching engine over one model (see the module docstring for threading)."""

    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.clock = clock
        context = model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's context of {context}")
        max_len = config.max_model_len or context
        num_blocks = resolve_num_blocks(config, model, max_len)
        self.block_manager = KVBlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config(max_len), self.block_manager)
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = eos_ids_of(tokenizer)
        self._lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}
        self._ready_outputs: list[RequestOutput] = []  # aborted between steps: returned by the next step
        self.counters: Counter[str] = Counter()

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + output) a request may have: model context, config and KV pool."""
        return self.scheduler.max_model_len

    # -- requests in and out (any thread) --

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams | None = None, priority: int = 0,
                    deadline: float | None = None) -> None:
        """Queue a request. ValueError for bad input, QueueFullError when the queue is full.

        deadline: an absolute time on the engine clock (`time.monotonic()`); earlier goes first
        among requests of equal priority.
        """
        params = params or SamplingParams()
        eos = () if params.ignore_eos else self.eos_token_ids
        request = Request(request_id, prompt_token_ids, params, priority=priority, arrival_time=self.clock(),
                          deadline=deadline, eos_token_ids=eos)
        self._check_fits(request)
        decoder = StreamDecoder(self.tokenizer, skip_special_tokens=True)
        with self._lock:
            self.scheduler.add(request)
            self._tracked[request_id] = _Tracked(request, decoder)
            self.counters["num_requests_total"] += 1

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks; its final output comes from the next `step()`.
        False if the request is unknown or already finished."""
        with self._lock:
            return self._abort(request_id, "abort")

    def abort_all(self) -> int:
        with self._lock:
            return sum(self._abort(rid, "abort") for rid in list(self._tracked))

    def unfinished_ids(self) -> list[str]:
        with self._lock:
            return list(self._tracked)

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or bool(self._ready_outputs)

    def stats(self) -> dict:
        with self._lock:
            bm, sched = self.block_manager, self.scheduler
            return {
                "num_running": sched.num_running, "num_waiting": sched.num_waiting,
                "num_waiting_tokens": sched.num_waiting_tokens,
                "kv_blocks_total": bm.num_blocks, "kv_blocks_free": bm.num_free_blocks, "kv_usage": bm.usage,
                "prefix_cache_queries": bm.prefix_cache_queries, "prefix_cache_hits": bm.prefix_cache_hits,
                "num_preemptions": sched.num_preemptions, **{k: self.counters[k] for k in _COUNTERS},
            }

    # -- the step (one thread) --

    def step(self) -> list[RequestOutput]:
        """One engine iteration; outputs for requests that got a token or finished."""
        with self._lock:
            outputs, self._ready_outputs = self._ready_outputs, []
            plan = self.scheduler.schedule(self.clock())
            for rid in plan.finished_ids:
                self.runner.release(rid)
            requests = {s.request_id: self.scheduler.get(s.request_id) for s in plan.scheduled}
            self._note_admissions(requests)
        if plan.is_empty:
            return outputs
        try:
            tokens = self.runner.execute(plan.scheduled, requests)
        except Exception as exc:  # a failed forward ends this step's requests, not the engine
            logger.exception("model forward failed; aborting %d requests", len(plan.scheduled))
            with self._lock:
                return outputs + self._fail(plan, exc)
        with self._lock:
            self.scheduler.update(tokens, self.clock())
            self._count(plan, tokens)
            outputs += [self._postprocess(requests[rid]) for rid in tokens
                        if requests[rid].finish_reason != "abort"]  # aborted while the forward ran
        return outputs

    # -- internals (called with the lock held) --

    def _check_fits(self, request: Request) -> None:
        bad = [t for t in request.prompt_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        limit, n, m = self.max_model_len, request.num_prompt_tokens, request.sampling_params.max_tokens
        if n + m > limit:
            raise ValueError(f"prompt of {n} tokens + max_tokens={m} = {n + m} tokens exceeds the limit of "
                             f"{limit} tokens (context window, max_model_len or KV cache size)")

    def _note_admissions(self, requests: dict[str, Request]) -> None:
        for rid, request in requests.items():
            tracked = self._tracked[rid]
            if tracked.cached_tokens is None:  # first admission
                tracked.cached_tokens = min(request.num_cached_tokens, request.num_prompt_tokens)
                self.counters["prompt_tokens_total"] += request.num_prompt_tokens

    def _count(self, plan: SchedulerOutput, tokens: dict[str, int]) -> None:
        self.counters["num_steps"] += 1
        self.counters["generation_tokens_total"] += len(tokens)
        self.counters["prefill_tokens_total"] += sum(s.num_new_tokens for s in plan.scheduled if s.is_prefill)
        self.counters["batched_tokens_total"] += plan.num_batched_tokens

    def _abort(self, request_id: str, reason: str, error: str | None = None) -> bool:
        if not self.scheduler.abort(request_id, self.clock()):
            return False
        tracked = self._tracked.pop(request_id)
        self.counters[f"finished_{reason}_total"] += 1
        self._ready_outputs.append(self._output(tracked, [], "", reason, error))
        return True

    def _fail(self, plan: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        self.counters["num_failed_steps"] += 1
        for seq in plan.scheduled:
            self._abort(seq.request_id, "error", f"{type(exc).__name__}: {exc}")
        failed, self._ready_outputs = self._ready_outputs, []
        return failed

    def _postprocess(self, request: Request) -> RequestOutput:
        """Detokenize the new token, apply stop strings, and build the output."""
        tracked = self._tracked[request.request_id]
        token = request.output_token_ids[-1]
        if not (request.finish_reason == "stop" and request.stop_reason == token):
            tracked.text += tracked.decoder.push(token)  # a stop token's text is never shown
        if request.is_finished:
            tracked.text += tracked.decoder.flush()
        self._apply_stop_strings(tracked)
        new_text = self._emit(tracked)
        if request.is_finished:
            self._finish(tracked)
        return self._output(tracked, [token], new_text, request.finish_reason)

    def _apply_stop_strings(self, tracked: _Tracked) -> None:
        request, stops = tracked.request, tracked.request.sampling_params.stop
        if not stops:
            return
        longest = max(len(s) for s in stops)
        hit = first_stop(tracked.text, stops, start=max(0, tracked.sent - longest + 1))
        if hit is None:
            return
        cut, stop = hit
        tracked.text = tracked.text[:max(cut, tracked.sent)]
        if not self.scheduler.finish(request.request_id, "stop", stop, self.clock()):
            # finished by length on the same token: the stop string wins, as in lmsmith.generation
            request.status, request.finish_reason = FINISH_STATUS_BY_REASON["stop"], "stop"
            request.stop_reason = stop

    def _emit(self, tracked: _Tracked) -> str:
        text = tracked.text
        safe = len(text) if tracked.request.is_finished else \
            len(text) - held_back(text, tracked.request.sampling_params.stop)
        new_text = text[tracked.sent:max(safe, tracked.sent)]
        tracked.sent += len(new_text)
        return new_text

    def _finish(self, tracked: _Tracked) -> None:
        rid = tracked.request.request_id
        del self._tracked[rid]
        self.runner.release(rid)
        self.counters[f"finished_{tracked.request.finish_reason}_total"] += 1

    def _output(self, tracked: _Tracked, new_ids: list[int], new_text: str, finish_reason: str | None,
                error: str | None = None) -> RequestOutput:
        r = tracked.request
        return RequestOutput(
            request_id=r.request_id, new_token_ids=new_ids, new_text=new_text,
            text=tracked.text[:tracked.sent],
            finished=r.is_finished, finish_reason=finish_reason, prompt_tokens=r.num_prompt_tokens,
            completion_tokens=r.num_output_tokens, cached_tokens=tracked.cached_tokens or 0,
            arrival_time=r.arrival_time, first_scheduled_time=r.first_scheduled_time,
            first_token_time=r.first_token_time, finish_time=r.finish_time,
            priority=r.priority, stop_reason=r.stop_reason, error=error)


_COUNTERS = ("num_requests_total", "prompt_tokens_total", "prefill_tokens_total", "generation_tokens_total",
             "batched_tokens_total", "num_steps", "num_failed_steps", "finished_stop_total",
             "finished_length_total", "finished_abort_total", "finished_error_total")


# ==================================================================== asyncio front


class EngineDrainingError(RuntimeError):
    """The engine is draining or shut down and accepts no new requests (an API maps this to 503)."""


class RequestStream:
    """Async iterator over one request's outputs, ending after the finished one.

    Cancelling the consumer while it waits, `aclose()`, or dropping the stream unfinished aborts the
    request (its KV blocks are freed by the engine thread right after the current step).
    """

    def __init__(self, owner: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self.request_id = request_id
        self._owner = owner
        self._outputs = outputs
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            output = await self._outputs.get()
        except BaseException:  # CancelledError: the client went away
            self._close()
            raise
        if output.finished:
            self._done = True  # the engine thread has already unregistered it
        return output

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._owner._unregister(self.request_id)
            self._owner.abort(self.request_id)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self._owner.abort(self.request_id)  # only enqueues: safe from any thread or the GC


OutputHook = Callable[[RequestOutput], None]
StepHook = Callable[[dict, float], None]


class AsyncEngine:
    """Runs `Engine.step()` in one background thread; asyncio API for the server.

    Hooks (called in the engine thread, before the step's outputs are handed to the streams; keep
    them quick): `on_output(output)` for every output, `on_step(stats, step_seconds)` after every
    step that ran the model or returned outputs. An exception in a hook is logged and ignored.
    """

    def __init__(self, engine: Engine, idle_wait_s: float = 1.0) -> None:
        self.engine = engine
        self.on_output: list[OutputHook] = []
        self.on_step: list[StepHook] = []
        self._idle_wait_s = idle_wait_s
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._draining = False

    # -- lifecycle --

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lmsmith-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def is_ready(self) -> bool:
        """Running and accepting requests."""
        return self.is_running and not self._draining and not self._stopping.is_set()

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting requests, wait up to timeout_s for in-flight ones, abort the rest.
        Returns how many requests were aborted."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.engine.has_unfinished() and loop.time() < deadline and self.is_running:
            await asyncio.sleep(0.02)
        leftover = self.engine.unfinished_ids()
        for rid in leftover:
            self.abort(rid)
        while self.engine.has_unfinished() and self.is_running:  # deliver the abort outputs
            await asyncio.sleep(0.01)
        return len(leftover)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Abort whatever is left, deliver the final outputs and stop the engine thread."""
        self._draining = True
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- requests --

    def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                 priority: int = 0, request_id: str | None = None,
                 deadline: float | None = None) -> RequestStream:
        """Enqueue a request now (raises EngineDrainingError, QueueFullError or ValueError here) and
        return the stream of its outputs. Call from a coroutine: outputs go to the running loop."""
        if self._draining or self._stopping.is_set():
            raise EngineDrainingError("the engine is shutting down and accepts no new requests")
        if not self.is_running:
            raise RuntimeError("AsyncEngine.start() has not been called (or the engine thread died)")
        loop = asyncio.get_running_loop()
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        outputs: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already streaming")
            self._streams[rid] = (loop, outputs)  # before add_request, so no output can miss it
        try:
            self.engine.add_request(rid, prompt_token_ids, params, priority, deadline)
        except BaseException:
            self._unregister(rid)
            raise
        self._wake.set()
        return RequestStream(self, rid, outputs)

    def abort(self, request_id: str) -> None:
        """Abort a request (any thread); the engine thread applies it before its next step."""
        self._aborts.put(request_id)
        self._wake.set()

    def stats(self) -> dict:
        with self._streams_lock:
            num_streams = len(self._streams)
        return {**self.engine.stats(), "num_streams": num_streams, "draining": self._draining}

    def _unregister(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)

    # -- the engine thread --

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before checking for work: a wake-up after this is never lost
            self._apply_aborts()
            if not self.engine.has_unfinished():
                self._wake.wait(self._idle_wait_s)
                continue
            if not self._step():  # nothing could be scheduled: wait instead of spinning
                self._wake.wait(0.01)
        self._apply_aborts()
        self.engine.abort_all()
        self._step()  # delivers the abort outputs

    def _apply_aborts(self) -> None:
        while True:
            try:
                rid = self._aborts.get_nowait()
            except queue.Empty:
                return
            self.engine.abort(rid)

    def _step(self) -> bool:
        """One engine step plus hand-off; True if it ran the model or produced outputs."""
        steps_before = self.engine.counters["num_steps"] + self.engine.counters["num_failed_steps"]
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception:  # a bug outside the forward: end every request rather than hang them
            logger.exception("engine step failed; aborting all requests")
            self.engine.abort_all()
            return True
        seconds = time.perf_counter() - start
        self._call_hooks(outputs, seconds)  # first: metrics are up to date when a client sees an output
        self._deliver(outputs)
        ran = self.engine.counters["num_steps"] + self.engine.counters["num_failed_steps"] > steps_before
        return ran or bool(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._streams_lock:
            for output in outputs:
                # a finished request's stream is done: forget it here, whoever owned it
                get = self._streams.pop if output.finished else self._streams.get
                target = get(output.request_id, None)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], output))
        for loop, items in by_loop.items():  # one hand-off per loop per step, not per output
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                for _, output in items:
                    self._unregister(output.request_id)
                    self.engine.abort(output.request_id)

    def _call_hooks(self, outputs: list[RequestOutput], seconds: float) -> None:
        for hook in self.on_output:
            for output in outputs:
                _safely(hook, output)
        if self.on_step:
            stats = self.engine.stats()
            for hook in self.on_step:
                _safely(hook, stats, seconds)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs, output in items:
        outputs.put_nowait(output)


def _safely(hook: Callable, *args) -> None:
    try:
        hook(*args)
    except Exception:  # a broken metrics hook must not stop serving
        logger.exception("engine hook %r failed", hook)
