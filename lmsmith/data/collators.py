"""Datasets and collate functions: features (dicts of int lists) → batches (dicts of int64 tensors).

A batch has `input_ids` (B, T), `attention_mask` (B, T; 1 = real token), `labels` ((B, T) padded
with -100 for token-level targets, or (B,) for sequence labels) and `token_type_ids` (B, T) when the
features carry them. Padding is on the right.

    loader = DataLoader(FeatureDataset(features), batch_sampler=ResumableSampler(...),
                        collate_fn=partial(collate_padded, pad_id=tokenizer.pad_id))
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from lmsmith.data.encoding import IGNORE_INDEX, TokenizerLike, mask_tokens, special_token_ids


class FeatureDataset(Dataset):
    """A map-style dataset over a list of feature dicts."""

    def __init__(self, features: Sequence[Mapping[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self.features[index]


class PackedDataset(Dataset):
    """Rows of a (num_blocks, seq_len) tensor from `pack_for_causal_lm`, labels = input_ids."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be (num_blocks, seq_len), got shape {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.blocks[index]
        return {"input_ids": row, "labels": row}


def collate_padded(features: Sequence[Mapping[str, Any]], pad_id: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of features into a batch (see module docstring). A scalar `label` becomes `labels`."""
    if not features:
        raise ValueError("cannot collate an empty list of features")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token; pass e.g. pad_id=eos_id")
    lengths = [len(feature["input_ids"]) for feature in features]
    width = _round_up(max(lengths), pad_to_multiple_of)
    batch = {"input_ids": _pad([f["input_ids"] for f in features], width, pad_id)}
    batch["attention_mask"] = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    if _present(features, "token_type_ids"):
        batch["token_type_ids"] = _pad([f["token_type_ids"] for f in features], width, 0)
    if _present(features, "labels"):
        batch["labels"] = _pad([f["labels"] for f in features], width, IGNORE_INDEX)
    elif _present(features, "label"):
        batch["labels"] = torch.tensor([int(f["label"]) for f in features], dtype=torch.long)
    return batch


def collate_seq2seq(features: Sequence[Mapping[str, Any]], pad_id: int,
                    pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Encoder-decoder features {input_ids, labels} → input_ids/attention_mask padded to the longest source
    and labels (B, T_target) padded with -100 to the longest target: the two widths differ."""
    if any("labels" not in f for f in features):
        raise ValueError("sequence-to-sequence features need 'labels' (the target ids)")
    batch = collate_padded([{"input_ids": f["input_ids"]} for f in features], pad_id, pad_to_multiple_of)
    targets = [f["labels"] for f in features]
    batch["labels"] = _pad(targets, _round_up(max(len(t) for t in targets), pad_to_multiple_of), IGNORE_INDEX)
    return batch


def _present(features: Sequence[Mapping[str, Any]], key: str) -> bool:
    count = sum(key in feature for feature in features)
    if 0 < count < len(features):
        raise ValueError(f"{count} of {len(features)} features have {key!r}; all or none must")
    return count > 0


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def _pad(rows: Sequence[Sequence[int] | torch.Tensor], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass
class MLMCollator:
    """Pads features and applies BERT dynamic masking with its own seeded generator.

    The masks depend on the generator's state, so a resumed run gets the same masks when it restores
    `state_dict()` (exact with DataLoader num_workers=0: workers would each copy the generator).
    """

    pad_id: int
    mask_id: int
    vocab_size: int
    special_ids: frozenset[int]
    probability: float = 0.15
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_tokenizer(cls, tokenizer: TokenizerLike, probability: float = 0.15, seed: int = 0) -> MLMCollator:
        if tokenizer.mask_id is None:
            raise ValueError("masked-LM needs a tokenizer with a mask token (mask_id is None)")
        return cls(tokenizer.pad_id, tokenizer.mask_id, tokenizer.vocab_size,
                   special_token_ids(tokenizer), probability, seed)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_padded([{"input_ids": f["input_ids"]} for f in features], self.pad_id)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], mask_id=self.mask_id, vocab_size=self.vocab_size,
            special_ids=self.special_ids | {self.pad_id}, attention_mask=batch["attention_mask"],
            probability=self.probability, generator=self.generator,
        )
        return batch

    def __getstate__(self) -> dict:  # torch.Generator does not pickle; its state does (spawned workers)
        return {**self.__dict__, "generator": self.generator.get_state()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, generator=torch.Generator())
        self.generator.set_state(state["generator"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
