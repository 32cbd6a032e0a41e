"""The public entry points: load a model by name or path, generate, chat."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


def resolve_device(requested: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): the first GPU when CUDA is available, else the CPU; otherwise the named device,
    refused with a clear error when it is a GPU this machine does not have."""
    if requested is None or requested == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ValueError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {requested!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {requested!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load(name_or_path: str | os.PathLike | None = None, task: str | None = None, dtype=None,
         device: str | torch.device | None = "cpu", labels: tuple[str, ...] | None = None,
         allow_pickle: bool = False):
    """Load (model, tokenizer) from an embedded name, a GGUF file, an HF folder or an lmsmith artifact."""
    path = resolve(name_or_path)
    dtype = parse_dtype(dtype)
    device = resolve_device(device)
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
    from .io.artifact import is_artifact
    from .io.checkpoint import load_hf_folder

    if is_artifact(path):
        return _load_artifact_as(path, task, labels, dtype, device)
    model = load_hf_folder(path, task=task, labels=labels, dtype=dtype, device=device, allow_pickle=allow_pickle)
    return model, _folder_tokenizer(path)


def _folder_tokenizer(path: Path):
    from .tokenizer import Tokenizer

    return Tokenizer.from_folder(path) if (path / "tokenizer.json").exists() else None


def _load_artifact_as(path: Path, task: str | None, labels: tuple[str, ...] | None, dtype, device):
    """An artifact as saved, as another task whose weights it holds (a classifier as `base`), or with
    its labels in another order (the classifier's rows follow). Unknown label names are an error:
    the artifact has no weights for them (fine-tuning builds a new head)."""
    from .io.artifact import check_tensors_match_config, load_artifact, read_manifest
    from .io.checkpoint import build_model, load_hf_folder, read_tensors, weight_files
    from .io.weights import CheckpointError

    manifest = read_manifest(path)
    if not manifest.get("config"):  # a hand-written manifest: config.json describes the model
        model = load_hf_folder(path, task=task, labels=labels, dtype=dtype, device=device)
        model.manifest = manifest
        return model, _folder_tokenizer(path)
    saved = _manifest_config(path, manifest)
    task = task or saved.task
    labels = _artifact_labels(path, saved, task, labels)
    if task == saved.task and labels == saved.labels:
        return load_artifact(path, dtype=dtype, device=device)
    if manifest.get("quantization"):
        raise CheckpointError(f"{path}: a quantized {saved.task} artifact with labels {saved.labels} loads "
                              f"only as saved; asked for task={task!r}, labels={labels}")
    # the manifest's config, not config.json: it also describes models config.json cannot (pruned heads)
    config, tensors = saved.replace(task=task, labels=labels), read_tensors(weight_files(path))
    try:
        check_tensors_match_config(tensors, config, str(path))
        model = build_model(config, tensors, str(path), dtype, device)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: this artifact holds a {saved.task} model and cannot be loaded as "
                              f"{task} ({e})") from e
    if saved.labels and labels and labels != saved.labels:
        _reorder_classes(model, [saved.labels.index(name) for name in labels])
    model.manifest = manifest
    return model, _folder_tokenizer(path)


def _manifest_config(path: Path, manifest: dict):
    from .io.weights import CheckpointError
    from .model.config import ModelConfig

    try:
        return ModelConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config in the manifest ({e})") from e


def _artifact_labels(path: Path, saved, task: str, labels: tuple[str, ...] | None) -> tuple[str, ...]:
    """The labels to load with: the saved ones unless given; given ones must be a reordering of them."""
    from .io.weights import CheckpointError

    classifier = task in ("sequence-classification", "token-classification")
    if labels is None:
        return saved.labels if classifier else ()
    labels = tuple(labels)
    if not classifier:
        raise ValueError(f"labels={labels} given for task={task!r}; labels apply only to classification tasks")
    if saved.labels and sorted(labels) != sorted(saved.labels):
        raise CheckpointError(f"{path}: the classifier was trained on labels {saved.labels}; labels={labels} "
                              "must be the same names (in any order). Fine-tune it to train a head for others")
    return labels


def _reorder_classes(model: Transformer, order: list[int]) -> None:
    """Row i of the output layer becomes the saved row order[i] (bias likewise)."""
    out = model.classifier.out
    with torch.no_grad():
        out.weight.copy_(out.weight[order].clone())
        if out.bias is not None:
            out.bias.copy_(out.bias[order].clone())


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
        **({"decoder_layers": c.decoder_layers} if c.encoder_decoder else {}),  # layers: the encoder's
    }
