"""Serving: lmsmith's server vs `transformers` static batches on the embedded SmolLM2-135M (CPU, fp32).

One command:  python benchmarks/serve.py [--quick] [--concurrency 1 8 32] [--new-tokens 128]

* lmsmith: `serve()` in a subprocess on 127.0.0.1, loaded with `bench serve` (closed loop, streaming)
  at each concurrency: ~29-token prompts, exactly --new-tokens new tokens (ignore_eos).
* transformers: the same model (GGUF dequantized to fp32) generating each wave of requests as one
  static batch with `model.generate`; TTFT, inter-token latency and end-to-end latency come from a
  per-step timestamp, as if the batch were requests that arrived together.
* vLLM (CPU) and llama.cpp's server are measured with `bench serve` when already installed, else
  listed as "not installed" (this benchmark never installs anything).
* Priority: on a server with 4 sequence slots and 8 low-priority streams (4 running, 4 queued), the
  TTFT of a high-priority request against the same request alone and one at the load's priority.

Every server listens on 127.0.0.1 only and every run is bounded in requests and time.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmsmith.serve.bench import (
    BenchConfig,
    LengthDist,
    build_report,
    make_client,
    make_prompt,
    run_bench,
    send_one,
)

PROMPT_WORDS = 29  # one token per word with SmolLM2's tokenizer (the table reports the measured count)
PRIORITY_SEQS, PRIORITY_LOAD = 4, 8  # priority test: 4 running + 4 queued low-priority streams


# ============================================================================ servers
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Until /ready (lmsmith) or /v1/models (peers without /ready) answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        for path in ("/ready", "/v1/models"):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + path, timeout=2, trust_env=False).status_code == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


@contextlib.contextmanager
def running(cmd: list[str], port: int):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def lmsmith_server(port: int, max_num_seqs: int, threads: int | None) -> list[str]:
    args = f"port={port}, max_num_seqs={max_num_seqs}, max_waiting_requests=1024, log_level='warning', " \
           f"drain_timeout_s=5, threads={threads!r}, max_model_len=1024"
    return [sys.executable, "-c", f"from lmsmith.serve.server import serve; serve({args})"]


def peer_servers(port: int, gguf: Path) -> dict[str, list[str] | None]:
    """Launch commands of the peers that are installed (None = not installed)."""
    llama = shutil.which("llama-server")
    vllm = importlib.util.find_spec("vllm") is not None
    return {
        "llama.cpp": [llama, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "32",
                      "-c", "16384"] if llama else None,
        "vLLM (cpu)": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(gguf),
                       "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024"] if vllm else None,
    }


# ============================================================================ measurements
def bench_rows(engine: str, url: str, concurrencies: list[int], new_tokens: int, rounds: int) -> list[dict]:
    rows = []
    for c in concurrencies:
        config = BenchConfig(url=url, num_requests=c * rounds, concurrency=c, prompt_len=LengthDist(PROMPT_WORDS),
                             output_len=LengthDist(new_tokens), duration_s=600, request_timeout_s=600)
        run_bench(BenchConfig(url=url, num_requests=1, concurrency=1, output_len=LengthDist(4)))  # warm-up
        report = run_bench(config)
        rows.append(row_from_report(engine, c, report))
        print(f"  {engine} c={c}: {report['output_tokens_per_s']:.1f} tok/s", flush=True)
    return rows


def row_from_report(engine: str, concurrency: int, report: dict) -> dict:
    ok = report["succeeded"] or 1
    return {"engine": engine, "concurrency": concurrency, "requests": report["requests"],
            "prompt_tokens": report["prompt_tokens"] / ok, "ttft_p50_s": report["ttft_s"]["p50"],
            "ttft_p99_s": report["ttft_s"]["p99"], "itl_p50_s": report["itl_s"]["p50"],
            "e2e_p50_s": report["e2e_s"]["p50"], "output_tok_s": report["output_tokens_per_s"],
            "goodput": report["goodput"], "failed": report["failed"]}


async def _ttft(url: str, priority: int, load: int, load_tokens: int, seed: int) -> float:
    """TTFT of one request of `priority`, sent while `load` low-priority (10) streams run or wait."""
    import random

    rng = random.Random(seed)
    client_config = BenchConfig(url=url, concurrency=load + 1, request_timeout_s=600)
    background_config = BenchConfig(url=url, concurrency=max(load, 1), priority=10, request_timeout_s=600)
    probe_config = BenchConfig(url=url, concurrency=1, priority=priority, request_timeout_s=600)
    async with make_client(client_config) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        background = [asyncio.create_task(send_one(client, background_config, model,
                                                   make_prompt(PROMPT_WORDS, rng), load_tokens))
                      for _ in range(load)]
        if load:
            await asyncio.sleep(1.0)  # the load is running (and queued) before the probe arrives
        probe = await send_one(client, probe_config, model, make_prompt(PROMPT_WORDS, rng), 8)
        for task in background:  # the load has done its job: disconnecting aborts it
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    if not probe.ok:
        raise RuntimeError(f"priority probe failed: {probe.error}")
    return probe.ttft_s


def priority_rows(url: str, load: int, load_tokens: int, repeats: int) -> list[dict]:
    """A request's TTFT alone, and under `load` streams at the load's priority and at a better one.
    At the same priority it queues behind the load (about two waves of `load_tokens` decode steps)."""
    def median_ttft(priority: int, with_load: int) -> float:
        return statistics.median(asyncio.run(_ttft(url, priority, with_load, load_tokens, seed))
                                 for seed in range(repeats))

    rows = [{"case": "alone", "priority": 0, "load_streams": 0, "ttft_s": median_ttft(0, 0)}]
    for name, priority in (("under load, same priority", 10), ("under load, high priority", -10)):
        rows.append({"case": name, "priority": priority, "load_streams": load, "ttft_s": median_ttft(priority, load)})
    return rows


# ---------------------------------------------------------------------------- transformers static batches
def transformers_worker(concurrencies: list[int], new_tokens: int, rounds: int, threads: int | None) -> dict:
    """Load the model once; per concurrency, `rounds` static batches (after one warm-up batch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmsmith.api import resolve

    if threads:
        torch.set_num_threads(threads)
    path = resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return {str(c): static_batches(model, tok, c, new_tokens, rounds) for c in concurrencies}


def static_batches(model, tok, concurrency: int, new_tokens: int, rounds: int) -> dict:
    import random

    import torch
    from transformers import StoppingCriteria

    class Clock(StoppingCriteria):  # called once per generated token (for the whole batch)
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    rng = random.Random(0)
    pad = tok.pad_token_id or tok.eos_token_id
    records, total_s, prompt_tokens = [], 0.0, 0
    for round_index in range(rounds + 1):
        enc = tok([make_prompt(PROMPT_WORDS, rng) for _ in range(concurrency)], return_tensors="pt", padding=True)
        clock = Clock()
        steps = 2 if round_index == 0 else new_tokens  # round 0: a short warm-up at this batch size
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=pad,
                           stopping_criteria=[clock])
        end = time.perf_counter()
        if round_index == 0:
            continue
        total_s += end - start
        prompt_tokens += int(enc["attention_mask"].sum())
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
        records += [{"ttft": clock.times[0] - start, "gaps": gaps, "e2e": end - start}] * concurrency
    return {"records": records, "seconds": total_s, "prompt_tokens": prompt_tokens}


