"""Move tensors between checkpoint names/layouts and ours, driven by a family's module map."""
from __future__ import annotations

import torch

from ..model.config import ModelConfig
from ..model.families import FAMILIES

# Old BERT checkpoints call LayerNorm parameters gamma/beta; BERT's MLM bias sits beside the decoder.
# A T5 checkpoint without `lm_head.weight` ties the head to `shared` (as transformers does).
_ALIASES = {"weight": ("gamma",), "bias": ("beta",)}
_EXTRA_ALIASES = {"cls.predictions.decoder.bias": ("cls.predictions.bias",), "lm_head.weight": ("shared.weight",)}
_PARAMS = ("weight", "bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: names the file and the tensor."""


def module_map(config: ModelConfig, base_prefix: str | None = None) -> list[tuple[str, str, str]]:
    """(our module, checkpoint module, kind) triples; with `base_prefix` the backbone is read from there.

    Head maps hold absolute names, and some heads use modules stored inside the backbone (BERT's
    classifier pooler is `bert.pooler.dense`): those move with the backbone, so a bare BertModel
    checkpoint supplies its pooler as `pooler.dense`.
    """
    family = FAMILIES[config.family]
    pairs = family.module_map(config, base_prefix)
    if base_prefix is None or base_prefix == family.base_prefix:
        return pairs
    heads = set(family.head_maps.get(config.task, ()))
    return [(ours, _reroot(theirs, family.base_prefix, base_prefix) if (ours, theirs, kind) in heads else theirs,
             kind) for ours, theirs, kind in pairs]


def _reroot(name: str, old_prefix: str, new_prefix: str) -> str:
    return new_prefix + name.removeprefix(old_prefix) if name.startswith(old_prefix) else name


def detect_base_prefix(config: ModelConfig, names: set[str]) -> str:
    """Task checkpoints nest the backbone ("model.", "bert."); bare *Model checkpoints do not."""
    prefix = FAMILIES[config.family].base_prefix
    return prefix if any(n.startswith(prefix) for n in names) else ""


def _lookup(theirs: dict[str, torch.Tensor], name: str) -> str | None:
    """The name under which `name` is stored, trying the known historical aliases."""
    if name in theirs:
        return name
    module, _, param = name.rpartition(".")
    for alias in _ALIASES.get(param, ()) + _EXTRA_ALIASES.get(name, ()):
        candidate = f"{module}.{alias}" if "." not in alias else alias
        if candidate in theirs:
            return candidate
    return None


def _split_fused(kind: str, t: torch.Tensor, param: str, config: ModelConfig) -> list[torch.Tensor]:
    if kind == "qkv_concat_conv1d":  # GPT-2: (in, 3*out) Conv1D weight, q|k|v along the output dim
        t = t.t() if param == "weight" else t
        return list(t.chunk(3, dim=0))
    if kind == "qkv_per_head":  # GPT-NeoX: rows grouped per head as [q_h, k_h, v_h]
        H, D = config.num_heads, config.dim_per_head
        t = t.reshape(H, 3, D, *t.shape[1:])
        return [t[:, j].reshape(H * D, *t.shape[3:]) for j in range(3)]
    raise AssertionError(kind)


def _fuse(kind: str, parts: list[torch.Tensor], param: str, config: ModelConfig) -> torch.Tensor:
    if kind == "qkv_concat_conv1d":
        t = torch.cat(parts, dim=0)
        return t.t().contiguous() if param == "weight" else t
    H, D = config.num_heads, config.dim_per_head
    stacked = torch.stack([p.reshape(H, D, *p.shape[1:]) for p in parts], dim=1)  # (H, 3, D, …)
    return stacked.reshape(H * 3 * D, *parts[0].shape[1:]).contiguous()


def to_ours(
    theirs: dict[str, torch.Tensor], config: ModelConfig, wanted: set[str], source: str = "checkpoint",
    optional: frozenset[str] = frozenset(),
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Checkpoint tensors → our state dict for the keys in `wanted`; returns (state, unused names).

    A key of `wanted` missing from the checkpoint raises CheckpointError, unless it is in `optional`
    (a new head's parameters: those found are loaded, the others are left out of the state).
    """
    prefix = detect_base_prefix(config, set(theirs))
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for our_module, their_module, kind in module_map(config, prefix):
        for param in _PARAMS:
            our_names = [f"{m}.{param}" for m in our_module.split("|")]
            if not any(n in wanted for n in our_names):
                continue
            their_name = f"{their_module}.{param}"
            stored = _lookup(theirs, their_name)
            if stored is None and all(n in optional for n in our_names):
                continue
            if stored is None:
                raise CheckpointError(f"{source}: missing tensor {their_name!r} (needed for {our_names[0]!r})")
            # A tensor read twice (T5's head falling back to `shared`) is cloned: shared storage would
            # tie modules the config keeps apart, and safetensors refuses to save it.
            t = theirs[stored].clone() if stored in used else theirs[stored]
            used.add(stored)
            if kind in ("copy", "conv1d"):
                ours[our_names[0]] = t.t() if (kind == "conv1d" and param == "weight") else t
            else:
                ours.update(zip(our_names, _split_fused(kind, t, param, config)))
    return ours, set(theirs) - used


def to_theirs(ours: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → checkpoint names/layouts (tied copies left out, as transformers saves them)."""
    theirs: dict[str, torch.Tensor] = {}
    tied = _tied_names(config)
    for our_module, their_module, kind in module_map(config):
        for param in _PARAMS:
            our_names = [f"{m}.{param}" for m in our_module.split("|")]
            if our_names[0] not in ours or our_names[0] in tied:
                continue
            t = [ours[n] for n in our_names]
            if kind == "copy":
                out = t[0]
            elif kind == "conv1d":
                out = t[0].t() if param == "weight" else t[0]
            else:
                out = _fuse(kind, t, param, config)
            theirs[f"{their_module}.{param}"] = out.contiguous()
    return theirs


def _tied_names(config: ModelConfig) -> set[str]:
    if not config.tie_word_embeddings:
        return set()
    return {"lm_head.weight", "mlm_head.decoder.weight"}


def module_name_map(config: ModelConfig) -> dict[str, str]:
    """Our module name → checkpoint module name, for modules stored one-to-one (PEFT adapters use it)."""
    return {ours: theirs for ours, theirs, kind in module_map(config) if kind in ("copy", "conv1d")}
