"""Write llama-family models as GGUF files that llama.cpp, transformers and `read_gguf` load.

    export_gguf(model, tokenizer, "smollm2-q8.gguf", quant="q8_0")

What llama.cpp's converter does, we do: HF-named tensors (via `weights.to_theirs`) get GGUF names,
`llama` q/k projection rows are permuted into llama.cpp's interleaved rotary order, 2-D weights are
encoded with the chosen type (norms and biases stay F32), and the file carries the architecture
hyper-parameters and the tokenizer as `tokenizer.ggml.*` metadata.

Quantization (`gguf.quants.quantize`, bit-exact with ggml's reference code):
    f32   everything F32
    f16   2-D weights F16
    q8_0  2-D weights Q8_0
    q4_0  2-D weights Q4_0; the output matrix (or the tied embedding that serves as it) Q8_0, since
          llama-quantize keeps it at higher precision too (Q6_K there, which gguf-py cannot write)
A weight whose rows are not a multiple of 32 values falls back to F16, as in llama.cpp's converter.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
)
from gguf.quants import quantize

from ..model.config import ModelConfig
from ..model.families import FAMILIES
from ..model.transformer import Transformer
from ..tokenizer import BYTE_LEVEL_PRE_TOKENIZERS, Tokenizer
from .gguf import ARCHITECTURES, GLOBAL_TENSOR_NAMES, LAYER_TENSOR_NAMES, permute_rope_rows
from .weights import to_theirs

Q = GGMLQuantizationType


@dataclass(frozen=True)
class GGUFQuant:
    """How one `quant=` choice encodes a model's tensors."""

    weight_type: GGMLQuantizationType  # 2-D weights
    output_type: GGMLQuantizationType  # output.weight, or token_embd.weight when it doubles as the head
    file_type: LlamaFileType  # general.file_type


