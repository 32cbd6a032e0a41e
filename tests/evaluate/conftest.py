"""Fixtures for the evaluation tests: tiny models (random weights) and the tiny labelled dataset."""
from __future__ import annotations

import pytest
import torch

from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from tests.compress.conftest import TINY_DATASET, TINY_LABELS  # noqa: F401 (importing it registers TINY_DATASET)
from tests.conftest import tiny_tokenizer

FAST = {"repeats": 3, "new_tokens": 4, "batch_sizes": (1, 2)}  # keeps each evaluate() call well under a second


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs on one thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


def varied_classifier(tok, seed: int = 0) -> Transformer:
    """A random tiny classifier that predicts several classes: mean pooling (a random CLS pooler gives
    nearly the same vector, so the same class, for every input) and a scaled-up output layer."""
    torch.manual_seed(seed)
    config = PRESETS["tiny-bert"].replace(vocab_size=tok.vocab_size, task="sequence-classification",
                                          labels=TINY_LABELS, pad_token_id=tok.pad_id, num_layers=2,
                                          classifier_pooler="mean")
    model = Transformer(config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        model.classifier.out.weight.copy_(torch.randn_like(model.classifier.out.weight) * 3)
        model.classifier.out.bias.zero_()
    return model.eval()


def tiny_lm(tok, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = PRESETS["tiny-llama"].replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                           pad_token_id=tok.pad_id, intermediate_size=128)
    return Transformer(config).eval()
