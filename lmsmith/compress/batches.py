"""Batches for compression steps: training data, evaluation batches and calibration inputs, built
from labelled records (classifiers) or plain text (language models) with the data package.

Calibration inputs are model keyword arguments only (no labels), because pruning and GPTQ feed
them straight to `model(**inputs)`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import default_collate

from ..data import FeatureDataset, PackedDataset, collate_padded, encode_classification, pack_for_causal_lm
from ..train.loop import TrainData

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id; decoder-only tokenizers often have none, so fall back to eos."""
    pad = getattr(tokenizer, "pad_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_id", None)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return pad


def model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The keyword arguments a Transformer accepts, taken from a training/eval batch."""
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}


def calibration_inputs(batches: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, torch.Tensor]]:
    if limit < 1:
        raise ValueError(f"calibration needs at least one batch, got limit={limit}")
    return [model_inputs(batch) for batch in batches[:limit]]


# --- classification ----------------------------------------------------------------------------------
def classification_features(records, tokenizer, labels: Sequence[str], max_length: int) -> list[dict]:
    return encode_classification(records, tokenizer, labels, max_length=max_length)


def classification_batches(features: Sequence[dict], pad_id: int, batch_size: int) -> list[dict]:
    """Evaluation batches; features sorted by length so little compute goes to padding."""
    ordered = sorted(features, key=lambda f: len(f["input_ids"]))
    return [collate_padded(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def classification_train_data(features: Sequence[dict], pad_id: int) -> TrainData:
    return TrainData(FeatureDataset(list(features)), partial(collate_padded, pad_id=pad_id))


# --- language modelling ------------------------------------------------------------------------------
def lm_blocks(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Texts packed into (num_blocks, seq_len) rows separated by eos (the tail is dropped)."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ValueError("packing text for a causal LM needs a tokenizer with an eos token")
    tokens = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    return pack_for_causal_lm(tokens, seq_len, eos_id=eos)


def lm_batches(blocks: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": blocks[i:i + batch_size], "labels": blocks[i:i + batch_size]}
            for i in range(0, blocks.shape[0], batch_size)]


def lm_train_data(blocks: torch.Tensor) -> TrainData:
    return TrainData(PackedDataset(blocks), default_collate)
