"""lmsmith artifacts: an HF model folder plus `lmsmith.json`, the manifest of where the model came
from, what was done to it and what was measured.

Float models are written in HF names (config.json + model.safetensors), so `transformers` loads them
as long as config.json can describe them, but lmsmith rebuilds them from the manifest's own
ModelConfig: a structurally pruned BERT / GPT-2 / GPT-NeoX has a head_dim that config.json cannot
carry. Quantized models store packed weights under our module names and are rebuilt from the
manifest's quantization config, so they load without re-quantizing.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.config import ModelConfig
from ..model.families import FAMILIES
from ..model.transformer import Transformer
from .checkpoint import build_model, load_hf_folder, read_tensors, replace_dir, save_hf_folder, weight_files
from .weights import CheckpointError, detect_base_prefix, to_theirs

MANIFEST = "lmsmith.json"
FORMAT = "lmsmith-artifact/1"


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).exists()


def read_manifest(path: str | os.PathLike) -> dict:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def new_manifest(config: ModelConfig, source: str) -> dict:
    return {"format": FORMAT, "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": config.to_dict(), "quantization": None, "history": []}


def save_artifact(model: Transformer, path: str | os.PathLike, tokenizer=None, manifest: dict | None = None) -> Path:
    manifest = dict(manifest or new_manifest(model.config, "unknown"))
    manifest["config"] = model.config.to_dict()
    qconfig = getattr(model, "quantization_config", None)
    manifest["quantization"] = qconfig.to_dict() if qconfig is not None else None
    text = json.dumps(manifest, indent=2, default=str)
    if qconfig is None:
        return save_hf_folder(model, path, tokenizer, extra_files={MANIFEST: text})
    return _save_quantized(model, Path(path), tokenizer, text)


def _save_quantized(model: Transformer, target: Path, tokenizer, manifest_text: str) -> Path:
    import shutil
    import tempfile

    from ..compress.quantize import quantized_state_dict

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors, _ = quantized_state_dict(model)
        tied = {"lm_head.weight", "mlm_head.decoder.weight"} if model.config.tie_word_embeddings else set()
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "lmsmith-quantized"})
        (tmp / MANIFEST).write_text(manifest_text)
        if tokenizer is not None:
            tokenizer.save(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_artifact(path: str | os.PathLike, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from an artifact folder; the model carries its manifest as `.manifest`."""
    from ..tokenizer import Tokenizer

    folder = Path(path)
    manifest = read_manifest(folder)
    if not manifest.get("config"):  # hand-written manifests: config.json is all there is
        model = load_hf_folder(folder, dtype=dtype, device=device)
    elif manifest.get("quantization"):
        model = _load_quantized(folder, _manifest_config(folder, manifest), manifest["quantization"], device)
    else:
        model = _load_float(folder, _manifest_config(folder, manifest), dtype, device)
    model.manifest = manifest
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").exists() else None
    return model.eval(), tokenizer


def _manifest_config(folder: Path, manifest: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / MANIFEST}: invalid model config ({e})") from e


def _load_float(folder: Path, config: ModelConfig, dtype, device) -> Transformer:
    """Rebuild from the manifest's ModelConfig, not config.json (see the module docstring)."""
    tensors = read_tensors(weight_files(folder))
    check_tensors_match_config(tensors, config, str(folder))
    return build_model(config, tensors, str(folder), dtype, device)


def check_tensors_match_config(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Raise CheckpointError naming the first checkpoint tensor (HF name) whose shape differs from
    what `config` expects. Checked up front because fused layouts (GPT-NeoX's per-head qkv) would
    otherwise fail inside a reshape with a message that names no tensor. Missing tensors are left to
    `build_model`, which knows the historical aliases."""
    try:
        expected = expected_checkpoint_shapes(config, set(tensors))
    except RuntimeError as e:  # e.g. grouped-query sizes in a family whose fused qkv assumes one KV head per head
        raise CheckpointError(f"{source}: the manifest config ({_size_summary(config)}) cannot be laid out "
                              f"in {config.family} checkpoint tensors: {e}") from e
    for name, shape in expected.items():
        stored = tensors.get(name)
        if stored is not None and tuple(stored.shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(stored.shape)}, but the manifest config "
                f"({_size_summary(config)}) expects {shape}"
            )


def expected_checkpoint_shapes(config: ModelConfig, names: set[str]) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape for a model built from `config`, with the backbone prefix ("bert.",
    "model.") the checkpoint `names` use (task checkpoints nest the backbone, bare ones do not)."""
    with torch.device("meta"):
        expected = to_theirs(Transformer(config).state_dict(), config)
    default, used = FAMILIES[config.family].base_prefix, detect_base_prefix(config, names)
    return {used + n.removeprefix(default) if default and n.startswith(default) else n: tuple(t.shape)
            for n, t in expected.items()}


def _size_summary(config: ModelConfig) -> str:
    return (f"num_layers={config.num_layers}, num_heads={config.num_heads}, num_kv_heads={config.kv_heads}, "
            f"head_dim={config.dim_per_head}, intermediate_size={config.intermediate_size}")


def _load_quantized(folder: Path, config: ModelConfig, qdict: dict, device) -> Transformer:
    from ..compress.quantize import QuantizationConfig, apply_quantization_config

    model = Transformer(config)
    qconfig = QuantizationConfig.from_dict(qdict)
    apply_quantization_config(model, qconfig)
    state = read_tensors([folder / "model.safetensors"])
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("lm_head.weight", "decoder.weight"))
               or not config.tie_word_embeddings]
    if missing:
        raise CheckpointError(f"{folder / 'model.safetensors'}: missing tensors {missing[:5]}")
    if not qconfig.tied_embeddings:  # else the embedding already reads the quantized head's rows
        model.tie_weights()
    return model.to(device)
