"""Tiny random models and tokenizers for the explain tests: a WordPiece classifier (BERT-like, with
[CLS]/[SEP]) and a byte-level BPE causal LM that adds BOS."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, normalizers, pre_tokenizers, processors

from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.tokenizer import SpecialTokens, Tokenizer
from tests.conftest import tiny_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "movie", "was", "great", "terrible", "good", "bad", "i", "hate", "love", "un", "##believ",
         "##ably", "!", ",", ".", "<", ">", "script"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
LABELS = ("neg", "pos")


def wordpiece_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + LETTERS + ["##" + c for c in LETTERS])}
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    special = SpecialTokens(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]")
    return Tokenizer(backend, special, model_max_length=64)


def spread_weights(model: Transformer, std: float) -> Transformer:
    """Random init at std 0.02 makes a tiny model almost linear; wider weights make it a real test."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, std)
    return model.eval()


def tiny_classifier(tokenizer: Tokenizer, **changes) -> Transformer:
    """A post-norm BERT classifier; mean pooling (at std 0.3, tanh pooling saturates and flattens it)."""
    torch.manual_seed(0)
    changes = {"classifier_pooler": "mean", **changes}
    config = PRESETS["tiny-bert"].replace(vocab_size=tokenizer.vocab_size, task="sequence-classification",
                                          labels=LABELS, max_position_embeddings=64, pad_token_id=0, **changes)
    return spread_weights(Transformer(config), 0.3)


@pytest.fixture(scope="session")
def wp_tokenizer() -> Tokenizer:
    return wordpiece_tokenizer()


@pytest.fixture(scope="session")
def classifier(wp_tokenizer) -> Transformer:
    return tiny_classifier(wp_tokenizer)


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Tokenizer:
    """The shared tiny byte-level BPE, set to start every text with BOS (shown, never attributed)."""
    base = tiny_tokenizer()
    return Tokenizer(base.backend, base.special, model_max_length=64, add_bos_eos=(True, False))


@pytest.fixture(scope="session")
def causal_lm(bpe_tokenizer) -> Transformer:
    torch.manual_seed(0)
    config = PRESETS["tiny-llama"].replace(vocab_size=bpe_tokenizer.vocab_size, max_position_embeddings=64,
                                           pad_token_id=bpe_tokenizer.pad_id)
    return spread_weights(Transformer(config), 0.15)


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs on one thread (tests/conftest.py says why)."""


