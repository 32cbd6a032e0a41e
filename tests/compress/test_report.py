"""Measurements: parameter counts, sizes, speed keys, ratios, the Pareto table and the plots."""
import math

import pytest
import torch

from lmsmith.api import load
from lmsmith.compress.quantize import quantize_model
from lmsmith.compress.report import (
    Measurement,
    MeasureSettings,
    classifier_eval_set,
    compare,
    count_parameters,
    lm_eval_set,
    markdown_table,
    measure,
    pareto_front,
    plot_tradeoffs,
)
from lmsmith.io.artifact import new_manifest, save_artifact

from .conftest import TINY_LABELS, tiny_classifier, tiny_records

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = MeasureSettings(batch_sizes=(1, 2), new_tokens=3, repeats=1)


def lm_row(name, ppl, size, speed) -> Measurement:
    return Measurement(name, "lm", {"perplexity": ppl}, 100, 100, size, 10.0, {"b8_per_s": speed})


def test_count_parameters_counts_quantized_weights_logically(tok):
    model = tiny_classifier(tok)
    total, nonzero = count_parameters(model)
    assert total == model.num_parameters()
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[:10] = 0
    assert count_parameters(model)[1] == nonzero - 10 * model.config.hidden_size
    quantize_model(model, "int8")
    assert count_parameters(model)[0] == total


def test_measure_a_tiny_lm_on_the_heldout_text(tiny_lm_folder, tmp_path):
    model, tok = load(tiny_lm_folder)
    evalset = lm_eval_set(tok, seq_len=64)
    start = measure(model, evalset, "fp32", settings=FAST)
    assert 1 < start.quality["perplexity"] < 10 * model.config.vocab_size
    assert set(start.speed) == {"b1_per_s", "b1_latency_ms", "b2_per_s", "b2_latency_ms"}
    assert start.size_bytes == sum(t.nbytes for t in model.state_dict().values()) - model.lm_head.weight.nbytes
    quantize_model(model, "int8")
    path = save_artifact(model, tmp_path / "q", tok, new_manifest(model.config, "test"))
    small = measure(model, evalset, "int8", path=path, settings=FAST)
    assert small.size_bytes == (path / "model.safetensors").stat().st_size < start.size_bytes
    ratios = compare(small, start)
    assert 0.2 < ratios["size_ratio"] < 0.6
    assert ratios["perplexity_ratio"] == pytest.approx(small.quality["perplexity"] / start.quality["perplexity"])
    assert {"b1_speedup", "b2_speedup", "parameters_ratio"} <= set(ratios)


def test_measure_a_classifier(tok):
    model = tiny_classifier(tok)
    evalset = classifier_eval_set(tok, tiny_records(30), TINY_LABELS, max_length=16, batch_size=8)
    m = measure(model, evalset, "tiny", settings=FAST)
    assert set(m.quality) == {"accuracy", "macro_f1", "loss"}
    assert 0 <= m.quality["macro_f1"] <= 1 and m.peak_memory_mb > 0
    assert m.per_s(2) > 0 and math.isnan(m.per_s(8))
    assert Measurement.from_dict(m.to_dict()) == m


def test_pareto_front_marks_undominated_rows():
    rows = [lm_row("fp32", 10.0, 400, 50), lm_row("int8", 10.2, 100, 60), lm_row("worse", 11.0, 120, 55),
            lm_row("int4", 12.0, 60, 40)]
    assert pareto_front(rows) == [True, True, False, True]


def test_markdown_table_compares_with_the_first_row():
    rows = [lm_row("fp32", 10.0, 400 * 2**20, 50), lm_row("int8", 10.5, 100 * 2**20, 75)]
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| model | perplexity | ppl × |") and "b8 tok/s" in table[0]
    int8 = [cell.strip() for cell in table[3].split("|")[1:-1]]
    assert int8[:3] == ["int8", "10.50", "1.050"]
    assert "0.25" in int8 and "1.50" in int8 and int8[-1] == "✓"
    with pytest.raises(ValueError):
        markdown_table([])


def test_classifier_table_shows_f1_points():
    start = Measurement("teacher", "classifier", {"accuracy": 0.8, "macro_f1": 0.75}, 10, 10, 100, 1.0, {})
    small = Measurement("student", "classifier", {"accuracy": 0.79, "macro_f1": 0.735}, 5, 5, 50, 1.0, {})
    row = markdown_table([start, small]).splitlines()[3]
    assert "| -1.50 |" in row and "| 0.7350 |" in row


def test_plots_are_png_files(tmp_path):
    rows = [lm_row("fp32", 10.0, 400, 50), lm_row("int8", 10.2, 100, 60)]
    paths = plot_tradeoffs(rows, tmp_path / "plots")
    assert [p.name for p in paths] == ["quality_vs_size.png", "quality_vs_speed.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_bad_measure_settings():
    with pytest.raises(ValueError, match="batch sizes"):
        MeasureSettings(batch_sizes=(0,))
