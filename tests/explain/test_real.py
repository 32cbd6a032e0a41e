"""The fine-tuned MiniLM tweet-sentiment classifier (runs/tune-full-1/model): the words that make a
clearly negative tweet negative get the top attribution. Skipped where that run folder is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

from lmsmith.explain import explain

MODEL = Path(__file__).resolve().parents[2] / "runs" / "tune-full-1" / "model"
SENTIMENT_WORDS = {"hate", "worst", "awful", "terrible", "boring"}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (MODEL / "lmsmith.json").is_file(), reason=f"no fine-tuned model at {MODEL}")]


@pytest.fixture(scope="module")
def sentiment_model():
    from lmsmith.api import load

    return load(MODEL)


@pytest.mark.parametrize("text", ["I hate this so much, worst day ever", "what a terrible, boring movie"])
def test_negative_tweet_is_explained_by_its_sentiment_word(sentiment_model, text):
    model, tokenizer = sentiment_model
    e = explain(model, tokenizer, text, method="ig", n_steps=32, merge_words=True, progress=False)
    assert e.prediction == e.target == "negative"
    top_word = e.top(1)[0][0]
    assert top_word in SENTIMENT_WORDS, e.summary()
    assert e.completeness_gap < 0.01 * abs(e.target_score - e.baseline_score)
    occluded = explain(model, tokenizer, text, method="occlusion", merge_words=True)
    assert occluded.top(1)[0][0] in SENTIMENT_WORDS, occluded.summary()
