"""Weight quantization for any nn.Module: swap `nn.Linear` children for quantized twins by name.

Layers are picked by dotted module name (glob patterns, or regexes prefixed with ``re:``); the model
code is never touched. Every quantized module stores its weight in one *portable* layout (plain int8,
or int4 nibble-packed into uint8 with float32 scales/zeros) so checkpoints load on any device; the
layout a fast kernel wants is built lazily on the device of the first forward call, checked once
against the plain dequantize-then-matmul path (`forward_reference`), and cached (not saved).

Integer convention used throughout: ``w ≈ q * scale + offset`` with ``q`` a signed `bits`-bit integer
and ``offset`` zero for symmetric quantization. For int4 the stored value is ``q + 8`` (0..15), two
per byte, the even input column in the low nibble. The float offset (not an integer zero point) is
what the tinygemm int4 kernels consume; it is saved under the ``zeros`` key.

Tied embeddings: when a quantized Linear shares its weight with an nn.Embedding (an LM head tied to
the input embedding, SmolLM2's 49152 x 576 matrix), the embedding becomes a `QuantizedEmbedding`
that looks up rows of the Linear's quantized weight and dequantizes only those. The matrix stays one
tensor, now quantized: the state dict holds it once, under the Linear's keys (as tied models already
leave out ``lm_head.weight``), and artifacts shrink instead of growing by an untied float copy.
The output head is excluded by default (DEFAULT_EXCLUDE); ``include_lm_head=True`` quantizes it,
with ``lm_head_method`` if the head should use another method than the body (an int8 head under an
int4 body keeps most of the saving at a fraction of the int4 head's quality loss).

int4 accuracy: ``clip_search=True`` picks each group's (scale, offset) by a search over shrunk ranges
with least-squares refits, minimising the squared error weighted by the calibration inputs' mean
square per input channel (like llama.cpp's importance matrix); on SmolLM2-135M at group 64 it cut
the perplexity loss from 37% (min/max) to 6%, below llama.cpp's Q4_0 format (16%, group 32).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmsmith.compress import native
from lmsmith.evaluate.memory import model_size_bytes, release_freed_heap  # noqa: F401 (public here too)

log = logging.getLogger(__name__)

QUANT_METHODS = ("int8", "int4", "w8a8", "gptq-int4", "gptq-int8")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head")
LM_HEAD_METHODS = ("int8", "w8a8")  # per-channel methods a head can use whatever the body's
CONFIG_FORMAT = "lmsmith-quant-v1"
_MIN_SCALE = 1e-10  # keeps all-zero rows/groups from dividing by zero
# A packed layout that is wrong gives errors near 100%; rounding (bf16 activations, 7-bit activations
# in fbgemm) stays within a few percent. So 10% separates "layout bug" from "expected rounding".
_KERNEL_CHECK_TOLERANCE = 0.1


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationConfig:
    """What was quantized and how; JSON-serialisable via `to_dict` and enough to rebuild the model."""

    method: str
    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    modules: tuple[str, ...]
    # (embedding, quantized Linear whose weight it was tied to): the embedding reads that Linear's rows
    tied_embeddings: tuple[tuple[str, str], ...] = ()
    format: str = CONFIG_FORMAT
    # (module, method) for modules quantized differently from `method`, e.g. an int8 head on int4
    module_methods: tuple[tuple[str, str], ...] = ()
    clip_search: bool = False  # provenance only: the saved layout is the same

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "modules": list(self.modules),
                "tied_embeddings": [list(pair) for pair in self.tied_embeddings],
                "module_methods": [list(pair) for pair in self.module_methods]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        if data.get("format") != CONFIG_FORMAT:
            raise ValueError(f"quantization config format {data.get('format')!r}; expected {CONFIG_FORMAT!r}")
        # tied_embeddings and module_methods are absent in older configs
        pairs = {key: tuple(tuple(pair) for pair in data.get(key, ())) for key in ("tied_embeddings", "module_methods")}
        config = cls(**{**data, "modules": tuple(data["modules"]), **pairs})
        for method in (config.method, *dict(config.module_methods).values()):
            _method_spec(method)  # validates the name
        return config

    def method_of(self, module: str) -> str:
        return dict(self.module_methods).get(module, self.method)


@dataclass(frozen=True)
class _MethodSpec:
    bits: int
    grouped: bool
    gptq: bool
    module: str  # class name, resolved after the classes exist


_METHODS = {
    "int8": _MethodSpec(8, grouped=False, gptq=False, module="Int8WeightOnlyLinear"),
    "int4": _MethodSpec(4, grouped=True, gptq=False, module="Int4WeightOnlyLinear"),
    "w8a8": _MethodSpec(8, grouped=False, gptq=False, module="DynamicInt8Linear"),
    "gptq-int4": _MethodSpec(4, grouped=True, gptq=True, module="Int4WeightOnlyLinear"),
    "gptq-int8": _MethodSpec(8, grouped=False, gptq=True, module="Int8WeightOnlyLinear"),
}
assert tuple(_METHODS) == QUANT_METHODS
# Methods that need no calibration data, so a model can be quantized as it loads (`serve --quantize`,
# a training recipe's `model.quantize`). GPTQ needs calibration: `lmsmith compress` does it.
LOAD_TIME_METHODS = tuple(name for name, spec in _METHODS.items() if not spec.gptq)


def _method_spec(method: str) -> _MethodSpec:
    if method not in _METHODS:
        raise ValueError(f"unknown quantization method {method!r}; allowed: {', '.join(QUANT_METHODS)}")
    return _METHODS[method]


# --------------------------------------------------------------------------------------------------
# Layer selection and calibration (prune.py uses these too)
# --------------------------------------------------------------------------------------------------
def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True if `name` fully matches any glob pattern, or any regex written as ``re:<regex>``."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def select_linear_layers(
    model: nn.Module, targets: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> list[str]:
    """Names of the plain `nn.Linear` modules matching `targets` and not `exclude`, in model order."""
    if isinstance(targets, str) or isinstance(exclude, str):
        raise TypeError("targets and exclude are sequences of patterns, not a single string")
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    chosen = [n for n in linears if name_matches(n, targets) and not name_matches(n, exclude)]
    if not chosen:
        raise ValueError(
            f"no nn.Linear matches targets={list(targets)} exclude={list(exclude)}; "
            f"linear layers are: {linears[:20]}{' ...' if len(linears) > 20 else ''}"
        )
    return chosen


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def run_model_on(model: nn.Module, batch: Any) -> None:
    """Feed one calibration batch: a tensor is positional, a tuple/list is *args, a dict is **kwargs."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def run_calibration(model: nn.Module, calibration: Iterable[Any], handles: Sequence[Any]) -> None:
    """Run every calibration batch in eval mode so `handles`' hooks see them; then remove the hooks
    and restore the training mode, whatever happens."""
    was_training = model.training
    try:
        model.eval()
        for batch in calibration:
            run_model_on(model, batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


@torch.no_grad()
def accumulate_linear_inputs(
    model: nn.Module,
    names: Sequence[str],
    calibration: Iterable[Any],
    reduce: Callable[[torch.Tensor], torch.Tensor],
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.add,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Run `calibration` through `model` (eval mode) and combine ``reduce(x)`` (by default: sum it)
    over the (rows, in_features) inputs of each named Linear. Returns ``{name: (total, number_of_rows)}``."""
    sums: dict[str, tuple[torch.Tensor, int]] = {}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            value = reduce(x)
            if name in sums:
                total, rows = sums[name]
                value, rows = combine(total, value), rows + x.shape[0]
            else:
                rows = x.shape[0]
            sums[name] = (value, rows)

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    run_calibration(model, calibration, handles)
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"calibration data never reached layers {missing[:5]} (empty calibration?)")
    return sums


def input_mean_squares(
    model: nn.Module, names: Sequence[str], calibration: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """Mean square of each named Linear's inputs per input channel (the Hessian's diagonal, what
    llama.cpp calls the importance matrix): how much an error in each weight column costs."""
    sums = accumulate_linear_inputs(model, names, calibration, lambda x: (x * x).sum(0))
    return {name: total / rows for name, (total, rows) in sums.items()}


def input_hessians(
    model: nn.Module, names: Sequence[str], calibration: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """Mean ``X^T X`` of each named Linear's inputs: the Hessian of its squared output error."""
    sums = accumulate_linear_inputs(model, names, calibration, lambda x: x.T @ x)
    return {name: total / rows for name, (total, rows) in sums.items()}


# --------------------------------------------------------------------------------------------------
# Quantization math (pure functions)
# --------------------------------------------------------------------------------------------------
def _int_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def affine_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and offset) per row of `w` (..., n) so that ``w ≈ q * scale + offset``."""
    w = w.float()
    if symmetric:
        return (w.abs().amax(-1) / _int_range(bits)[1]).clamp(min=_MIN_SCALE), None
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=_MIN_SCALE)
    return scale, lo + 2 ** (bits - 1) * scale  # offset puts `lo` at q = -2^(bits-1)


def quantize_affine(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Round-to-nearest: signed integers (int8 dtype) with one scale/offset per row of `w` (..., n)."""
    shifted = w.float() if offset is None else w.float() - offset.unsqueeze(-1)
    qmin, qmax = _int_range(bits)
    return torch.round(shifted / scale.unsqueeze(-1)).clamp(qmin, qmax).to(torch.int8)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    w = q.float() * scale.float().unsqueeze(-1)
    return w if offset is None else w + offset.float().unsqueeze(-1)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one float32 scale per output row: ``weight ≈ q * scales[:, None]``."""
    scales, _ = affine_qparams(weight, 8, symmetric=True)
    return quantize_affine(weight, scales, None, 8), scales


def dequantize_int8_per_channel(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return dequantize_affine(q, scales, None)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = weight.shape
    if group_size <= 0 or cols % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {cols}")
    return weight.reshape(rows, cols // group_size, group_size)  # (out, groups, group_size)


def quantize_int4_grouped(
    weight: torch.Tensor, group_size: int = 64, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise int4 round-to-nearest along in_features.

    Returns ``(q, scales, offsets)``: q is int8 in [-8, 7] shaped like `weight`; scales and offsets
    (None when symmetric) are float32 (out_features, in_features // group_size).
    """
    groups = _grouped(weight.float(), group_size)
    scales, offsets = affine_qparams(groups, 4, symmetric)
    q = quantize_affine(groups, scales, offsets, 4)
    return q.reshape(weight.shape), scales, offsets


