"""`bench serve` (the load generator) against a live fake-engine server, and the CLI verbs' parsers."""
from __future__ import annotations

import argparse
import json
import random

import pytest

from lmsmith.serve.bench import (
    BenchConfig,
    LengthDist,
    RequestRecord,
    build_report,
    check_loopback,
    format_table,
    make_prompt,
    meets_slo,
    percentile,
    run_bench,
)
from lmsmith.serve.cli_verbs import VERBS, api_keys_from

from .fake_engine import live_server
from .test_api import make_app


@pytest.fixture(scope="module")
def url():
    app, _ = make_app(token_delay_s=0.002, max_num_seqs=8, max_waiting_requests=64)
    with live_server(app) as base:
        yield base


def test_closed_loop_report(url):
    config = BenchConfig(url=url, num_requests=12, concurrency=4, prompt_len=LengthDist(20),
                         output_len=LengthDist(10), slo_ttft_s=5.0, slo_itl_s=1.0)
    report = run_bench(config)
    assert report["model"] == "fake" and report["succeeded"] == 12 and report["failed"] == 0
    assert report["output_tokens"] == 12 * 10  # ignore_eos: exactly max_tokens each
    assert report["prompt_tokens"] > 12 * 20  # ~1 token per byte with the byte tokenizer
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        stats = report[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert report["ttft_s"]["p50"] < report["e2e_s"]["p50"]
    assert report["goodput"] == pytest.approx(report["request_throughput"])  # generous SLO: all met
    assert report["output_tokens_per_s"] > 0 and report["slo_attainment"] == 1.0
    table = format_table(report)
    assert "TTFT" in table and "goodput" in table and "12/12 requests ok" in table


def test_open_loop_chat_non_streaming_and_tight_slo(url):
    config = BenchConfig(url=url, endpoint="chat", num_requests=6, concurrency=None, request_rate=50.0,
                         stream=False, output_len=LengthDist(5, "uniform", 0.5), slo_ttft_s=1e-6)
    report = run_bench(config)
    assert report["succeeded"] == 6 and report["request_rate"] == 50.0
    assert report["goodput"] == 0 and report["slo_attainment"] == 0  # nobody answers within a microsecond
    assert report["itl_s"]["p50"] is None  # no streaming: no inter-token gaps


def test_failures_are_counted_not_raised(url):
    report = run_bench(BenchConfig(url=url, model="no-such-model", num_requests=3, concurrency=3))
    assert report["failed"] == 3 and report["errors"] == {"HTTP 404": 3}
    assert report["goodput"] == 0


def test_duration_bounds_the_run(url):
    report = run_bench(BenchConfig(url=url, num_requests=1000, concurrency=2, duration_s=0.3,
                                   output_len=LengthDist(20)))
    assert 0 < report["requests"] < 1000


@pytest.mark.parametrize("target", ["http://10.0.0.1:8000", "http://192.168.1.5", "http://example.com",
                                    "ftp://127.0.0.1", "http://8.8.8.8:80"])
def test_only_loopback_targets_are_allowed(target):
    with pytest.raises(ValueError, match="loopback|http"):
        BenchConfig(url=target)


@pytest.mark.parametrize("target", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80",
                                    "https://127.5.6.7"])
def test_loopback_targets_pass(target):
    check_loopback(target)


def test_percentiles_lengths_and_slo():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    rng = random.Random(0)
    assert {LengthDist(10).sample(rng) for _ in range(5)} == {10}
    uniform = [LengthDist(10, "uniform", 0.5).sample(rng) for _ in range(200)]
    assert min(uniform) >= 5 and max(uniform) <= 15 and len(set(uniform)) > 5
    assert min(LengthDist(2, "normal", 1.0).sample(rng) for _ in range(200)) >= 1
    assert len(make_prompt(29, rng).split()) == 29
    with pytest.raises(ValueError):
        LengthDist(0)
    fast = RequestRecord(ok=True, ttft_s=0.5, e2e_s=1.5, output_tokens=11)
    assert fast.tpot_s == pytest.approx(0.1) and meets_slo(fast, 1.0, 0.2)
    assert not meets_slo(fast, 0.4, 0.2) and not meets_slo(fast, 1.0, 0.05)
    report = build_report([fast, RequestRecord(ok=False, error="HTTP 429")], 2.0, BenchConfig())
    assert report["goodput"] == 0.5 and report["errors"] == {"HTTP 429": 1}


def parser_for(verb: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="verb", required=True)
    help_text, setup, _ = VERBS[verb]
    setup(sub.add_parser(verb, help=help_text))
    return parser


def test_bench_verb_prints_json(url, capsys):
    args = parser_for("bench").parse_args(["bench", "serve", "--url", url, "--num-requests", "3",
                                           "--output-len", "4", "--concurrency", "2", "--json", "-"])
    VERBS["bench"][2](args)
    report = json.loads(capsys.readouterr().out)
    assert report["succeeded"] == 3 and report["output_tokens"] == 12


def test_serve_verb_parses_every_option(monkeypatch):
    monkeypatch.setenv("LMSMITH_API_KEYS", "k2, k3")
    args = parser_for("serve").parse_args(
        ["serve", "smollm2", "--port", "9000", "--api-key", "k1", "--replicas", "2", "--max-num-seqs", "4",
         "--embedding-model", "minilm-l6", "--drain-timeout", "5", "--num-kv-blocks", "64"])
    assert (args.model, args.port, args.replicas, args.max_num_seqs) == ("smollm2", 9000, 2, 4)
    assert (args.embedding_model, args.drain_timeout_s, args.num_kv_blocks) == ("minilm-l6", 5.0, 64)
    assert api_keys_from(args.api_keys) == ("k1", "k2", "k3")
    assert set(VERBS) == {"serve", "bench"}
