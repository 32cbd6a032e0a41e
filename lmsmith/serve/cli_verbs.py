"""The `serve` and `bench` verbs for lmsmith/cli.py: `VERBS = {name: (help, setup_parser, run)}`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# A copy of server.SERVE_QUANT_METHODS (a test keeps them equal): building the CLI parser must stay
# light, and importing server.py loads torch and uvicorn.
SERVE_QUANT_METHODS = ("int8", "int4", "w8a8")
API_KEYS_ENV = "LMSMITH_API_KEYS"  # comma-separated; keeps keys off the command line (and out of `ps`)


def _setup_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="embedded name, GGUF file or model folder "
                                                          "(default: the embedded SmolLM2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], dest="api_keys",
                   help=f"require 'Authorization: Bearer KEY' (repeatable; also ${API_KEYS_ENV}, comma-separated)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    p.add_argument("--max-waiting-requests", type=int, default=256, help="queue bound (beyond it: 429)")
    p.add_argument("--max-waiting-tokens", type=int, default=1 << 20, help="queued tokens bound (beyond it: 429)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: from --kv-cache-mb)")
    p.add_argument("--kv-cache-mb", type=float, default=512.0, dest="kv_cache_memory_mb")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per request")
    p.add_argument("--embedding-model", default=None, help="also serve /v1/embeddings (e.g. minilm-l6)")
    p.add_argument("--classifier-model", default=None, help="also serve /v1/classify (a fine-tuned classifier)")
    p.add_argument("--no-generate", action="store_false", dest="generate",
                   help="serve only the embedding/classifier models")
    p.add_argument("--served-model-name", default=None, help="model id in /v1/models and requests")
    p.add_argument("--replicas", type=int, default=1, help="engine processes behind a least-loaded router")
    p.add_argument("--drain-timeout", type=float, default=30.0, dest="drain_timeout_s",
                   help="on SIGTERM, seconds to let requests in flight finish")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto (a GPU when CUDA is available), cpu, cuda or cuda:N")
    p.add_argument("--quantize", default=None, choices=SERVE_QUANT_METHODS,
                   help="quantize the linear layers at load: int8 / int4 weights, or w8a8 (int8 weights and "
                        "activations); an already quantized lmsmith artifact needs no flag")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def api_keys_from(args_keys: list[str]) -> tuple[str, ...]:
    from_env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return tuple(dict.fromkeys([*args_keys, *from_env]))


def _run_serve(a: argparse.Namespace) -> None:
    import logging

    from .server import serve_options

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = serve_options_from(a)  # a bad value: ValueError, which lmsmith.cli reports as an error
    try:
        serve_options(options)
    except RuntimeError as err:  # loading failed: the server has stopped
        print(f"lmsmith serve: error: {err}", file=sys.stderr)
        sys.exit(1)


def serve_options_from(a: argparse.Namespace):
    from .server import ServeOptions

    return ServeOptions(
        model=a.model, host=a.host, port=a.port, api_keys=api_keys_from(a.api_keys), max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, max_waiting_requests=a.max_waiting_requests,
        max_waiting_tokens=a.max_waiting_tokens, num_kv_blocks=a.num_kv_blocks,
        kv_cache_memory_mb=a.kv_cache_memory_mb, max_model_len=a.max_model_len, embedding_model=a.embedding_model,
        classifier_model=a.classifier_model, generate=a.generate, served_model_name=a.served_model_name,
        replicas=a.replicas, drain_timeout_s=a.drain_timeout_s, max_body_bytes=a.max_body_bytes,
        threads=a.threads, dtype=a.dtype, device=a.device, quantize=a.quantize, log_level=a.log_level)


def _setup_bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_target", required=True)
    s = sub.add_parser("serve", help="load-test an OpenAI-compatible server on this machine")
    s.add_argument("--url", default="http://127.0.0.1:8000", help="base URL (loopback addresses only)")
    s.add_argument("--model", default=None, help="default: the first model the server lists")
    s.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    s.add_argument("--num-requests", type=int, default=64)
    s.add_argument("--concurrency", type=int, default=None, help="closed loop: streams in flight (default 8)")
    s.add_argument("--request-rate", type=float, default=None, help="open loop: requests/s, Poisson arrivals")
    s.add_argument("--prompt-len", type=int, default=32, help="mean prompt length (words ~ tokens)")
    s.add_argument("--output-len", type=int, default=128, help="mean max_tokens")
    s.add_argument("--len-dist", choices=["fixed", "uniform", "normal"], default="fixed")
    s.add_argument("--len-spread", type=float, default=0.0, help="uniform: ±fraction; normal: std/mean")
    s.add_argument("--no-stream", action="store_false", dest="stream")
    s.add_argument("--no-ignore-eos", action="store_false", dest="ignore_eos")
    s.add_argument("--priority", type=int, default=None)
    s.add_argument("--api-key", default=None)
    s.add_argument("--duration", type=float, default=300.0, help="send no request after this many seconds")
    s.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    s.add_argument("--slo-itl", type=float, default=0.2, help="seconds")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, help="also write the report as JSON to this file ('-' = stdout)")


def _run_bench(a: argparse.Namespace) -> None:
    from .bench import BenchConfig, LengthDist, format_table, report_json, run_bench

    concurrency = a.concurrency if a.concurrency is not None or a.request_rate is not None else 8
    config = BenchConfig(
        url=a.url, model=a.model, endpoint=a.endpoint, num_requests=a.num_requests, concurrency=concurrency,
        request_rate=a.request_rate, prompt_len=LengthDist(a.prompt_len, a.len_dist, a.len_spread),
        output_len=LengthDist(a.output_len, a.len_dist, a.len_spread), stream=a.stream, ignore_eos=a.ignore_eos,
        priority=a.priority, api_key=a.api_key or os.environ.get("LMSMITH_API_KEY"), duration_s=a.duration,
        slo_ttft_s=a.slo_ttft, slo_itl_s=a.slo_itl, seed=a.seed)
    report = run_bench(config)
    if a.json == "-":
        print(report_json(report))
        return
    print(format_table(report))
    if a.json:
        Path(a.json).write_text(report_json(report))


VERBS = {
    "serve": ("OpenAI-compatible HTTP server (continuous batching, SSE streaming, metrics)", _setup_serve, _run_serve),
    "bench": ("benchmarks: `bench serve` load-tests an OpenAI-compatible server", _setup_bench, _run_bench),
}
