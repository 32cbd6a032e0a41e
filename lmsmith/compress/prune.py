"""Weight pruning for any nn.Module: masks for `nn.Linear` layers chosen by name.

Masks are pure functions of scores (``True`` = keep). `prune_model` zeroes the pruned weights in
place and keeps each mask as a non-persistent ``weight_mask`` buffer, so state-dict keys do not
change and fine-tuning can call `reapply_masks` after each optimizer step. (A saved pruned model
has no masks; `restore_masks` rebuilds them from the zeros.)

Structured helpers (`prune_linear_outputs`, `prune_linear_inputs`, neuron / head importance) work
on plain Linear pairs and return new, smaller modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .quantize import DEFAULT_EXCLUDE, accumulate_linear_inputs, select_linear_layers

PRUNE_METHODS = ("magnitude", "magnitude-global", "wanda", "nm-magnitude", "nm-wanda")
MASK_BUFFER = "weight_mask"


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    sparsity: float  # fraction of weights that are exactly zero


# --------------------------------------------------------------------------------------------------
# Masks (pure functions; True = keep)
# --------------------------------------------------------------------------------------------------
def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _keep_all_but_lowest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask over the last dim of `scores` pruning exactly `n_prune` lowest entries per row."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        lowest = torch.topk(scores, n_prune, dim=-1, largest=False).indices
        mask.scatter_(-1, lowest, False)
    return mask


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * numel)`` smallest-magnitude weights of one tensor."""
    n_prune = round(check_sparsity(sparsity) * weight.numel())
    return _keep_all_but_lowest(weight.detach().abs().flatten(), n_prune).reshape(weight.shape)


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One magnitude threshold across all tensors, so layers end up with different sparsities."""
    check_sparsity(sparsity)
    scores = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
    n_prune = round(sparsity * scores.numel())
    if n_prune == 0:
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    threshold = torch.kthvalue(scores, n_prune).values  # ties at the threshold are pruned too
    return {name: w.detach().abs() > threshold.to(w.device) for name, w in weights.items()}


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2`` — a weight matters as much as its input does."""
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(f"input_norms shape {tuple(input_norms.shape)} != (in_features={weight.shape[1]},)")
    return weight.detach().abs().float() * input_norms.float().to(weight.device)[None, :]


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest Wanda scores within each output row (Wanda's comparison group)."""
    n_prune = round(check_sparsity(sparsity) * weight.shape[1])
    return _keep_all_but_lowest(wanda_scores(weight, input_norms), n_prune)


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M semi-structured: keep the `n` highest scores in every `m` consecutive inputs of a row."""
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"in_features {cols} is not a multiple of m={m}")
    grouped = scores.reshape(rows, cols // m, m)
    return _keep_all_but_lowest(grouped, m - n).reshape(rows, cols)


# --------------------------------------------------------------------------------------------------
# Whole-model pruning
# --------------------------------------------------------------------------------------------------
def input_column_norms(
    model: nn.Module, names: Sequence[str], calibration: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` over all calibration tokens, per input column of each named Linear."""
    sums = accumulate_linear_inputs(model, names, calibration, lambda x: (x * x).sum(0))
    return {name: total.sqrt() for name, (total, _) in sums.items()}


def _check_method(method: str, sparsity: float | None, n: int, m: int, calibration: Any) -> None:
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; allowed: {', '.join(PRUNE_METHODS)}")
    if method.startswith("nm-"):
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"{method} with n={n}, m={m} gives sparsity {1 - n / m}, not {sparsity}")
    elif sparsity is None:
        raise ValueError(f"method {method!r} needs a sparsity in [0, 1)")
    else:
        check_sparsity(sparsity)
    if method.endswith("wanda") and calibration is None:
        raise ValueError(f"method {method!r} needs calibration data: calibration=[batch, ...]")


