"""The public entry points: load a model by name or path, generate, chat."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from .embedded import ASSETS, DEFAULT_MODEL, asset_path, find_asset
from .generation import Completion, GenerationConfig, generate, stream
from .model.transformer import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """An embedded model name, a GGUF file or a model folder → a path on disk."""
    name = str(name_or_path or DEFAULT_MODEL)
    if find_asset(name) is not None:
        return asset_path(name)
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(a.name for a in ASSETS if a.kind != "csv")
        raise FileNotFoundError(f"no model named or at {name!r} (embedded models: {known})")
    return path


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load(name_or_path: str | os.PathLike | None = None, task: str | None = None, dtype=None,
         device: str | torch.device = "cpu", labels: tuple[str, ...] | None = None,
         allow_pickle: bool = False):
    """Load (model, tokenizer) from an embedded name, a GGUF file, an HF folder or an lmsmith artifact."""
    path = resolve(name_or_path)
    dtype = parse_dtype(dtype)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, task, dtype, device)
    elif path.is_dir():
        model, tokenizer = _load_folder(path, task, labels, dtype, device, allow_pickle)
    else:
        raise ValueError(f"{path}: expected a .gguf file or a model folder (config.json + safetensors)")
    return model.eval(), tokenizer


def _load_gguf(path: Path, task, dtype, device):
    from .io.checkpoint import build_model
    from .io.gguf import read_gguf
    from .model.families import config_from_hf

    ckpt = read_gguf(path)
    config = config_from_hf(ckpt.hf_config, task=task)
    return build_model(config, ckpt.tensors, str(path), dtype, device), ckpt.tokenizer


def _load_folder(path: Path, task, labels, dtype, device, allow_pickle):
    from .io.artifact import is_artifact, load_artifact
    from .io.checkpoint import load_hf_folder
    from .tokenizer import Tokenizer

    if is_artifact(path):
        return load_artifact(path, dtype=dtype, device=device)
    model = load_hf_folder(path, task=task, labels=labels, dtype=dtype, device=device, allow_pickle=allow_pickle)
    tokenizer = Tokenizer.from_folder(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


def chat(model: Transformer, tokenizer, messages: list[dict], config: GenerationConfig | None = None,
         **overrides) -> Completion:
    """One assistant reply to a list of {role, content} messages, rendered with the chat template."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return generate(model, tokenizer, [ids], config, **overrides)[0]


def chat_stream(model: Transformer, tokenizer, messages: list[dict], config: GenerationConfig | None = None,
                **overrides) -> Iterator[str]:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return stream(model, tokenizer, ids, config, **overrides)


def info(name_or_path: str | None = None) -> dict:
    """What a model is: family, task, parameter count, size on disk and in memory, context length."""
    path = resolve(name_or_path)
    model, tokenizer = load(path)
    c = model.config
    disk = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    memory = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values())
    return {
        "path": str(path), "family": c.family, "task": c.task, "parameters": model.num_parameters(),
        "layers": c.num_layers, "hidden_size": c.hidden_size, "heads": c.num_heads, "kv_heads": c.kv_heads,
        "vocab_size": c.vocab_size, "context_length": c.max_position_embeddings, "size_on_disk_bytes": disk,
        "size_in_memory_bytes": memory, "dtype": str(model.dtype).removeprefix("torch."),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "quantization": getattr(getattr(model, "quantization_config", None), "method", None),
    }
