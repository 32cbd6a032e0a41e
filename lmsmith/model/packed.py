"""Inference-only linear layers with weights pre-packed for oneDNN (CPU, float32).

Why: on CPUs where MKL's sgemm picks a slow path (measured on an AVX2 AMD EPYC: 30 GFLOP/s for the
SmolLM2 lm_head at 32 rows), oneDNN with a weight reordered once into its blocked layout runs the same
matmul 1.3-2.7x faster (docs/benchmarks.md). `pack_linears` swaps plain `nn.Linear` modules for
`PackedLinear` by module name; the state dict keeps the `weight`/`bias` keys (the packed weight is
written back as a dense tensor), so checkpoints and adapters see the same model.

Packing is for inference only: a packed layer has no gradient and refuses to run with autograd on.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# A packed weight whose layout is wrong gives errors of the order of the outputs; reordering only
# changes the summation order (errors ~1e-6 relative). 1e-3 separates the two.
_PACK_CHECK_TOLERANCE = 1e-3


def packing_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """oneDNN's reordered linear exists in this build and applies to (device, dtype)."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout; numerically an `nn.Linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
        # bias stays a buffer, not a parameter: the layer is frozen by construction.
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear is inference-only: call lmsmith.model.packed.unpack_linears "
                               "before training")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # The state dict looks like nn.Linear's, so saving a packed model writes the usual keys.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
            return
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: shape {tuple(weight.shape)} in the checkpoint, "
                              f"{(self.out_features, self.in_features)} in the model")
            return
        if self.bias is not None and prefix + "bias" not in state_dict:
            missing_keys.append(prefix + "bias")  # as nn.Linear would: keep the old bias, say so
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), 1)
        if self.bias is not None:
            self.bias = state_dict[prefix + "bias"].detach().clone()

    def __deepcopy__(self, memo):  # oneDNN's opaque tensors cannot be deep-copied directly
        return PackedLinear(self.dense_weight(), None if self.bias is None else self.bias.clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Only large weights are packed by default. oneDNN runs every matmul as a parallel region, while MKL
# runs small ones (a decode step's 576x576 projections) on one thread. On an idle machine packing every
# layer of SmolLM2 was faster still (batch 1: 81 vs 89 ms/token), but when other processes compete for
# the cores each parallel region waits for a descheduled thread: 211 regions per token made batch-1
# decode 7x slower than MKL. The lm_head (49152 x 576) is one region per token and gains the most.
DEFAULT_MIN_WEIGHT_ELEMENTS = 1 << 22


def _packable(module: nn.Module, min_weight_elements: int) -> bool:
    return (type(module) is nn.Linear  # subclasses (LoRA, quantized, …) have their own forward
            and module.weight.numel() >= min_weight_elements
            and packing_supported(module.weight.device, module.weight.dtype))


def _agrees(linear: nn.Linear, packed: PackedLinear) -> bool:
    """Run both on a small random input: a reorder this build gets wrong must not reach users."""
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = F.linear(x, linear.weight, linear.bias), packed(x)
    scale = want.abs().max().clamp_min(1e-6)
    return bool(((got - want).abs().max() / scale) < _PACK_CHECK_TOLERANCE)


def pack_linears(model: nn.Module, exclude: Sequence[str] = (),
                 min_weight_elements: int = DEFAULT_MIN_WEIGHT_ELEMENTS) -> list[str]:
    """Replace each plain `nn.Linear` (CPU float32) with at least `min_weight_elements` weights by a
    `PackedLinear`, in place; `min_weight_elements=0` packs them all (fastest on an idle machine).

    Returns the names packed; an empty list when this build or device cannot pack (nothing changes).
    Tied weights (e.g. lm_head sharing the embedding) get their own packed copy; the embedding stays.
    """
    names = [n for n, m in model.named_modules()
             if _packable(m, min_weight_elements)
             and not any(fnmatch.fnmatchcase(n, pattern) for pattern in exclude)]
    packed_names = []
    for name in names:
        linear = model.get_submodule(name)
        packed = PackedLinear.from_linear(linear)
        if not _agrees(linear, packed):
            log.warning("oneDNN packed linear disagrees with nn.Linear for %s; leaving it unpacked", name)
            continue
        model.set_submodule(name, packed)
        packed_names.append(name)
    return packed_names


def unpack_linears(model: nn.Module) -> int:
    """Turn every `PackedLinear` back into an `nn.Linear` (for training or export); returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    return len(names)
