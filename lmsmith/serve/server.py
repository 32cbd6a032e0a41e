"""`serve(...)`: run the OpenAI-compatible server with uvicorn, one process or N replicas + a router.

* The models load in a background thread after the socket is listening: /health answers at once,
  /ready is 503 until the engine runs.
* SIGTERM (or Ctrl-C) drains: new requests get 503, requests in flight finish (up to
  `drain_timeout_s`, then they are aborted), and the process exits with status 0. A second signal
  exits at once.
* `replicas=N > 1` starts N engine servers as child processes on free loopback ports (each with
  1/N of the CPU threads) behind a router (see router.py) on host:port. The replicas watch their
  parent and exit if it dies; on SIGTERM the router drains, then stops them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import uvicorn

from ..compress.quantize import LOAD_TIME_METHODS
from .api import APIConfig, Backends, create_app, drain
from .router import RouterConfig, create_router_app, drain_router

logger = logging.getLogger(__name__)
REPLICA_OPTIONS_ENV = "LMSMITH_REPLICA_OPTIONS"  # options reach a replica by environment, keys stay out of `ps`
PARENT_PID_ENV = "LMSMITH_PARENT_PID"
# GPTQ needs calibration data: quantize with `lmsmith compress` and serve the saved artifact instead.
SERVE_QUANT_METHODS = LOAD_TIME_METHODS
INT4_GROUP_PREFERENCE = (64, 32, 128, 256)  # 64: lmsmith.compress's default; the rest: what the kernels accept


@dataclass(frozen=True)
class ServeOptions:
    model: str | None = None  # embedded name, GGUF file or model folder; None = embedded SmolLM2
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int = 256
    max_waiting_tokens: int = 1 << 20
    num_kv_blocks: int | None = None  # None: what kv_cache_memory_mb holds
    kv_cache_memory_mb: float = 512.0
    max_model_len: int | None = None
    embedding_model: str | None = None  # e.g. "minilm-l6"
    classifier_model: str | None = None  # a fine-tuned sequence-classification model
    generate: bool = True  # False: host only the encoder models
    served_model_name: str | None = None
    replicas: int = 1
    drain_timeout_s: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024
    threads: int | None = None  # torch CPU threads per process; None = torch's default (split over replicas)
    dtype: str | None = None
    device: str = "auto"  # auto: a GPU when CUDA is available, else the CPU
    quantize: str | None = None  # one of SERVE_QUANT_METHODS: quantize the linear layers at load
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("replicas", "max_num_seqs", "max_num_batched_tokens", "max_waiting_requests",
                     "max_waiting_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s={self.drain_timeout_s} must be >= 0")
        if self.quantize is not None and self.quantize not in SERVE_QUANT_METHODS:
            raise ValueError(f"quantize={self.quantize!r} is not supported; allowed: "
                             f"{', '.join(SERVE_QUANT_METHODS)} (GPTQ needs calibration data: quantize with "
                             "`lmsmith compress` and serve the saved artifact)")
        from ..api import resolve_device

        resolve_device(self.device)  # an unknown or missing device fails here, before the server starts
        if not self.generate and not (self.embedding_model or self.classifier_model):
            raise ValueError("generate=False needs an embedding_model or a classifier_model to serve")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_keys: tuple[str, ...] = (),
          max_num_seqs: int = 32, max_num_batched_tokens: int = 2048, max_waiting_requests: int = 256,
          max_waiting_tokens: int = 1 << 20, num_kv_blocks: int | None = None, embedding_model: str | None = None,
          classifier_model: str | None = None, replicas: int = 1, drain_timeout_s: float = 30.0,
          quantize: str | None = None, **more) -> None:
    """Serve `model` (default: the embedded SmolLM2) over HTTP until SIGTERM/SIGINT; see ServeOptions.

    quantize: "int8", "int4" or "w8a8" quantizes the linear layers as the model loads (ValueError for
    anything else); a quantized lmsmith artifact is served as saved, without it."""
    options = ServeOptions(model=model, host=host, port=port, api_keys=tuple(api_keys), max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, max_waiting_requests=max_waiting_requests,
                           max_waiting_tokens=max_waiting_tokens, num_kv_blocks=num_kv_blocks,
                           embedding_model=embedding_model, classifier_model=classifier_model, replicas=replicas,
                           drain_timeout_s=drain_timeout_s, quantize=quantize, **more)
    serve_options(options)


def serve_options(options: ServeOptions) -> None:
    """Serve until drained by a signal; RuntimeError if the models failed to load."""
    if options.replicas > 1:
        return serve_replicated(options)
    error = serve_one(options)
    if error is not None:
        raise RuntimeError(f"the server stopped: model loading failed ({error})")


def serve_one(options: ServeOptions, parent_pid: int | None = None) -> str | None:
    """One API server process; returns the loading error if it stopped because loading failed."""
    if options.threads:
        import torch
        torch.set_num_threads(options.threads)
    app = create_app(lambda: build_backends(options), api_config(options))
    state = app.state.lmsmith
    failed = run_server(app, options.host, options.port, lambda: drain(app, options.drain_timeout_s),
                        options.log_level, is_failed=lambda: state.phase == "failed", parent_pid=parent_pid)
    return state.error if failed else None


def api_config(options: ServeOptions) -> APIConfig:
    return APIConfig(api_keys=options.api_keys, max_body_bytes=options.max_body_bytes)


# ============================================================================ loading
def build_backends(options: ServeOptions) -> Backends:
    """Load the models named in options (slow: runs in the server's loader thread)."""
    engine = tokenizer = name = None
    aliases: tuple[str, ...] = ()
    if options.generate:
        engine, tokenizer = build_engine(options)
        name, aliases = model_names(options.model, options.served_model_name)
    return Backends(engine=engine, tokenizer=tokenizer, model_name=name, aliases=aliases,
                    embedder=load_embedder(options.embedding_model, options.device) if options.embedding_model else None,
                    classifier=load_classifier(options.classifier_model, options.device) if options.classifier_model else None)


def build_engine(options: ServeOptions):
    from ..api import load
    from .engine import AsyncEngine, Engine, EngineConfig

    model, tokenizer = load(options.model, dtype=options.dtype, device=options.device)
    if tokenizer is None:
        raise ValueError(f"{options.model}: a generative model needs a tokenizer (none found next to it)")
    if options.quantize:
        quantize_for_serving(model, options.quantize)  # before the engine: its runner packs plain nn.Linear
    config = EngineConfig(
        num_blocks=options.num_kv_blocks, kv_cache_memory_mb=options.kv_cache_memory_mb,
        max_num_seqs=options.max_num_seqs, max_num_batched_tokens=options.max_num_batched_tokens,
        max_waiting_requests=options.max_waiting_requests, max_waiting_tokens=options.max_waiting_tokens,
        max_model_len=options.max_model_len)
    return AsyncEngine(Engine(model, tokenizer, config)), tokenizer


def quantize_for_serving(model, method: str) -> None:
    """Quantize the model's linear layers in place, with the settings that measured best without
    calibration data (perplexity of SmolLM2-135M on the held-out text, docs/benchmarks.md):

    * int8: every linear and the output head (tied: the embedding too) in int8: x1.000. The head is
      the largest single matrix a decode step reads: 6.9 ms fp32 vs 1.1 ms int8 at one row.
    * int4: groups of 64 with each group's range searched (clip search), the head in int8:
      x1.26 (plain round-to-nearest: x1.37). GPTQ with calibration does better (x1.05): run
      `lmsmith compress` and serve its artifact.
    * w8a8: the linears (x1.11), the head in int8 (weight-only: no activation rounding there).
      SmoothQuant needs calibration, so for quality serve the artifact of
      `lmsmith compress compress-smollm2-w8a8` (x1.04) instead.
    """
    from ..compress.quantize import DEFAULT_EXCLUDE, quantize_model, select_linear_layers

    existing = getattr(model, "quantization_config", None)
    if existing is not None:
        raise ValueError(f"the model is already quantized ({existing.method}); serve it without quantize")
    options = {"group_size": 64}
    if method == "int4":
        options["group_size"] = int4_group_size([model.get_submodule(name).in_features
                                                 for name in select_linear_layers(model, exclude=DEFAULT_EXCLUDE)])
        options["clip_search"] = True
    if hasattr(model, "lm_head"):
        options.update(include_lm_head=True, lm_head_method="int8")
    quantize_model(model, method, **options)
    logger.info("quantized %d linear layers to %s", len(model.quantization_config.modules), method)


def int4_group_size(in_features: list[int]) -> int:
    """The preferred int4 group size that divides every layer's input width."""
    for size in INT4_GROUP_PREFERENCE:
        if all(n % size == 0 for n in in_features):
            return size
    raise ValueError(f"int4 needs input widths divisible by one of {sorted(INT4_GROUP_PREFERENCE)}; "
                     f"this model has {sorted(set(in_features))}: use int8 or w8a8")


def model_names(model: str | None, served_name: str | None) -> tuple[str, tuple[str, ...]]:
    """The id /v1/models shows and the other names requests may use for the same model."""
    from ..embedded import DEFAULT_MODEL, find_asset

    given = model or DEFAULT_MODEL
    asset = find_asset(given)
    canonical = asset.name if asset else os.path.basename(os.path.normpath(given))
    others = {given, *(asset.aliases if asset else ()), canonical}
    name = served_name or canonical
    return name, tuple(sorted(others - {name}))


def load_embedder(name: str, device: str = "cpu"):
    from ..api import load
    from .encoders import Embedder

    model, tokenizer = load(name, task="base", device=device)
    if tokenizer is None:
        raise ValueError(f"embedding model {name!r} has no tokenizer")
    return Embedder(model, tokenizer, _display_name(name))


def load_classifier(name: str, device: str = "cpu"):
    from ..api import load
    from .encoders import Classifier

    model, tokenizer = load(name, device=device)
    if tokenizer is None:
        raise ValueError(f"classifier {name!r} has no tokenizer")
    return Classifier(model, tokenizer, _display_name(name))


def _display_name(name: str) -> str:
    from ..embedded import find_asset

    asset = find_asset(name)
    return asset.name if asset else os.path.basename(os.path.normpath(name))


# ============================================================================ uvicorn with drain
class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains (via `drain()`) before shutting down,
    and the process then exits normally (status 0) instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]],
                 is_failed: Callable[[], bool] = lambda: False, parent_pid: int | None = None) -> None:
        super().__init__(config)
        self._drain = drain
        self._is_failed = is_failed
        self._parent_pid = parent_pid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self.failed = False

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_task is not None or self._loop is None:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        logger.info("signal %d: draining (up to the drain timeout), then exiting", sig)
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:
            logger.exception("draining failed; exiting anyway")
        finally:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._is_failed() and not self.should_exit:
            logger.error("model loading failed; exiting")
            self.failed = self.should_exit = True
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            self._begin_drain_once("parent process died")
        return await super().on_tick(counter)

    def _begin_drain_once(self, reason: str) -> None:
        if self._drain_task is None:
            logger.warning("%s: draining and exiting", reason)
            self._begin_drain()


