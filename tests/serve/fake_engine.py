"""A fake AsyncEngine with the real one's interface, for fast and deterministic API tests.

It "generates" a fixed reply (then an end token) one token per `token_delay_s`, holds KV blocks for
each running request (prompt + max_tokens) like a paged engine, bounds its waiting queue, and
supports abort / drain / shutdown / hooks exactly as `lmsmith.serve.engine.AsyncEngine` documents.
Also: a tiny byte-level tokenizer with a ChatML template, and a helper to run an app in uvicorn.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import uvicorn
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from lmsmith.serve.engine import EngineDrainingError, RequestOutput
from lmsmith.serve.kv_blocks import blocks_for_tokens
from lmsmith.serve.request import SamplingParams
from lmsmith.serve.scheduler import QueueFullError
from lmsmith.tokenizer import SpecialTokens, Tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REPLY = "Hello from the fake engine!"


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens + 3 specials (ids 256..258), ChatML template, eos = <|im_end|>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    special = SpecialTokens(bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    return Tokenizer(backend, special, chat_template=CHATML)


@dataclass
class _FakeRequest:
    request_id: str
    prompt_len: int
    params: SamplingParams
    priority: int
    queue: asyncio.Queue
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    blocks: int = 0
    text: str = ""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


class FakeStream:
    """Async iterator over one request's outputs; closing or cancelling it aborts the request."""

    def __init__(self, engine: FakeAsyncEngine, request: _FakeRequest) -> None:
        self.request_id = request.request_id
        self._engine, self._queue, self._done = engine, request.queue, False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            output = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        self._done = output.finished
        return output

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)


class FakeAsyncEngine:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int = 256, num_kv_blocks: int = 64,
                 block_size: int = 16, max_num_seqs: int = 4, max_waiting_requests: int = 8,
                 token_delay_s: float = 0.0, reply: str = REPLY) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.num_kv_blocks, self.block_size = num_kv_blocks, block_size
        self.max_num_seqs, self.max_waiting_requests = max_num_seqs, max_waiting_requests
        self.token_delay_s = token_delay_s
        self.reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        self.eos_id = tokenizer.eos_id
        self.on_output: list = []
        self.on_step: list = []
        self.waiting: deque[_FakeRequest] = deque()
        self.running: dict[str, _FakeRequest] = {}
        self.free_blocks = num_kv_blocks
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "num_preemptions": 0}
        self._task: asyncio.Task | None = None
        self._draining = False
        self.generate_calls = 0

    # -- lifecycle --
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def is_ready(self) -> bool:
        return self._task is not None and not self._draining

    async def drain(self, timeout_s: float) -> int:
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while (self.waiting or self.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        leftover = [r.request_id for r in [*self.waiting, *self.running.values()]]
        for rid in leftover:
            self.abort(rid)
        return len(leftover)

    def shutdown(self) -> None:
        self._draining = True
        for rid in [r.request_id for r in [*self.waiting, *self.running.values()]]:
            self.abort(rid)
        if self._task is not None:
            self._task.cancel()

    # -- requests --
    def generate(self, prompt_token_ids, params: SamplingParams, priority: int = 0, request_id: str | None = None,
                 deadline: float | None = None) -> FakeStream:
        self.generate_calls += 1
        if self._draining:
            raise EngineDrainingError("the engine is shutting down and accepts no new requests")
        n, m = len(prompt_token_ids), params.max_tokens
        if n == 0:
            raise ValueError("prompt_token_ids is empty")
        if n + m > self.max_model_len:
            raise ValueError(f"prompt of {n} tokens + max_tokens={m} = {n + m} tokens exceeds the limit of "
                             f"{self.max_model_len} tokens")
        if len(self.waiting) >= self.max_waiting_requests:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_waiting_requests reached)")
        request = _FakeRequest(request_id or f"req-{uuid.uuid4().hex}", n, params, priority, asyncio.Queue())
        self.waiting.append(request)
        self.counters["prompt_tokens_total"] += n
        return FakeStream(self, request)

    def abort(self, request_id: str) -> bool:
        request = self.running.pop(request_id, None)
        if request is None:
            request = next((r for r in self.waiting if r.request_id == request_id), None)
            if request is None:
                return False
            self.waiting.remove(request)
        self._finish(request, [], "", "abort")
        return True

    def stats(self) -> dict:
        used = self.num_kv_blocks - self.free_blocks
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "kv_blocks_total": self.num_kv_blocks, "kv_blocks_free": self.free_blocks,
                "kv_usage": used / self.num_kv_blocks, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                **self.counters}

    # -- the "model" --
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.token_delay_s)
            start = time.perf_counter()
            self._admit()
            for request in list(self.running.values()):
                self._decode(request)
            for hook in self.on_step:
                hook(self.stats(), time.perf_counter() - start)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            need = blocks_for_tokens(request.prompt_len + request.params.max_tokens, self.block_size)
            if need > self.free_blocks:
                return
            self.waiting.popleft()
            request.blocks, self.free_blocks = need, self.free_blocks - need
            request.first_scheduled_time = request.first_scheduled_time or time.monotonic()
            self.running[request.request_id] = request

    def _decode(self, request: _FakeRequest) -> None:
        step = len(request.output_ids)
        ids = self.reply_ids + [self.eos_id]
        token = ids[step % len(ids)] if request.params.ignore_eos else ids[min(step, len(ids) - 1)]
        request.output_ids.append(token)
        request.first_token_time = request.first_token_time or time.monotonic()
        self.counters["generation_tokens_total"] += 1
        new_text = "" if token == self.eos_id else self.tokenizer.decode([token])
        for stop in request.params.stop:
            if stop in request.text + new_text:
                new_text = (request.text + new_text).split(stop)[0][len(request.text):]
                return self._end(request, [token], new_text, "stop")
        if token == self.eos_id and not request.params.ignore_eos:
            return self._end(request, [token], "", "stop")
        if len(request.output_ids) >= request.params.max_tokens:
            return self._end(request, [token], new_text, "length")
        request.text += new_text
        self._emit(request, [token], new_text, None)

    def _end(self, request: _FakeRequest, ids: list[int], new_text: str, reason: str) -> None:
        del self.running[request.request_id]
        self._finish(request, ids, new_text, reason)

    def _finish(self, request: _FakeRequest, ids: list[int], new_text: str, reason: str) -> None:
        self.free_blocks += request.blocks
        request.blocks = 0
        request.text += new_text
        self._emit(request, ids, new_text, reason)

    def _emit(self, request: _FakeRequest, ids: list[int], new_text: str, reason: str | None) -> None:
        output = RequestOutput(
            request_id=request.request_id, new_token_ids=ids, new_text=new_text, text=request.text,
            finished=reason is not None, finish_reason=reason, prompt_tokens=request.prompt_len,
            completion_tokens=len(request.output_ids), cached_tokens=0, arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time, first_token_time=request.first_token_time,
            finish_time=time.monotonic() if reason else None, priority=request.priority)
        request.queue.put_nowait(output)
        for hook in self.on_output:
            hook(output)


