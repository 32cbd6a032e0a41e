"""A simple batched generate loop over a static KV cache, plus streaming.

The server has its own engine (paged cache, continuous batching); this loop is for the library,
the CLI and as the reference the engine is tested against. Encoder-decoder models (T5) take the
prompt as the encoder input and generate from `decoder_start_token_id`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from .model.cache import EncoderDecoderCache, StaticKVCache
from .model.transformer import Transformer
from .sampling import SamplingSettings, make_generator, sample


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: output is cut before them
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's end-of-turn/eos ids
    seed: int | None = None
    truncate_prompt: bool = False  # keep the prompt's tail instead of failing when it is too long

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", 0 <= self.temperature <= 100, "in [0, 100]"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {allowed}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token/string) or "length"
    prompt_tokens: int = 0


@dataclass
class _Row:
    prompt_len: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: str = "length"


def encode_prompts(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    encoded = [list(p) if not isinstance(p, str) else tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
    return encoded


def fit_to_context(ids: list[int], context: int, config: GenerationConfig) -> tuple[list[int], int]:
    """Check (or truncate) a prompt against the context window; returns (ids, max new tokens)."""
    if len(ids) >= context:
        if not config.truncate_prompt:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the context window is {context} tokens "
                "(leave room for at least one new token, or pass truncate_prompt=True)"
            )
        ids = ids[-(context - 1):]
    return ids, min(config.max_new_tokens, context - len(ids))


def prompt_budget(model_config, ids: list[int], config: GenerationConfig) -> tuple[list[int], int]:
    """(the prompt as it will run, max new tokens) for a model.

    A decoder-only prompt shares the context window with its completion. An encoder-decoder prompt
    fills the encoder's window; the decoder has its own, holding its start token and the new tokens.
    """
    context = model_config.max_position_embeddings
    if not getattr(model_config, "encoder_decoder", False):
        return fit_to_context(ids, context, config)
    if len(ids) > context:
        if not config.truncate_prompt:
            raise ValueError(f"prompt has {len(ids)} tokens but the encoder's context window is {context} tokens "
                             "(shorten it, or pass truncate_prompt=True to keep its tail)")
        ids = ids[-context:]
    return ids, min(config.max_new_tokens, context - 1)


def _pad(rows: list[list[int]], pad_id: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return ids, mask


@torch.inference_mode()
def iter_tokens(model: Transformer, prompts: list[list[int]], config: GenerationConfig,
                pad_id: int) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) each step until every row stopped or hit its budget."""
    if getattr(model.config, "encoder_decoder", False):
        yield from _iter_seq2seq_tokens(model, prompts, config, pad_id)
        return
    device = model.device
    budgets = [fit_to_context(p, model.config.max_position_embeddings, config) for p in prompts]
    prompts = [p for p, _ in budgets]
    steps = max(b for _, b in budgets)
    ids, mask = _pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, width = ids.shape
    cache = StaticKVCache(model.config, B, width + steps, device=device, dtype=model.dtype)
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    settings = SamplingSettings.from_rows([config] * B, device=device)
    generators = [make_generator(None if config.seed is None else config.seed + i, device) for i in range(B)]
    seen = _seen_tokens(ids, mask, model.config.vocab_size) if config.repetition_penalty != 1 else None
    logits = model(ids, attention_mask=mask if padded else None, position_ids=positions, cache=cache,
                   logits_to_keep=1).logits[:, -1]
    next_pos = positions[:, -1:] + 1
    for _ in range(steps):
        token = sample(logits, settings, generators, seen)
        yield token
        if seen is not None:
            seen[torch.arange(B), token] = True
        if padded:
            mask = torch.cat((mask, torch.ones(B, 1, dtype=mask.dtype, device=device)), dim=1)
        logits = model(token.view(B, 1), attention_mask=mask if padded else None, position_ids=next_pos,
                       cache=cache).logits[:, -1]
        next_pos = next_pos + 1


