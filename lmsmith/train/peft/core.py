"""Inject, freeze, merge, report: the method-independent part of PEFT."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .adalora import AdaLoraCallback, SVDLinear, svd_modules
from .base import AdaptedLinear, AdapterModule
from .bottleneck import BottleneckAdapter, attach_bottleneck, bottleneck_features, detach_bottleneck
from .callbacks import TrainingCallback
from .config import AdaLoraConfig, BottleneckConfig, IA3Config, LoraConfig, PeftConfig, PrefixConfig
from .ia3 import IA3Linear
from .lora import LoRALinear
from .prefix import PREFIX_ATTRIBUTE, PrefixEncoder, build_prefix_encoder
from .targets import find_targets, name_matches, replace_module

log = logging.getLogger(__name__)
SAVE_WHOLE = "_peft_train_whole"  # attribute marking a `modules_to_save` module (trained and saved in full)


# --- apply --------------------------------------------------------------------------------------------


def apply_peft(model: nn.Module, config: PeftConfig) -> nn.Module:
    """Add the adapters `config` describes to `model` in place, freeze every other parameter, return `model`.

    Base state-dict keys are unchanged; adapter tensors are extra keys (see `peft_state_dict`). Calling it
    again with another config adds more adapters (on other modules). The trainable/total counts are
    logged; `trainable_parameters_report(model)` returns them.
    """
    if isinstance(config, PrefixConfig):
        _attach_prefix(model, config)
    elif isinstance(config, BottleneckConfig):
        _attach_bottlenecks(model, config)
    elif isinstance(config, (LoraConfig, IA3Config, AdaLoraConfig)):
        for name in find_targets(model, config.target_modules, exclude=config.modules_to_save):
            base = model.get_submodule(name)
            replace_module(model, name, wrap_linear(base, config, name))
    else:
        raise TypeError(f"apply_peft: unsupported config {type(config).__name__}")
    _mark_modules_to_save(model, config.modules_to_save)
    set_trainable(model)
    log.info("%s: %s", config.peft_type, trainable_parameters_report(model))
    return model


def wrap_linear(base: nn.Linear, config: LoraConfig | IA3Config | AdaLoraConfig, name: str) -> AdaptedLinear:
    if isinstance(config, LoraConfig):
        return LoRALinear(base, config)
    if isinstance(config, IA3Config):
        return IA3Linear(base, config, is_feedforward=name_matches(name, config.feedforward_modules))
    return SVDLinear(base, config)


def _attach_bottlenecks(model: nn.Module, config: BottleneckConfig) -> None:
    for name in find_targets(model, config.target_modules, config.modules_to_save, _any_module, "any"):
        module = model.get_submodule(name)
        ref = next(module.parameters(), None)
        device, dtype = (
            (ref.device, ref.dtype) if ref is not None and ref.is_floating_point() else (None, None)
        )
        features = bottleneck_features(module, model, config)
        attach_bottleneck(module, BottleneckAdapter(features, config, device=device, dtype=dtype))


def _any_module(module: nn.Module) -> bool:
    return not isinstance(module, AdapterModule)


def _attach_prefix(model: nn.Module, config: PrefixConfig) -> None:
    if isinstance(getattr(model, PREFIX_ATTRIBUTE, None), nn.Module):
        raise ValueError(f"the model already has a {PREFIX_ATTRIBUTE!r}")
    encoder = build_prefix_encoder(model, config)
    ref = next(model.parameters(), None)
    if ref is not None:
        encoder.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    encoder.config = config
    model.add_module(PREFIX_ATTRIBUTE, encoder)


def _mark_modules_to_save(model: nn.Module, names: tuple[str, ...]) -> None:
    if not names:
        return
    found = [m for n, m in model.named_modules() if n and name_matches(n, names)]
    if not found:
        raise ValueError(f"modules_to_save {names!r} matched no module")
    for module in found:
        setattr(module, SAVE_WHOLE, True)


def set_trainable(model: nn.Module) -> None:
    """Only adapter parameters and `modules_to_save` parameters require gradients."""
    trainable = {id(p) for _, p in peft_named_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


# --- which tensors are PEFT tensors -------------------------------------------------------------------


def peft_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) of every adapter tensor and every `modules_to_save` tensor."""
    seen = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, AdapterModule):
            params = module.adapter_parameters()
        elif getattr(module, SAVE_WHOLE, False):
            params = module.named_parameters()
        else:
            continue
        for rel, p in params:
            if prefix + rel not in seen:
                seen.add(prefix + rel)
                yield prefix + rel, p


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter (and modules_to_save) tensors under their model state-dict keys, detached."""
    return {name: p.detach() for name, p in peft_named_parameters(model)}


def adapter_modules(model: nn.Module) -> dict[str, AdapterModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterModule)}


# --- merge / unmerge / unload -------------------------------------------------------------------------


def _linear_adapters(model: nn.Module) -> dict[str, AdaptedLinear]:
    modules = adapter_modules(model)
    unmergeable = [n or "<model>" for n, m in modules.items() if not isinstance(m, AdaptedLinear)]
    if unmergeable:
        raise ValueError(
            f"bottleneck and prefix adapters are not linear and cannot be merged: {unmergeable[:5]}"
        )
    return {n: m for n, m in modules.items() if isinstance(m, AdaptedLinear)}


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold every linear adapter into its base weight (outputs unchanged, no adapter cost at inference)."""
    for module in _linear_adapters(model).values():
        module.merge()
    return model


def unmerge_peft(model: nn.Module) -> nn.Module:
    """Take merged adapters out of the base weights again (exact up to float rounding)."""
    for module in _linear_adapters(model).values():
        module.unmerge()
    return model


def unload_peft(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter, leaving plain modules; `merge=True` keeps the linear adapters' effect."""
    modules = _linear_adapters(model) if merge else adapter_modules(model)
    for name, module in modules.items():
        if isinstance(module, AdaptedLinear):
            module.merge() if merge else module.unmerge()
            replace_module(model, name, module.to_linear())
        elif isinstance(module, BottleneckAdapter):
            detach_bottleneck(model.get_submodule(name.rpartition(".")[0]))
        elif isinstance(module, PrefixEncoder):
            delattr(model, PREFIX_ATTRIBUTE)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (e.g. the reference policy in DPO) without touching any weight."""
    modules = adapter_modules(model).values()
    if any(getattr(m, "merged", False) for m in modules):
        raise ValueError("adapters are merged into the weights; unmerge_peft(model) before disabling them")
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was


# --- reports and training hooks ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int
    adapter: int  # parameters added by adapters (modules_to_save not included)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.trainable_fraction:.4f}"
        )


def trainable_parameters_report(model: nn.Module) -> ParameterReport:
    """Counts with tied parameters counted once."""
    unique = {id(p): p for p in model.parameters()}
    adapter_ids = {id(p) for m in adapter_modules(model).values() for _, p in m.adapter_parameters()}
    return ParameterReport(
        trainable=sum(p.numel() for p in unique.values() if p.requires_grad),
        total=sum(p.numel() for p in unique.values()),
        adapter=sum(unique[i].numel() for i in adapter_ids if i in unique),
    )


def peft_callbacks(model: nn.Module) -> list[TrainingCallback]:
    """The callbacks the training loop must run for the adapters in `model` (AdaLoRA needs one).
    Build them once per training run: they keep state (importance EMAs) across steps."""
    return [AdaLoraCallback(model)] if svd_modules(model) else []