def dequantize_int4_grouped(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    w = dequantize_affine(_grouped(q, group_size), scales, offsets)
    return w.reshape(q.shape)


# Clip search: shrinking a group's range trades a larger error on its few extreme weights for finer
# steps on all the others. Candidates are the range scaled by these factors around its centre.
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
CLIP_REFITS = 2  # least-squares refits of (scale, offset) per candidate; a third gained <1% error


def _weighted_error(groups, q, scale, offset, importance) -> torch.Tensor:
    """Importance-weighted squared error per group (rows of `groups` (..., n))."""
    return ((groups - dequantize_affine(q, scale, offset)) ** 2 * importance).sum(-1)


def _least_squares_qparams(groups, q, importance, symmetric: bool):
    """(scale, offset) minimising the weighted error of ``q * scale + offset`` for fixed integers
    `q`; NaN where the system is singular (e.g. all q equal), so the caller keeps its old values."""
    wq = importance * q
    sqq, sqx = (wq * q).sum(-1), (wq * groups).sum(-1)
    if symmetric:
        return sqx / sqq, None
    sw, sq, sx = importance.sum(-1).expand_as(sqq), wq.sum(-1), (importance * groups).sum(-1)
    det = sw * sqq - sq * sq
    det = torch.where(det > 1e-9 * sw * sqq, det, torch.nan)
    return (sw * sqx - sq * sx) / det, (sqq * sx - sq * sqx) / det


def _refined_candidate(groups, scale, offset, importance, bits: int, refits: int):
    """Round with (scale, offset), then alternately refit them by least squares and re-round."""
    q = quantize_affine(groups, scale, offset, bits)
    for _ in range(refits):
        fit_scale, fit_offset = _least_squares_qparams(groups, q.float(), importance, offset is None)
        keep = ~(fit_scale > _MIN_SCALE)  # also true for NaN
        scale = torch.where(keep, scale, fit_scale)
        offset = None if offset is None else torch.where(keep, offset, fit_offset)
        q = quantize_affine(groups, scale, offset, bits)
    return q, scale, offset


def clip_search_qparams(
    groups: torch.Tensor,
    bits: int,
    symmetric: bool,
    importance: torch.Tensor | None = None,
    factors: Sequence[float] = CLIP_FACTORS,
    refits: int = CLIP_REFITS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row (q, scale, offset) of `groups` (..., n) with the least importance-weighted squared
    error among plain round-to-nearest and each clip factor's refined candidate, so never worse than
    `affine_qparams` + `quantize_affine`. `importance` (n,) or broadcastable to `groups`, e.g. the
    calibration inputs' mean square per input channel (llama.cpp's imatrix); None weighs all equally.
    """
    if not factors or any(not 0 < f <= 1 for f in factors):
        raise ValueError(f"clip factors must be in (0, 1], got {list(factors)}")
    groups = groups.float()
    importance = torch.ones(groups.shape[-1]) if importance is None else importance.float()
    scale, offset = affine_qparams(groups, bits, symmetric)
    best = (quantize_affine(groups, scale, offset, bits), scale, offset)
    best_error = _weighted_error(groups, best[0], scale, offset, importance)
    centre = None if symmetric else offset + scale / 2  # the middle of [min, max]
    for factor in factors:
        start = None if symmetric else centre - factor * scale / 2
        q, s, o = _refined_candidate(groups, scale * factor, start, importance, bits, refits)
        error = _weighted_error(groups, q, s, o, importance)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = (torch.where(better.unsqueeze(-1), q, best[0]), torch.where(better, s, best[1]),
                None if symmetric else torch.where(better, o, best[2]))
    return best


def quantize_int4_clip_search(
    weight: torch.Tensor, group_size: int = 64, symmetric: bool = False, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`quantize_int4_grouped` with each group's range picked by `clip_search_qparams`; `importance`
    is per input channel (in_features,)."""
    groups = _grouped(weight.float(), group_size)
    weights = None if importance is None else _grouped(importance.reshape(1, -1), group_size)[0]
    q, scales, offsets = clip_search_qparams(groups, 4, symmetric, weights)
    return q.reshape(weight.shape), scales, offsets


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values (out, in) → uint8 (out, in // 2): ``q + 8``, even column in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 (out, in // 2) → int8 in [-8, 7] shaped (out, in)."""
    low, high = packed & 0x0F, packed >> 4
    u = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
    return u.to(torch.int8) - 8


def quantize_activations_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (token) of x (..., in): ``x ≈ q * scales``."""
    scales = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=_MIN_SCALE)
    return torch.round(x.float() / scales).clamp(-127, 127).to(torch.int8), scales


# --------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTQResult:
    q: torch.Tensor  # int8 signed integers, shaped like the weight
    scales: torch.Tensor  # (out, groups) float32
    offsets: torch.Tensor | None  # (out, groups) or None when symmetric


def _gptq_inverse_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped inverse Hessian, and the mask of never-active columns."""
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0  # inputs that are always zero: any value works, keep h invertible
    h.diagonal().add_(damp * h.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(f"GPTQ Hessian is not positive definite even with damp={damp}; try a larger damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True), dead


def _check_gptq_args(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None) -> int:
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features {cols}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 8; got {bits}")
    group = group_size or cols
    if cols % group:
        raise ValueError(f"group_size {group_size} does not divide in_features {cols}")
    return group


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 64,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search: bool = False,
    act_order: bool = False,
) -> GPTQResult:
    """GPTQ (Frantar et al. 2022): quantize columns left to right, pushing each column's rounding
    error onto the not-yet-quantized columns through the inverse Hessian of the layer inputs.

    `hessian` is the mean ``X^T X`` of the calibration inputs (see `input_hessians`); `damp` is added
    to its diagonal as a fraction of the mean diagonal. Columns are processed in blocks of
    `block_size` (rounded to whole groups) so the cross-block update is one matrix multiply.
    `clip_search=True` picks each group's parameters with `clip_search_qparams`, weighting columns
    by the Hessian's diagonal, instead of min/max. `act_order=True` quantizes the columns with the
    largest Hessian diagonal first (while many columns remain to absorb their error) with *static*
    groups: all group parameters are fixed beforehand from the original weights, so the groups stay
    contiguous input ranges as the int4 kernels need. Otherwise each group's parameters are fitted
    to its error-updated weights when the column loop reaches it.
    """
    group = _check_gptq_args(weight, hessian, bits, group_size)
    importance = hessian.detach().float().diagonal().clone() if clip_search else None
    w = weight.detach().float().clone()
    rows, cols = w.shape
    if act_order:
        scales, offsets = _static_group_qparams(w, group, bits, symmetric, importance)
        order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
        column_groups = order // group
    else:
        scales, offsets = torch.empty(rows, cols // group), None if symmetric else torch.empty(rows, cols // group)
        order, column_groups = torch.arange(cols), None
    h_inv, dead = _gptq_inverse_hessian(hessian.detach()[order][:, order], damp)
    w = w[:, order]
    w[:, dead] = 0.0
    q = torch.empty_like(w, dtype=torch.int8)
    block = max(1, block_size // group) * group if group < cols else block_size
    for start in range(0, cols, block):
        end = min(start + block, cols)
        errors = _gptq_block(w, h_inv, q, scales, offsets, start, end, group, bits, importance, column_groups)
        w[:, end:] -= errors @ h_inv[start:end, end:]
    unpermuted = torch.empty_like(q)
    unpermuted[:, order] = q
    return GPTQResult(unpermuted, scales, offsets)


def _static_group_qparams(w: torch.Tensor, group: int, bits: int, symmetric: bool, importance: torch.Tensor | None):
    groups = _grouped(w, group)
    weights = None if importance is None else _grouped(importance.reshape(1, -1), group)[0]
    return _gptq_group_qparams(groups, bits, symmetric, weights)


def _gptq_group_qparams(source: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None):
    if importance is None:
        return affine_qparams(source, bits, symmetric)
    _, scale, offset = clip_search_qparams(source, bits, symmetric, importance)
    return scale, offset


def _gptq_block(
    w, h_inv, q, scales, offsets, start: int, end: int, group: int, bits: int,
    importance: torch.Tensor | None, column_groups: torch.Tensor | None,
) -> torch.Tensor:
    """Quantize columns start..end of `w` in place of `q` (and, without static `column_groups`,
    fit `scales`/`offsets` at each group's first column); returns the scaled errors."""
    block = w[:, start:end].clone()
    errors = torch.zeros_like(block)
    h_block = h_inv[start:end, start:end]
    for i in range(end - start):
        col = start + i
        if column_groups is None and col % group == 0:  # new group: fit its params to the updated weights
            source = block[:, i : i + group] if group < w.shape[1] else w
            weights = None if importance is None else importance[col : col + source.shape[1]]
            scale, offset = _gptq_group_qparams(source, bits, offsets is None, weights)
            scales[:, col // group] = scale
            if offsets is not None:
                offsets[:, col // group] = offset
        g = col // group if column_groups is None else int(column_groups[col])
        scale = scales[:, g]
        offset = None if offsets is None else offsets[:, g]
        q_col = quantize_affine(block[:, i : i + 1], scale, offset, bits)
        q[:, col] = q_col[:, 0]
        err = (block[:, i] - dequantize_affine(q_col, scale, offset)[:, 0]) / h_block[i, i]
        block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
        errors[:, i] = err
    return errors


# --------------------------------------------------------------------------------------------------
# Kernels: repack the portable layout into what a fused op wants, per device
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Kernel:
    name: str
    device_type: str
    ops: tuple[str, ...]  # "namespace.op" that must exist in this torch build
    pack: Callable[[Any, torch.device], Any]  # (module, device) -> kernel state
    matmul: Callable[[Any, torch.Tensor], torch.Tensor]  # (state, x (rows, in)) -> (rows, out), no bias
    requires: Callable[[], bool] | None = None  # a further runtime check (native kernel built, CPU)

    def available(self) -> bool:
        if self.requires is not None and not self.requires():
            return False
        for op in self.ops:
            namespace, _, name = op.partition(".")
            if not hasattr(getattr(torch.ops, namespace), name):
                return False
        return True


def _pack_int8_weight_only(module: Int8WeightOnlyLinear, device: torch.device) -> tuple:
    return module.qweight.to(device).contiguous(), module.scales.to(device, torch.bfloat16)


def _int8_weight_only_mm(state: tuple, x: torch.Tensor) -> torch.Tensor:
    qweight, scales = state
    # bf16 activations: the fp32 variant of this op is ~10x slower than plain fp32 matmul on CPU
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scales)


# Above this many rows (prefill) dequantize-then-sgemm beats the native kernel, whose cost per row
# stays flat while sgemm's falls: on an AVX2 EPYC with SmolLM2 shapes the crossover was ~128 rows for
# the 576/1536-wide layers. Dequantizing a big weight costs more than sgemm gains (49152x576 LM head:
# native was still faster at 512 rows) and would allocate a float copy, so big weights stay native.
_NATIVE_INT8_MAX_ROWS = 128
# tinygemm's CPU int4 kernel (bf16 activations) took 2x the time of dequantize + fp32 GEMM at 928 rows
# and less at 32 (SmolLM2 shapes, 2 AVX2 cores): prefill-sized inputs take the second path.
_INT4_DEQUANTIZE_MIN_ROWS = 192
_DEQUANTIZE_MAX_NUMEL = 1 << 23


def _pack_int8_native(module: Int8WeightOnlyLinear, device: torch.device) -> tuple:
    qweight, scales = module.qweight.contiguous(), module.scales.float().contiguous()
    native.check_int8_weight(qweight, scales)  # TypeError/ValueError here would be a layout bug
    return qweight, scales


def _int8_native_mm(state: tuple, x: torch.Tensor) -> torch.Tensor:
    qweight, scales = state
    if x.dtype != torch.float32 or not x.is_contiguous():  # checks cost less than no-op conversions
        x = x.to(torch.float32).contiguous()
    if x.shape[0] > _NATIVE_INT8_MAX_ROWS and qweight.numel() <= _DEQUANTIZE_MAX_NUMEL:
        return F.linear(x, qweight.float() * scales[:, None])
    return native.int8_linear_unchecked(x, qweight, scales)


def _scales_and_zeros(module: Int4WeightOnlyLinear, device: torch.device) -> torch.Tensor:
    """tinygemm's (groups, out, 2) table; its dequantization is (u - 8) * scale + zero, u = q + 8."""
    zeros = module.zeros if module.zeros is not None else torch.zeros_like(module.scales)
    table = torch.stack([module.scales.float(), zeros.float()], dim=-1)  # (out, groups, 2)
    return table.transpose(0, 1).contiguous().to(device, torch.bfloat16)


def _pack_int4_cpu(module: Int4WeightOnlyLinear, device: torch.device) -> tuple:
    unsigned = unpack_int4(module.qweight.cpu()).to(torch.int32) + 8  # (out, in) in 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 8)
    portable = (module.qweight, module.scales, module.zeros, module.group_size)  # for the prefill path
    return packed, _scales_and_zeros(module, device), module.group_size, portable


def _int4_cpu_mm(state: tuple, x: torch.Tensor) -> torch.Tensor:
    packed, scales_and_zeros, group_size, portable = state
    if x.shape[0] >= _INT4_DEQUANTIZE_MIN_ROWS:  # prefill: dequantize once, then one fp32 GEMM
        qweight, scales, zeros, group = portable
        weight = dequantize_int4_grouped(unpack_int4(qweight), scales, zeros, group)
        return F.linear(x.float(), weight.float())
    # bf16 activations: the fp32 variant is ~15x slower than fp32 matmul on AVX2 CPUs
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), packed, group_size, scales_and_zeros
    )


def _pack_int4_cuda(module: Int4WeightOnlyLinear, device: torch.device) -> tuple:
    unsigned = (unpack_int4(module.qweight) + 8).to(torch.uint8)
    high_even = (unsigned[:, 0::2] << 4) | unsigned[:, 1::2]  # CUDA op wants the even column high
    in_features = module.in_features
    tiles = next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), 0)
    if not tiles:
        raise RuntimeError(f"in_features {in_features} is not a multiple of 32")
    packed = torch.ops.aten._convert_weight_to_int4pack(high_even.to(device).contiguous(), tiles)
    return packed, _scales_and_zeros(module, device), module.group_size


def _int4_cuda_mm(state: tuple, x: torch.Tensor) -> torch.Tensor:
    packed, scales_and_zeros, group_size = state
    return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, group_size, scales_and_zeros)


def _pack_w8a8_fbgemm(module: DynamicInt8Linear, device: torch.device) -> Any:
    zero_points = torch.zeros(module.out_features, dtype=torch.long)
    with warnings.catch_warnings():  # quantized-tensor constructors warn about a future deprecation
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            module.qweight.cpu(), module.scales.cpu().double(), zero_points, 0
        )
        return torch.ops.quantized.linear_prepack(qweight, None)


