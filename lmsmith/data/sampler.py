"""A seeded batch sampler that can stop and resume mid-epoch and see exactly the same batches.

Epoch e's order is a permutation drawn from (seed, e) alone, so any process can recompute it; the
position is just (epoch, next batch index). Iterating to the end of an epoch moves the sampler to
the next epoch, so `for epoch in ...: for batch in loader:` gets a fresh order each time.

    sampler = ResumableSampler(len(dataset), batch_size=32, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=...)
    ... checkpoint["sampler"] = sampler.state_dict()
    ... later: sampler.load_state_dict(checkpoint["sampler"])

`state_dict()` counts the batches the sampler has handed out. With DataLoader num_workers=0 that
equals the batches the loop received; workers prefetch ahead, so with workers record the loop's own
(epoch, batches done) and build `ResumableSampler(..., epoch=e, start_batch=k)` instead.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                 *, shuffle: bool = True, drop_last: bool = False):
        if n < 0 or batch_size < 1:
            raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = epoch
        self.position = self._checked_position(start_batch)

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The index order of an epoch: a permutation seeded by (seed, epoch), or 0..n-1 unshuffled."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def batch(self, epoch: int, index: int) -> list[int]:
        order = self.epoch_order(epoch)
        return order[index * self.batch_size:(index + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        while self.position < self.batches_per_epoch:
            start = self.position * self.batch_size
            self.position += 1  # counted before yielding: a batch handed out is a batch consumed
            yield order[start:start + self.batch_size].tolist()
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its start; setting the current epoch keeps the (resumed) position."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "next_batch": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("n", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"saved sampler has {key}={state[key]}, this one {getattr(self, key)}; "
                                 "resuming would see different batches")
        self.seed, self.epoch = state["seed"], state["epoch"]
        self.position = self._checked_position(state["next_batch"])

    def _checked_position(self, batch_index: int) -> int:
        if not 0 <= batch_index <= self.batches_per_epoch:
            raise ValueError(f"start batch {batch_index} outside 0..{self.batches_per_epoch}")
        return batch_index
