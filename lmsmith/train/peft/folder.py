"""Adapter folders in Hugging Face peft's layout: `adapter_config.json` + `adapter_model.safetensors`.

Formats written and read:

* peft's own: `LORA` (with DoRA, rsLoRA, per-module rank/alpha patterns), `IA3`, `ADALORA`.
  Tensor keys are `base_model.model.<hf module name>.<tensor>` with peft's tensor names
  (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`, `ia3_l`, `lora_A`/`lora_B`/`lora_E`);
  peft drops the adapter name ("default") from saved keys and so do we.
* ours, same file names, peft_type marking them: `LMSMITH_BOTTLENECK` (keys
  `base_model.model.<hf module>.adapter.{down,up}.{weight,bias}`) and `LMSMITH_PREFIX_TUNING`
  (keys `prefix_encoder.<tensor>`).

`name_map` turns our module names into the checkpoint's (per model family; identity by default) and
`name_map_inverse` does the reverse. `modules_to_save` tensors are stored in full, as peft stores them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adalora import SVDLinear
from .base import AdaptedLinear, AdapterModule
from .bottleneck import ADAPTER_CHILD, BottleneckAdapter
from .config import AdaLoraConfig, BottleneckConfig, IA3Config, LoraConfig, PrefixConfig
from .core import SAVE_WHOLE, apply_peft, set_trainable
from .ia3 import IA3Linear
from .lora import LoRALinear
from .prefix import PREFIX_ATTRIBUTE, PrefixEncoder
from .targets import name_matches, replace_module, within

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
NameMap = Callable[[str], str]
# tensor names per adapter type, relative to the adapted module (longest first for suffix matching)
ADAPTER_TENSORS = {
    "LORA": ("lora_magnitude_vector.weight", "lora_magnitude_vector", "lora_A.weight", "lora_B.weight"),
    "IA3": ("ia3_l",),
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "LMSMITH_BOTTLENECK": tuple(
        f"{ADAPTER_CHILD}.{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")
    ),
    "LMSMITH_PREFIX_TUNING": (),
}
_KIND_OF = {
    LoRALinear: "LORA",
    IA3Linear: "IA3",
    SVDLinear: "ADALORA",
    BottleneckAdapter: "LMSMITH_BOTTLENECK",
    PrefixEncoder: "LMSMITH_PREFIX_TUNING",
}


def _identity(name: str) -> str:
    return name


# --- save ---------------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    name_map: NameMap = _identity,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the model's adapters (one method per folder) as `adapter_config.json` + safetensors."""
    kind, modules = _adapter_kind(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": kind,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": _modules_to_save_names(model, name_map) or None,
    }
    config.update(_CONFIG_WRITERS[kind](modules, name_map))
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in _tensors_to_save(model, name_map).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _adapter_kind(model: nn.Module) -> tuple[str, dict[str, AdapterModule]]:
    modules = {n: m for n, m in model.named_modules() if isinstance(m, AdapterModule)}
    kinds = {_KIND_OF[type(m)] for m in modules.values()}
    if len(kinds) != 1:
        found = sorted(kinds) or "none"
        raise ValueError(f"save_adapter writes one adapter type per folder; the model has: {found}")
    return kinds.pop(), modules


def _owner(name: str, module: AdapterModule) -> str:
    """The model module an adapter belongs to (a bottleneck adapter is a child of its target)."""
    return name.rpartition(".")[0] if isinstance(module, BottleneckAdapter) else name


def _tensors_to_save(model: nn.Module, name_map: NameMap) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, PrefixEncoder):
            out.update({f"{PREFIX_ATTRIBUTE}.{rel}": p for rel, p in module.adapter_parameters()})
        elif isinstance(module, AdapterModule):
            rel_prefix = f"{ADAPTER_CHILD}." if isinstance(module, BottleneckAdapter) else ""
            base = KEY_PREFIX + name_map(_owner(name, module))
            out.update({f"{base}.{rel_prefix}{rel}": p for rel, p in module.adapter_parameters()})
        elif getattr(module, SAVE_WHOLE, False):
            for param_name, p in module.named_parameters():
                module_name, _, rel = f"{name}.{param_name}".rpartition(".")
                out[f"{KEY_PREFIX}{name_map(module_name)}.{rel}"] = p
    return out


