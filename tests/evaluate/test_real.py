"""Real models: the fine-tuned MiniLM tweet classifier and SmolLM2 (slow: CPU minutes)."""
import json
import math
from pathlib import Path

import pytest

from lmsmith.cli import main

pytestmark = pytest.mark.slow
TWEET_CLASSIFIER = Path(__file__).resolve().parents[2] / "runs" / "tune-full-1" / "model"


@pytest.mark.skipif(not (TWEET_CLASSIFIER / "lmsmith.json").exists(), reason="no fine-tuned tweet classifier here")
def test_minilm_tweet_classifier_on_the_test_split(tmp_path):
    code = main(["evaluate", str(TWEET_CLASSIFIER), "--data", "tweets-sentiment", "--split", "test", "--limit", "300",
                 "--batch-sizes", "1,8", "--repeats", "3", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["examples"] == 300 and report["quality"]["accuracy"] > 0.6
    assert report["classification"]["labels"] == ["negative", "neutral", "positive"]
    assert "sizes {'train': 8000, 'validation': 1000, 'test': 2000}" in report["notes"][0]  # the recipe's split


def test_smollm2_perplexity_on_the_heldout_text(tmp_path):
    code = main(["evaluate", "smollm2-135m-instruct", "--limit", "1", "--batch-sizes", "1", "--repeats", "2",
                 "--new-tokens", "8", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    perplexity = report["quality"]["perplexity"]
    assert perplexity is not None and math.isfinite(perplexity) and 1 < perplexity < 100
    assert report["memory"]["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 4  # 30 layers, 3 KV heads of 64, fp32
    assert report["generation"]["decode_tokens_per_s"] > 0
