"""The fine-tuned MiniLM tweet classifier (runs/tune-full-1/model, made by `lmsmith finetune
minilm-sentiment-full`): typos cost it accuracy and a greedy attack flips some of its predictions."""
from pathlib import Path

import pytest

from lmsmith.api import load
from lmsmith.robustness import greedy_word_attack, perturbation_suite
from lmsmith.robustness.report import load_eval_data

MODEL = Path(__file__).resolve().parents[2] / "runs" / "tune-full-1" / "model"


@pytest.mark.slow
@pytest.mark.skipif(not MODEL.is_dir(), reason=f"no fine-tuned classifier at {MODEL}")
def test_minilm_tweet_classifier_loses_accuracy_on_typos_and_can_be_attacked():
    model, tokenizer = load(MODEL, task="sequence-classification")
    data = load_eval_data("tweets-sentiment", "test", 200, model)
    assert "the model's training splits" in data.description  # the test tweets it never trained on
    report = perturbation_suite(model, tokenizer, data.texts, data.labels, ["identity", "typo"], (0.1, 0.5),
                                max_length=64, progress=False)
    assert 0.65 < report.clean_accuracy < 0.9  # the run scored 0.76 accuracy on its 2000 test tweets
    assert report.row("identity", 0.5).accuracy_drop == 0
    mild, heavy = report.row("typo", 0.1), report.row("typo", 0.5)
    assert heavy.accuracy < report.clean_accuracy and heavy.flip_rate > mild.flip_rate > 0
    attacked = greedy_word_attack(model, tokenizer, data.texts[:20], data.labels[:20], max_length=64,
                                  progress=False)
    assert attacked.successes > 0 and attacked.accuracy_after < attacked.accuracy_before
    for e in attacked.examples:
        if e.status == "success":
            assert e.after != e.label and 0 < e.changed <= max(1, int(0.25 * e.units))