QUANTS: dict[str, GGUFQuant] = {
    "f32": GGUFQuant(Q.F32, Q.F32, LlamaFileType.ALL_F32),
    "f16": GGUFQuant(Q.F16, Q.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": GGUFQuant(Q.Q8_0, Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": GGUFQuant(Q.Q4_0, Q.Q8_0, LlamaFileType.MOSTLY_Q4_0),
}
# Our model family → GGUF `general.architecture`.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
ROPE_SCALINGS = {"linear": RopeScalingType.LINEAR}

# Value types of the tokenizer keys llama.cpp defines; anything else is typed from its Python value.
_TOKENIZER_ARRAY_TYPES = {
    "tokenizer.ggml.tokens": GGUFValueType.STRING, "tokenizer.ggml.merges": GGUFValueType.STRING,
    "tokenizer.ggml.token_type": GGUFValueType.INT32, "tokenizer.ggml.scores": GGUFValueType.FLOAT32,
}


# ==================================================================== public API
def export_gguf(model: Transformer, tokenizer: Tokenizer | None, path: str | os.PathLike,
                quant: str = "q8_0") -> Path:
    """Write `model` (+ `tokenizer` as metadata; None writes no vocabulary) to a GGUF file at `path`.

    Supports the llama and qwen2 families, causal LM task. The file is written next to `path` and
    renamed into place, so a failed export leaves no partial file behind.
    """
    spec = quant_spec(quant)
    if not isinstance(model, Transformer):
        raise TypeError(f"export_gguf needs an lmsmith Transformer, got {type(model).__name__}")
    arch = gguf_architecture(model.config)
    tensors = gguf_tensors(model.state_dict(), model.config)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        _write(partial, arch, model.config, spec, tensors, tokenizer)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def quant_spec(quant: str) -> GGUFQuant:
    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quantization {quant!r}; choose one of {sorted(QUANTS)}")
    return QUANTS[quant]


def gguf_architecture(config: ModelConfig) -> str:
    """The GGUF architecture name for `config`; ValueError naming what llama.cpp's layout cannot hold."""
    if config.family not in GGUF_ARCHITECTURES:
        raise ValueError(f"cannot export family {config.family!r} to GGUF; supported: {sorted(GGUF_ARCHITECTURES)}")
    problems = _unsupported_settings(config)
    if problems:
        raise ValueError(f"cannot export this {config.family} model to GGUF: {'; '.join(problems)}")
    if config.sliding_window is not None:
        warnings.warn(f"sliding_window={config.sliding_window} is not stored in GGUF; llama.cpp attends to the "
                      "whole context", stacklevel=3)
    return GGUF_ARCHITECTURES[config.family]


def _unsupported_settings(config: ModelConfig) -> list[str]:
    expected = {"task": "causal-lm", "position": "rope", "norm": "rmsnorm", "norm_position": "pre",
                "activation": "silu", "gated_mlp": True, "mlp_bias": False, "rotary_fraction": 1.0,
                "parallel_residual": False, "embed_norm": False, "final_norm": True}
    problems = [f"{key}={getattr(config, key)!r} (needs {value!r})"
                for key, value in expected.items() if getattr(config, key) != value]
    if config.family == "qwen2" and (not config.attn_qkv_bias or config.attn_out_bias):
        problems.append("qwen2 needs q/k/v biases and no o_proj bias")
    if config.family == "llama" and config.attn_qkv_bias != config.attn_out_bias:
        problems.append("llama biases are all-or-none over q/k/v/o (HF attention_bias)")
    if config.rope_scaling is not None and config.rope_scaling.kind not in ROPE_SCALINGS:
        problems.append(f"rope scaling {config.rope_scaling.kind!r} (supported: none, {', '.join(ROPE_SCALINGS)})")
    return problems


# ==================================================================== tensors
def gguf_tensor_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight` (inverse of `hf_tensor_name`)."""
    module, _, param = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        layer, _, part = module.removeprefix("model.layers.").partition(".")
        return f"blk.{layer}.{_LAYER_TO_GGUF[part]}.{param}"
    return f"{_GLOBAL_TO_GGUF[module]}.{param}"


_LAYER_TO_GGUF = {hf: gguf for gguf, hf in LAYER_TENSOR_NAMES.items()}
_GLOBAL_TO_GGUF = {hf: gguf for gguf, hf in GLOBAL_TENSOR_NAMES.items()}


def gguf_tensors(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → GGUF-named float32 tensors in llama.cpp's layout (q/k rows permuted for llama)."""
    _check_state(state, config)
    theirs = to_theirs({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, config)
    permuted = ARCHITECTURES[GGUF_ARCHITECTURES[config.family]].rope_permuted
    tensors = {}
    for hf_name, tensor in theirs.items():
        if permuted and ".self_attn.q_proj." in hf_name:
            tensor = permute_rope_rows(tensor, config.num_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            tensor = permute_rope_rows(tensor, config.kv_heads)
        tensors[gguf_tensor_name(hf_name)] = tensor
    return tensors


def _check_state(state: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    """Every parameter must be a plain float tensor the weight map knows: quantized or adapter-wrapped
    modules (other state keys) would otherwise be dropped silently."""
    known = {f"{m}.{p}" for ours, _, _ in FAMILIES[config.family].module_map(config)
             for m in ours.split("|") for p in ("weight", "bias")}
    extra = sorted(set(state) - known)
    if extra:
        raise ValueError(f"model state has tensors GGUF cannot hold: {extra[:5]} — merge adapters and "
                         "remove quantization/pruning wrappers before exporting")
    not_float = sorted(k for k, v in state.items() if not v.is_floating_point())
    if not_float:
        raise ValueError(f"model state has non-float tensors {not_float[:5]}; export needs float weights")


def encode_tensor(name: str, tensor: torch.Tensor, spec: GGUFQuant, tied: bool) -> tuple[np.ndarray, Q]:
    """(data, GGML type) for one GGUF tensor: quantized bytes (uint8), float16 or float32 values."""
    array = tensor.numpy()
    qtype = _tensor_type(name, array, spec, tied)
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32), qtype
    if qtype == Q.F16:
        return array.astype(np.float16), qtype
    return quantize(array, qtype), qtype


def _tensor_type(name: str, array: np.ndarray, spec: GGUFQuant, tied: bool) -> Q:
    if array.ndim < 2:
        return Q.F32  # norms and biases: tiny, and precision-sensitive
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    qtype = spec.output_type if is_output else spec.weight_type
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block_size:
        return Q.F16  # rows that do not split into blocks: llama.cpp's converter falls back to F16 too
    return qtype


# ==================================================================== metadata
def model_metadata(config: ModelConfig, spec: GGUFQuant) -> dict[str, tuple[Any, GGUFValueType]]:
    """`general.*` and `{arch}.*` keys for `config`, with their GGUF value types."""
    arch = GGUF_ARCHITECTURES[config.family]
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    meta: dict[str, tuple[Any, GGUFValueType]] = {
        "general.name": (config.name or f"lmsmith-{config.family}", GGUFValueType.STRING),
        "general.file_type": (int(spec.file_type), u32),
        "general.quantization_version": (GGML_QUANT_VERSION, u32),
        f"{arch}.context_length": (config.max_position_embeddings, u32),
        f"{arch}.embedding_length": (config.hidden_size, u32),
        f"{arch}.block_count": (config.num_layers, u32),
        f"{arch}.feed_forward_length": (config.intermediate_size, u32),
        f"{arch}.attention.head_count": (config.num_heads, u32),
        f"{arch}.attention.head_count_kv": (config.kv_heads, u32),
        f"{arch}.rope.freq_base": (float(config.rope_theta), f32),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(config.norm_eps), f32),
        f"{arch}.vocab_size": (config.vocab_size, u32),
        f"{arch}.rope.dimension_count": (config.rotary_dim, u32),
    }
    if config.dim_per_head * config.num_heads != config.hidden_size:  # explicit head_dim
        meta[f"{arch}.attention.key_length"] = (config.dim_per_head, u32)
        meta[f"{arch}.attention.value_length"] = (config.dim_per_head, u32)
    if (scaling := config.rope_scaling) is not None:
        meta[f"{arch}.rope.scaling.type"] = (ROPE_SCALINGS[scaling.kind].value, GGUFValueType.STRING)
        meta[f"{arch}.rope.scaling.factor"] = (float(scaling.factor), f32)
        if scaling.original_max_position_embeddings:
            meta[f"{arch}.rope.scaling.original_context_length"] = (scaling.original_max_position_embeddings, u32)
    return meta


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.*` keys: kept as read when the tokenizer came from a GGUF file, otherwise derived
    from its byte-level BPE backend (llama.cpp's `gpt2` tokenizer model)."""
    if tokenizer.gguf_metadata is not None:
        meta = dict(tokenizer.gguf_metadata)
    else:
        meta = _metadata_from_backend(tokenizer, vocab_size)
    if tokenizer.chat_template:  # the one field callers commonly change after loading
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    tokens = meta["tokenizer.ggml.tokens"]
    if len(tokens) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    if len(tokens) < vocab_size:  # embedding rows past the vocabulary: padding tokens, as llama.cpp writes
        meta.update(_padded_vocab(meta, vocab_size))
    return meta


def _padded_vocab(meta: Mapping[str, Any], vocab_size: int) -> dict[str, list]:
    tokens = list(meta["tokenizer.ggml.tokens"])
    missing = range(len(tokens), vocab_size)
    padded = {"tokenizer.ggml.tokens": tokens + [f"[PAD{i}]" for i in missing]}
    if "tokenizer.ggml.token_type" in meta:
        padded["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"]) + [TokenType.UNUSED] * len(missing)
    if "tokenizer.ggml.scores" in meta:
        padded["tokenizer.ggml.scores"] = list(meta["tokenizer.ggml.scores"]) + [-1000.0] * len(missing)
    return padded


def _metadata_from_backend(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    spec = json.loads(tokenizer.backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ValueError(
            f"only byte-level BPE tokenizers (GPT-2 style, GGUF model 'gpt2') can be exported; this one has "
            f"model {model.get('type')!r} and decoder {decoder.get('type')!r}"
        )
    tokens, token_types = _token_table(tokenizer, vocab_size)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        "tokenizer.ggml.add_bos_token": tokenizer.adds_bos,
        "tokenizer.ggml.add_eos_token": _adds_eos(tokenizer),
    }
    for key, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id),
                          ("unknown", tokenizer.unk_id)):
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = token_id
    return meta


