"""`lmsmith bench serve`: a load generator for any OpenAI-compatible server on this machine.

Closed loop (`concurrency` streams, each sending its next request when the last one finishes) or
open loop (`request_rate` requests per second with Poisson arrivals, optionally capped at
`concurrency` in flight). Prompt and output lengths follow a distribution (fixed, uniform or
normal around a mean). For every request it records time to first token (TTFT), the gaps between
streamed chunks (inter-token latency, ITL), time per output token after the first (TPOT) and the
end-to-end latency; the report gives p50/p90/p99, token throughput and goodput: the rate of
requests that met the SLO (TTFT <= slo_ttft_s and TPOT <= slo_itl_s).

Bounded by construction: at most `num_requests` requests and `duration_s` seconds of sending,
and only to loopback addresses (127.0.0.0/8, ::1, localhost).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import urlsplit

import httpx

# Common English words: most BPE vocabularies have each as one token (with its leading space),
# so a prompt of n words is about n tokens for any model.
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at", "be", "by", "this", "had", "not", "but", "from", "have", "they", "which", "one", "you", "were", "all", "her", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between", "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three"]
Distribution = Literal["fixed", "uniform", "normal"]


@dataclass(frozen=True)
class LengthDist:
    mean: int
    kind: Distribution = "fixed"
    spread: float = 0.0  # uniform: ±spread·mean; normal: std = spread·mean

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise ValueError(f"length mean={self.mean} must be >= 1")
        if self.kind not in ("fixed", "uniform", "normal"):
            raise ValueError(f"length distribution {self.kind!r}; choose fixed, uniform or normal")
        if not 0 <= self.spread <= 1:
            raise ValueError(f"spread={self.spread} must be in [0, 1]")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            value = rng.uniform(self.mean * (1 - self.spread), self.mean * (1 + self.spread))
        elif self.kind == "normal":
            value = rng.gauss(self.mean, self.spread * self.mean)
        else:
            value = self.mean
        return max(1, round(value))


@dataclass(frozen=True)
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model /v1/models lists
    endpoint: Literal["completions", "chat"] = "completions"
    num_requests: int = 64
    concurrency: int | None = 8  # closed loop; with request_rate: the cap on requests in flight
    request_rate: float | None = None  # requests/s, Poisson arrivals (open loop)
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist(32))
    output_len: LengthDist = field(default_factory=lambda: LengthDist(128))
    stream: bool = True
    ignore_eos: bool = True  # generate exactly the sampled output length (servers that support it)
    temperature: float = 0.0
    priority: int | None = None
    api_key: str | None = None
    duration_s: float = 300.0  # no request is sent after this
    request_timeout_s: float = 300.0
    slo_ttft_s: float = 1.0
    slo_itl_s: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        check_loopback(self.url)
        if self.num_requests < 1:
            raise ValueError(f"num_requests={self.num_requests} must be >= 1")
        if self.concurrency is None and self.request_rate is None:
            raise ValueError("set concurrency (closed loop) or request_rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be >= 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request_rate={self.request_rate} must be > 0")
        if not self.duration_s > 0 or not self.request_timeout_s > 0:
            raise ValueError("duration_s and request_timeout_s must be > 0")


def check_loopback(url: str) -> None:
    """ValueError unless url is http(s) on a loopback address: this tool never loads other hosts."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"url {url!r} must start with http:// or https://")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"url host {host!r} is not a loopback address; bench serve only targets "
                         "127.0.0.0/8, ::1 or localhost")


@dataclass
class RequestRecord:
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks that carried text
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    priority: int | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def make_prompt(num_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: list[float]) -> dict[str, float | None]:
    return {"mean": sum(values) / len(values) if values else None, "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99)}


def meets_slo(record: RequestRecord, slo_ttft_s: float, slo_itl_s: float) -> bool:
    if not record.ok or record.ttft_s is None or record.ttft_s > slo_ttft_s:
        return False
    return record.tpot_s is None or record.tpot_s <= slo_itl_s


def build_report(records: list[RequestRecord], duration_s: float, config: BenchConfig) -> dict:
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    good = sum(meets_slo(r, config.slo_ttft_s, config.slo_itl_s) for r in records)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    return {
        "url": config.url, "model": config.model, "endpoint": config.endpoint, "stream": config.stream,
        "concurrency": config.concurrency, "request_rate": config.request_rate,
        "requests": len(records), "succeeded": len(ok), "failed": len(records) - len(ok), "errors": errors,
        "duration_s": duration_s, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_tokens_per_s": output_tokens / duration_s if duration_s else 0.0,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / duration_s if duration_s else 0.0,
        "goodput": good / duration_s if duration_s else 0.0, "slo_attainment": good / len(records),
        "slo": {"ttft_s": config.slo_ttft_s, "itl_s": config.slo_itl_s},
        "ttft_s": summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": summarize([gap for r in ok for gap in r.itl_s]),
        "tpot_s": summarize([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_s": summarize([r.e2e_s for r in ok if r.e2e_s is not None]),
    }


# ============================================================================ sending
def _payload(config: BenchConfig, model: str, prompt: str, max_tokens: int) -> dict:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": config.temperature,
                  "stream": config.stream, "ignore_eos": config.ignore_eos}
    if config.stream:
        body["stream_options"] = {"include_usage": True}
    if config.priority is not None:
        body["priority"] = config.priority
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(event: dict) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def _read_stream(response: httpx.Response, start: float, record: RequestRecord) -> None:
    last, chunks = None, 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error'].get('code') or event['error'].get('message')}")
        now = time.perf_counter()
        if _chunk_text(event):
            chunks += 1
            if last is None:
                record.ttft_s = now - start
            else:
                record.itl_s.append(now - last)
            last = now
        if event.get("usage"):
            record.prompt_tokens = event["usage"].get("prompt_tokens", 0)
            record.output_tokens = event["usage"].get("completion_tokens", 0)
    record.output_tokens = record.output_tokens or chunks


async def send_one(client: httpx.AsyncClient, config: BenchConfig, model: str, prompt: str,
                   max_tokens: int) -> RequestRecord:
    path = "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
    record = RequestRecord(ok=False, priority=config.priority)
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=_payload(config, model, prompt, max_tokens)) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}"
                return record
            if config.stream:
                await _read_stream(response, start, record)
            else:
                _read_body(json.loads(await response.aread()), time.perf_counter() - start, record)
    except (httpx.HTTPError, RuntimeError, ValueError) as err:
        record.error = f"{type(err).__name__}: {err}"[:120]
        return record
    record.e2e_s = time.perf_counter() - start
    record.ok = True
    return record