def transformers_rows(concurrencies: list[int], new_tokens: int, rounds: int, threads: int | None) -> list[dict]:
    from lmsmith.serve.bench import RequestRecord

    cmd = [sys.executable, __file__, "--hf-worker", ",".join(map(str, concurrencies)), "--new-tokens",
           str(new_tokens), "--rounds", str(rounds)] + (["--threads", str(threads)] if threads else [])
    results = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    rows = []
    for c in concurrencies:
        out = results[str(c)]
        per_request_prompt = out["prompt_tokens"] // max(len(out["records"]), 1)
        records = [RequestRecord(ok=True, ttft_s=r["ttft"], e2e_s=r["e2e"], itl_s=r["gaps"],
                                 output_tokens=new_tokens, prompt_tokens=per_request_prompt) for r in out["records"]]
        report = build_report(records, out["seconds"], BenchConfig(num_requests=len(records), concurrency=c))
        rows.append(row_from_report("transformers (static batch)", c, report))
        print(f"  transformers c={c}: {report['output_tokens_per_s']:.1f} tok/s", flush=True)
    return rows


# ============================================================================ output
def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def print_table(rows: list[dict]) -> None:
    base = {r["concurrency"]: r["output_tok_s"] for r in rows if r["engine"] == "lmsmith"}
    header = (f"{'engine':<28}{'conc':>5}{'reqs':>6}{'prompt':>7}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}"
              f"{'E2E p50':>9}{'tok/s':>8}{'goodput':>9}{'lmsmith x':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("status"):
            print(f"{r['engine']:<28}{r['status']:>20}")
            continue
        ratio = base.get(r["concurrency"], 0) / r["output_tok_s"] if r["output_tok_s"] else None
        print(f"{r['engine']:<28}{r['concurrency']:>5}{r['requests']:>6}{_fmt(r['prompt_tokens'], 1, 0):>7}"
              f"{_fmt(r['ttft_p50_s'], 1000):>8}ms{_fmt(r['ttft_p99_s'], 1000):>8}ms{_fmt(r['itl_p50_s'], 1000):>7}ms"
              f"{_fmt(r['e2e_p50_s'], 1, 2):>8}s{_fmt(r['output_tok_s']):>8}{_fmt(r['goodput'], 1, 2):>9}"
              f"{_fmt(ratio, 1, 2):>9}x")
    print("TTFT/ITL/E2E: median per request; tok/s: output tokens per second; goodput: requests/s meeting "
          "TTFT <= 1 s and ITL <= 0.2 s; 'lmsmith x' = lmsmith tok/s / this row's tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds (about a minute or two)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="waves of `concurrency` requests per point")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", default=None, help="also write all rows to this file")
    parser.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)  # "1,8,32": run in a subprocess
    a = parser.parse_args()
    if a.hf_worker is not None:
        concurrencies = [int(c) for c in a.hf_worker.split(",")]
        print(json.dumps(transformers_worker(concurrencies, a.new_tokens, a.rounds, a.threads)))
        return
    if a.quick:
        a.new_tokens, a.concurrency = min(a.new_tokens, 32), [c for c in a.concurrency if c <= 8] or [1]
    started = time.perf_counter()
    rows, priority = run_all(a)
    print()
    print_table(rows)
    print(f"\nTTFT of a request while {PRIORITY_LOAD} low-priority (10) streams run or wait "
          f"(server with max_num_seqs={PRIORITY_SEQS}):")
    for r in priority:
        print(f"  {r['case']:<28} priority {r['priority']:>4}: {r['ttft_s'] * 1000:8.1f} ms")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "priority": priority}, indent=2))


