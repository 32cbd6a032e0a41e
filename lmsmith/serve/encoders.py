"""Encoder-side serving: sentence embeddings (mean pooling) and sequence classification.

Both run one padded forward pass per batch under a lock (a torch module is not safe to call from
several threads at once); the API calls them from a worker thread so the event loop stays free.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.heads import pool

TokenLists = list[list[int]]


@dataclass(frozen=True)
class EncodedBatch:
    token_ids: TokenLists
    num_tokens: int


class _Encoder:
    """Tokenise (or take token ids), check lengths, run padded batches through the model."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_length = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self._pad_id = getattr(tokenizer, "pad_id", None) or 0
        self._lock = threading.Lock()

    def encode(self, inputs: Sequence[str] | Sequence[Sequence[int]]) -> EncodedBatch:
        """Strings are tokenised with special tokens; token-id lists are used as they are."""
        if inputs and isinstance(inputs[0], str):
            ids = self.tokenizer.encode_batch(list(inputs), add_special_tokens=True)
        else:
            ids = [list(x) for x in inputs]
        for i, seq in enumerate(ids):
            if len(seq) > self.max_length:
                raise ValueError(f"input[{i}] has {len(seq)} tokens; {self.name} accepts at most "
                                 f"{self.max_length} tokens")
            bad = [t for t in seq if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"input[{i}] contains token id {bad[0]}, outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        return EncodedBatch(ids, sum(len(s) for s in ids))

    def _run(self, ids: TokenLists, reduce) -> torch.Tensor:
        """reduce(model_output, attention_mask) per padded batch, concatenated (on the CPU)."""
        parts = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(ids), self.batch_size):
                input_ids, mask = self._pad(ids[start:start + self.batch_size])
                out = self.model(input_ids, attention_mask=mask)
                parts.append(reduce(out, mask).float().cpu())
        return torch.cat(parts)

    def _pad(self, chunk: TokenLists) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, T) ids and attention mask on the model's device."""
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        device = self.model.device
        return input_ids.to(device), mask.to(device)


class Embedder(_Encoder):
    """Mean-pooled (optionally L2-normalised) sentence embeddings from an encoder (`task="base"`)."""

    @property
    def dimensions(self) -> int:
        return self.model.config.hidden_size

    def embed(self, ids: TokenLists, normalize: bool = True) -> torch.Tensor:
        """(N, hidden_size) float32 embeddings, one per token list."""
        def mean_pool(out, mask):
            pooled = pool(out.hidden_states.float(), mask, "mean")
            return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

        return self._run(ids, mean_pool)


class Classifier(_Encoder):
    """Class probabilities from a fine-tuned sequence classifier (`task="sequence-classification"`)."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, batch_size: int = 32) -> None:
        if model.config.task != "sequence-classification":
            raise ValueError(f"classifier {name!r} has task={model.config.task!r}; "
                             "expected 'sequence-classification'")
        super().__init__(model, tokenizer, name, batch_size)
        self.labels: tuple[str, ...] = tuple(model.config.labels)

    def probabilities(self, ids: TokenLists) -> torch.Tensor:
        """(N, num_labels) softmax probabilities, columns in `labels` order."""
        return self._run(ids, lambda out, mask: out.logits.float().softmax(-1))
