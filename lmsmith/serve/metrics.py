"""Prometheus metrics for the server, with vLLM-like names under an `lmsmith:` prefix.

Each app owns a `CollectorRegistry` (tests create several apps in one process, and the default
global registry would reject the second set of names). Per-request latencies come from the engine's
`on_output` callback; engine state (queue sizes, KV blocks, cumulative counters) is read from
`engine.stats()` when Prometheus scrapes, so gauges are never stale and counters never drift.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no `*_created` series: they double the output and nobody graphs them

PREFIX = "lmsmith:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Priorities are client-chosen ints: label the common small ones exactly and lump the rest, so a
# client cannot blow up the number of time series.
PRIORITY_LABEL_LIMIT = 10

# (metric name, kind, engine.stats() key, help)
ENGINE_STATS = (
    ("num_requests_running", "gauge", "num_running", "Requests holding KV blocks (being processed)."),
    ("num_requests_waiting", "gauge", "num_waiting", "Requests waiting in the queue (preempted included)."),
    ("kv_cache_usage_perc", "gauge", "kv_usage", "Fraction of KV-cache blocks in use (0..1)."),
    ("kv_blocks_total", "gauge", "kv_blocks_total", "KV-cache blocks in the pool."),
    ("kv_blocks_free", "gauge", "kv_blocks_free", "KV-cache blocks not held by any request."),
    ("prefix_cache_queries", "counter", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "counter", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("num_preemptions", "counter", "num_preemptions", "Requests preempted (their KV blocks freed) so far."),
    ("prompt_tokens", "counter", "prompt_tokens", "Prompt tokens processed."),
    ("generation_tokens", "counter", "generation_tokens", "Tokens generated."),
)


def priority_label(priority: int) -> str:
    if priority > PRIORITY_LABEL_LIMIT:
        return f">{PRIORITY_LABEL_LIMIT}"
    if priority < -PRIORITY_LABEL_LIMIT:
        return f"<-{PRIORITY_LABEL_LIMIT}"
    return str(priority)


def stat_value(stats: dict[str, Any], key: str) -> float | None:
    """A stat by name; the engine may name token counters with or without a `_total` or `num_` prefix."""
    for candidate in (key, f"{key}_total", f"num_{key}"):
        value = stats.get(candidate)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class EngineStatsCollector:
    """Reads `get_stats()` at scrape time and exposes the ENGINE_STATS as gauges and counters."""

    def __init__(self, get_stats: Callable[[], dict[str, Any] | None]) -> None:
        self._get_stats = get_stats

    def describe(self):
        return []  # collected lazily: no name clash checks against an engine that may not exist yet

    def collect(self):
        stats = self._get_stats() or {}
        for name, kind, key, help_text in ENGINE_STATS:
            value = stat_value(stats, key)
            if value is None:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(PREFIX + name, help_text)
            metric.add_metric([], value)
            yield metric


class ServingMetrics:
    """All the server's metrics in one registry; `observe_output` is the engine's on_output hook."""

    def __init__(self, get_stats: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self._last_token_time: dict[str, float] = {}
        self._lock = threading.Lock()
        self._histograms()
        r = self.registry
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.requests_rejected = Counter(PREFIX + "requests_rejected", "Requests refused before running.",
                                         ["reason"], registry=r)
        self.requests_in_flight = Gauge(PREFIX + "http_requests_in_flight", "HTTP API requests being served.",
                                        registry=r)
        r.register(EngineStatsCollector(get_stats))

    def _histograms(self) -> None:
        def histogram(name: str, help_text: str, buckets, labels=("priority",)) -> Histogram:
            return Histogram(PREFIX + name, help_text, list(labels), buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.", E2E_BUCKETS)
        self.step_time = histogram("engine_step_seconds", "Duration of one engine step.", STEP_BUCKETS, labels=())

    # ------------------------------------------------------------------ engine callbacks
    def observe_output(self, output: Any) -> None:
        """Record queue time and TTFT (first output), inter-token latency, and at the end e2e and outcome."""
        label = priority_label(getattr(output, "priority", 0) or 0)
        now = time.monotonic()
        with self._lock:
            last = self._last_token_time.get(output.request_id)
            if output.new_token_ids:
                self._last_token_time[output.request_id] = now
            if output.finished:
                self._last_token_time.pop(output.request_id, None)
        if last is None:  # the request's first output: it got its first token, or ended before one
            self._observe_first_output(output, label)
        elif output.new_token_ids:
            self.itl.labels(label).observe(max(now - last, 0.0) / len(output.new_token_ids))
        if output.finished:
            self._observe_finish(output, label)

    def _observe_first_output(self, output: Any, label: str) -> None:
        # A request aborted while still queued was never scheduled: it has no queue time to record.
        if output.first_scheduled_time is not None:
            self.queue_time.labels(label).observe(max(output.first_scheduled_time - output.arrival_time, 0.0))
        if output.new_token_ids and output.first_token_time is not None:
            self.ttft.labels(label).observe(max(output.first_token_time - output.arrival_time, 0.0))

    def _observe_finish(self, output: Any, label: str) -> None:
        self.request_success.labels(output.finish_reason or "unknown").inc()
        if output.finish_time is not None:
            self.e2e.labels(label).observe(max(output.finish_time - output.arrival_time, 0.0))

    def observe_step(self, stats: dict[str, Any], step_seconds: float) -> None:
        self.step_time.observe(step_seconds)

    def attach(self, engine: Any) -> None:
        engine.on_output.append(self.observe_output)
        engine.on_step.append(self.observe_step)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RouterMetrics:
    """The router's view: per-replica health, in-flight requests and how many it sent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.healthy = Gauge(PREFIX + "router_replica_healthy", "1 if the replica passes its health check.",
                             ["replica"], registry=r)
        self.in_flight = Gauge(PREFIX + "router_replica_in_flight", "Requests in flight per replica.",
                               ["replica"], registry=r)
        self.routed = Counter(PREFIX + "router_requests", "Requests sent to each replica.", ["replica"], registry=r)
        self.failovers = Counter(PREFIX + "router_failovers", "Requests retried on another replica.", registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
