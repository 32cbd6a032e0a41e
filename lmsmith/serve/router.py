"""A small reverse proxy in front of N engine servers ("replicas") on internal ports.

Each API request goes to the least-loaded healthy replica: the one with the fewest requests in
flight through this router (ties go round-robin). A background task polls every replica's /ready;
a replica that fails it (dead, loading or draining) gets no new requests until it passes again.
A request whose replica cannot be reached (refused, reset before answering) is retried on another
replica, so killing one replica loses no request that had not started. Responses, SSE streams
included, are relayed chunk by chunk; a replica dying mid-stream ends the stream with an error
frame and `data: [DONE]`. Authentication and validation are the replicas' job: the router
forwards the request as it came (minus hop-by-hop headers).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .api import ClosingStreamingResponse, error_response, sse_frame
from .metrics import RouterMetrics
from .protocol import APIError, unavailable

logger = logging.getLogger(__name__)
# Hop-by-hop headers (RFC 9110 §7.6.1) plus those the proxy's HTTP stack sets itself.
_DROP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                           "trailer", "transfer-encoding", "upgrade", "host", "content-length", "server", "date"})
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
              httpx.WriteError, httpx.PoolTimeout)


@dataclass(frozen=True)
class RouterConfig:
    health_interval_s: float = 0.5
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 2.0
    retry_after_s: int = 1
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("health_interval_s", "health_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RouterConfig.{name}={getattr(self, name)!r} must be > 0")


@dataclass
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    last_error: str | None = None
    last_check: float = 0.0


class ReplicaPool:
    """The replicas, their health and load; `pick` chooses the least-loaded healthy one."""

    def __init__(self, urls: list[str]) -> None:
        if not urls:
            raise ValueError("the router needs at least one replica URL")
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self._turn = itertools.count()

    def pick(self, exclude: set[str] = frozenset()) -> Replica | None:
        candidates = [r for r in self.replicas if r.healthy and r.url not in exclude]
        if not candidates:
            return None
        fewest = min(r.in_flight for r in candidates)
        tied = [r for r in candidates if r.in_flight == fewest]
        return tied[next(self._turn) % len(tied)]

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            logger.warning("replica %s is down: %s", replica.url, reason)
        replica.healthy, replica.last_error = False, reason

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    async def check(self, client: httpx.AsyncClient, replica: Replica, timeout_s: float) -> None:
        replica.last_check = time.monotonic()
        try:
            response = await client.get(f"{replica.url}/ready", timeout=timeout_s)
        except httpx.HTTPError as err:
            return self.mark_down(replica, f"{type(err).__name__}: {err}")
        if response.status_code != 200:
            return self.mark_down(replica, f"/ready answered {response.status_code}")
        if not replica.healthy:
            logger.info("replica %s is ready", replica.url)
        replica.healthy, replica.last_error = True, None

    async def poll(self, client: httpx.AsyncClient, interval_s: float, timeout_s: float) -> None:
        while True:
            await asyncio.gather(*(self.check(client, r, timeout_s) for r in self.replicas))
            await asyncio.sleep(interval_s)


class RouterState:
    def __init__(self, urls: list[str], config: RouterConfig) -> None:
        self.config = config
        self.pool = ReplicaPool(urls)
        self.metrics = RouterMetrics()
        self.draining = False
        self.client: httpx.AsyncClient | None = None

    def update_gauges(self) -> None:
        for r in self.pool.replicas:
            self.metrics.healthy.labels(r.url).set(1 if r.healthy else 0)
            self.metrics.in_flight.labels(r.url).set(r.in_flight)


def create_router_app(replica_urls: list[str], config: RouterConfig | None = None) -> FastAPI:
    state = RouterState(replica_urls, config or RouterConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        cfg = state.config
        # trust_env=False: never send replica traffic through a proxy from the environment.
        timeout = httpx.Timeout(connect=cfg.connect_timeout_s, read=None, write=60.0, pool=None)
        state.client = httpx.AsyncClient(timeout=timeout, trust_env=False,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        poller = asyncio.create_task(state.pool.poll(state.client, cfg.health_interval_s, cfg.health_timeout_s))
        yield
        poller.cancel()
        await state.client.aclose()

    app = FastAPI(title="lmsmith router", lifespan=lifespan, openapi_url=None)
    app.state.router = state
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: RouterState) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "replicas": [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight,
                                              "last_error": r.last_error} for r in state.pool.replicas]}

    @app.get("/ready")
    async def ready():
        if state.draining or not state.pool.any_healthy():
            status = "draining" if state.draining else "no_healthy_replica"
            return JSONResponse({"status": status}, status_code=503,
                                headers={"Retry-After": str(state.config.retry_after_s)})
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        state.update_gauges()
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def proxy(path: str, request: Request):
        try:
            return await _proxy(state, request)
        except APIError as err:
            return error_response(err)


async def _proxy(state: RouterState, request: Request) -> Response:
    if state.draining:
        raise unavailable("the server is shutting down", state.config.retry_after_s, "server_draining")
    body = await _bounded_body(request, state.config.max_body_bytes)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS}
    tried: set[str] = set()
    while (replica := state.pool.pick(exclude=tried)) is not None:
        tried.add(replica.url)
        upstream = await _send(state, replica, request, headers, body)
        if upstream is not None:
            return _relay(state, replica, upstream)
        state.metrics.failovers.inc()
    raise unavailable("no healthy replica is available; retry shortly", state.config.retry_after_s,
                      "no_healthy_replica")


async def _bounded_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _send(state: RouterState, replica: Replica, request: Request, headers: dict, body: bytes):
    """The replica's streamed response, or None (replica marked down) if it could not be reached."""
    url = f"{replica.url}{request.url.path}"
    upstream_request = state.client.build_request(request.method, url, params=request.query_params,
                                                  headers=headers, content=body)
    replica.in_flight += 1
    try:
        upstream = await state.client.send(upstream_request, stream=True)
    except _RETRYABLE as err:
        replica.in_flight -= 1
        state.pool.mark_down(replica, f"{type(err).__name__}: {err}")
        return None
    except BaseException:
        replica.in_flight -= 1
        raise
    state.metrics.routed.labels(replica.url).inc()
    return upstream


def _relay(state: RouterState, replica: Replica, upstream: httpx.Response) -> StreamingResponse:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_HEADERS}
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
    released = False

    async def release() -> None:  # runs once, however the response ends
        nonlocal released
        if not released:
            released = True
            replica.in_flight -= 1
            await upstream.aclose()  # a client that left closes the replica connection: it aborts too

    return ClosingStreamingResponse(_chunks(state, replica, upstream, is_sse), on_close=release,
                                    status_code=upstream.status_code, headers=headers)


async def _chunks(state: RouterState, replica: Replica, upstream: httpx.Response, is_sse: bool
                  ) -> AsyncIterator[bytes]:
    """The replica's bytes as they arrive; if it fails mid-stream, an SSE error frame and [DONE]."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as err:
        state.pool.mark_down(replica, f"failed mid-response: {type(err).__name__}: {err}")
        if is_sse:
            failure = APIError(502, "the replica serving this stream failed", type="server_error",
                               code="replica_failed")
            yield (sse_frame(failure.body()) + sse_frame("[DONE]")).encode()


async def drain_router(app: FastAPI, timeout_s: float) -> None:
    """Refuse new requests (503) and wait up to timeout_s for those in flight to finish."""
    state: RouterState = app.state.router
    state.draining = True
    deadline = time.monotonic() + timeout_s
    while state.pool.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