@torch.inference_mode()
def _iter_seq2seq_tokens(model: Transformer, prompts: list[list[int]], config: GenerationConfig,
                         pad_id: int) -> Iterator[torch.Tensor]:
    """Encode the (right-padded) prompts once, then decode from decoder_start_token_id; the cache keeps
    the decoder's keys/values and the encoder's cross-attention keys/values."""
    cfg, device = model.config, model.device
    if cfg.decoder_start_token_id is None:
        raise ValueError(f"this {cfg.family} encoder-decoder model has no decoder_start_token_id in its config")
    budgets = [prompt_budget(cfg, p, config) for p in prompts]
    steps = max(b for _, b in budgets)
    ids, mask = _pad([p for p, _ in budgets], pad_id, left=False)
    B = ids.shape[0]
    cache = EncoderDecoderCache(cfg, B, steps + 1, device=device, dtype=model.dtype)  # start token + steps
    token = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    settings = SamplingSettings.from_rows([config] * B, device=device)
    generators = [make_generator(None if config.seed is None else config.seed + i, device) for i in range(B)]
    # As transformers does for encoder-decoder models, the penalty sees the decoder's tokens only.
    seen = _seen_tokens(token, None, cfg.vocab_size) if config.repetition_penalty != 1 else None
    padded = bool((mask == 0).any())
    logits = model(ids.to(device), attention_mask=mask.to(device) if padded else None, decoder_input_ids=token,
                   cache=cache).logits[:, -1]
    for _ in range(steps):
        token = sample(logits, settings, generators, seen)
        yield token
        if seen is not None:
            seen[torch.arange(B), token] = True
        logits = model(decoder_input_ids=token.view(B, 1), cache=cache).logits[:, -1]


def _seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids * mask, mask.bool()) if mask is not None else seen.scatter_(1, ids, True)


def _stop_ids(tokenizer, config: GenerationConfig) -> set[int]:
    if config.stop_token_ids is not None:
        return set(config.stop_token_ids)
    return set(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id})


def generate(model: Transformer, tokenizer, prompts, config: GenerationConfig | None = None,
             **overrides) -> list[Completion]:
    """Complete each prompt (text or token ids); returns one Completion per prompt."""
    config = replace(config or GenerationConfig(), **overrides)
    encoded = encode_prompts(tokenizer, prompts)
    rows = [_Row(len(p)) for p in encoded]
    budgets = [prompt_budget(model.config, p, config)[1] for p in encoded]
    stop_ids = _stop_ids(tokenizer, config)
    for tokens in iter_tokens(model, encoded, config, _pad_id(tokenizer)):
        for row, token, budget in zip(rows, tokens.tolist(), budgets):
            if not row.done:
                _advance(row, token, tokenizer, config, stop_ids, budget)
        if all(r.done for r in rows):
            break
    return [Completion(r.text, r.ids, r.finish_reason, r.prompt_len) for r in rows]


def _advance(row: _Row, token: int, tokenizer, config, stop_ids: set[int], budget: int) -> None:
    if token in stop_ids:
        row.done, row.finish_reason = True, "stop"
        return
    row.ids.append(token)
    row.text = tokenizer.decode(row.ids, skip_special_tokens=True)
    cut = find_stop(row.text, config.stop)
    if cut is not None:
        row.text, row.done, row.finish_reason = row.text[:cut], True, "stop"
    elif len(row.ids) >= budget:
        row.done = True


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None else 0


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might be the start of a stop string (so must not be streamed yet)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest


def stream(model: Transformer, tokenizer, prompt: str | list[int], config: GenerationConfig | None = None,
           **overrides) -> Iterator[str]:
    """Yield text pieces of one completion as they are decoded: never half a UTF-8 character, never
    part of a stop string."""
    config = replace(config or GenerationConfig(), **overrides)
    encoded = encode_prompts(tokenizer, [prompt])
    budget = prompt_budget(model.config, encoded[0], config)[1]
    row, sent = _Row(len(encoded[0])), 0
    stop_ids = _stop_ids(tokenizer, config)
    for tokens in iter_tokens(model, encoded, config, _pad_id(tokenizer)):
        _advance(row, int(tokens[0]), tokenizer, config, stop_ids, budget)
        safe = len(row.text) if row.done else len(row.text) - held_back(row.text, config.stop)
        if not row.done and row.text.endswith("\ufffd"):
            safe = min(safe, len(row.text.rstrip("\ufffd")))  # wait for the rest of the character
        if safe > sent:
            yield row.text[sent:safe]
            sent = safe
        if row.done:
            break
