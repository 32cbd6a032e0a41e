"""Scheduled sequences → one batched forward over the paged KV cache → one sampled token per sequence.

A step is a ragged batch: each sequence computes `num_new_tokens` tokens starting at
`start_position` (a whole prompt, a prefill chunk, or one decode token). The runner right-pads them
into (B, T) input ids; the `PagedKVCache` writes each real token's K/V into its slot of the block
pool and hands attention every sequence's whole context, gathered from its blocks and padded to the
longest context of the step, with a (B, 1, T, S) mask that hides padding and the future.

All index arithmetic (slots to write, slots to gather, the mask) is done once per step in
`plan_step`, on tensors; every layer then does one `index_copy_` and one `index_select` per K and V.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model.config import ModelConfig
from ..model.packed import pack_linears
from ..sampling import SamplingSettings, make_generator, sample
from .request import Request
from .scheduler import ScheduledSeq


@dataclass(frozen=True)
class StepLayout:
    """Index tensors for one ragged step of B sequences, T = longest chunk, S = longest context."""

    positions: torch.Tensor  # (B, T) absolute position of each query; padding repeats the last real one
    num_new_tokens: torch.Tensor  # (B,)
    write_slots: torch.Tensor  # (N,) pool slot of each real new token, in row-major (B, T) order
    write_rows: torch.Tensor | None  # (N,) flat (B*T) index of each real token; None: no padding
    gather_slots: torch.Tensor  # (B*S,) pool slot of every key of every row (padding keys repeat one)
    mask: torch.Tensor  # (B, 1, T, S) bool, True = may attend

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def max_context(self) -> int:
        return self.mask.shape[-1]


def slots_of(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pool slot of each token position: table[pos // block_size] * block_size + pos % block_size.

    block_tables: (B, W) block ids; positions: (B, L) positions inside each row's table.
    """
    blocks = block_tables.gather(1, torch.div(positions, block_size, rounding_mode="floor"))
    return blocks * block_size + positions % block_size


def plan_step(block_tables: Sequence[Sequence[int]], start_positions: Sequence[int],
              num_new_tokens: Sequence[int], block_size: int, sliding_window: int | None = None,
              device: torch.device | str | None = None) -> StepLayout:
    """Where every new token's K/V goes and where every row's keys come from (pure; no cache access)."""
    _check_step(block_tables, start_positions, num_new_tokens, block_size)
    starts = torch.tensor(start_positions, dtype=torch.long)
    num_new = torch.tensor(num_new_tokens, dtype=torch.long)
    context = starts + num_new  # (B,) keys each row sees after this step
    T, S = int(num_new.max()), int(context.max())
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)

    offsets = torch.arange(T)
    real = offsets < num_new[:, None]  # (B, T) real tokens vs right padding
    positions = torch.where(real, starts[:, None] + offsets, context[:, None] - 1)
    write = slots_of(tables, positions, block_size).flatten()
    real_flat = real.flatten()
    all_real = bool(real_flat.all())
    write_rows = None if all_real else real_flat.nonzero().squeeze(1)
    write_slots = write if all_real else write[write_rows]

    keys = torch.arange(S)
    key_positions = torch.minimum(keys[None, :], context[:, None] - 1)  # padding keys re-read a real one
    gather = slots_of(tables, key_positions, block_size).flatten()
    mask = (keys[None, None, :] <= positions[:, :, None]) & (keys[None, :] < context[:, None])[:, None, :]
    if sliding_window is not None:
        mask &= keys[None, None, :] > positions[:, :, None] - sliding_window
    move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    return StepLayout(move(positions), move(num_new), move(write_slots),
                      None if write_rows is None else move(write_rows), move(gather), move(mask[:, None]))


def _check_step(block_tables, start_positions, num_new_tokens, block_size: int) -> None:
    if not (len(block_tables) == len(start_positions) == len(num_new_tokens) >= 1):
        raise ValueError(f"need one block table, start and count per sequence, got {len(block_tables)}, "
                         f"{len(start_positions)}, {len(num_new_tokens)}")
    for i, (table, start, n) in enumerate(zip(block_tables, start_positions, num_new_tokens)):
        if n < 1 or start < 0:
            raise ValueError(f"sequence {i}: num_new_tokens={n} must be >= 1 and start_position={start} >= 0")
        if len(table) * block_size < start + n:
            raise ValueError(f"sequence {i}: {len(table)} blocks of {block_size} cannot hold "
                             f"{start + n} tokens")