def _w8a8_fbgemm_mm(packed: Any, x: torch.Tensor) -> torch.Tensor:
    # fbgemm quantizes the whole input with one scale; dividing each token by its own max first makes
    # that per-token (linear, so multiplying back is exact). reduce_range=True uses 7-bit activations:
    # on AVX2 8-bit ones can saturate the int16 accumulation and were measured to be less accurate.
    row_max = x.float().abs().amax(-1, keepdim=True).clamp(min=_MIN_SCALE)
    return torch.ops.quantized.linear_dynamic(x.float() / row_max, packed, True) * row_max


# Up to this many rows the CPU W8A8 layer runs the int8 weight-only kernel on its (identical) int8
# weights with float activations: fbgemm's dynamic linear costs ~125 µs per call whatever the rows
# (quantizing the activations, requantizing the output), which outweighs its int8 GEMM until 8-16
# rows on SmolLM2's shapes (AVX2; per layer at 1 row: 34-75 µs native vs 127-148 µs fbgemm). Float
# activations are also the more accurate of the two, so small batches lose nothing.
W8A8_NATIVE_MAX_ROWS = 8


def _pack_w8a8_cpu(module: DynamicInt8Linear, device: torch.device) -> tuple:
    small = _pack_int8_native(module, device) if native.native_int8_available() else None
    return _pack_w8a8_fbgemm(module, device), small


