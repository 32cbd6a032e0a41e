"""Server processes: SIGTERM drain, and replicas behind the least-loaded router (failover, streaming).

Everything listens on 127.0.0.1 only; every subprocess is stopped by the test that started it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lmsmith.serve.api import Backends, create_app
from lmsmith.serve.router import ReplicaPool, RouterConfig, create_router_app

from .fake_engine import REPLY, FakeAsyncEngine, LiveServer, byte_tokenizer, free_port, live_server

ROOT = Path(__file__).resolve().parents[2]


def wait_ready(url: str, timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=1, trust_env=False).status_code == 200:
                return
        assert proc is None or proc.poll() is None, f"server exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{url} never became ready"
        time.sleep(0.05)


def start_fake_server(token_delay: float, drain_timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.serve.fake_engine", "--port", str(port), "--token-delay", str(token_delay),
           "--drain-timeout", str(drain_timeout)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def fake_server_processes(count: int = 1, token_delay: float = 0.02, drain_timeout: float = 10.0):
    """`count` API servers on the fake engine, each its own process (started together: imports are slow)."""
    servers = [start_fake_server(token_delay, drain_timeout) for _ in range(count)]
    try:
        for proc, url in servers:
            wait_ready(url, proc=proc)
        yield servers
    finally:
        for proc, _ in servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


class StreamReader(threading.Thread):
    """Reads one SSE stream in the background; `first_frame` is set when data starts to flow."""

    def __init__(self, url: str, payload: dict, path: str = "/v1/completions") -> None:
        super().__init__(daemon=True)
        self.url, self.payload, self.path = url, payload, path
        self.first_frame = threading.Event()
        self.frames: list = []
        self.status: int | None = None
        self.first_frame_at = self.done_at = None

    def run(self) -> None:
        with httpx.stream("POST", self.url + self.path, json=self.payload, timeout=60, trust_env=False) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    self.frames.append(data if data == "[DONE]" else json.loads(data))
                    if self.first_frame_at is None:
                        self.first_frame_at = time.monotonic()
                    self.first_frame.set()
        self.done_at = time.monotonic()
        self.first_frame.set()

    def text(self) -> str:
        return "".join(f["choices"][0]["text"] for f in self.frames if isinstance(f, dict) and f.get("choices"))

    def finish_reason(self) -> str | None:
        return [f["choices"][0]["finish_reason"] for f in self.frames if isinstance(f, dict) and f.get("choices")][-1]

    def completion_tokens(self) -> int:
        return next(f["usage"]["completion_tokens"] for f in self.frames if isinstance(f, dict) and f.get("usage"))


def long_stream(max_tokens: int) -> dict:
    return {"prompt": "Hi", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}


# ============================================================================ SIGTERM drain
@pytest.mark.slow  # multi-process
def test_sigterm_drains_in_flight_streams_refuses_new_requests_and_exits_0():
    with fake_server_processes(token_delay=0.05) as [(proc, url)]:
        reader = StreamReader(url, long_stream(40))  # ~2 s of tokens
        reader.start()
        assert reader.first_frame.wait(10)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while True:  # the signal is handled asynchronously: new requests turn into 503 within moments
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi"}, trust_env=False)
            if refused.status_code == 503:
                break
            assert time.monotonic() < deadline, refused.status_code
            time.sleep(0.02)
        assert refused.json()["error"]["code"] == "server_draining" and "retry-after" in refused.headers
        reader.join(15)
        assert reader.frames[-1] == "[DONE]" and reader.finish_reason() == "length"
        assert reader.completion_tokens() == 40 and reader.text().startswith(REPLY)
        assert proc.wait(15) == 0


@pytest.mark.slow  # multi-process
def test_drain_timeout_aborts_what_is_left_and_still_exits_0():
    with fake_server_processes(token_delay=0.05, drain_timeout=0.5) as [(proc, url)]:
        reader = StreamReader(url, long_stream(400))  # ~20 s: cannot finish within the drain timeout
        reader.start()
        assert reader.first_frame.wait(10)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - started < 8
        reader.join(5)
        assert reader.frames[-1] == "[DONE]" and reader.frames[-2]["error"]["code"] == "request_aborted"


# ============================================================================ router
def test_pool_picks_the_least_loaded_healthy_replica():
    pool = ReplicaPool(["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"])
    a, b, c = pool.replicas
    assert pool.pick() is None  # nobody has passed a health check yet
    a.healthy = b.healthy = c.healthy = True
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert pool.pick() is b
    b.healthy = False
    assert pool.pick() is c
    assert pool.pick(exclude={c.url}) is a
    a.in_flight = c.in_flight = 0
    assert {pool.pick().url for _ in range(4)} == {a.url, c.url}  # ties go round-robin
    with pytest.raises(ValueError):
        ReplicaPool([])


def fake_app(token_delay: float = 0.02):
    tokenizer = byte_tokenizer()
    engine = FakeAsyncEngine(tokenizer, token_delay_s=token_delay, max_model_len=1024, num_kv_blocks=512)
    return create_app(Backends(engine=engine, tokenizer=tokenizer, model_name="fake"))


@pytest.fixture
def replicas():
    """Two in-process replicas (uvicorn threads on the fake engine): fast to start, and stoppable."""
    servers = [LiveServer(fake_app()).start() for _ in range(2)]
    yield servers
    for server in servers:
        if server.thread.is_alive():
            server.stop(force=True)


def router_for(urls: list[str]):
    return live_server(create_router_app(urls, RouterConfig(health_interval_s=0.1)))


def routed_counts(router_url: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(f"{router_url}/metrics", trust_env=False).text.splitlines():
        if line.startswith("lmsmith:router_requests_total{"):
            replica = line.split('replica="')[1].split('"')[0]
            counts[replica] = float(line.rsplit(" ", 1)[1])
    return counts


def wait_healthy(router: str, expected: list[bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while [r["healthy"] for r in httpx.get(f"{router}/health", trust_env=False).json()["replicas"]] != expected:
        assert time.monotonic() < deadline, f"replica health never became {expected}"
        time.sleep(0.05)


def test_router_spreads_load_and_streams_chunk_by_chunk(replicas):
    url_a, url_b = (r.url for r in replicas)
    with router_for([url_a, url_b]) as router:
        wait_healthy(router, [True, True])
        readers = [StreamReader(router, long_stream(30)) for _ in range(4)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(20)
            assert reader.frames[-1] == "[DONE]" and reader.completion_tokens() == 30
            # chunk by chunk: the first frame arrived well before the ~0.6 s stream ended
            assert reader.done_at - reader.first_frame_at > 0.3
        assert routed_counts(router) == {url_a: 2.0, url_b: 2.0}  # least-loaded: two concurrent streams each
        bad = httpx.post(f"{router}/v1/completions", json={"prompt": "Hi", "temperature": 9}, trust_env=False)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"  # relayed as is
        assert httpx.get(f"{router}/v1/models", trust_env=False).json()["data"][0]["id"] == "fake"


def test_router_fails_over_when_a_replica_goes_away(replicas):
    url_a, url_b = (r.url for r in replicas)
    with router_for([url_a, url_b]) as router:
        wait_healthy(router, [True, True])
        replicas[1].stop(force=True)
        for _ in range(6):  # right away: connection refused → marked down, retried on the live replica
            response = httpx.post(f"{router}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                                  trust_env=False, timeout=30)
            assert response.status_code == 200 and response.json()["choices"][0]["text"] == REPLY[:3]
        wait_healthy(router, [True, False])
        assert routed_counts(router)[url_a] == 6.0
        assert "lmsmith:router_failovers_total" in httpx.get(f"{router}/metrics", trust_env=False).text
        replicas[0].stop(force=True)
        wait_healthy(router, [False, False])
        response = httpx.post(f"{router}/v1/completions", json={"prompt": "Hi"}, trust_env=False)
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_healthy_replica"
        assert httpx.get(f"{router}/ready", trust_env=False).status_code == 503


@pytest.mark.slow  # multi-process
def test_router_survives_a_killed_replica_process():
    with fake_server_processes(2) as [(proc_a, url_a), (_, url_b)], router_for([url_a, url_b]) as router:
        wait_healthy(router, [True, True])
        reader = StreamReader(router, long_stream(400))  # goes to replica a (round-robin starts there)
        reader.start()
        assert reader.first_frame.wait(10)
        proc_a.kill()  # SIGKILL mid-stream
        reader.join(10)
        assert reader.frames[-1] == "[DONE]" and reader.frames[-2]["error"]["code"] == "replica_failed"
        for _ in range(4):
            response = httpx.post(f"{router}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                                  trust_env=False, timeout=30)
            assert response.status_code == 200
        wait_healthy(router, [False, True])


# ============================================================================ serve(replicas=N), real engine
@pytest.mark.slow
def test_serve_with_two_replicas_of_a_real_model(tiny_chat_folder):
    port = free_port()
    code = ("from lmsmith.serve.server import serve; "
            f"serve(model={str(tiny_chat_folder)!r}, port={port}, replicas=2, max_model_len=128, "
            "num_kv_blocks=32, drain_timeout_s=5, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s=60, proc=proc)
        wait_until = time.monotonic() + 30
        while not all(r["healthy"] for r in httpx.get(f"{url}/health").json()["replicas"]):
            assert time.monotonic() < wait_until
            time.sleep(0.1)
        for _ in range(4):
            body = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).json()
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-chat"
        replicas = [r["url"] for r in httpx.get(f"{url}/health").json()["replicas"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for replica in replicas:  # the replicas are gone too
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{replica}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
