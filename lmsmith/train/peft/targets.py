"""Find modules by name (peft's matching rules) and swap them in place."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ...compress.quantize import QuantizedLinear
from .base import AdapterModule
from .config import Targets

ALL_LINEAR = "all-linear"
OUTPUT_HEADS = ("lm_head",)  # "all-linear" leaves the vocabulary projection alone, as peft does


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a quantized one (a frozen QLoRA base)."""
    return isinstance(module, (nn.Linear, QuantizedLinear))


def name_matches(name: str, targets: Targets) -> bool:
    """A string is a regex over the whole name; a tuple holds exact names or dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def within(name: str, patterns: Targets) -> bool:
    """Whether `name` or one of its ancestors matches (peft never adapts inside a modules_to_save module)."""
    if not patterns:
        return False
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def adapter_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, AdapterModule)]


def _inside(name: str, containers: list[str]) -> bool:
    return any(name.startswith(c + ".") for c in containers if c)


def find_targets(
    model: nn.Module,
    targets: Targets,
    exclude: tuple[str, ...] = (),
    accepts: Callable[[nn.Module], bool] = is_linear,
    kind: str = "nn.Linear (or quantized linear)",
) -> list[str]:
    """Names of the modules `targets` selects, in model order.

    Raises ValueError when nothing matches (listing some module names), when a match is a module of the
    wrong kind, or when a match already carries an adapter.
    """
    wrapped = adapter_module_names(model)
    names = []
    for name, module in model.named_modules():
        if not name or _inside(name, wrapped) or within(name, exclude):
            continue
        if not _selected(name, module, targets):
            continue
        if isinstance(module, AdapterModule):
            raise ValueError(f"module {name!r} already has an adapter ({type(module).__name__})")
        if not accepts(module):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; this method adapts {kind} modules"
            )
        names.append(name)
    if not names:
        raise ValueError(f"target_modules {targets!r} matched no module; {_available(model)}")
    return names


def _selected(name: str, module: nn.Module, targets: Targets) -> bool:
    if targets == ALL_LINEAR:
        return is_linear(module) and name.rpartition(".")[2] not in OUTPUT_HEADS
    return name_matches(name, targets)


def _available(model: nn.Module, limit: int = 10) -> str:
    linear = [n for n, m in model.named_modules() if n and is_linear(m)]
    names = linear or [n for n, _ in model.named_modules() if n]
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"available {'linear ' if linear else ''}module names include: {shown or '(none)'}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is (works through ModuleList / ModuleDict too)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