def _compute_masks(model, names, method, sparsity, calibration, n, m) -> dict[str, torch.Tensor]:
    weights = {name: model.get_submodule(name).weight for name in names}
    if method == "magnitude-global":
        return global_magnitude_masks(weights, sparsity)
    norms = input_column_norms(model, names, calibration) if method.endswith("wanda") else {}
    masks = {}
    for name, weight in weights.items():
        try:
            masks[name] = _layer_mask(weight, norms.get(name), method, sparsity, n, m)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    return masks


def _layer_mask(weight, norms, method: str, sparsity, n: int, m: int) -> torch.Tensor:
    if method == "magnitude":
        return magnitude_mask(weight, sparsity)
    if method == "wanda":
        return wanda_mask(weight, norms, sparsity)
    scores = weight.detach().abs() if method == "nm-magnitude" else wanda_scores(weight, norms)
    return nm_mask(scores, n, m)


@torch.no_grad()
def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero `linear.weight` where `mask` is False and remember the mask (non-persistent buffer)."""
    if mask.shape != linear.weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(linear.weight.shape)}")
    mask = mask.to(linear.weight.device, torch.bool)
    linear.weight.mul_(mask)
    linear.register_buffer(MASK_BUFFER, mask, persistent=False)


def prune_model(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | None = None,
    *,
    targets: Sequence[str] = ("*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    calibration: Iterable[Any] | None = None,
    n: int = 2,
    m: int = 4,
) -> list[LayerSparsity]:
    """Prune the selected Linear layers in place; returns their sparsity report.

    Methods: "magnitude" (per layer), "magnitude-global" (one threshold over all selected layers),
    "wanda" (|W| * input norm, per output row; needs `calibration`), "nm-magnitude" / "nm-wanda"
    (keep `n` of every `m` consecutive weights of a row; `sparsity` may be omitted).
    """
    _check_method(method, sparsity, n, m, calibration)
    names = select_linear_layers(model, targets, exclude)
    masks = _compute_masks(model, names, method, sparsity, calibration, n, m)
    for name, mask in masks.items():
        apply_mask(model.get_submodule(name), mask)
    return sparsity_report(model, names)


def _masked_linears(model: nn.Module) -> list[nn.Linear]:
    return [mod for mod in model.modules() if isinstance(mod, nn.Linear) and hasattr(mod, MASK_BUFFER)]


@torch.no_grad()
def reapply_masks(model: nn.Module) -> int:
    """Zero pruned weights again (e.g. after an optimizer step); returns how many layers had masks."""
    linears = _masked_linears(model)
    for linear in linears:
        linear.weight.mul_(getattr(linear, MASK_BUFFER))
    return len(linears)


def restore_masks(model: nn.Module, names: Sequence[str] | None = None) -> int:
    """Rebuild masks from the zeros of a loaded pruned model (all Linear layers unless `names`)."""
    names = (
        names if names is not None else [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    )
    for name in names:
        linear = model.get_submodule(name)
        apply_mask(linear, linear.weight != 0)
    return len(names)


def remove_masks(model: nn.Module) -> int:
    """Forget the masks (the zeros stay); returns how many layers had one."""
    linears = _masked_linears(model)
    for linear in linears:
        delattr(linear, MASK_BUFFER)
    return len(linears)


def sparsity_report(model: nn.Module, names: Sequence[str] | None = None) -> list[LayerSparsity]:
    """Fraction of exactly-zero weights per Linear layer (all of them unless `names` is given)."""
    if names is None:
        names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    report = []
    for name in names:
        weight = model.get_submodule(name).weight
        zeros = (weight == 0).sum().item()
        report.append(LayerSparsity(name, tuple(weight.shape), zeros / weight.numel()))
    return report


# --------------------------------------------------------------------------------------------------
# Structured pruning: smaller Linear layers
# --------------------------------------------------------------------------------------------------
def _check_indices(keep_idx: torch.Tensor | Sequence[int], size: int, what: str) -> torch.Tensor:
    keep = torch.as_tensor(keep_idx, dtype=torch.long)
    if keep.ndim != 1 or keep.numel() == 0:
        raise ValueError(f"keep_idx must be a non-empty 1-D list of {what} indices")
    if keep.min() < 0 or keep.max() >= size or keep.unique().numel() != keep.numel():
        raise ValueError(
            f"keep_idx must hold distinct {what} indices in [0, {size}), got {keep.tolist()[:10]}"
        )
    return keep


@torch.no_grad()
def prune_linear_outputs(linear: nn.Linear, keep_idx: torch.Tensor | Sequence[int]) -> nn.Linear:
    """A new Linear computing only outputs `keep_idx` of `linear` (in that order)."""
    keep = _check_indices(keep_idx, linear.out_features, "output").to(linear.weight.device)
    has_bias = linear.bias is not None
    smaller = nn.Linear(linear.in_features, keep.numel(), bias=has_bias)
    smaller = smaller.to(linear.weight.device, linear.weight.dtype)
    smaller.weight.copy_(linear.weight[keep])
    if has_bias:
        smaller.bias.copy_(linear.bias[keep])
    return smaller


@torch.no_grad()
def prune_linear_inputs(linear: nn.Linear, keep_idx: torch.Tensor | Sequence[int]) -> nn.Linear:
    """A new Linear reading only inputs `keep_idx` of `linear`; the bias is unchanged."""
    keep = _check_indices(keep_idx, linear.in_features, "input").to(linear.weight.device)
    has_bias = linear.bias is not None
    smaller = nn.Linear(keep.numel(), linear.out_features, bias=has_bias)
    smaller = smaller.to(linear.weight.device, linear.weight.dtype)
    smaller.weight.copy_(linear.weight[:, keep])
    if has_bias:
        smaller.bias.copy_(linear.bias)
    return smaller


def ffn_neuron_importance(
    down_weight: torch.Tensor,
    activation_norms: torch.Tensor | None = None,
    in_weights: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Score per intermediate FFN neuron i: ``||W_down[:, i]|| * a_i``.

    ``a_i`` is the calibration norm of neuron i's activation (input to down_proj) when given, else
    the product of the row norms of the projections feeding it (`in_weights`: up, gate), else 1.
    """
    score = down_weight.detach().float().norm(dim=0)
    if activation_norms is not None:
        if activation_norms.shape != score.shape:
            raise ValueError(
                f"activation_norms shape {tuple(activation_norms.shape)} != {tuple(score.shape)}"
            )
        return score * activation_norms.float().to(score.device)
    for weight in in_weights:
        if weight.shape[0] != score.shape[0]:
            raise ValueError(f"in_weights rows {weight.shape[0]} != intermediate size {score.shape[0]}")
        score = score * weight.detach().float().norm(dim=1)
    return score


