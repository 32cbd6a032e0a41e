"""Frozen settings for each parameter-efficient method.

`target_modules` follows peft's rule: a string is a regular expression that must match the whole module
name; a list/tuple holds names or name suffixes (`"q_proj"` matches `layers.0.attn.q_proj`); the string
`"all-linear"` means every `nn.Linear` except an `lm_head`. `modules_to_save` names (suffixes) of
modules that are trained in full next to the adapters, e.g. a classification head.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal

Targets = str | tuple[str, ...]
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "tanh")


def _as_targets(value: object, field_name: str) -> Targets:
    """Lists become tuples (so configs stay hashable); empty or non-string entries are refused."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field_name} must not be empty")
        return value
    items = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else None
    if items is None or not all(isinstance(t, str) and t for t in items):
        raise TypeError(f"{field_name} must be a regex string or a list of module names, got {value!r}")
    if not items:
        raise ValueError(f"{field_name} must name at least one module")
    return tuple(sorted(items)) if isinstance(value, (set, frozenset)) else items


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


class _Normalise:
    """Mixin: turn list fields into tuples after construction (dataclasses are frozen)."""

    def _normalise_targets(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            if f.name == "target_modules":
                object.__setattr__(self, f.name, _as_targets(getattr(self, f.name), f.name))
            elif f.name in ("modules_to_save", "feedforward_modules"):
                value = getattr(self, f.name)
                object.__setattr__(self, f.name, _as_targets(value, f.name) if value else ())


@dataclass(frozen=True)
class LoraConfig(_Normalise):
    """LoRA: W x + s·B A x with s = alpha/r (or alpha/sqrt(r) with rsLoRA); DoRA adds a magnitude vector."""

    target_modules: Targets
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        self._normalise_targets()
        _check_positive_int("LoraConfig.r", self.r)
        _check_probability("LoraConfig.lora_dropout", self.lora_dropout)


@dataclass(frozen=True)
class IA3Config(_Normalise):
    """(IA)^3: a learned vector scales the output of each target, or its input for feed-forward targets."""

    target_modules: Targets
    feedforward_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    peft_type: ClassVar[str] = "IA3"

    def __post_init__(self) -> None:
        self._normalise_targets()
        if isinstance(self.target_modules, tuple) and not set(self.feedforward_modules) <= set(
            self.target_modules
        ):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            raise ValueError(
                f"IA3Config.feedforward_modules must be a subset of target_modules; not targeted: {extra}"
            )


@dataclass(frozen=True)
class BottleneckConfig(_Normalise):
    """Houlsby adapter after each target's output: h + up(act(down(h))), `up` zero-initialised.

    `hidden_size` is the width of the target's output; None reads `out_features` (linear targets) or
    `model.config.hidden_size`.
    """

    target_modules: Targets
    bottleneck_size: int = 64
    activation: Literal["relu", "gelu", "silu", "tanh"] = "gelu"
    dropout: float = 0.0
    hidden_size: int | None = None
    modules_to_save: tuple[str, ...] = ()
    peft_type: ClassVar[str] = "LMSMITH_BOTTLENECK"

    def __post_init__(self) -> None:
        self._normalise_targets()
        _check_positive_int("BottleneckConfig.bottleneck_size", self.bottleneck_size)
        _check_probability("BottleneckConfig.dropout", self.dropout)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BottleneckConfig.activation={self.activation!r} is not one of {ACTIVATIONS}")
        if self.hidden_size is not None:
            _check_positive_int("BottleneckConfig.hidden_size", self.hidden_size)


@dataclass(frozen=True)
class PrefixConfig(_Normalise):
    """Prefix tuning: trained key/value vectors prepended in every attention layer.

    Sizes left as None are read from `model.config` (`num_layers`, `kv_heads`, `dim_per_head`).
    `encoder_hidden_size` set: the prefixes come from a small MLP over an embedding (more stable training,
    as in the paper); None: the prefixes are trained directly.
    """

    num_virtual_tokens: int = 20
    encoder_hidden_size: int | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    modules_to_save: tuple[str, ...] = ()
    peft_type: ClassVar[str] = "LMSMITH_PREFIX_TUNING"

    def __post_init__(self) -> None:
        self._normalise_targets()
        _check_positive_int("PrefixConfig.num_virtual_tokens", self.num_virtual_tokens)
        for name in ("encoder_hidden_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) is not None:
                _check_positive_int(f"PrefixConfig.{name}", getattr(self, name))


@dataclass(frozen=True)
class AdaLoraConfig(_Normalise):
    """AdaLoRA: SVD-form adapters P Λ Q whose total rank shrinks from init_r to target_r per module.

    Schedule (optimizer steps): full budget up to `tinit`, cubic decrease until `total_step - tfinal`,
    then the final allocation is kept. Masking happens every `deltaT` steps.
    """

    target_modules: Targets
    total_step: int
    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    modules_to_save: tuple[str, ...] = ()
    peft_type: ClassVar[str] = "ADALORA"

    def __post_init__(self) -> None:
        self._normalise_targets()
        _check_positive_int("AdaLoraConfig.init_r", self.init_r)
        _check_positive_int("AdaLoraConfig.target_r", self.target_r)
        _check_positive_int("AdaLoraConfig.total_step", self.total_step)
        _check_positive_int("AdaLoraConfig.deltaT", self.deltaT)
        _check_probability("AdaLoraConfig.lora_dropout", self.lora_dropout)
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoraConfig.target_r={self.target_r} must be <= init_r={self.init_r}")
        if self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"AdaLoraConfig needs 0 <= tinit < total_step - tfinal, got tinit={self.tinit}, "
                f"tfinal={self.tfinal}, total_step={self.total_step}"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")


PeftConfig = LoraConfig | IA3Config | BottleneckConfig | PrefixConfig | AdaLoraConfig
