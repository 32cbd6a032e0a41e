"""Evaluation batches: padded classification batches and packed causal-LM windows.

Shared by `lmsmith.evaluate` and the compression pipeline (which re-exports them from
`lmsmith.compress.batches`), so both score a model on exactly the same tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import collate_padded, pack_for_causal_lm


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id; decoder-only tokenizers often have none, so fall back to eos."""
    pad = getattr(tokenizer, "pad_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_id", None)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return pad


def classification_batches(features: Sequence[dict], pad_id: int, batch_size: int) -> list[dict]:
    """Evaluation batches; features sorted by length so little compute goes to padding."""
    ordered = sorted(features, key=lambda f: len(f["input_ids"]))
    return [collate_padded(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


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