# ============================================================================ live servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, timeout_s: float = 10.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout_s = timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, force: bool = False) -> None:
        """Stop serving; `force` drops open connections at once (like a crash, minus the process)."""
        self.server.should_exit = True
        self.server.force_exit = force
        self.thread.join(self.timeout_s)


@contextlib.contextmanager
def live_server(app, timeout_s: float = 10.0):
    """Run `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    server = LiveServer(app, timeout_s).start()
    try:
        yield server.url
    finally:
        server.stop()


# ============================================================================ as a server process
def main(argv: list[str] | None = None) -> int:
    """`python -m tests.serve.fake_engine --port N`: the API on the fake engine, with SIGTERM drain."""
    import argparse

    from lmsmith.serve.api import APIConfig, Backends, create_app, drain
    from lmsmith.serve.server import run_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--reply", default=REPLY)
    parser.add_argument("--api-key", action="append", default=[])
    a = parser.parse_args(argv)
    tokenizer = byte_tokenizer()
    engine = FakeAsyncEngine(tokenizer, token_delay_s=a.token_delay, reply=a.reply, max_model_len=1024,
                             num_kv_blocks=512)
    app = create_app(Backends(engine=engine, tokenizer=tokenizer, model_name="fake"),
                     APIConfig(api_keys=tuple(a.api_key)))
    run_server(app, "127.0.0.1", a.port, lambda: drain(app, a.drain_timeout), log_level="warning")
    return 0


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll /ready until the models have loaded (the server answers 503 until then)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/ready", trust_env=False).status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.05)


if __name__ == "__main__":
    raise SystemExit(main())

