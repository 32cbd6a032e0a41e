"""Recipes: YAML files (plus dotted-key overrides) → one frozen, validated `RunConfig`.

    config = load_recipe("minilm-sentiment-lora", ["train.lr=3e-4", "peft.r=16"])
    print(to_yaml(config))          # the resolved config, as the run folder keeps it

A recipe names the objective and has sections model / tokenizer / data / train / peft / distill /
output / distributed. A key that is not a field raises ValueError naming the key and listing the
valid ones. Shipped recipes live in `lmsmith/recipes/` and can be named without a path.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ..compress.quantize import LOAD_TIME_METHODS
from ..robustness.augmentation import AugmentSettings
from .loop import TrainSettings
from .objectives import OBJECTIVES
from .peft import AdaLoraConfig, BottleneckConfig, IA3Config, LoraConfig, PeftConfig, PrefixConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DATA_FORMATS = ("auto", "text", "csv", "jsonl", "conll")
TOKENIZER_KINDS = ("auto", "bpe", "wordpiece", "t5")
PEFT_METHODS: dict[str, type] = {"lora": LoraConfig, "dora": LoraConfig, "ia3": IA3Config,
                                 "adapter": BottleneckConfig, "prefix": PrefixConfig, "adalora": AdaLoraConfig}


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


QLORA_METHODS = LOAD_TIME_METHODS  # QLoRA quantizes its frozen base as it loads: no calibration data


@dataclass(frozen=True)
class ModelSection:
    source: str | None = None  # embedded name, HF folder, GGUF file or lmsmith artifact (pretrained)
    preset: str | None = None  # a lmsmith.model.config.PRESETS name: a new model from scratch
    config: Mapping[str, Any] = field(default_factory=_empty)  # ModelConfig field overrides (sizes for presets, dropout, …)
    dtype: str = "float32"
    # QLoRA: quantize the pretrained linear layers as they load (int8, int4 or w8a8; not lm_head). The
    # base then stays frozen under the adapters, so this needs a peft method.
    quantize: str | None = None
    quantize_group_size: int = 64  # int4 only

    def __post_init__(self) -> None:
        if (self.source is None) == (self.preset is None):
            raise ValueError("recipe needs exactly one of model.source (pretrained) and model.preset (scratch), "
                             f"got source={self.source!r}, preset={self.preset!r}")
        if self.quantize is not None and self.quantize not in QLORA_METHODS:
            raise ValueError(f"model.quantize={self.quantize!r} is not one of {QLORA_METHODS}")


@dataclass(frozen=True)
class TokenizerSection:
    source: str | None = None  # default: the model's own tokenizer
    train_vocab_size: int | None = None  # train a new tokenizer on the training texts (scratch runs)
    kind: str = "auto"  # for training: bpe (byte-level), wordpiece or t5; auto = wordpiece for masked-lm, t5 for seq2seq-lm

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer.kind={self.kind!r} is not one of {TOKENIZER_KINDS}")


@dataclass(frozen=True)
class DataSection:
    source: str = "tweets-sentiment"  # a registered data set (lmsmith.data.dataset_names()), a file or a folder
    format: str = "auto"  # files: auto (folder or .txt = text, .csv, .jsonl, .conll) or one of those
    columns: Mapping[str, str] = field(default_factory=_empty)  # record field → CSV/JSON column, e.g. {text: tweet, label: sentiment}
    text_unit: str = "paragraph"  # text files: one document per paragraph or per file
    pattern: str = "*.txt"
    sizes: Mapping[str, int] | None = None  # {train: 8000, validation: 500, test: 2000}; wins over ratios
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    stratify: bool = True
    max_length: int = 128  # tokens per example (seq2seq-lm: per source text)
    max_target_length: int | None = None  # seq2seq-lm: target tokens, eos included (None: max_length)
    labels: tuple[str, ...] = ()  # class names; default: the data set's
    mlm_probability: float = 0.15
    # perturbed copies of the TRAIN split, e.g. {perturbations: [typos], copies: 1, probability: 0.5}
    augment: AugmentSettings | None = None

    def __post_init__(self) -> None:
        if self.format not in DATA_FORMATS:
            raise ValueError(f"data.format={self.format!r} is not one of {DATA_FORMATS}")
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.max_target_length is not None and self.max_target_length < 2:
            raise ValueError(f"data.max_target_length must be >= 2 (a token and eos) or null, got {self.max_target_length}")


@dataclass(frozen=True)
class PeftSection:
    method: str | None = None  # lora, dora, ia3, adapter, prefix, adalora; None = full fine-tuning
    params: Mapping[str, Any] = field(default_factory=_empty)  # the method's settings (written flat in the recipe)
    save_merged: bool = False  # also write a merged, adapter-free model (linear adapters only)


@dataclass(frozen=True)
class DistillSection:
    teacher: str | None = None  # model to distil from; None = no distillation
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0


@dataclass(frozen=True)
class OutputSection:
    dir: str = "runs/run"


@dataclass(frozen=True)
class DistributedSection:
    strategy: str = "ddp"  # ddp or fsdp, when launched with torchrun
    backend: str = "auto"  # nccl on CUDA, gloo on CPU


@dataclass(frozen=True)
class RunConfig:
    objective: str
    name: str = ""
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="tiny-gpt"))
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSettings = field(default_factory=TrainSettings)
    peft: PeftSection = field(default_factory=PeftSection)
    distill: DistillSection = field(default_factory=DistillSection)
    output: OutputSection = field(default_factory=OutputSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {sorted(OBJECTIVES)}")
        if self.model.quantize is not None and self.peft.method is None:
            raise ValueError(f"model.quantize={self.model.quantize!r} freezes the quantized base: it needs a "
                             "peft method (e.g. peft.method=lora, QLoRA-style)")


# --- YAML ---------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; recipes mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe file, or the name of a shipped one ("minilm-sentiment-lora")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{Path(str(name_or_path)).stem}.yaml"
    if shipped.is_file() and path.suffix in ("", ".yaml", ".yml") and len(path.parts) == 1:
        return shipped
    raise FileNotFoundError(f"no recipe file {str(name_or_path)!r}; shipped recipes: {shipped_recipes()}")


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(name_or_path: str | os.PathLike) -> dict:
    path = recipe_path(name_or_path)
    tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping, got {type(tree).__name__}")
    return tree


# --- overrides ----------------------------------------------------------------------------------------

def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """["train.lr=3e-4", "peft.target_modules=[q_proj,v_proj]"] → {"train.lr": 0.0003, ...}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        out[key.strip()] = parse_value(value)
    return out