def _read_body(body: dict, seconds: float, record: RequestRecord) -> None:
    use = body.get("usage") or {}
    record.prompt_tokens = use.get("prompt_tokens", 0)
    record.output_tokens = use.get("completion_tokens", 0)
    record.ttft_s = seconds  # without streaming the first token arrives with the last


def make_client(config: BenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limit = config.concurrency or 256
    # trust_env=False: an HTTP(S)_PROXY in the environment must never redirect benchmark traffic
    return httpx.AsyncClient(base_url=config.url.rstrip("/"), headers=headers, trust_env=False,
                             timeout=httpx.Timeout(config.request_timeout_s, connect=10.0),
                             limits=httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4))


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data:
        raise ValueError("the server lists no models; pass --model")
    return data[0]["id"]


async def run_bench_async(config: BenchConfig) -> dict:
    rng = random.Random(config.seed)
    jobs = [(make_prompt(config.prompt_len.sample(rng), rng), config.output_len.sample(rng))
            for _ in range(config.num_requests)]
    async with make_client(config) as client:
        model = config.model or await first_model(client)
        start = time.perf_counter()
        if config.request_rate is None:
            records = await _closed_loop(client, config, model, jobs, start)
        else:
            records = await _open_loop(client, config, model, jobs, start, rng)
        duration = time.perf_counter() - start
    return build_report(records, duration, replace(config, model=model))


async def _closed_loop(client, config: BenchConfig, model: str, jobs: list, start: float) -> list[RequestRecord]:
    queue = list(reversed(jobs))
    records: list[RequestRecord] = []

    async def worker() -> None:
        while queue and time.perf_counter() - start < config.duration_s:
            prompt, max_tokens = queue.pop()
            records.append(await send_one(client, config, model, prompt, max_tokens))

    await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(jobs)))))
    return records


async def _open_loop(client, config: BenchConfig, model: str, jobs: list, start: float,
                     rng: random.Random) -> list[RequestRecord]:
    gate = asyncio.Semaphore(config.concurrency) if config.concurrency else None

    async def one(prompt: str, max_tokens: int) -> RequestRecord:
        if gate is None:
            return await send_one(client, config, model, prompt, max_tokens)
        async with gate:
            return await send_one(client, config, model, prompt, max_tokens)

    tasks = []
    for prompt, max_tokens in jobs:
        if time.perf_counter() - start >= config.duration_s:
            break
        tasks.append(asyncio.create_task(one(prompt, max_tokens)))
        await asyncio.sleep(rng.expovariate(config.request_rate))
    return list(await asyncio.gather(*tasks))


def run_bench(config: BenchConfig) -> dict:
    return asyncio.run(run_bench_async(config))


# ============================================================================ output
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def format_table(report: dict) -> str:
    """The report as an aligned text table (latencies in ms)."""
    lines = [
        (f"{report['succeeded']}/{report['requests']} requests ok in {report['duration_s']:.2f} s "
        f"({report['endpoint']}, stream={report['stream']}, concurrency={report['concurrency']}, "
        f"rate={report['request_rate'] or 'max'})"),
        (f"throughput: {report['request_throughput']:.2f} req/s, {report['output_tokens_per_s']:.1f} output tok/s, "
        f"{report['total_tokens_per_s']:.1f} total tok/s"),
        (f"goodput: {report['goodput']:.2f} req/s ({report['slo_attainment'] * 100:.0f}% met TTFT <= "
        f"{report['slo']['ttft_s']} s and ITL <= {report['slo']['itl_s']} s)"),
        f"{'metric (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        s = report[key]
        lines.append(f"{label:<14}{_ms(s['mean']):>10}{_ms(s['p50']):>10}{_ms(s['p90']):>10}{_ms(s['p99']):>10}")
    if report["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in report["errors"].items()))
    return "\n".join(lines)


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2)