def _modules_to_save_names(model: nn.Module, name_map: NameMap) -> list[str]:
    return sorted(name_map(n) for n, m in model.named_modules() if getattr(m, SAVE_WHOLE, False))


def _most_common(values: Iterable):
    return Counter(values).most_common(1)[0][0]


def _uniform(modules: Iterable[AdaptedLinear], attribute: str):
    values = {getattr(m.config, attribute) for m in modules}
    if len(values) != 1:
        raise ValueError(
            f"cannot save adapters with different {attribute} values in one folder: {sorted(values)}"
        )
    return values.pop()


def _lora_config(modules: dict[str, LoRALinear], name_map: NameMap) -> dict:
    hf = {name_map(n): m for n, m in modules.items()}
    r, alpha = _most_common(m.r for m in hf.values()), _most_common(m.lora_alpha for m in hf.values())
    return {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _uniform(hf.values(), "lora_dropout"),
        "use_rslora": _uniform(hf.values(), "use_rslora"),
        "use_dora": _uniform(hf.values(), "use_dora"),
        "target_modules": sorted(hf),
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {n: m.r for n, m in hf.items() if m.r != r},
        "alpha_pattern": {n: m.lora_alpha for n, m in hf.items() if m.lora_alpha != alpha},
    }


def _ia3_config(modules: dict[str, IA3Linear], name_map: NameMap) -> dict:
    hf = {name_map(n): m for n, m in modules.items()}
    return {
        "target_modules": sorted(hf),
        "feedforward_modules": sorted(n for n, m in hf.items() if m.is_feedforward),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
    }


def _adalora_config(modules: dict[str, SVDLinear], name_map: NameMap) -> dict:
    hf = {name_map(n): m for n, m in modules.items()}
    config = next(iter(hf.values())).config
    init_r = int(_most_common(m.ranknum for m in hf.values()))
    schedule = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")
    return {
        "init_r": init_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        **{k: getattr(config, k) for k in schedule},
        "target_modules": sorted(hf),
        # modules saved at a reduced rank: peft's rank_pattern (kept singular values) sizes them on load
        "rank_pattern": {
            f"{n}.lora_E": [i < m.r for i in range(init_r)] for n, m in hf.items() if m.r != init_r
        }
        or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "use_rslora": False,
    }


def _bottleneck_config(modules: dict[str, BottleneckAdapter], name_map: NameMap) -> dict:
    config = next(iter(modules.values())).config
    settings = {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if f.name not in ("target_modules", "modules_to_save")
    }
    return {**settings, "target_modules": sorted(name_map(_owner(n, m)) for n, m in modules.items())}


def _prefix_config(modules: dict[str, PrefixEncoder], name_map: NameMap) -> dict:
    encoder = next(iter(modules.values()))
    return {
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "num_layers": encoder.num_layers,
        "num_kv_heads": encoder.num_kv_heads,
        "head_dim": encoder.head_dim,
        "encoder_hidden_size": encoder.config.encoder_hidden_size,
    }


_CONFIG_WRITERS = {
    "LORA": _lora_config,
    "IA3": _ia3_config,
    "ADALORA": _adalora_config,
    "LMSMITH_BOTTLENECK": _bottleneck_config,
    "LMSMITH_PREFIX_TUNING": _prefix_config,
}


# --- load ---------------------------------------------------------------------------------------------