class PagedKVCache:
    """Per-layer K and V pools of shape (num_blocks, block_size, Hkv, D), allocated once.

    Implements the model's KVCache protocol for one ragged step at a time: call `prepare(layout)`
    before the forward. The Transformer picks up `attention_mask_4d` as the attention mask.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = config.kv_heads, config.dim_per_head
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.layout: StepLayout | None = None

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def attention_mask_4d(self) -> torch.Tensor | None:
        return None if self.layout is None else self.layout.mask

    def prepare(self, layout: StepLayout) -> None:
        self.layout = layout

    def clear(self) -> None:
        self.layout = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's real tokens; return every row's keys/values (B, Hkv, S, D)."""
        assert self.layout is not None, "PagedKVCache.prepare(layout) must be called before the forward"
        return self._store_and_gather(self.k[layer], k), self._store_and_gather(self.v[layer], v)

    def _store_and_gather(self, pool: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        B, H, T, D = new.shape
        # One row per slot: a 2-D index_select copies whole contiguous rows, ~3x faster on CPU than
        # the same gather over a (slots, Hkv, D) view.
        flat_pool = pool.view(-1, H * D)  # (num_blocks * block_size, Hkv*D), shares storage
        rows = new.transpose(1, 2).reshape(B * T, H * D)  # (B*T, Hkv*D)
        if lay.write_rows is not None:
            rows = rows.index_select(0, lay.write_rows)
        flat_pool.index_copy_(0, lay.write_slots, rows.to(pool.dtype))
        gathered = flat_pool.index_select(0, lay.gather_slots)  # (B*S, Hkv*D)
        return gathered.view(B, lay.max_context, H, D).transpose(1, 2)  # (B, Hkv, S, D)


class ModelRunner:
    """Owns the paged KV pool and the per-request random generators; runs one step at a time.

    Not thread-safe: one thread calls `execute`. Requests are only read.
    """

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, pack_weights: bool = True) -> None:
        config: ModelConfig = model.config
        if config.encoder_decoder:
            raise ValueError(f"{config.family} is an encoder-decoder model: the serving engine runs decoder-only "
                             "causal LMs (use `lmsmith generate` or lmsmith.generation for T5)")
        if config.task != "causal-lm" or not config.causal:
            raise ValueError(f"serving needs a causal LM, got task={config.task!r} causal={config.causal}")
        self.model = model.eval()  # dropout off: serving must be deterministic
        # The engine owns the model from here: packing its float32 CPU linears for oneDNN speeds up every
        # step (no-op elsewhere); the state dict keeps its keys.
        self.packed_layers = pack_linears(model) if pack_weights else []
        self.config = config
        self.device = next(model.parameters()).device
        self.cache = PagedKVCache(config, num_blocks, block_size, self.device, _kv_dtype(model))
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, scheduled: Sequence[ScheduledSeq], requests: Mapping[str, Request]) -> dict[str, int]:
        """Run the step; return the sampled next token of every sequence that `samples_token`."""
        if not scheduled:
            return {}
        logits = self.compute_logits(scheduled)
        sampling = [s.request_id for s in scheduled if s.samples_token]
        if not sampling:
            return {}
        tokens = self._sample(logits, [requests[rid] for rid in sampling])
        return dict(zip(sampling, tokens.tolist()))

    @torch.inference_mode()
    def compute_logits(self, scheduled: Sequence[ScheduledSeq]) -> torch.Tensor:
        """(n, V) logits at the last real position of each of the n sequences that sample, in order."""
        out, _ = self.forward(scheduled, logits_to_keep=1)
        rows = [i for i, s in enumerate(scheduled) if s.samples_token]
        last = [scheduled[i].num_new_tokens - 1 for i in rows]  # column of each row's last real token
        keep = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        T = max(s.num_new_tokens for s in scheduled)
        if all(col == T - 1 for col in last):  # every sampling row ends at the last column (always in decode)
            return out.logits[:, -1].index_select(0, keep)
        columns = torch.tensor(last, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = out.hidden_states[keep, columns]  # (n, H): final-normed states at the last real tokens
        return self.model.lm_head(hidden)

    @torch.inference_mode()
    def forward(self, scheduled: Sequence[ScheduledSeq], logits_to_keep: int = 0):
        """One model forward over the paged cache: (ModelOutput, StepLayout). Writes the step's K/V."""
        layout = plan_step([s.block_table for s in scheduled], [s.start_position for s in scheduled],
                           [s.num_new_tokens for s in scheduled], self.cache.block_size,
                           self.config.sliding_window, self.device)
        for s in scheduled:
            if len(s.token_ids) != s.num_new_tokens:
                raise ValueError(
                    f"{s.request_id}: {len(s.token_ids)} token ids for {s.num_new_tokens} tokens")
        T = layout.positions.shape[1]
        padded = [list(s.token_ids) + [0] * (T - s.num_new_tokens) for s in scheduled]
        input_ids = torch.tensor(padded, dtype=torch.long).to(self.device, non_blocking=True)  # (B, T)
        self.cache.prepare(layout)
        try:
            out = self.model(input_ids, position_ids=layout.positions, cache=self.cache,
                             logits_to_keep=logits_to_keep)
        finally:
            self.cache.clear()
        return out, layout

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator (safe for unknown ids)."""
        self._generators.pop(request_id, None)

    @property
    def num_generators(self) -> int:
        return len(self._generators)

    # -- sampling --

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        settings = SamplingSettings.from_rows(params, device=logits.device)
        generators = [None if p.greedy else self._generator(r) for p, r in zip(params, requests)]
        penalised = any(p.repetition_penalty != 1 for p in params)
        seen = seen_tokens([r.all_token_ids for r in requests], logits.shape[-1], logits.device) \
            if penalised else None
        return sample(logits, settings, generators, seen)

    def _generator(self, request: Request) -> torch.Generator:
        """One generator per request, seeded once: a seeded request draws the same stream as
        `lmsmith.generation` with that seed, however it is batched or preempted."""
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = make_generator(request.sampling_params.seed, self.device)
            self._generators[request.request_id] = generator
        return generator


def seen_tokens(rows: list[list[int]], vocab_size: int, device=None) -> torch.Tensor:
    """(B, V) bool: True where the token occurs in the row (for the repetition penalty)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device).scatter_(1, ids, True)


def _kv_dtype(model: nn.Module) -> torch.dtype:
    """The dtype k/v come out of the projections in: the first floating parameter's."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.kv_heads * config.dim_per_head * element