def run_server(app, host: str, port: int, drain_fn: Callable[[], Awaitable[None]], log_level: str = "info",
               is_failed: Callable[[], bool] = lambda: False, parent_pid: int | None = None) -> bool:
    """Serve `app` until a signal has drained it. Returns True if it stopped because loading failed."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, drain_fn, is_failed, parent_pid)
    server.run()
    return server.failed


# ============================================================================ replicas
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_options(options: ServeOptions, port: int) -> ServeOptions:
    threads = options.threads or max(1, (os.cpu_count() or 1) // options.replicas)
    return dataclasses.replace(options, host="127.0.0.1", port=port, replicas=1, threads=threads)


def start_replica(options: ServeOptions) -> subprocess.Popen:
    env = {**os.environ, REPLICA_OPTIONS_ENV: json.dumps(dataclasses.asdict(options)),
           PARENT_PID_ENV: str(os.getpid())}
    # Own session: a Ctrl-C in the terminal reaches only the router, which then stops the replicas in order.
    return subprocess.Popen([sys.executable, "-m", "lmsmith.serve.server"], env=env, start_new_session=True)


def stop_replicas(processes: list[subprocess.Popen], timeout_s: float) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_replicated(options: ServeOptions) -> None:
    """N replica processes on free loopback ports behind a least-loaded router on host:port."""
    ports = [free_port() for _ in range(options.replicas)]
    processes = [start_replica(replica_options(options, port)) for port in ports]
    logger.info("started %d replicas on ports %s", len(ports), ports)
    app = create_router_app([f"http://127.0.0.1:{port}" for port in ports],
                            RouterConfig(max_body_bytes=options.max_body_bytes))
    try:
        run_server(app, options.host, options.port, lambda: drain_router(app, options.drain_timeout_s),
                   options.log_level)
    finally:
        stop_replicas(processes, options.drain_timeout_s + 10)


def main() -> int:
    """Entry point of a replica process (`python -m lmsmith.serve.server`, options in the environment)."""
    raw = os.environ.get(REPLICA_OPTIONS_ENV)
    if not raw:
        print(f"lmsmith.serve.server is started by serve(replicas=N); set {REPLICA_OPTIONS_ENV}", file=sys.stderr)
        return 2
    fields = json.loads(raw)
    fields["api_keys"] = tuple(fields.get("api_keys") or ())
    options = ServeOptions(**fields)
    logging.basicConfig(level=options.log_level.upper())
    parent = int(os.environ[PARENT_PID_ENV]) if os.environ.get(PARENT_PID_ENV) else None
    return 1 if serve_one(options, parent_pid=parent) is not None else 0


if __name__ == "__main__":
    sys.exit(main())