def _token_table(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and llama.cpp token types: special added tokens CONTROL, other added tokens
    USER_DEFINED, ids the tokenizer lacks `[PAD{i}]` UNUSED (as llama.cpp's converter writes them)."""
    added = tokenizer.backend.get_added_tokens_decoder()
    size = max(vocab_size, tokenizer.vocab_size)
    tokens, types = [], []
    for i in range(size):
        token = tokenizer.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        kind = TokenType.NORMAL if i not in added else (
            TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        types.append(kind)
    return tokens, [int(t) for t in types]


def _adds_eos(tokenizer: Tokenizer) -> bool:
    ids = tokenizer.encode("", add_special_tokens=True)
    return bool(ids) and tokenizer.eos_id is not None and ids[-1] == tokenizer.eos_id


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """The llama.cpp pre-tokenizer name whose text splitting matches this one; GPT-2's otherwise."""
    wanted = _split_signature(pre_tokenizer)
    for name, build in BYTE_LEVEL_PRE_TOKENIZERS.items():
        # "default" is llama.cpp's own older regex, never what an HF byte-level tokenizer does.
        if name != "default" and _split_signature(json.loads(build().__getstate__())) == wanted:
            return name
    warnings.warn(f"no llama.cpp pre-tokenizer matches {json.dumps(pre_tokenizer)[:200]}; writing 'gpt2'",
                  stacklevel=4)
    return "gpt2"


def _split_signature(node: Any) -> Any:
    """What decides how a pre-tokenizer splits text (not offsets bookkeeping such as trim_offsets)."""
    if not isinstance(node, dict):
        return None
    kind = node.get("type")
    if kind == "Sequence":
        return tuple(_split_signature(child) for child in node.get("pretokenizers", []))
    if kind == "ByteLevel":
        return kind, node.get("use_regex", True), node.get("add_prefix_space", False)
    if kind == "Split":
        return kind, json.dumps(node.get("pattern"), sort_keys=True), node.get("behavior"), node.get("invert")
    if kind == "Digits":
        return kind, node.get("individual_digits")
    return kind, json.dumps(node, sort_keys=True)


def _value_type(key: str, value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """(type, array element type) to write a metadata value with."""
    if key in _TOKENIZER_ARRAY_TYPES:
        return GGUFValueType.ARRAY, _TOKENIZER_ARRAY_TYPES[key]
    if key.endswith(("_token_id", "token_type_count")):
        return GGUFValueType.UINT32, None
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY, GGUFValueType.get_type(value[0])
    return GGUFValueType.get_type(value), None


# ==================================================================== writing
def _write(path: Path, arch: str, config: ModelConfig, spec: GGUFQuant, tensors: dict[str, torch.Tensor],
           tokenizer: Tokenizer | None) -> None:
    writer = GGUFWriter(str(path), arch)
    for key, (value, vtype) in model_metadata(config, spec).items():
        writer.add_key_value(key, value, vtype)
    if tokenizer is not None:
        for key, value in tokenizer_metadata(tokenizer, config.vocab_size).items():
            if isinstance(value, (list, tuple)) and not value:
                continue  # GGUF has no empty arrays (gguf-py refuses them; llama.cpp omits the key)
            vtype, sub_type = _value_type(key, value)
            writer.add_key_value(key, list(value) if vtype == GGUFValueType.ARRAY else value, vtype, sub_type)
    tied = config.tie_word_embeddings
    for name, tensor in tensors.items():
        data, qtype = encode_tensor(name, tensor, spec, tied)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
