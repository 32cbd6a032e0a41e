"""lmsmith artifacts: an HF model folder plus `lmsmith.json`, the manifest of where the model came
from, what was done to it and what was measured.

Float models stay loadable by `transformers` (config.json + model.safetensors in HF names).
Quantized models store packed weights under our module names and are rebuilt from the manifest's
quantization config, so they load without re-quantizing.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.config import ModelConfig
from ..model.transformer import Transformer
from .checkpoint import load_hf_folder, read_tensors, replace_dir, save_hf_folder
from .weights import CheckpointError

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
    config = ModelConfig.from_dict(manifest["config"])
    if manifest.get("quantization"):
        model = _load_quantized(folder, config, manifest["quantization"], device)
    else:
        model = load_hf_folder(folder, task=config.task, labels=config.labels, dtype=dtype, device=device)
    model.manifest = manifest
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").exists() else None
    return model.eval(), tokenizer


def _load_quantized(folder: Path, config: ModelConfig, qdict: dict, device) -> Transformer:
    from ..compress.quantize import QuantizationConfig, apply_quantization_config

    model = Transformer(config)
    apply_quantization_config(model, QuantizationConfig.from_dict(qdict))
    state = read_tensors([folder / "model.safetensors"])
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("lm_head.weight", "decoder.weight"))
               or not config.tie_word_embeddings]
    if missing:
        raise CheckpointError(f"{folder / 'model.safetensors'}: missing tensors {missing[:5]}")
    model.tie_weights()
    return model.to(device)
