"""Attention weights as plain data, and the aggregations people read them through."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .tokens import TokenizedText, tokenize


@dataclass(frozen=True)
class AttentionMaps:
    """Attention of one text: weights[l, h, t, s] is how much query token t reads key token s in
    layer `layers[l]`, head `heads[h]` (rows sum to 1)."""

    tokens: tuple[str, ...]
    weights: torch.Tensor  # (L, H, T, S) float32 on the CPU
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    special: tuple[bool, ...] = ()
    causal: bool = False

    def head_mean(self) -> torch.Tensor:
        """(L, T, S): each layer's attention averaged over its heads."""
        return head_mean(self.weights)

    def rollout(self) -> torch.Tensor:
        """(T, S): attention rollout over the captured layers (all of them unless `layers` was given)."""
        return attention_rollout(self.weights)

    def layer_index(self, layer: int | None) -> int | None:
        """Position of model layer `layer` in `weights` (negative counts from the last captured one)."""
        if layer is None:
            return None
        if layer in self.layers:
            return self.layers.index(layer)
        if -len(self.layers) <= layer < 0:
            return len(self.layers) + layer
        raise ValueError(f"layer {layer} was not captured; captured layers are {list(self.layers)}")

    def to_dict(self, decimals: int = 4) -> dict:
        return {"tokens": list(self.tokens), "layers": list(self.layers), "heads": list(self.heads),
                "special": list(self.special), "causal": self.causal,
                "weights": self.weights.round(decimals=decimals).tolist()}

    def to_json(self, decimals: int = 4) -> str:
        return json.dumps(self.to_dict(decimals), ensure_ascii=False)

    def to_html(self) -> str:
        """A self-contained page (inline data, no network) with layer/head pickers."""
        from .render import attention_html

        return attention_html(self)

    def save_png(self, path: str | Path, layer: int | None = None, head: int | None = None) -> Path:
        """Heatmaps: every layer × head, the heads of one layer, or one head (token labels on the axes)."""
        from .render import plot_attention

        return plot_attention(self, Path(path), self.layer_index(layer), head)

    def save(self, out_dir: str | Path, layer: int | None = None, head: int | None = None,
             stem: str = "attention") -> dict[str, Path]:
        """Write `<stem>.png`, `<stem>.html` and `<stem>.json` into out_dir; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"png": out / f"{stem}.png", "html": out / f"{stem}.html", "json": out / f"{stem}.json"}
        self.save_png(paths["png"], layer, head)
        paths["html"].write_text(self.to_html(), encoding="utf-8")
        paths["json"].write_text(self.to_json(), encoding="utf-8")
        return paths

    def summary(self, layer: int | None = None, query: int | None = None, k: int = 5) -> str:
        """The tokens one query reads most in one layer (head mean); defaults: last layer, the [CLS]
        token for encoders, the last token for causal models."""
        index = self.layer_index(layer) if layer is not None else len(self.layers) - 1
        query = query if query is not None else (len(self.tokens) - 1 if self.causal else 0)
        row = self.head_mean()[index, query]
        top = row.topk(min(k, row.numel()))
        pairs = ", ".join(f"{self.tokens[i]!r} {v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
        return f"layer {self.layers[index]}, token {self.tokens[query]!r} attends most to: {pairs}"


def head_mean(weights: torch.Tensor) -> torch.Tensor:
    """(L, H, T, S) → (L, T, S)."""
    return weights.mean(dim=1)


def attention_rollout(weights: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): Â_l = (1 − r)·mean_heads(A_l) + r·I, rows renormalised,
    R = Â_L ⋯ Â_1. R[t, s] estimates how much of token s's input reaches position t at the top.

    weights: (L, H, T, T) or head-averaged (L, T, T). The identity stands for the residual stream,
    which carries each token past attention; without it rollout quickly becomes uniform.
    """
    if weights.dim() == 4:
        weights = head_mean(weights)
    _, T, S = weights.shape
    if T != S:
        raise ValueError(f"rollout needs square attention (queries = keys), got {T} queries and {S} keys")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual weight must be in [0, 1], got {residual}")
    eye = torch.eye(T, dtype=torch.float64)
    rollout = eye
    for layer in weights.double():
        mixed = (1 - residual) * layer + residual * eye
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    return rollout.float()


# --- capture -------------------------------------------------------------------------------------------
def attention_maps(model, tokenizer, text: str, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None) -> AttentionMaps:
    """Run `text` through the model once and keep the attention weights of the chosen layers/heads."""
    tokens = tokenize(tokenizer, text)
    layers = _check_indices("layer", layers, model.config.num_layers)
    heads = _check_indices("head", heads, model.config.num_heads)
    with eval_mode(model):
        weights = capture_attention(model, tokens)[list(layers)][:, list(heads)]
    return AttentionMaps(tokens.labels, weights, layers, heads, tokens.special, bool(model.config.causal))


def capture_attention(model, tokens: TokenizedText) -> torch.Tensor:
    """(L, H, T, S) attention weights of every layer for one encoded text (float32, CPU)."""
    check_length(model, len(tokens))
    ids = torch.tensor([tokens.ids], device=model.device)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    return torch.stack([w[0].float().cpu() for w in out.attentions])


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout off while explaining (attention or attributions of a noisy function mean little); the
    model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_length(model, n_tokens: int) -> None:
    limit = model.config.max_position_embeddings
    if n_tokens > limit:
        raise ValueError(f"the text is {n_tokens} tokens long; this model reads at most {limit}")


def _check_indices(what: str, chosen: Sequence[int] | None, count: int) -> tuple[int, ...]:
    if chosen is None:
        return tuple(range(count))
    if isinstance(chosen, int):
        chosen = [chosen]
    resolved = []
    for i in chosen:
        if not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f"{what} {i!r} does not exist: this model has {count} {what}s (0..{count - 1})")
        resolved.append(i % count)
    if not resolved:
        raise ValueError(f"no {what}s chosen; pick some of 0..{count - 1}")
    return tuple(resolved)
