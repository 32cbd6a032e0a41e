"""Read GGUF files (llama.cpp's format) as a transformers-style config + HF-named float32 tensors.

    ckpt = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.hf_config["num_hidden_layers"], ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]

Quantized tensors are dequantized with `gguf.quants.dequantize` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0,
k-quants, …). llama.cpp's converter permutes the q/k projection rows of `llama` models for its rotary
layout; we undo that so the weights match the HF checkpoint they came from.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField, ReaderTensor
from gguf.quants import dequantize

from ..tokenizer import Tokenizer, tokenizer_from_gguf_metadata


@dataclass(frozen=True)
class GGUFArch:
    """How one `general.architecture` maps onto a transformers model."""

    model_type: str
    hf_architecture: str
    rope_permuted: bool  # q/k rows stored in llama.cpp's interleaved-rope order
    config_defaults: Mapping[str, Any] = field(default_factory=dict)


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", rope_permuted=True,
                      config_defaults={"hidden_act": "silu", "mlp_bias": False}),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", rope_permuted=False,
                      config_defaults={"hidden_act": "silu", "use_sliding_window": False}),
}

# GGUF module name → HF module name, for the decoder-only families above.
GLOBAL_TENSOR_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors with no HF parameter: llama3 rope frequency factors (HF config describes them with
# rope_scaling parameters that the GGUF metadata does not keep; transformers drops them too).
IGNORED_TENSORS = frozenset({"rope_freqs.weight"})

# `{arch}.<key>` metadata → config.json key.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
REQUIRED_CONFIG = ("hidden_size", "num_hidden_layers", "num_attention_heads")
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)")


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # as stored in the file (GGUF naming)
    ggml_type: str  # e.g. "Q4_1", "F32"
    shape: tuple[int, ...]  # torch/row-major order (GGUF lists dims fastest-first; this is reversed)


@dataclass(frozen=True)
class GGUFCheckpoint:
    path: Path
    architecture: str  # general.architecture
    hf_config: dict[str, Any]  # a transformers config.json dict
    tensors: dict[str, torch.Tensor]  # HF names, float32
    metadata: dict[str, Any]  # every key/value of the file, parsed to Python values
    tokenizer: Tokenizer | None  # None when the file carries no vocabulary


# ==================================================================== public API
def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a GGUF checkpoint: config, dequantized HF-named tensors, metadata and tokenizer."""
    reader = open_gguf(path)
    metadata = _guarded(path, lambda: gguf_fields(reader))
    arch_name = metadata.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch_name!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[arch_name]
    tensor_names = {t.name for t in reader.tensors}
    config = hf_config_from_metadata(metadata, arch, tensor_names)
    _check_required(config, arch_name, path)
    tensors = hf_tensors(reader, arch, config)
    tokenizer = tokenizer_from_gguf_metadata(metadata) if "tokenizer.ggml.tokens" in metadata else None
    return GGUFCheckpoint(Path(path), arch_name, config, tensors, metadata, tokenizer)


def gguf_tensor_info(path: str | os.PathLike) -> list[GGUFTensorInfo]:
    """Names, GGML types and shapes of the tensors in a GGUF file, without reading their data."""
    return [
        GGUFTensorInfo(t.name, t.tensor_type.name, _torch_shape(t))
        for t in open_gguf(path).tensors
    ]


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A `gguf.GGUFReader`, with a corrupt or truncated file reported as a ValueError naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return _guarded(path, lambda: GGUFReader(path, "r"))


def gguf_fields(reader: GGUFReader, prefix: str = "") -> dict[str, Any]:
    """The file's metadata whose keys start with `prefix`, as Python values (str, int, float, bool, list)."""
    return {name: field_value(f) for name, f in reader.fields.items() if name.startswith(prefix)}


# ==================================================================== metadata → config
def field_value(f: ReaderField) -> Any:
    """One metadata value; arrays become lists."""
    kind = f.types[0]
    if kind == GGUFValueType.ARRAY:
        return [_scalar(f.parts[i], f.types[-1]) for i in f.data]
    return _scalar(f.parts[f.data[0]], kind)


def _scalar(part: np.ndarray, kind: GGUFValueType) -> Any:
    if kind == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if kind == GGUFValueType.BOOL:
        return bool(part[0])
    if kind in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        # Shortest repr of the stored precision: 1e-05, not 9.999999747378752e-06.
        return float(str(part[0]))
    return int(part[0])


