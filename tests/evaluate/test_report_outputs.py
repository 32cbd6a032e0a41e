"""report.json / report.md / PNGs exist and parse; strict JSON; the markdown tables."""
import dataclasses
import json
import math

from lmsmith.evaluate import evaluate

from .conftest import FAST, TINY_DATASET, TINY_LABELS, tiny_lm, varied_classifier

PNG = b"\x89PNG\r\n\x1a\n"


def test_classifier_report_files(tok, tmp_path):
    report = evaluate(varied_classifier(tok), tok, TINY_DATASET, device="cpu", name="tiny", **FAST)
    paths = report.save(tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "confusion_matrix.png", "latency.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths[2:])
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["model"] == "tiny" and data["quality"]["accuracy"] == report.quality["accuracy"]
    assert data["classification"]["labels"] == list(TINY_LABELS)
    assert data["classification"]["confusion"] == [list(row) for row in report.classification.confusion]
    assert set(data["classification"]["per_class"]) == set(TINY_LABELS)
    assert [s["batch_size"] for s in data["latency"]] == [1, 2] and data["memory"]["parameters"] > 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown == report.to_markdown()
    assert "## Evaluation: tiny" in markdown and "### Confusion matrix" in markdown
    accuracy_row = next(line for line in markdown.splitlines() if line.startswith("| accuracy |"))
    assert accuracy_row == f"| accuracy | {report.quality['accuracy']:.4f} |"
    confusion = markdown.split("### Confusion matrix")[1].splitlines()
    assert confusion[2] == "| true \\ predicted | negative | neutral | positive |"


def test_lm_report_has_no_confusion_matrix_and_shows_generation(tok, tmp_path):
    report = evaluate(tiny_lm(tok), tok, device="cpu", seq_len=64, limit=2, **FAST)
    names = [p.name for p in report.save(tmp_path)]
    assert names == ["report.json", "report.md", "latency.png"]
    markdown = report.to_markdown()
    assert "### Generation (greedy)" in markdown and "KV cache per token" in markdown
    assert "Confusion" not in markdown and "| perplexity |" in markdown
    assert json.loads(report.to_json())["generation"]["new_tokens"] == FAST["new_tokens"]


def test_non_finite_numbers_become_null_in_json(tok):
    report = evaluate(tiny_lm(tok), tok, device="cpu", seq_len=64, limit=1, **FAST)
    broken = dataclasses.replace(report, quality={**report.quality, "perplexity": math.inf})
    assert json.loads(broken.to_json())["quality"]["perplexity"] is None
    assert "| perplexity | inf |" in broken.to_markdown()


def test_a_base_model_gets_latency_and_memory_only(tok):
    model = tiny_lm(tok)
    model.config = model.config.replace(task="base")  # what a head-less encoder reports
    report = evaluate(model, tok, device="cpu", **FAST)
    assert report.quality == {} and report.classification is None and report.examples == 0
    assert len(report.latency) == 2 and any("quality not measured" in n for n in report.notes)
    assert "quality not measured" in report.to_markdown()