def _w8a8_cpu_mm(state: tuple, x: torch.Tensor) -> torch.Tensor:
    packed, small = state
    if small is not None and x.shape[0] <= W8A8_NATIVE_MAX_ROWS:
        return _int8_native_mm(small, x)
    return _w8a8_fbgemm_mm(packed, x)


def _pack_w8a8_int_mm(module: DynamicInt8Linear, device: torch.device) -> tuple:
    return module.qweight.to(device).contiguous(), module.scales.to(device, torch.float32)


def _w8a8_int_mm(state: tuple, x: torch.Tensor) -> torch.Tensor:
    qweight, w_scales = state
    q, x_scales = quantize_activations_per_token(x)
    rows = q.shape[0]
    padded = max(32, -(-rows // 8) * 8)  # cuBLASLt int8 GEMM needs > 16 rows, a multiple of 8
    q = F.pad(q, (0, 0, 0, padded - rows))
    acc = torch._int_mm(q, qweight.t())[:rows]
    return acc.float() * x_scales * w_scales


_INT8_WEIGHT_ONLY_KERNELS = (
    _Kernel("int8_avx2", "cpu", (), _pack_int8_native, _int8_native_mm, native.native_int8_available),
    _Kernel(
        "int8pack_mm", "cpu", ("aten._weight_int8pack_mm",), _pack_int8_weight_only, _int8_weight_only_mm
    ),
    _Kernel(
        "int8pack_mm", "cuda", ("aten._weight_int8pack_mm",), _pack_int8_weight_only, _int8_weight_only_mm
    ),
)
_INT4_KERNELS = (
    _Kernel(
        "int4pack_mm_for_cpu",
        "cpu",
        ("aten._convert_weight_to_int4pack_for_cpu", "aten._weight_int4pack_mm_for_cpu"),
        _pack_int4_cpu,
        _int4_cpu_mm,
    ),
    _Kernel(
        "int4pack_mm",
        "cuda",
        ("aten._convert_weight_to_int4pack", "aten._weight_int4pack_mm"),
        _pack_int4_cuda,
        _int4_cuda_mm,
    ),
)
_W8A8_KERNELS = (
    _Kernel(
        "fbgemm_linear_dynamic",
        "cpu",
        ("quantized.linear_prepack", "quantized.linear_dynamic"),
        _pack_w8a8_cpu,
        _w8a8_cpu_mm,
    ),
    _Kernel("int_mm", "cuda", ("aten._int_mm",), _pack_w8a8_int_mm, _w8a8_int_mm),
)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
def _clear_kernel_cache(module: QuantizedLinear, incompatible_keys: Any) -> None:
    module._kernel_cache.clear()


class QuantizedLinear(nn.Module):
    """A Linear whose weight lives in a portable quantized layout (buffers), with a lazily packed,
    per-device fast kernel. The weight is frozen (no gradient); inputs that need a gradient get one
    through `_FrozenQuantizedLinear`, so the layer can serve as a QLoRA base."""

    kernels: ClassVar[tuple[_Kernel, ...]] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.use_kernels = True
        self._kernel_cache: dict[torch.device, tuple[_Kernel, Any] | None] = {}
        self.register_load_state_dict_post_hook(_clear_kernel_cache)  # loading copies in place

    def dequantize_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Float rows `rows` (any shape of indices) of the weight, shaped (*rows.shape, in_features)."""
        return self.dequantize_weight()[rows]

    def _reference_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight().to(x.dtype))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain dequantize-then-matmul: slow, simple, the ground truth for the fast kernels."""
        y = self._reference_matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # a frozen base under trainable adapters (QLoRA)
            return _FrozenQuantizedLinear.apply(x, self)
        return self._forward_inference(x)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~200 times per token: no-op conversions are skipped, not just cheap.
        if not self.use_kernels or x.numel() == 0:
            return self.forward_reference(x)
        kernel = self._kernel_for(x.device)
        if kernel is None:
            return self.forward_reference(x)
        impl, state = kernel
        y = impl.matmul(state, x.reshape(-1, self.in_features))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        bias = self.bias
        if bias is None:
            return y
        return y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))

    def kernel_name(self, device: str | torch.device = "cpu") -> str:
        """Name of the fast kernel `forward` uses on `device`, or "reference" if none works."""
        kernel = self._kernel_for(torch.device(device))
        return "reference" if kernel is None else kernel[0].name

    def _kernel_for(self, device: torch.device) -> tuple[_Kernel, Any] | None:
        if device not in self._kernel_cache:
            self._kernel_cache[device] = self._build_kernel(device)
        return self._kernel_cache[device]

    @torch.no_grad()
    def _build_kernel(self, device: torch.device) -> tuple[_Kernel, Any] | None:
        for kernel in self.kernels:
            if kernel.device_type != device.type or not kernel.available():
                continue
            try:
                state = kernel.pack(self, device)
                if self._kernel_agrees(kernel, state, device):
                    return kernel, state
                log.warning(
                    "%s kernel %s disagrees with the reference; using the reference",
                    type(self).__name__,
                    kernel.name,
                )
            except RuntimeError as err:  # shape or dtype the op does not support
                log.debug("%s kernel %s unavailable: %s", type(self).__name__, kernel.name, err)
        return None

    def _kernel_agrees(self, kernel: _Kernel, state: Any, device: torch.device) -> bool:
        """Private aten ops have changed packing conventions between releases: check once per module."""
        # two sizes: kernels may switch paths by the number of rows (see W8A8_NATIVE_MAX_ROWS)
        for rows in (3, 17):
            probe = torch.randn(rows, self.in_features, generator=torch.Generator().manual_seed(0)).to(device)
            fast = kernel.matmul(state, probe).float()
            reference = self._reference_matmul(probe.to(self._reference_dtype())).float()
            error = (fast - reference).norm() / reference.norm().clamp(min=_MIN_SCALE)
            if not error < _KERNEL_CHECK_TOLERANCE:
                return False
        return True

    def _reference_dtype(self) -> torch.dtype:
        return self.scales.dtype if self.scales.is_floating_point() else torch.float32

    def to_linear(self) -> nn.Linear:
        """A float nn.Linear with the dequantized weight (same device, float32 unless scales differ)."""
        weight = self.dequantize_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(weight.device, weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class _FrozenQuantizedLinear(torch.autograd.Function):
    """y = the fast kernel's x W^T + b; dx = dy W with W dequantized again in backward and dropped.

    The weight gets no gradient. Letting autograd differentiate the reference path instead would save
    a float copy of every weight for backward, which is the memory QLoRA exists to avoid. For W8A8
    the activation rounding passes the gradient straight through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        return module._forward_inference(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantize_weight().to(grad.dtype)
        return grad @ weight, None


def requantize_(module: QuantizedLinear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Quantize the float `weight` (out, in) into `module` in place, with its own method, group size and
    symmetry, by round to nearest (a merged LoRA delta, say); `bias` replaces the bias when given."""
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {module.out_features}x{module.in_features}")
    weight = weight.detach().float()
    with torch.no_grad():
        if isinstance(module, Int4WeightOnlyLinear):
            q, scales, offsets = quantize_int4_grouped(weight, module.group_size, module.symmetric)
            module.qweight.copy_(pack_int4(q))
            if offsets is not None:
                module.zeros.copy_(offsets)
        elif isinstance(module, _Int8StorageLinear):
            q, scales = quantize_int8_per_channel(weight)
            module.qweight.copy_(q)
        else:
            raise TypeError(f"cannot requantize {type(module).__name__}")
        module.scales.copy_(scales)
        if bias is not None and module.bias is not None:
            module.bias.copy_(bias)
    module._kernel_cache.clear()  # the packed layouts hold the old weight


class _Int8StorageLinear(QuantizedLinear):
    """Per-output-channel symmetric int8 weight: ``weight ≈ qweight * scales[:, None]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        module = cls(q.shape[1], q.shape[0], bias is not None)
        module.qweight.copy_(q)
        module.scales.copy_(scales)
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module.to(q.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        q, scales = quantize_int8_per_channel(linear.weight.detach())
        return cls.from_quantized(q, scales, linear.bias)

    def dequantize_weight(self) -> torch.Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.qweight[rows].to(self.scales.dtype) * self.scales[rows].unsqueeze(-1)


class Int8WeightOnlyLinear(_Int8StorageLinear):
    """Weight-only int8; activations stay float. Fast path: ``aten._weight_int8pack_mm``."""

    kernels = _INT8_WEIGHT_ONLY_KERNELS


class DynamicInt8Linear(_Int8StorageLinear):
    """W8A8: int8 weights and per-token dynamically quantized int8 activations.

    Reference: per-token symmetric int8 fake-quantized activations times the dequantized weight.
    Fast paths: fbgemm's dynamic linear on CPU (per-token via row normalisation, 7-bit activations)
    and ``torch._int_mm`` on CUDA."""

    kernels = _W8A8_KERNELS

    def _reference_matmul(self, x: torch.Tensor) -> torch.Tensor:
        q, scales = quantize_activations_per_token(x)
        return F.linear((q.float() * scales).to(x.dtype), self.dequantize_weight().to(x.dtype))


class Int4WeightOnlyLinear(QuantizedLinear):
    """Group-wise int4 weight-only: ``weight ≈ q * scales + zeros`` per group of `group_size` inputs.
    Buffers: qweight uint8 (out, in/2) nibble-packed, scales and (asymmetric only) zeros float32
    (out, in/group_size). Fast path: tinygemm ``_weight_int4pack_mm`` (CPU and CUDA variants)."""

    kernels = _INT4_KERNELS

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 64,
        symmetric: bool = False,
    ):
        super().__init__(in_features, out_features, bias)
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("qweight", torch.full((out_features, in_features // 2), 0x88, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, groups))

    @classmethod
    def from_quantized(cls, q, scales, offsets, group_size: int, bias: torch.Tensor | None = None):
        """From signed int4 values `q` (out, in) in [-8, 7] and per-group scales/offsets."""
        module = cls(q.shape[1], q.shape[0], bias is not None, group_size, symmetric=offsets is None)
        module.qweight.copy_(pack_int4(q))
        module.scales.copy_(scales)
        if offsets is not None:
            module.zeros.copy_(offsets)
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module.to(q.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, symmetric: bool = False):
        q, scales, offsets = quantize_int4_grouped(linear.weight.detach(), group_size, symmetric)
        return cls.from_quantized(q, scales, offsets, group_size, linear.bias)

    def dequantize_weight(self) -> torch.Tensor:
        q = unpack_int4(self.qweight)
        return dequantize_int4_grouped(q, self.scales, self.zeros, self.group_size).to(self.scales.dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        zeros = None if self.zeros is None else self.zeros[flat]
        w = dequantize_int4_grouped(unpack_int4(self.qweight[flat]), self.scales[flat], zeros, self.group_size)
        return w.to(self.scales.dtype).reshape(*rows.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, symmetric={self.symmetric}"


class QuantizedEmbedding(nn.Module):
    """An embedding table that is the (quantized) weight of a tied Linear, e.g. the LM head: a lookup
    dequantizes only the rows it reads. It owns no tensors, so the state dict keeps the matrix once,
    under the Linear's keys; it follows the Linear through `.to()`, `load_state_dict` and deepcopy."""

    def __init__(self, source: QuantizedLinear):
        super().__init__()
        self._source = (source,)  # a tuple keeps nn.Module from registering it: no duplicate keys
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features

    @property
    def source(self) -> QuantizedLinear:
        return self._source[0]

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized table, for code that reads ``embedding.weight``: costs a full copy."""
        return self.source.dequantize_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.dequantize_rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {type(self.source).__name__} rows"


_MODULE_CLASSES = {
    cls.__name__: cls for cls in (Int8WeightOnlyLinear, DynamicInt8Linear, Int4WeightOnlyLinear)
}


# --------------------------------------------------------------------------------------------------
# Whole-model API
# --------------------------------------------------------------------------------------------------
def _resolve_symmetric(method: str, spec: _MethodSpec, symmetric: bool | None) -> bool:
    if spec.grouped:
        return False if symmetric is None else symmetric  # int4: asymmetric is more accurate, same speed
    if symmetric is False:
        raise ValueError(f"method {method!r} supports only symmetric quantization (symmetric=True or None)")
    return True


def _check_group_size(model: nn.Module, names: Sequence[str], group_size: int | None) -> None:
    if group_size is None:
        return
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size {group_size} is not supported; allowed: {INT4_GROUP_SIZES}")
    for name in names:
        in_features = model.get_submodule(name).in_features
        if in_features % group_size:
            raise ValueError(
                f"layer {name!r}: group_size {group_size} does not divide in_features {in_features}"
            )


def _quantize_linear(
    linear: nn.Linear,
    method: str,
    config: QuantizationConfig,
    calibrated: tuple[torch.Tensor | None, torch.Tensor | None],
    gptq_args: dict,
):
    """`calibrated` is (GPTQ Hessian, clip-search importance), either None when not used."""
    cls = _MODULE_CLASSES[_METHODS[method].module]
    hessian, importance = calibrated
    if hessian is not None:
        result = gptq_quantize(linear.weight, hessian, config.bits, config.group_size, config.symmetric,
                               clip_search=config.clip_search, **gptq_args)
        if cls is Int4WeightOnlyLinear:
            return cls.from_quantized(result.q, result.scales, result.offsets, config.group_size, linear.bias)
        return cls.from_quantized(result.q, result.scales[:, 0], linear.bias)
    if cls is not Int4WeightOnlyLinear:
        return cls.from_linear(linear)
    if not config.clip_search:
        return cls.from_linear(linear, config.group_size, config.symmetric)
    q, scales, offsets = quantize_int4_clip_search(linear.weight.detach(), config.group_size, config.symmetric,
                                                   importance)
    return cls.from_quantized(q, scales, offsets, config.group_size, linear.bias)


def quantize_model(
    model: nn.Module,
    method: str = "int8",
    *,
    group_size: int = 64,
    symmetric: bool | None = None,
    targets: Sequence[str] = ("*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    calibration: Iterable[Any] | None = None,
    gptq_damp: float = 0.01,
    gptq_block_size: int = 128,
    include_lm_head: bool = False,
    lm_head_method: str | None = None,
    clip_search: bool = False,
    gptq_act_order: bool = False,
) -> QuantizationConfig:
    """Replace the selected `nn.Linear` layers of `model` in place by quantized ones.

    `method` is one of QUANT_METHODS; `group_size` applies to int4 methods only; `symmetric=None`
    picks asymmetric for int4 and symmetric for int8. GPTQ methods need `calibration`: an iterable
    of model inputs (tensor, tuple of args or dict of kwargs). All layer Hessians come from one
    calibration pass over the float model. `include_lm_head=True` quantizes the output head too
    (the DEFAULT_EXCLUDE names), whatever `targets`/`exclude` say about it, with `lm_head_method`
    (one of LM_HEAD_METHODS) when given, else `method`. A layer tied to an
    embedding shares its quantized weight with it (see the module docstring); with GPTQ such a layer
    is rounded to nearest, because GPTQ's error feedback would tune the rows for the head's outputs
    only, not as embedding vectors. `clip_search=True` (int4 methods) picks each group's range by
    `clip_search_qparams`, weighting input channels by the calibration inputs' mean square when
    `calibration` is given (GPTQ: the Hessian's diagonal), equally otherwise.
    `gptq_act_order=True` runs GPTQ in act-order with static groups (see `gptq_quantize`).
    The returned config is also set as ``model.quantization_config``.
    """
    spec = _method_spec(method)
    if getattr(model, "quantization_config", None) is not None:
        raise ValueError("model is already quantized; call dequantize_model first")
    _check_int4_options(method, spec, clip_search)
    if gptq_act_order and not spec.gptq:
        raise ValueError(f"gptq_act_order applies to the GPTQ methods, not {method!r}")
    names = _selected_layers(model, targets, exclude, include_lm_head)
    tied = tied_embeddings(model, names)
    config = QuantizationConfig(
        method,
        spec.bits,
        group_size if spec.grouped else None,
        _resolve_symmetric(method, spec, symmetric),
        tuple(names),
        tied,
        module_methods=_head_methods(model, names, method, include_lm_head, lm_head_method),
        clip_search=clip_search,
    )
    _check_group_size(model, _grouped_layers(config), config.group_size)
    calibrated = _calibration_statistics(model, config, calibration)
    gptq_args = {"damp": gptq_damp, "block_size": gptq_block_size, "act_order": gptq_act_order}
    for name in names:
        linear = model.get_submodule(name)
        quantized = _quantize_linear(linear, config.method_of(name), config, calibrated.pop(name, (None, None)),
                                     gptq_args)
        replace_submodule(model, name, quantized)
    _tie_quantized_embeddings(model, tied)
    model.quantization_config = config
    release_freed_heap()  # without it the replaced float weights stay in RSS (measured: 360 MB of SmolLM2's)
    return config


def _check_int4_options(method: str, spec: _MethodSpec, clip_search: bool) -> None:
    if not isinstance(clip_search, bool):
        raise TypeError(f"clip_search must be True or False, got {clip_search!r}")
    if clip_search and not spec.grouped:
        grouped = [m for m, s in _METHODS.items() if s.grouped]
        raise ValueError(f"clip_search applies to the int4 methods {grouped}, not {method!r}")


def _head_methods(
    model: nn.Module, names: Sequence[str], method: str, include_lm_head: bool, lm_head_method: str | None
) -> tuple[tuple[str, str], ...]:
    """(head, lm_head_method) for each selected output head when the head's method differs."""
    if lm_head_method is None or lm_head_method == method:
        return ()
    if lm_head_method not in LM_HEAD_METHODS:
        raise ValueError(f"lm_head_method {lm_head_method!r} is not supported; allowed: {LM_HEAD_METHODS}, "
                         f"or the body's method {method!r}")
    if not include_lm_head:
        raise ValueError("lm_head_method needs include_lm_head=True (else the head stays float)")
    return tuple((name, lm_head_method) for name in names if name_matches(name, DEFAULT_EXCLUDE))


def _grouped_layers(config: QuantizationConfig) -> list[str]:
    return [name for name in config.modules if _METHODS[config.method_of(name)].grouped]


def _calibration_statistics(
    model: nn.Module, config: QuantizationConfig, calibration: Iterable[Any] | None
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """{layer: (GPTQ Hessian, clip-search importance)} for the layers of the body's method, from one
    pass over the float model. Tied layers get no Hessian (they are rounded to nearest), but with
    `clip_search` they are weighted by their inputs as a head: measured on SmolLM2's int4 head, that
    beat equal weights (perplexity x1.12 vs x1.18), i.e. the head's outputs matter more."""
    tied = {linear for _, linear in config.tied_embeddings}
    body = [n for n in config.modules if config.method_of(n) == config.method]
    if _METHODS[config.method].gptq:
        hessians = _gptq_hessians(model, body, calibration)
        importance = {n: hessians.pop(n).diagonal().clone() for n in tied & set(hessians)}
        return {**{n: (h, None) for n, h in hessians.items()},
                **{n: (None, m if config.clip_search else None) for n, m in importance.items()}}
    if not config.clip_search or calibration is None:
        return {}
    return {name: (None, m) for name, m in input_mean_squares(model, body, calibration).items()}


def _selected_layers(
    model: nn.Module, targets: Sequence[str], exclude: Sequence[str], include_lm_head: bool
) -> list[str]:
    if not include_lm_head:
        return select_linear_layers(model, targets, exclude)
    if isinstance(targets, str) or isinstance(exclude, str):
        raise TypeError("targets and exclude are sequences of patterns, not a single string")
    heads = [n for n, m in model.named_modules() if type(m) is nn.Linear and name_matches(n, DEFAULT_EXCLUDE)]
    if not heads:
        raise ValueError(f"include_lm_head=True, but the model has no nn.Linear named like {DEFAULT_EXCLUDE}")
    kept_exclude = [p for p in exclude if p not in DEFAULT_EXCLUDE]
    return select_linear_layers(model, (*targets, *DEFAULT_EXCLUDE), kept_exclude)


def tied_embeddings(model: nn.Module, linear_names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """(embedding name, linear name) for each nn.Embedding whose weight *is* one of the named
    Linears' weight (tied input and output embeddings)."""
    by_weight = {id(model.get_submodule(n).weight): n for n in linear_names}
    return tuple(
        (name, by_weight[id(module.weight)])
        for name, module in model.named_modules()
        if type(module) is nn.Embedding and id(module.weight) in by_weight
    )


def _tie_quantized_embeddings(model: nn.Module, tied: Sequence[tuple[str, str]]) -> None:
    for embedding, linear in tied:
        if type(model.get_submodule(embedding)) is not nn.Embedding:
            raise ValueError(f"tied embedding {embedding!r} is not an nn.Embedding in this model")
        replace_submodule(model, embedding, QuantizedEmbedding(model.get_submodule(linear)))


def _gptq_hessians(model: nn.Module, names: Sequence[str], calibration: Iterable[Any] | None) -> dict:
    if calibration is None:
        raise ValueError("GPTQ methods need calibration data: calibration=[batch, ...]")
    return input_hessians(model, names, calibration)


def apply_quantization_config(model: nn.Module, config: QuantizationConfig | dict) -> QuantizationConfig:
    """Swap in empty quantized modules as `config` describes, ready for ``load_state_dict``."""
    config = config if isinstance(config, QuantizationConfig) else QuantizationConfig.from_dict(config)
    _method_spec(config.method)
    missing = [name for name in config.modules if not _is_linear(model, name)]
    if missing:
        raise ValueError(
            f"quantization config names layers that are not nn.Linear in this model: {missing[:5]}"
        )
    _check_group_size(model, _grouped_layers(config), config.group_size)
    for name in config.modules:
        cls = _MODULE_CLASSES[_METHODS[config.method_of(name)].module]
        linear = model.get_submodule(name)
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        extra = (config.group_size, config.symmetric) if cls is Int4WeightOnlyLinear else ()
        replace_submodule(model, name, cls(*args, *extra).to(linear.weight.device))
    _tie_quantized_embeddings(model, config.tied_embeddings)
    model.quantization_config = config
    return config


def _is_linear(model: nn.Module, name: str) -> bool:
    try:
        return type(model.get_submodule(name)) is nn.Linear
    except AttributeError:
        return False


def quantized_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, quantization_config dict): portable tensors (``<name>.qweight``, ``.scales``,
    ``.zeros``, ``.bias`` for quantized layers, the usual keys elsewhere) and the JSON-able config."""
    config = getattr(model, "quantization_config", None)
    if config is None:
        raise ValueError("model is not quantized (no quantization_config); call quantize_model first")
    tensors = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    return tensors, config.to_dict()


def save_quantized(model: nn.Module, path: str) -> None:
    """Write a quantized model to a safetensors file; the config goes into the file's metadata."""
    from safetensors.torch import save_model

    _, config = quantized_state_dict(model)
    save_model(model, str(path), metadata={"quantization_config": json.dumps(config)})


def load_quantized(model: nn.Module, path: str) -> QuantizationConfig:
    """Rebuild a model saved by `save_quantized` into a fresh float `model` without re-quantizing."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "quantization_config" not in metadata:
        raise ValueError(f"{path} has no quantization_config metadata; was it written by save_quantized?")
    config = apply_quantization_config(model, json.loads(metadata["quantization_config"]))
    load_model(model, str(path), strict=True)
    return config


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized layer by a float nn.Linear (re-tying embeddings that shared its
    weight); returns how many Linears were replaced."""
    names = [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    embeddings = [(name, module.source) for name, module in model.named_modules()
                  if isinstance(module, QuantizedEmbedding)]
    floats = {}
    for name in names:
        quantized = model.get_submodule(name)
        floats[id(quantized)] = quantized.to_linear()
        replace_submodule(model, name, floats[id(quantized)])
    for name, source in embeddings:
        weight = floats[id(source)].weight
        table = nn.Embedding(source.out_features, source.in_features, _weight=weight)  # no random init
        table.weight = weight  # the same Parameter: tied again
        replace_submodule(model, name, table)
    if hasattr(model, "quantization_config"):
        del model.quantization_config
    return len(names)
