"""Tiny classifiers for the robustness tests: a random one, and one with a planted weakness.

The planted model is a keyword detector: its blocks add nothing (output projections zeroed), so
pooled = mean(RMSNorm(token embeddings)); only the embeddings of "happy" (+) and "sad" (−) have a
component on axis 0, and the classifier reads axis 0. It says "pos" exactly when "happy" is in the
text (and "sad" is not): typo-ing or replacing that one word flips it.
"""
from __future__ import annotations

import random

import pytest
import torch

from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.train.build import train_tokenizer

LABELS = ("neg", "pos")
FILLER = ["the", "a", "cat", "dog", "bird", "sat", "ran", "on", "under", "over", "mat", "log", "tree", "and", "then", "big", "small", "day", "night", "sun", "rain"]


def sentences(n: int = 40, seed: int = 0) -> tuple[list[str], list[str]]:
    """Texts with "happy" (pos) or "sad" (neg) among filler words; labels follow the keyword."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = LABELS[i % 2]
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 9))]
        words.insert(rng.randint(0, len(words)), "happy" if label == "pos" else "sad")
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs on one thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def tokenizer():
    corpus = [" ".join(FILLER + ["happy", "sad", "glad", "joyful", "gloomy", "angry"])] * 30 + sentences(200, 1)[0]
    return train_tokenizer(corpus, vocab_size=120, kind="wordpiece")


def classifier_config(tokenizer, **changes):
    base = PRESETS["tiny-llama"].replace(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
        intermediate_size=64, max_position_embeddings=64, task="sequence-classification", labels=LABELS,
        classifier_pooler="mean", causal=False, pad_token_id=tokenizer.pad_id, tie_word_embeddings=False)
    return base.replace(**changes)


@pytest.fixture
def random_classifier(tokenizer):
    torch.manual_seed(0)
    return Transformer(classifier_config(tokenizer)).eval()


def planted_classifier(tokenizer) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(classifier_config(tokenizer, classifier_dropout=0.0, hidden_dropout=0.0)).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        emb = model.embed.tokens.weight
        emb[:, 0] = 0.0
        for word, sign in (("happy", 1.0), ("sad", -1.0)):
            token = tokenizer.token_to_id(word)
            assert token is not None, word
            emb[token] = 0.0
            emb[token, 0] = sign
        out = model.classifier.out
        out.weight.zero_()
        out.weight[1, 0], out.weight[0, 0] = 5.0, -5.0
        out.bias.copy_(torch.tensor([1.0, -1.0]))  # no keyword: neg
    return model


@pytest.fixture
def planted(tokenizer):
    return planted_classifier(tokenizer)