def hf_config_from_metadata(
    metadata: Mapping[str, Any], arch: GGUFArch, tensor_names: set[str]
) -> dict[str, Any]:
    """A transformers config.json dict for a GGUF file with this metadata and these tensors."""
    prefix = f"{metadata['general.architecture']}."
    config: dict[str, Any] = {"model_type": arch.model_type, "architectures": [arch.hf_architecture]}
    config.update(arch.config_defaults)
    config.update({hf: metadata[prefix + key] for key, hf in CONFIG_KEYS.items() if prefix + key in metadata})
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    config["head_dim"] = _head_dim(metadata, prefix, config)
    config["vocab_size"] = _vocab_size(metadata, prefix)
    # llama.cpp writes output.weight only when the LM head is not the embedding matrix.
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    if (scaling := _rope_scaling(metadata, prefix)) is not None:
        config["rope_scaling"] = scaling
    for name in ("bos", "eos", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config["pad_token_id" if name == "padding" else f"{name}_token_id"] = token_id
    return config


def _check_required(config: Mapping[str, Any], arch_name: str, path: str | os.PathLike) -> None:
    missing = [f"{arch_name}.{key}" for key, hf in CONFIG_KEYS.items()
               if hf in REQUIRED_CONFIG and hf not in config]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {missing}, needed to rebuild the model config")


def _head_dim(metadata: Mapping[str, Any], prefix: str, config: dict[str, Any]) -> int | None:
    for key in ("attention.key_length", "rope.dimension_count"):
        if prefix + key in metadata:
            return metadata[prefix + key]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


def _vocab_size(metadata: Mapping[str, Any], prefix: str) -> int | None:
    if prefix + "vocab_size" in metadata:
        return metadata[prefix + "vocab_size"]
    tokens = metadata.get("tokenizer.ggml.tokens")
    return len(tokens) if tokens is not None else None


def _rope_scaling(metadata: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    kind = metadata.get(prefix + "rope.scaling.type")
    factor = metadata.get(prefix + "rope.scaling.factor")
    if kind in (None, "none") or factor is None:
        return None
    scaling = {"rope_type": kind, "factor": factor}
    if (original := metadata.get(prefix + "rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


# ==================================================================== tensors
def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None if not in the tables."""
    module, _, param = gguf_name.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if match := _LAYER_PATTERN.fullmatch(module):
        layer, part = match.groups()
        hf_part = LAYER_TENSOR_NAMES.get(part)
        return f"model.layers.{layer}.{hf_part}.{param}" if hf_part else None
    hf_module = GLOBAL_TENSOR_NAMES.get(module)
    return f"{hf_module}.{param}" if hf_module else None


def hf_tensors(reader: GGUFReader, arch: GGUFArch, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32, under its HF name."""
    unknown = [t.name for t in reader.tensors
               if hf_tensor_name(t.name) is None and t.name not in IGNORED_TENSORS]
    if unknown:
        raise ValueError(f"GGUF tensors with no HF name for {arch.model_type!r}: {unknown[:10]}")
    tensors = {}
    for t in reader.tensors:
        if t.name in IGNORED_TENSORS:
            warnings.warn(f"GGUF tensor {t.name} has no HF equivalent and is skipped", stacklevel=3)
            continue
        tensors[hf_tensor_name(t.name)] = _undo_rope_permutation(t.name, dequantize_tensor(t), arch, config)
    return tensors


def dequantize_tensor(t: ReaderTensor) -> torch.Tensor:
    """A GGUF tensor as float32 in torch (row-major) shape."""
    try:
        values = dequantize(t.data, t.tensor_type)
    except NotImplementedError as err:
        raise ValueError(f"tensor {t.name}: cannot dequantize GGML type {t.tensor_type.name}: {err}") from err
    # The reader's arrays are read-only views of the memory-mapped file: copy before handing to torch.
    values = np.require(np.asarray(values), dtype=np.float32, requirements=["C", "W"])
    return torch.from_numpy(values.reshape(_torch_shape(t)))


def _torch_shape(t: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first


def _undo_rope_permutation(
    name: str, tensor: torch.Tensor, arch: GGUFArch, config: Mapping[str, Any]
) -> torch.Tensor:
    if not arch.rope_permuted:
        return tensor
    if ".attn_q." in name:
        return unpermute_rope_rows(tensor, config["num_attention_heads"])
    if ".attn_k." in name:
        return unpermute_rope_rows(tensor, config["num_key_value_heads"])
    return tensor


def permute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter: per head, rows [first half | second half] → interleaved pairs."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `permute_rope_rows`: back to the HF (rotate-half) row order."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _guarded(path: str | os.PathLike, action):
    """Run `action`; the reader signals a corrupt or truncated file with assorted exception types."""
    try:
        return action()
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from err
