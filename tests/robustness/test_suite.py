import json

import pytest
import torch

from lmsmith.robustness import (
    Victim,
    perturb_all,
    perturbation_suite,
    save_suite_plot,
    suite_json,
    suite_markdown,
)

from .conftest import LABELS, sentences


def hand_predictions(model, tokenizer, texts):
    """One text at a time, no padding: the reference the batched suite must match."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text)])
            out.append(int(model(ids).logits.argmax(-1)))
    return out


def test_clean_accuracy_matches_a_hand_computation(random_classifier, tokenizer):
    texts, labels = sentences(24)
    report = perturbation_suite(random_classifier, tokenizer, texts, labels, perturbations=["identity", "typo"],
                                severities=(0.2, 0.5), batch_size=5, progress=False)
    predicted = hand_predictions(random_classifier, tokenizer, texts)
    expected = sum(LABELS[p] == y for p, y in zip(predicted, labels)) / len(texts)
    assert report.clean_accuracy == pytest.approx(expected)
    assert report.count == 24 and report.labels == LABELS
    assert [(r.perturbation, r.severity) for r in report.rows] == [("identity", 0.2), ("identity", 0.5),
                                                                   ("typo", 0.2), ("typo", 0.5)]


def test_identity_gives_zero_drop_and_no_flips(random_classifier, tokenizer):
    texts, labels = sentences(16)
    report = perturbation_suite(random_classifier, tokenizer, texts, labels, perturbations=["identity"],
                                severities=(0.5,), progress=False)
    row = report.row("identity", 0.5)
    assert row.accuracy_drop == 0 and row.macro_f1_drop == 0 and row.flip_rate == 0 and row.changed == 0
    assert row.accuracy == report.clean_accuracy


def test_perturbed_rows_match_hand_scored_perturbed_texts(planted, tokenizer):
    texts, labels = sentences(20)
    report = perturbation_suite(planted, tokenizer, texts, labels, perturbations=["typo_delete"],
                                severities=(1.0,), seed=4, progress=False)
    assert report.clean_accuracy == 1.0  # the planted model reads the keyword exactly
    perturbed = perturb_all(texts, "typo_delete", 1.0, seed=4)
    predicted = hand_predictions(planted, tokenizer, perturbed)
    row = report.row("typo_delete", 1.0)
    assert row.accuracy == pytest.approx(sum(LABELS[p] == y for p, y in zip(predicted, labels)) / 20)
    assert row.flip_rate == pytest.approx(1 - row.accuracy)  # clean was all right: every error is a flip
    assert row.accuracy_drop == pytest.approx(1.0 - row.accuracy)
    assert row.accuracy < 1.0 and row.changed == 1.0


def test_labels_as_indices_and_seeded_reports(random_classifier, tokenizer):
    texts, labels = sentences(12)
    by_name = perturbation_suite(random_classifier, tokenizer, texts, labels, ["words"], (0.3,), progress=False)
    by_index = perturbation_suite(random_classifier, tokenizer, texts, [LABELS.index(y) for y in labels],
                                  ["words"], (0.3,), progress=False)
    assert by_name == by_index


def test_cache_scores_each_distinct_text_once(random_classifier, tokenizer, monkeypatch):
    texts, labels = sentences(10)
    calls = []
    original = Victim.probs

    def counting(self, batch_texts):
        calls.append(len(batch_texts))
        return original(self, batch_texts)

    monkeypatch.setattr(Victim, "probs", counting)
    perturbation_suite(random_classifier, tokenizer, texts, labels, ["identity", "case"], (0.0, 0.5),
                       progress=False)
    assert calls[0] == 10 and sum(calls) == 20  # identity and severity 0 reuse the clean predictions


def test_rendering_markdown_json_and_plot(random_classifier, tokenizer, tmp_path):
    texts, labels = sentences(8)
    report = perturbation_suite(random_classifier, tokenizer, texts, labels, ["typo_swap", "case"], (0.1, 0.4),
                                progress=False)
    table = suite_markdown(report)
    assert table.count("| typo_swap |") == 2 and "flip rate" in table
    data = json.loads(suite_json(report))
    assert data["clean_accuracy"] == report.clean_accuracy and len(data["rows"]) == 4
    png = save_suite_plot(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors(random_classifier, tokenizer):
    texts, labels = sentences(4)
    with pytest.raises(ValueError, match="unknown perturbation 'nope'"):
        perturbation_suite(random_classifier, tokenizer, texts, labels, ["nope"], progress=False)
    with pytest.raises(ValueError, match="data is empty"):
        perturbation_suite(random_classifier, tokenizer, [], [], progress=False)
    with pytest.raises(ValueError, match="4 texts but 3 labels"):
        perturbation_suite(random_classifier, tokenizer, texts, labels[:3], progress=False)
    with pytest.raises(ValueError, match="label 'maybe' is not one of the model's labels"):
        perturbation_suite(random_classifier, tokenizer, texts, ["maybe"] * 4, progress=False)
    with pytest.raises(ValueError, match="severity must be in"):
        perturbation_suite(random_classifier, tokenizer, texts, labels, severities=(2,), progress=False)
    lm = type(random_classifier)(random_classifier.config.replace(task="causal-lm", labels=()))
    with pytest.raises(ValueError, match="need a 'sequence-classification' model.*causal-lm"):
        perturbation_suite(lm, tokenizer, texts, labels, progress=False)
