"""Overload (many more concurrent requests than the queue holds) and client disconnects, on the real
engine with a tiny random model behind a live uvicorn server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from lmsmith.serve.api import create_app

from .fake_engine import live_server
from .test_api_openai import real_backends


@pytest.fixture(scope="module")
def server(tiny_chat_folder):
    backends = real_backends(tiny_chat_folder, max_num_seqs=2, max_waiting_requests=4, num_blocks=32)
    with live_server(create_app(backends)) as url:
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield url, backends.engine


def stream_request(max_tokens: int) -> dict:
    return {"prompt": "The quick brown fox", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}


def wait_all_blocks_free(engine, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats()
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
        if idle and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            return stats
        assert time.monotonic() < deadline, f"blocks not freed: {stats}"
        time.sleep(0.02)


async def one_stream(client: httpx.AsyncClient, payload: dict) -> tuple[int, str, dict]:
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        body = (await response.aread()).decode()
        return response.status_code, body, dict(response.headers)


def test_overload_is_answered_with_429s_and_no_crash(server):
    url, engine = server

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False,
                                     limits=httpx.Limits(max_connections=50)) as client:
            return await asyncio.gather(*(one_stream(client, stream_request(6)) for _ in range(40)))

    results = asyncio.run(burst())
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 20  # 2 running + 4 waiting fit at a time
    for status, body, headers in results:
        if status == 429:
            assert '"code":"queue_full"' in body.replace(" ", "") and int(headers["retry-after"]) >= 1
        else:
            assert body.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in body
    wait_all_blocks_free(engine)
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_disconnects_abort_requests_and_free_their_blocks(server):
    url, engine = server
    aborted_before = engine.stats().get("finished_abort_total", 0)

    async def start_and_leave(client: httpx.AsyncClient) -> bool:
        async with client.stream("POST", "/v1/completions", json=stream_request(100)) as response:
            if response.status_code != 200:
                return False
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return True  # leave mid-stream: closing the response drops the connection
        return False

    async def many():
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)  # each close = a real disconnect
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False, limits=limits) as client:
            results = []
            for _ in range(4):
                results += await asyncio.gather(*(start_and_leave(client) for _ in range(5)))
            return results

    started = asyncio.run(many())
    assert sum(started) >= 8
    stats = wait_all_blocks_free(engine)
    assert stats["finished_abort_total"] - aborted_before >= sum(started)


def test_a_non_streaming_client_that_leaves_aborts_its_request(server, monkeypatch):
    url, engine = server
    runner = engine.engine.runner
    execute = runner.execute

    def slow_execute(*args, **kwargs):  # make sure the request is still running when the client leaves
        time.sleep(0.05)
        return execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", slow_execute)
    aborted_before = engine.stats().get("finished_abort_total", 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 100, "ignore_eos": True},
                   timeout=httpx.Timeout(10, read=0.3))
    wait_all_blocks_free(engine)
    assert engine.stats()["finished_abort_total"] == aborted_before + 1
