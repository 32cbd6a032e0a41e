"""Structured pruning: physically remove attention heads, FFN neurons or whole layers.

The result is a plain, smaller Transformer: its Linear layers shrink and `model.config` follows
(num_heads / num_kv_heads / head_dim, intermediate_size, num_layers), so it saves, loads,
quantizes and serves like any other model, and runs faster (unstructured zeros do not).

Sizes stay uniform across layers: every layer keeps the same *number* of heads and neurons, each
layer choosing *which* by its own importance scores. One ModelConfig still describes the model, so
no per-layer size field is needed and checkpoints stay loadable by `transformers` (Llama-style
configs record head_dim; see the report for BERT).

Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads). Two units of
removal are offered:
  * head_unit="query" (default): remove the same number of query heads inside every KV group.
    K/V projections and the KV cache keep their size; finer-grained, so less damage.
  * head_unit="group": remove whole KV groups (a K/V head and all its query heads). Also shrinks
    the KV cache, but every removal takes num_heads // num_kv_heads query heads at once.
With multi-head attention every head is its own group, so "group" is used whatever is asked.

Importance: "magnitude" uses weights only (a head's slice of o_proj; a neuron's down_proj column
times its up/gate rows); "calibration" weights those by activation norms measured on calibration
batches (Wanda-style). Layers are scored on calibration data by how much they change the hidden
state, 1 - cos(block input, block output) ("Block Influence", ShortGPT, Men et al. 2024).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .prune import (
    attention_head_importance,
    ffn_neuron_importance,
    head_channel_indices,
    input_column_norms,
    prune_linear_inputs,
    prune_linear_outputs,
    top_k_indices,
)
from .quantize import run_calibration

HEAD_UNITS = ("query", "group")
IMPORTANCE = ("magnitude", "calibration")


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def _check_float_model(model: nn.Module) -> None:
    if getattr(model, "quantization_config", None) is not None:
        raise ValueError("structured pruning needs a float model: prune before quantizing")
    if not hasattr(model, "layers") or not hasattr(model, "config"):
        raise TypeError(f"structured pruning works on lmsmith Transformers, got {type(model).__name__}")


def _check_fraction(name: str, fraction: float) -> float:
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"{name} must be a fraction to remove in [0, 1), got {fraction!r}")
    return float(fraction)


def _check_importance(importance: str, calibration: Any) -> None:
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; allowed: {', '.join(IMPORTANCE)}")
    if importance == "calibration" and calibration is None:
        raise ValueError("importance='calibration' needs calibration data: calibration=[batch, ...]")


def _kept_count(total: int, fraction: float, what: str) -> int:
    keep = total - round(fraction * total)
    if keep < 1:
        raise ValueError(f"removing {fraction:.0%} of {total} {what} would leave none")
    return keep


# --------------------------------------------------------------------------------------------------
# Importance scores
# --------------------------------------------------------------------------------------------------
def _calibration_norms(model: nn.Module, names: list[str], importance: str, calibration) -> dict:
    _check_importance(importance, calibration)
    return input_column_norms(model, names, calibration) if importance == "calibration" else {}


def head_importance(model: nn.Module, importance: str = "magnitude",
                    calibration: Iterable[Any] | None = None) -> list[torch.Tensor]:
    """Per layer, one score per query head, (num_heads,): the size of its o_proj slice (times the
    calibration norms of o_proj's input channels with importance="calibration")."""
    names = [f"layers.{i}.attn.o_proj" for i in range(len(model.layers))]
    norms = _calibration_norms(model, names, importance, calibration)
    head_dim = model.config.dim_per_head
    return [attention_head_importance(model.get_submodule(n).weight, head_dim, norms.get(n)) for n in names]


def neuron_importance(model: nn.Module, importance: str = "magnitude",
                      calibration: Iterable[Any] | None = None) -> list[torch.Tensor]:
    """Per layer, one score per FFN neuron, (intermediate_size,)."""
    names = [f"layers.{i}.mlp.down_proj" for i in range(len(model.layers))]
    norms = _calibration_norms(model, names, importance, calibration)
    scores = []
    for name, block in zip(names, model.layers):
        mlp = block.mlp
        feeding = [mlp.up_proj.weight] + ([mlp.gate_proj.weight] if mlp.gate_proj is not None else [])
        scores.append(ffn_neuron_importance(mlp.down_proj.weight, norms.get(name), feeding))
    return scores


@torch.no_grad()
def layer_importance(model: nn.Module, calibration: Iterable[Any]) -> torch.Tensor:
    """(num_layers,) mean of 1 - cos(block input, block output) over calibration tokens: a block
    that barely changes its input can go (ShortGPT's Block Influence)."""
    totals = torch.zeros(len(model.layers), dtype=torch.float64)
    counts = torch.zeros(len(model.layers), dtype=torch.float64)

    def hook_for(index: int):
        def hook(module, args, output):
            x_in, x_out = args[0].float(), output[0].float()  # (B, T, H)
            totals[index] += float((1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum())
            counts[index] += x_in.shape[0] * x_in.shape[1]
        return hook

    handles = [block.register_forward_hook(hook_for(i)) for i, block in enumerate(model.layers)]
    run_calibration(model, calibration, handles)
    if not counts.all():
        raise ValueError("calibration data never reached the layers (empty calibration?)")
    return (totals / counts).float()


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------
def kept_heads(scores: torch.Tensor, num_kv_heads: int, keep: int, unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, KV heads) one layer keeps, both ascending, from per-query-head `scores`.

    unit="query": the `keep` best query heads of every KV group (all KV heads stay).
    unit="group": the `keep` best KV groups (group score = sum of its heads' squared scores).
    """
    if unit not in HEAD_UNITS:
        raise ValueError(f"unknown head_unit {unit!r}; allowed: {', '.join(HEAD_UNITS)}")
    rep = scores.numel() // num_kv_heads
    grouped = scores.reshape(num_kv_heads, rep)
    if unit == "query":
        heads = torch.cat([top_k_indices(grouped[g], keep) + g * rep for g in range(num_kv_heads)])
        return heads, torch.arange(num_kv_heads)
    groups = top_k_indices(grouped.float().pow(2).sum(1), keep)
    return (groups[:, None] * rep + torch.arange(rep)[None, :]).flatten(), groups


def _shrink_attention(attn: nn.Module, heads: torch.Tensor, kv_heads: torch.Tensor, head_dim: int) -> None:
    q_channels = head_channel_indices(heads, head_dim)
    attn.q_proj = prune_linear_outputs(attn.q_proj, q_channels)
    attn.o_proj = prune_linear_inputs(attn.o_proj, q_channels)
    if kv_heads.numel() != attn.num_kv_heads:
        kv_channels = head_channel_indices(kv_heads, head_dim)
        attn.k_proj = prune_linear_outputs(attn.k_proj, kv_channels)
        attn.v_proj = prune_linear_outputs(attn.v_proj, kv_channels)
    attn.num_heads, attn.num_kv_heads = heads.numel(), kv_heads.numel()


def prune_heads(model: nn.Module, fraction: float, *, unit: str = "query", importance: str = "magnitude",
                calibration: Iterable[Any] | None = None,
                scores: Sequence[torch.Tensor] | None = None) -> dict[str, Any]:
    """Remove `fraction` of the attention heads of every layer, in place; returns what was done.

    `fraction` counts query heads per KV group (unit="query") or KV groups (unit="group"); see the
    module docstring. `scores` (per layer, per query head) overrides the importance computation.
    """
    _check_float_model(model)
    fraction = _check_fraction("heads", fraction)
    config = model.config
    kv, rep = config.kv_heads, config.num_heads // config.kv_heads
    unit = "group" if rep == 1 else unit  # multi-head attention: each head is its own group
    keep = _kept_count(rep if unit == "query" else kv, fraction, "query heads per group" if unit == "query"
                       else "KV groups")
    source = importance if scores is None else "given"
    if scores is None:
        scores = head_importance(model, importance, calibration)
    kept: dict[int, list[int]] = {}
    for index, block in enumerate(model.layers):
        heads, kv_heads = kept_heads(scores[index].detach().cpu(), kv, keep, unit)
        _shrink_attention(block.attn, heads, kv_heads, config.dim_per_head)
        kept[index] = heads.tolist()
    num_heads = len(kept[0])
    num_kv = kv if unit == "query" else keep
    model.config = config.replace(num_heads=num_heads, num_kv_heads=num_kv, head_dim=config.dim_per_head)
    return {"unit": unit, "importance": source,
            "num_heads": [config.num_heads, num_heads], "num_kv_heads": [kv, num_kv], "kept_heads": kept}


# --------------------------------------------------------------------------------------------------
# FFN neurons
# --------------------------------------------------------------------------------------------------
def _shrink_mlp(mlp: nn.Module, neurons: torch.Tensor) -> None:
    mlp.up_proj = prune_linear_outputs(mlp.up_proj, neurons)
    if mlp.gate_proj is not None:
        mlp.gate_proj = prune_linear_outputs(mlp.gate_proj, neurons)
    mlp.down_proj = prune_linear_inputs(mlp.down_proj, neurons)


def prune_neurons(model: nn.Module, fraction: float, *, importance: str = "magnitude",
                  calibration: Iterable[Any] | None = None,
                  scores: Sequence[torch.Tensor] | None = None) -> dict[str, Any]:
    """Remove `fraction` of the FFN neurons of every layer (lowest importance first), in place."""
    _check_float_model(model)
    fraction = _check_fraction("neurons", fraction)
    config = model.config
    keep = _kept_count(config.intermediate_size, fraction, "FFN neurons")
    source = importance if scores is None else "given"
    if scores is None:
        scores = neuron_importance(model, importance, calibration)
    for index, block in enumerate(model.layers):
        _shrink_mlp(block.mlp, top_k_indices(scores[index].detach().cpu(), keep))
    model.config = config.replace(intermediate_size=keep)
    return {"importance": source, "intermediate_size": [config.intermediate_size, keep]}


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
def _check_layer_indices(indices: Sequence[int], num_layers: int, what: str) -> list[int]:
    chosen = [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad or len(set(chosen)) != len(chosen):
        raise ValueError(f"{what} must be distinct layer indices in [0, {num_layers}), got {list(indices)}")
    return sorted(chosen)


def keep_layers(model: nn.Module, keep: Sequence[int]) -> dict[str, Any]:
    """Keep only the blocks `keep` (in model order), renumbering them for the KV cache; in place."""
    _check_float_model(model)
    num_layers = len(model.layers)
    keep = _check_layer_indices(keep, num_layers, "keep_layers")
    if not keep:
        raise ValueError("keep_layers is empty: a model needs at least one layer")
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    for new_index, block in enumerate(model.layers):
        block.attn.layer_idx = new_index  # the KV cache and prefix tuning index layers by position
    model.config = model.config.replace(num_layers=len(keep))
    return {"kept_layers": keep, "num_layers": [num_layers, len(keep)]}


def drop_layers(model: nn.Module, drop: Sequence[int]) -> dict[str, Any]:
    """Remove the blocks `drop`; in place."""
    num_layers = len(model.layers)
    drop = _check_layer_indices(drop, num_layers, "drop_layers")
    record = keep_layers(model, [i for i in range(num_layers) if i not in drop])
    return {**record, "dropped_layers": drop}


def prune_layers(model: nn.Module, count: int, calibration: Iterable[Any]) -> dict[str, Any]:
    """Drop the `count` layers with the lowest Block Influence on `calibration`."""
    num_layers = len(model.layers)
    if not isinstance(count, int) or not 0 <= count < num_layers:
        raise ValueError(f"layers to drop must be an integer in [0, {num_layers}), got {count!r}")
    if calibration is None:
        raise ValueError("choosing layers to drop needs calibration data (or pass explicit layer indices)")
    scores = layer_importance(model, calibration)
    drop = torch.topk(scores, count, largest=False).indices.tolist() if count else []
    record = drop_layers(model, drop)
    return {**record, "importance": [round(float(s), 5) for s in scores]}


# --------------------------------------------------------------------------------------------------
# One entry point for recipes
# --------------------------------------------------------------------------------------------------
def structured_prune(model: nn.Module, *, heads: float = 0.0, neurons: float = 0.0,
                     layers: int | Sequence[int] = 0, head_unit: str = "query", importance: str = "magnitude",
                     calibration: Sequence[Any] | None = None) -> dict[str, Any]:
    """Drop layers (a count, scored on calibration data, or explicit indices), then heads, then neurons
    (fractions to remove). Scores are computed on the model as it stands before each part."""
    _check_float_model(model)
    _check_importance(importance, calibration)
    _check_fraction("heads", heads)
    _check_fraction("neurons", neurons)
    record: dict[str, Any] = {"before": size_fields(model.config)}
    if isinstance(layers, int) and layers:
        record["layers"] = prune_layers(model, layers, calibration)
    elif not isinstance(layers, int) and layers:
        record["layers"] = drop_layers(model, layers)
    if heads:
        record["heads"] = prune_heads(model, heads, unit=head_unit, importance=importance, calibration=calibration)
    if neurons:
        record["neurons"] = prune_neurons(model, neurons, importance=importance, calibration=calibration)
    record["after"] = size_fields(model.config)
    return record


def size_fields(config) -> dict[str, int]:
    return {"num_layers": config.num_layers, "num_heads": config.num_heads, "num_kv_heads": config.kv_heads,
            "head_dim": config.dim_per_head, "intermediate_size": config.intermediate_size}
