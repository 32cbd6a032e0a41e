"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

W8A8 quantizes each token's activations to 8 bits with one scale per token. A few input channels of
a transformer's linear layers carry values 10-100× larger than the rest, so that one scale leaves the
other channels only a few levels: SmolLM2-135M loses 10% perplexity under plain W8A8.

A linear layer computes the same output when input channel j is divided by s_j and weight column j is
multiplied by s_j. Choosing s_j = max|X_j|^α / max|W_j|^(1-α) flattens the activations and hands part
of their range to the weights, which are quantized per output channel and absorb it well.

The division must be free, i.e. folded into whatever produces the input:
  * the norm before q/k/v and before gate/up (pre-norm blocks): its weight (and bias) per channel;
  * up_proj's output rows before down_proj in a gated MLP: act(gate) * up is linear in up;
  * v_proj's output rows before o_proj: attention mixes values linearly. With grouped-query heads
    the query heads that share a value head must share its scales, so those are maxed over the group.
The transformed float model is the same function (up to rounding): smoothing is a float step that
runs before quantization, and the smoothed model saves and loads like any other.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .quantize import accumulate_linear_inputs

_FLOOR = 1e-5  # no channel is scaled from (or to) zero: an all-zero column keeps scale 1


@dataclass(frozen=True)
class SmoothGroup:
    """Linear layers reading one input, and the module whose output channels produce that input."""

    source: str  # a norm (weight, bias) or a Linear (output rows) whose outputs are divided by s
    linears: tuple[str, ...]  # their weight columns are multiplied by s
    query_heads: tuple[int, int, int] | None = None  # (heads, kv_heads, head_dim): v_proj → o_proj


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), per input channel j."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    scales = act_absmax.clamp(min=_FLOOR).pow(alpha) / weight_absmax.clamp(min=_FLOOR).pow(1.0 - alpha)
    return scales.clamp(min=_FLOOR)


def share_over_query_heads(scales: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Per value-head scales (kv_heads * head_dim,): the max over the query heads reading each one."""
    return scales.view(kv_heads, heads // kv_heads, head_dim).amax(1).reshape(-1)


def expand_to_query_heads(kv_scales: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Per o_proj input channel (heads * head_dim,) from per value-head scales."""
    return kv_scales.view(kv_heads, 1, head_dim).expand(kv_heads, heads // kv_heads, head_dim).reshape(-1)


def smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """The foldable groups of a pre-norm Transformer (see the module docstring)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "layers"):
        raise ValueError("smoothing needs an lmsmith Transformer (a model with .config and .layers)")
    if config.norm_position != "pre":
        raise ValueError("smoothing needs pre-norm blocks: in a post-norm block (BERT) the norm's output "
                         "also feeds the residual stream, so it cannot absorb the scales")
    groups = []
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        groups.append(SmoothGroup(p + "attn_norm", (p + "attn.q_proj", p + "attn.k_proj", p + "attn.v_proj")))
        mlp_inputs = ("mlp.gate_proj", "mlp.up_proj") if config.gated_mlp else ("mlp.up_proj",)
        groups.append(SmoothGroup(p + "mlp_norm", tuple(p + n for n in mlp_inputs)))
        if config.gated_mlp:
            groups.append(SmoothGroup(p + "mlp.up_proj", (p + "mlp.down_proj",)))
        attn = block.attn
        groups.append(SmoothGroup(p + "attn.v_proj", (p + "attn.o_proj",),
                                  (attn.num_heads, attn.num_kv_heads, attn.head_dim)))
    return groups


def input_absmax(model: nn.Module, names: Sequence[str], calibration: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per input channel max |x| of each named Linear over the calibration batches."""
    found = accumulate_linear_inputs(model, names, calibration, lambda x: x.abs().amax(0), torch.maximum)
    return {name: absmax for name, (absmax, _) in found.items()}


@torch.no_grad()
def smooth_model(model: nn.Module, calibration: Iterable[Any], alpha: float = 0.5) -> dict[str, Any]:
    """Apply SmoothQuant's equivalent rescaling to every foldable group of `model` in place, with
    activation ranges measured on `calibration` (model inputs, as for GPTQ). Returns a summary."""
    groups = smooth_groups(model)
    modules = dict(model.named_modules())
    _check_plain_linears(modules, groups)
    absmax = input_absmax(model, [g.linears[0] for g in groups], list(calibration))
    largest = 0.0
    for group in groups:
        scales = _group_scales(modules, group, absmax[group.linears[0]], alpha)
        largest = max(largest, float(scales.max()))
    return {"alpha": alpha, "groups": len(groups), "layers": len(model.layers), "largest_scale": largest}


def _group_scales(modules: dict[str, nn.Module], group: SmoothGroup, act: torch.Tensor, alpha: float) -> torch.Tensor:
    linears = [modules[n] for n in group.linears]
    weight_absmax = torch.stack([m.weight.abs().amax(0).float() for m in linears]).amax(0)
    scales = smoothing_scales(act, weight_absmax, alpha)
    source = modules[group.source]
    if group.query_heads is not None:
        kv_scales = share_over_query_heads(scales, *group.query_heads)
        _divide_rows(source, kv_scales)
        scales = expand_to_query_heads(kv_scales, *group.query_heads)
    elif isinstance(source, nn.Linear):
        _divide_rows(source, scales)
    else:
        _divide_norm(source, scales)
    for m in linears:
        m.weight.mul_(scales.to(m.weight.dtype)[None, :])
    return scales


def _divide_rows(linear: nn.Linear, scales: torch.Tensor) -> None:
    linear.weight.div_(scales.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias.div_(scales.to(linear.bias.dtype))


def _divide_norm(norm: nn.Module, scales: torch.Tensor) -> None:
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"{type(norm).__name__} has no per-channel weight to fold the scales into")
    weight.div_(scales.to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.div_(scales.to(bias.dtype))


def _check_plain_linears(modules: dict[str, nn.Module], groups: Sequence[SmoothGroup]) -> None:
    for group in groups:
        for name in (*group.linears, *([group.source] if group.source.endswith("_proj") else [])):
            if type(modules.get(name)) is not nn.Linear:
                raise ValueError(f"smoothing needs plain float nn.Linear layers, but {name} is "
                                 f"{type(modules.get(name)).__name__}: smooth before quantizing or adding adapters")