def attention_head_importance(
    o_weight: torch.Tensor, head_dim: int, activation_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Score per attention head: size of its slice of o_proj, optionally weighted by the calibration
    norms of o_proj's input channels (Wanda-style): ``sqrt(sum_j ||W_o[:, j]||^2 a_j^2)``."""
    in_features = o_weight.shape[1]
    if head_dim <= 0 or in_features % head_dim:
        raise ValueError(f"head_dim {head_dim} does not divide o_proj in_features {in_features}")
    column_sq = o_weight.detach().float().pow(2).sum(0)
    if activation_norms is not None:
        if activation_norms.shape != (in_features,):
            raise ValueError(f"activation_norms shape {tuple(activation_norms.shape)} != ({in_features},)")
        column_sq = column_sq * activation_norms.float().to(column_sq.device).pow(2)
    return column_sq.reshape(-1, head_dim).sum(1).sqrt()


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest scores, in ascending index order (keeps the original layout)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"k must be in [1, {scores.numel()}], got {k}")
    return torch.topk(scores, k).indices.sort().values


def head_channel_indices(keep_heads: torch.Tensor | Sequence[int], head_dim: int) -> torch.Tensor:
    """Channel indices (for q/k/v outputs and o_proj inputs) covering the kept heads."""
    heads = torch.as_tensor(keep_heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()
