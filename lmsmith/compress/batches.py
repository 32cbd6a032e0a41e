"""Batches for compression steps: training data, evaluation batches and calibration inputs, built
from labelled records (classifiers) or plain text (language models) with the data package. The
evaluation batch builders live in `lmsmith.evaluate.batches` and are re-exported here.

Calibration inputs are model keyword arguments only (no labels), because pruning and GPTQ feed
them straight to `model(**inputs)`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import default_collate

from ..data import FeatureDataset, PackedDataset, collate_padded, encode_classification
from ..evaluate.batches import classification_batches, lm_batches, lm_blocks, pad_id_of
from ..train.loop import TrainData

__all__ = [
    "MODEL_INPUT_KEYS", "calibration_inputs", "classification_batches", "classification_features",
    "classification_train_data", "lm_batches", "lm_blocks", "lm_train_data", "model_inputs", "pad_id_of",
]

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


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


def classification_train_data(features: Sequence[dict], pad_id: int) -> TrainData:
    return TrainData(FeatureDataset(list(features)), partial(collate_padded, pad_id=pad_id))


# --- language modelling ------------------------------------------------------------------------------


def lm_train_data(blocks: torch.Tensor) -> TrainData:
    return TrainData(PackedDataset(blocks), default_collate)
