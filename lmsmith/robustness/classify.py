"""A sequence classifier seen as a function texts → class probabilities, with a query counter.

Suites and attacks call the model only through `Victim.probs`, so "queries" (texts scored) are counted
in one place and batching (length-sorted, to pad little) is done once.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.collators import collate_padded
from ..data.encoding import special_token_ids, special_wrapping

CLASSIFIER_TASK = "sequence-classification"


def check_classifier(model: nn.Module) -> tuple[str, ...]:
    """The model's class labels; ValueError unless it is a sequence classifier."""
    config = getattr(model, "config", None)
    task = getattr(config, "task", None)
    if task != CLASSIFIER_TASK:
        raise ValueError(f"robustness checks need a {CLASSIFIER_TASK!r} model (config.task), got task={task!r}; "
                         "load it with lmsmith.api.load(path, task='sequence-classification')")
    labels = tuple(config.labels)
    if not labels:
        raise ValueError("the classifier has no config.labels; pass labels= when loading it")
    return labels


def label_ids(labels: Sequence[Hashable], names: Sequence[str]) -> list[int]:
    """Labels given as names (or as class indices) → class indices of the model."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for label in labels:
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
            out.append(label)
        elif label in index:
            out.append(index[label])
        else:
            raise ValueError(f"label {label!r} is not one of the model's labels {list(names)} (or an index into them)")
    return out


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return 0 if pad is None else pad  # padded positions are masked out, so any id works


@dataclass
class Victim:
    """The model under test (put in eval mode): `probs(texts)` → (N, C) softmax probabilities; `queries`
    counts texts scored."""

    model: nn.Module
    tokenizer: object
    batch_size: int = 32
    max_length: int = 128
    queries: int = 0
    labels: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.labels = check_classifier(self.model)
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {self.batch_size}, {self.max_length}")
        self.model.eval()
        self.wrapping = special_wrapping(self.tokenizer)
        self.special_ids = special_token_ids(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        budget = self.wrapping.budget(self.max_length)
        return [self.wrapping.wrap(self.tokenizer.encode(t, add_special_tokens=False)[:budget]) for t in texts]

    def batch(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        batch = collate_padded([{"input_ids": list(x)} for x in ids], pad_id=pad_id_of(self.tokenizer))
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def probs_of_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, C) probabilities for token-id sequences (already wrapped in special tokens)."""
        if not ids:
            return torch.empty(0, len(self.labels))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out = torch.empty(len(ids), len(self.labels))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = self.batch([ids[i] for i in chunk])
            logits = self.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
        self.queries += len(ids)
        return out

    def probs(self, texts: Sequence[str]) -> torch.Tensor:
        return self.probs_of_ids(self.encode(texts))