def apply_overrides(tree: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """A copy of `tree` with each dotted key set (keys may also use "__": train__lr)."""
    result = _deep_copy(tree)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.replace("__", ".").split(".")
        node = result
        for index, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parents[: index + 1])
                raise ValueError(f"override {dotted!r}: {where!r} is a value ({child!r}), not a section")
            node = child
        node[leaf] = value
    return result


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


# --- tree → frozen config ----------------------------------------------------------------------------

def load_recipe(recipe: str | os.PathLike | Mapping | RunConfig,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> RunConfig:
    """A RunConfig from a recipe file/name, a dict or a RunConfig, with overrides applied."""
    if isinstance(recipe, RunConfig):
        tree = to_dict(recipe)
    elif isinstance(recipe, Mapping):
        tree = dict(recipe)
    else:
        tree = read_recipe(recipe)
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    return from_dict(apply_overrides(tree, overrides))


def from_dict(tree: Mapping[str, Any]) -> RunConfig:
    return _build(RunConfig, tree, "")


def _build(cls: type, tree: Any, where: str):
    if not isinstance(tree, Mapping):
        raise ValueError(f"recipe section {where or '<top>'!r} must be a mapping, got {tree!r}")
    if cls is PeftSection:
        return _build_peft(tree, where)
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in tree if k not in valid]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown recipe key {key!r}; valid keys{' in ' + repr(where) if where else ''}: {valid}")
    values = {}
    for name, value in tree.items():
        path = f"{where}.{name}" if where else name
        values[name] = _convert(hints[name], value, path)
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"recipe section {where or '<top>'!r}: {e}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    """Coerce a YAML value to a field's type: nested sections, tuples, floats written as ints, mappings."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path) if len(inner) == 1 else value
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        return _as_float(value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"recipe key {path!r} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(item, v, path) for v in value)
    if origin is Mapping or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ValueError(f"recipe key {path!r} must be a mapping, got {value!r}")
        return MappingProxyType(dict(value))
    return value


def _as_float(value: int | str, path: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"recipe key {path!r} must be a number, got {value!r}") from None


def _build_peft(tree: Mapping[str, Any], where: str) -> PeftSection:
    params = {k: v for k, v in tree.items() if k not in ("method", "save_merged")}
    method = tree.get("method")
    if method is None:
        if params:
            raise ValueError(f"recipe keys {sorted(params)} in {where!r} need peft.method "
                             f"(one of {sorted(PEFT_METHODS)})")
        return PeftSection(save_merged=bool(tree.get("save_merged", False)))
    if method not in PEFT_METHODS:
        raise ValueError(f"peft.method={method!r} is not one of {sorted(PEFT_METHODS)}")
    valid = sorted(f.name for f in fields(PEFT_METHODS[method]))
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ValueError(f"unknown recipe key '{where}.{unknown[0]}' for peft method {method!r}; valid keys: "
                         f"{['method', 'save_merged', *valid]}")
    return PeftSection(method, MappingProxyType(params), bool(tree.get("save_merged", False)))


def peft_config(section: PeftSection, total_steps: int) -> PeftConfig | None:
    """The PEFT method's frozen config; AdaLoRA's schedule length defaults to the run's steps."""
    if section.method is None:
        return None
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in section.params.items()}
    if section.method == "dora":
        params["use_dora"] = True
    if section.method == "adalora":
        params.setdefault("total_step", total_steps)
    try:
        return PEFT_METHODS[section.method](**params)
    except TypeError as e:
        raise ValueError(f"peft ({section.method}): {e}") from None


# --- frozen config → plain data ------------------------------------------------------------------------

def to_dict(config: Any) -> Any:
    """Plain dicts/lists (YAML-safe); the peft section is written flat, as recipes write it."""
    if isinstance(config, PeftSection):
        return {"method": config.method, **to_dict(dict(config.params)), "save_merged": config.save_merged}
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
