"""The token-embedding output as an attack surface: add an offset to it, or take the gradient there.

Both adversarial training (FGM/PGD) and HotFlip perturb `model.embed.tokens`'s output, never its
weights, through a forward hook that is always removed: no perturbation outlives the call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP/FSDP-style wrapper (`.module`), or the model itself."""
    return getattr(model, "module", model)


def token_embedding(model: nn.Module) -> nn.Embedding:
    embed = getattr(getattr(unwrapped(model), "embed", None), "tokens", None)
    if not isinstance(embed, nn.Embedding):
        raise TypeError(f"{type(model).__name__} has no token embedding at embed.tokens (an nn.Embedding); "
                        "adversarial perturbations need lmsmith's Transformer")
    return embed


@contextlib.contextmanager
def embedding_offset(model: nn.Module, offset: torch.Tensor) -> Iterator[None]:
    """Inside the block, the token-embedding output is `embed.tokens(ids) + offset` ((B, T, H))."""
    def add(_module, _inputs, output):
        if output.shape != offset.shape:
            raise ValueError(f"embedding offset {tuple(offset.shape)} does not match the embeddings "
                             f"{tuple(output.shape)}")
        return output + offset.to(output.dtype)

    handle = token_embedding(model).register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def zero_offset(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """A zero (B, T, H) offset that requires grad: its gradient is d loss / d token embeddings, even
    when the embedding weights are frozen (PEFT)."""
    weight = token_embedding(model).weight
    shape = (*input_ids.shape, weight.shape[1])
    return torch.zeros(shape, dtype=weight.dtype, device=input_ids.device, requires_grad=True)


def per_example_unit(grad: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """grad / ‖grad‖ with the L2 norm taken per example over (T, H); zero where the gradient is zero."""
    norms = grad.flatten(1).norm(dim=1).clamp(min=eps)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))
