"""Fixtures for the compression pipeline tests: a tiny labelled dataset, tiny model folders."""
from __future__ import annotations

import random

import pytest
import torch

from lmsmith.data import TextRecord, register_dataset, split
from lmsmith.data.registry import LoadedDataset, dataset_names
from lmsmith.io.checkpoint import save_hf_folder
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from tests.conftest import tiny_tokenizer

TINY_DATASET = "tiny-sentiment-test"
TINY_LABELS = ("negative", "neutral", "positive")
_WORDS = {"positive": ("good", "great", "happy", "love"), "negative": ("bad", "awful", "sad", "hate"),
          "neutral": ("the", "a", "table", "chair")}


def tiny_records(n: int = 240, seed: int = 0) -> list[TextRecord]:
    """Six words each: three carry the label's sentiment, three are neutral filler."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        label = TINY_LABELS[i % 3]
        words = [rng.choice(_WORDS[label]) for _ in range(3)] + [rng.choice(_WORDS["neutral"]) for _ in range(3)]
        rng.shuffle(words)
        records.append(TextRecord(" ".join(words), label))
    return records


def _tiny_dataset(**split_options) -> LoadedDataset:
    return LoadedDataset(TINY_DATASET, split(tiny_records(), **split_options), TINY_LABELS, None)


if TINY_DATASET not in dataset_names():
    register_dataset(TINY_DATASET)(_tiny_dataset)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory, tok):
    """An HF folder: random tiny Llama (GQA: 4 heads, 2 KV heads) + trained BPE tokenizer."""
    torch.manual_seed(0)
    config = PRESETS["tiny-llama"].replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                           pad_token_id=tok.pad_id, intermediate_size=128)
    return save_hf_folder(Transformer(config), tmp_path_factory.mktemp("lm") / "tiny-llama", tokenizer=tok)


@pytest.fixture(scope="session")
def tiny_encoder_folder(tmp_path_factory, tok):
    """An HF folder: random tiny BERT encoder (no head, like MiniLM) + tokenizer."""
    torch.manual_seed(0)
    config = PRESETS["tiny-bert"].replace(vocab_size=tok.vocab_size, task="base", pad_token_id=tok.pad_id)
    return save_hf_folder(Transformer(config), tmp_path_factory.mktemp("enc") / "tiny-bert", tokenizer=tok)


def tiny_classifier(tok, seed: int = 0, num_layers: int = 2) -> Transformer:
    torch.manual_seed(seed)
    config = PRESETS["tiny-bert"].replace(vocab_size=tok.vocab_size, task="sequence-classification",
                                          labels=TINY_LABELS, pad_token_id=tok.pad_id, num_layers=num_layers,
                                          hidden_dropout=0.0, attention_dropout=0.0)
    return Transformer(config)