def load_adapter(model: nn.Module, folder: str | Path, name_map_inverse: NameMap = _identity) -> nn.Module:
    """Add the adapter saved in `folder` (by peft or by `save_adapter`) to `model`, in place.

    An adapter of the same type already on a module is replaced. The loaded adapter tensors (and
    modules_to_save) are left trainable. Raises FileNotFoundError for a
    missing file and ValueError for an unsupported peft_type, an unknown module or a tensor whose shape
    does not fit.
    """
    config, tensors = _read_folder(Path(folder))
    kind = config.get("peft_type")
    if kind not in _LOADERS:
        raise ValueError(f"unsupported peft_type {kind!r} in {folder}; supported: {sorted(_LOADERS)}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"adapters that train biases are not supported (bias={config.get('bias')!r})")
    grouped, whole = _group_tensors(tensors, ADAPTER_TENSORS[kind], config)
    _LOADERS[kind](model, config, grouped, name_map_inverse)
    _load_modules_to_save(model, whole, name_map_inverse)
    set_trainable(model)
    return model


def _read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    return json.loads((folder / CONFIG_FILE).read_text()), load_file(str(folder / WEIGHTS_FILE))


def _group_tensors(tensors: dict[str, torch.Tensor], adapter_names: tuple[str, ...], config: dict):
    """→ ({hf module: {tensor name: tensor}}, {hf parameter key: tensor} of modules_to_save)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    to_save = tuple(config.get("modules_to_save") or ())
    for key, tensor in tensors.items():
        if key.startswith(PREFIX_ATTRIBUTE + "."):
            grouped.setdefault(PREFIX_ATTRIBUTE, {})[key[len(PREFIX_ATTRIBUTE) + 1 :]] = tensor
            continue
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"unexpected tensor {key!r}: peft keys start with {KEY_PREFIX!r}")
        name = key[len(KEY_PREFIX) :]
        rel = next((r for r in adapter_names if name.endswith("." + r)), None)
        if rel is not None:
            grouped.setdefault(name[: -len(rel) - 1], {})[rel] = tensor
        elif within(name.rpartition(".")[0], to_save):
            whole[name] = tensor
        else:
            raise ValueError(f"unsupported tensor {key!r} for peft_type {config.get('peft_type')!r}")
    return grouped, whole


def _our_module(model: nn.Module, hf_name: str, name_map_inverse: NameMap) -> str:
    try:
        ours = name_map_inverse(hf_name)
        model.get_submodule(ours)
    except (AttributeError, KeyError):
        raise ValueError(
            f"adapter module {hf_name!r} has no counterpart in the model (name_map_inverse)"
        ) from None
    return ours


def _wrapped(model: nn.Module, name: str, cls: type[AdaptedLinear], **kwargs) -> AdaptedLinear:
    """A new `cls(linear, **kwargs)` at `name`; an adapter of the same type already there is replaced
    (its settings, e.g. alpha, may differ from the folder's)."""
    module = model.get_submodule(name)
    if isinstance(module, cls):
        module.unmerge()
        module = module.to_linear()
    if not isinstance(module, nn.Linear) or isinstance(module, AdapterModule):
        raise ValueError(f"cannot load a {cls.__name__} adapter into {name!r} ({type(module).__name__})")
    wrapper = cls(module, **kwargs)
    replace_module(model, name, wrapper)
    return wrapper


def _copy_tensor(param: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(
            f"adapter tensor {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(tensor.to(device=param.device, dtype=param.dtype))


def _copy_all(targets: dict[str, torch.Tensor], parts: dict[str, torch.Tensor], module_name: str) -> None:
    missing, unexpected = sorted(set(targets) - set(parts)), sorted(set(parts) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors for module {module_name!r} do not fit: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for rel, param in targets.items():
        _copy_tensor(param, parts[rel], f"{module_name}.{rel}")


def _pattern_value(patterns: dict, hf_name: str, default):
    """peft's rank/alpha_pattern lookup: a key matches a module name ending in it (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


def _load_lora(model, config: dict, grouped, name_map_inverse) -> None:
    for hf_name, parts in grouped.items():
        if "lora_A.weight" not in parts:
            raise ValueError(f"adapter folder lacks lora_A.weight for module {hf_name!r}")
        ours = _our_module(model, hf_name, name_map_inverse)
        r = parts["lora_A.weight"].shape[0]
        cfg = LoraConfig(
            target_modules=(ours,),
            r=r,
            lora_dropout=config.get("lora_dropout", 0.0),
            lora_alpha=_pattern_value(config.get("alpha_pattern"), hf_name, config.get("lora_alpha", 8)),
            use_rslora=bool(config.get("use_rslora")),
            use_dora=bool(config.get("use_dora")),
        )
        module = _wrapped(model, ours, LoRALinear, config=cfg)
        if "lora_magnitude_vector.weight" in parts:  # older peft versions saved it with ".weight"
            parts["lora_magnitude_vector"] = parts.pop("lora_magnitude_vector.weight")
        targets = {"lora_A.weight": module.lora_A.weight, "lora_B.weight": module.lora_B.weight}
        if module.use_dora:
            targets["lora_magnitude_vector"] = module.lora_magnitude_vector
        _copy_all(targets, parts, hf_name)


def _load_ia3(model, config: dict, grouped, name_map_inverse) -> None:
    feedforward = config.get("feedforward_modules") or ()
    feedforward = feedforward if isinstance(feedforward, str) else tuple(feedforward)
    names = _our_names(model, grouped, name_map_inverse)
    shared = IA3Config(target_modules=tuple(names.values()))
    for hf_name, parts in grouped.items():
        is_ff = bool(feedforward) and name_matches(hf_name, feedforward)
        module = _wrapped(model, names[hf_name], IA3Linear, config=shared, is_feedforward=is_ff)
        _copy_all({"ia3_l": module.ia3_l}, parts, hf_name)


def _load_adalora(model, config: dict, grouped, name_map_inverse) -> None:
    keys = {f.name for f in fields(AdaLoraConfig)} - {"target_modules", "modules_to_save"}
    names = _our_names(model, grouped, name_map_inverse)
    # one shared config, so that peft_callbacks can resume rank allocation on the loaded adapter
    shared = AdaLoraConfig(
        target_modules=tuple(names.values()), **{k: config[k] for k in keys if config.get(k) is not None}
    )
    for hf_name, parts in grouped.items():
        r = parts["lora_A"].shape[0] if "lora_A" in parts else shared.init_r  # peft saves allocated ranks
        module = _wrapped(model, names[hf_name], SVDLinear, config=shared, r=r, ranknum=shared.init_r)
        targets = {"lora_A": module.lora_A, "lora_B": module.lora_B, "lora_E": module.lora_E}
        _copy_all(targets, parts, hf_name)


def _our_names(model: nn.Module, grouped: dict, name_map_inverse: NameMap) -> dict[str, str]:
    return {hf_name: _our_module(model, hf_name, name_map_inverse) for hf_name in grouped}


def _load_bottleneck(model, config: dict, grouped, name_map_inverse) -> None:
    keys = {f.name for f in fields(BottleneckConfig)} - {"target_modules", "modules_to_save"}
    targets = tuple(_our_module(model, n, name_map_inverse) for n in config["target_modules"])
    apply_peft(model, BottleneckConfig(target_modules=targets, **{k: config[k] for k in keys if k in config}))
    for hf_name, parts in grouped.items():
        adapter = model.get_submodule(f"{_our_module(model, hf_name, name_map_inverse)}.{ADAPTER_CHILD}")
        params = {f"{ADAPTER_CHILD}.{rel}": p for rel, p in adapter.adapter_parameters()}
        _copy_all(params, parts, hf_name)


def _load_prefix(model, config: dict, grouped, name_map_inverse) -> None:
    keys = {f.name for f in fields(PrefixConfig)} - {"modules_to_save"}
    apply_peft(model, PrefixConfig(**{k: config[k] for k in keys if k in config}))
    encoder = getattr(model, PREFIX_ATTRIBUTE)
    _copy_all(dict(encoder.adapter_parameters()), grouped.get(PREFIX_ATTRIBUTE, {}), PREFIX_ATTRIBUTE)


_LOADERS = {
    "LORA": _load_lora,
    "IA3": _load_ia3,
    "ADALORA": _load_adalora,
    "LMSMITH_BOTTLENECK": _load_bottleneck,
    "LMSMITH_PREFIX_TUNING": _load_prefix,
}


def _load_modules_to_save(
    model: nn.Module, whole: dict[str, torch.Tensor], name_map_inverse: NameMap
) -> None:
    for hf_key, tensor in whole.items():
        hf_module, _, rel = hf_key.rpartition(".")
        module = model.get_submodule(_our_module(model, hf_module, name_map_inverse))
        param = getattr(module, rel, None)
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"modules_to_save tensor {hf_key!r} has no counterpart in the model")
        _copy_tensor(param, tensor, hf_key)
        setattr(module, SAVE_WHOLE, True)