def run_all(a) -> tuple[list[dict], list[dict]]:
    from lmsmith.api import resolve

    max_c = max(a.concurrency)
    port = free_port()
    print("lmsmith server ...", flush=True)
    with running(lmsmith_server(port, max(32, max_c), a.threads), port) as url:
        rows = bench_rows("lmsmith", url, a.concurrency, a.new_tokens, a.rounds)
    print("lmsmith server, priority test ...", flush=True)
    with running(lmsmith_server(port, PRIORITY_SEQS, a.threads), port) as url:
        priority = priority_rows(url, PRIORITY_LOAD, min(a.new_tokens, 64), repeats=1 if a.quick else 2)
    if not a.skip_transformers:
        print("transformers ...", flush=True)
        rows += transformers_rows(a.concurrency, a.new_tokens, a.rounds, a.threads)
    for name, cmd in peer_servers(port := free_port(), resolve("smollm2")).items():
        if cmd is None:
            rows.append({"engine": name, "status": "not installed"})
            continue
        print(f"{name} ...", flush=True)
        try:
            with running(cmd, port) as url:
                rows += bench_rows(name, url, a.concurrency, a.new_tokens, a.rounds)
        except (RuntimeError, TimeoutError, subprocess.SubprocessError) as err:
            rows.append({"engine": name, "status": f"failed: {err}"[:40]})
    return rows, priority


if __name__ == "__main__":
    main()
