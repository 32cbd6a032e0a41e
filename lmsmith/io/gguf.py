"""Read GGUF files (llama.cpp's format) as a transformers-style config + HF-named float32 tensors.

    ckpt = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.hf_config["num_hidden_layers"], ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]

The header (metadata and tensor directory) is parsed here with `struct` over a memory map, reading a
vocabulary's strings in one tight loop; `gguf.GGUFReader` builds numpy views per string and needs
seconds for a 50k-token vocabulary. Tensor data is then read with one `readinto` per tensor and decoded
by `ggml_quants` (vectorised torch for F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0; `gguf.quants` otherwise).

llama.cpp's converter permutes the q/k projection rows of `llama` models for its rotary layout; we
undo that so the weights match the HF checkpoint they came from.

File layout (GGUF v2/v3, little-endian): magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count |
kv pairs (string key, u32 value type, value) | tensor infos (string name, u32 n_dims, u64 dims[n_dims]
fastest-first, u32 ggml type, u64 offset from the data start) | padding to `general.alignment` | data.
A string is a u64 byte length + UTF-8 bytes; an array is a u32 element type + u64 count + elements.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from ..tokenizer import Tokenizer, tokenizer_from_gguf_metadata
from . import ggml_quants

if TYPE_CHECKING:
    from gguf import GGUFReader
    from gguf.gguf_reader import ReaderField

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class GGUFArch:
    """How one `general.architecture` maps onto a transformers model."""

    model_type: str
    hf_architecture: str
    rope_permuted: bool  # q/k rows stored in llama.cpp's interleaved-rope order
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    # HF Llama's `attention_bias` switches q/k/v/o biases together; Qwen2 always has q/k/v biases
    # and no o bias, with no config key for it.
    bias_in_config: bool = True


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", rope_permuted=True,
                      config_defaults={"hidden_act": "silu", "mlp_bias": False}),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", rope_permuted=False,
                      config_defaults={"hidden_act": "silu", "use_sliding_window": False}, bias_in_config=False),
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
    offset: int = 0  # absolute byte offset of the data in the file
    n_bytes: int = 0

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.ggml_type]


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header: every metadata value and where each tensor's bytes are."""

    path: Path
    version: int
    metadata: dict[str, Any]  # file order; starts with GGUF.version / tensor_count / kv_count, as GGUFReader
    value_types: dict[str, tuple[GGUFValueType, ...]]  # (type,) or (ARRAY, element type)
    tensors: tuple[GGUFTensorInfo, ...]
    alignment: int
    data_offset: int  # where tensor data starts


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
    gguf_file = open_gguf(path)
    try:
        return _checkpoint(gguf_file)
    except NotImplementedError:  # a valid file using something we do not support (e.g. its tokenizer)
        raise
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as err:
        # A header that parses but describes an impossible model (corrupt values): name the file.
        if str(gguf_file.path) in str(err):
            raise
        raise ValueError(f"{gguf_file.path}: {err}") from err


def _checkpoint(gguf_file: GGUFFile) -> GGUFCheckpoint:
    metadata, path = gguf_file.metadata, gguf_file.path
    arch_name = metadata.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch_name!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[arch_name]
    config = hf_config_from_metadata(metadata, arch, {t.name for t in gguf_file.tensors})
    _check_required(config, arch_name, path)
    tensors = hf_tensors(gguf_file, arch, config)
    tokenizer = tokenizer_from_gguf_metadata(metadata) if "tokenizer.ggml.tokens" in metadata else None
    return GGUFCheckpoint(path, arch_name, config, tensors, metadata, tokenizer)


def gguf_tensor_info(path: str | os.PathLike) -> list[GGUFTensorInfo]:
    """Names, GGML types, shapes and byte ranges of the tensors in a GGUF file, without reading data."""
    return list(open_gguf(path).tensors)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header; a corrupt or truncated file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError(f"{path}: not a readable GGUF file (it is empty)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _guarded(path, lambda: parse_gguf(data, path))


def gguf_fields(source: GGUFFile | GGUFReader, prefix: str = "") -> dict[str, Any]:
    """The metadata whose keys start with `prefix`, as Python values (str, int, float, bool, list).

    Takes our parsed `GGUFFile` or a `gguf.GGUFReader` (converted the same way)."""
    if isinstance(source, GGUFFile):
        return {k: v for k, v in source.metadata.items() if k.startswith(prefix)}
    return {name: field_value(f) for name, f in source.fields.items() if name.startswith(prefix)}


# ==================================================================== header parsing
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALAR_LAYOUTS = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: _U32, GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.UINT64: _U64, GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT32: struct.Struct("<f"), GGUFValueType.FLOAT64: struct.Struct("<d"),
    GGUFValueType.BOOL: struct.Struct("<?"),
}
_ARRAY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.FLOAT64: "<f8", GGUFValueType.BOOL: "?",
}


class _Cursor:
    """Little-endian reads from a bytes-like object, front to back; reading past its end is a ValueError."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data, self.pos, self.size = data, 0, len(data)

    def unpack(self, layout: struct.Struct) -> tuple:
        try:
            values = layout.unpack_from(self.data, self.pos)
        except struct.error:
            raise self.truncated(layout.size) from None
        self.pos += layout.size
        return values

    def u32(self) -> int:
        return self.unpack(_U32)[0]

    def u64(self) -> int:
        return self.unpack(_U64)[0]

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.size:
            raise self.truncated(n)
        chunk, self.pos = self.data[self.pos:end], end
        return chunk

    def string(self) -> str:
        return str(self.take(self.u64()), "utf-8")

    def strings(self, count: int) -> list[str]:
        """`count` consecutive strings: one loop, no per-item method calls (vocabularies are 50k+)."""
        data, pos, unpack = self.data, self.pos, _U64.unpack_from
        out = [""] * self.plausible_count(count, 8)
        try:
            for i in range(count):
                (n,) = unpack(data, pos)
                out[i] = str(data[pos + 8:pos + 8 + n], "utf-8")
                pos += 8 + n
        except struct.error:
            pos = self.size + 1
        if pos > self.size:
            raise self.truncated(pos - self.pos)
        self.pos = pos
        return out

    def numbers(self, kind: GGUFValueType, count: int) -> np.ndarray:
        dtype = np.dtype(_ARRAY_DTYPES[kind])
        # A copy of the bytes, not a view: a view would pin the memory map open.
        raw = self.take(self.plausible_count(count, dtype.itemsize) * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype)

    def plausible_count(self, count: int, min_item_bytes: int) -> int:
        """A corrupt count must fail as truncation, not as an attempt to allocate petabytes."""
        if count * min_item_bytes > self.size - self.pos:
            raise self.truncated(count * min_item_bytes)
        return count

    def truncated(self, wanted: int) -> ValueError:
        return ValueError(f"truncated: needs {wanted} more bytes at offset {self.pos}, the file has {self.size}")


def parse_gguf(data: bytes | mmap.mmap, path: str | os.PathLike = "<bytes>") -> GGUFFile:
    """Parse the header of a GGUF file held in `data` (bytes or a memory map of the whole file)."""
    cur = _Cursor(data)
    version = _read_preamble(cur)
    tensor_count, kv_count = cur.u64(), cur.u64()
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensor_count,
                                "GGUF.kv_count": kv_count}
    value_types = {"GGUF.version": (GGUFValueType.UINT32,), "GGUF.tensor_count": (GGUFValueType.UINT64,),
                   "GGUF.kv_count": (GGUFValueType.UINT64,)}
    for _ in range(cur.plausible_count(kv_count, 12)):  # key length + value type at least
        key = cur.string()
        if key in metadata:
            raise ValueError(f"duplicate metadata key {key!r}")
        metadata[key], value_types[key] = _read_value(cur, _value_type(cur.u32()))
    raw_infos = [_read_tensor_info(cur) for _ in range(cur.plausible_count(tensor_count, 24))]
    alignment = _alignment(metadata, value_types)
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _locate_tensors(raw_infos, data_offset, cur.size)
    return GGUFFile(Path(path), version, metadata, value_types, tensors, alignment, data_offset)


def _read_preamble(cur: _Cursor) -> int:
    if cur.take(4) != GGUF_MAGIC:
        raise ValueError(f"bad magic (expected {GGUF_MAGIC!r})")
    version = cur.u32()
    if version & 0xFFFF == 0 and version:
        raise ValueError("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported; supported: {list(SUPPORTED_VERSIONS)}")
    return version


def _value_type(raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ValueError(f"unknown metadata value type {raw}; known: 0..{max(GGUFValueType)}") from None


def _read_value(cur: _Cursor, kind: GGUFValueType) -> tuple[Any, tuple[GGUFValueType, ...]]:
    if kind == GGUFValueType.STRING:
        return cur.string(), (kind,)
    if kind == GGUFValueType.ARRAY:
        return _read_array(cur)
    value = cur.unpack(_SCALAR_LAYOUTS[kind])[0]
    return (_shortest_float32(value) if kind == GGUFValueType.FLOAT32 else value), (kind,)


def _read_array(cur: _Cursor) -> tuple[list, tuple[GGUFValueType, ...]]:
    kind, count = _value_type(cur.u32()), cur.u64()
    if kind == GGUFValueType.STRING:
        return cur.strings(count), (GGUFValueType.ARRAY, kind)
    if kind in _ARRAY_DTYPES:
        values = cur.numbers(kind, count)
        if kind == GGUFValueType.FLOAT32:
            return [float(s) for s in values.astype(str)], (GGUFValueType.ARRAY, kind)
        return values.tolist(), (GGUFValueType.ARRAY, kind)
    items = [_read_value(cur, kind) for _ in range(cur.plausible_count(count, 12))]  # arrays of arrays
    inner = items[0][1] if items else (kind,)
    return [value for value, _ in items], (GGUFValueType.ARRAY, *inner)


def _shortest_float32(value: float) -> float:
    # The shortest decimal that round-trips the stored float32: 1e-05, not 9.999999747378752e-06.
    return float(str(np.float32(value)))


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string()
    n_dims = cur.u32()
    if n_dims > MAX_DIMS:
        raise ValueError(f"tensor {name!r} has {n_dims} dimensions; GGML allows at most {MAX_DIMS}")
    dims = cur.unpack(struct.Struct(f"<{n_dims}Q"))
    raw_type, offset = cur.u32(), cur.u64()
    return name, dims, raw_type, offset


def _alignment(metadata: Mapping[str, Any], value_types: Mapping[str, tuple]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    alignment = metadata["general.alignment"]
    if value_types["general.alignment"] != (GGUFValueType.UINT32,) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment must be a uint32 power of two, got {alignment!r}")
    return alignment


def _locate_tensors(raw_infos: list[tuple], data_offset: int, file_size: int) -> tuple[GGUFTensorInfo, ...]:
    tensors, seen = [], set()
    for name, dims, raw_type, offset in raw_infos:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        qtype = _ggml_type(raw_type, name)
        shape = tuple(reversed(dims))  # GGUF lists dims fastest-first
        try:
            n_bytes = ggml_quants.tensor_nbytes(qtype, shape)
        except ValueError as err:
            raise ValueError(f"tensor {name!r} {shape}: {err}") from None
        start = data_offset + offset
        if start + n_bytes > file_size:
            raise ValueError(f"truncated: tensor {name!r} needs bytes {start}..{start + n_bytes}, "
                             f"the file has {file_size}")
        tensors.append(GGUFTensorInfo(name, qtype.name, shape, start, n_bytes))
    return tuple(tensors)


def _ggml_type(raw: int, tensor_name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(raw)
    except ValueError:
        raise ValueError(f"tensor {tensor_name!r} has unknown GGML type {raw}") from None


# ==================================================================== GGUFReader fields (compatibility)
def field_value(f: ReaderField) -> Any:
    """One `gguf.GGUFReader` metadata field as a Python value; arrays become lists."""
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
        return float(str(part[0]))
    return int(part[0])


# ==================================================================== metadata → config
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
    if arch.bias_in_config:
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


def hf_tensors(gguf_file: GGUFFile, arch: GGUFArch, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32, under its HF name."""
    unknown = [t.name for t in gguf_file.tensors
               if hf_tensor_name(t.name) is None and t.name not in IGNORED_TENSORS]
    if unknown:
        raise ValueError(f"GGUF tensors with no HF name for {arch.model_type!r}: {unknown[:10]}")
    tensors = {}
    with gguf_file.path.open("rb", buffering=0) as f, _single_threaded():
        for info in gguf_file.tensors:
            if info.name in IGNORED_TENSORS:
                warnings.warn(f"GGUF tensor {info.name} has no HF equivalent and is skipped", stacklevel=3)
                continue
            values = dequantize_tensor(info, read_tensor_bytes(f, info, gguf_file.path))
            tensors[hf_tensor_name(info.name)] = _undo_rope_permutation(info.name, values, arch, config)
    return tensors


@contextmanager
def _single_threaded():
    """Decode on one intra-op thread. Decoding is memory-bound, so a second thread gains little on an
    idle machine, while on a busy one every op waits at an OpenMP barrier for a descheduled thread:
    SmolLM2 took 27 s to decode with 2 threads on a loaded 2-core machine and 2.3 s with 1."""
    previous = torch.get_num_threads()
    if previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous > 1:
            torch.set_num_threads(previous)


def read_tensor_bytes(f: BinaryIO, info: GGUFTensorInfo, path: str | os.PathLike = "") -> torch.Tensor:
    """The raw bytes of one tensor as a fresh uint8 tensor, read straight into its memory."""
    raw = torch.empty(info.n_bytes, dtype=torch.uint8)
    target = memoryview(raw.numpy())
    f.seek(info.offset)
    got = 0
    while got < info.n_bytes:  # one read() returns at most ~2 GiB on Linux
        n = f.readinto(target[got:])
        if not n:
            break
        got += n
    if got != info.n_bytes:  # the file shrank since its header was parsed
        raise ValueError(f"{path}: truncated: tensor {info.name!r} has {got} of {info.n_bytes} bytes")
    return raw


def dequantize_tensor(info: GGUFTensorInfo, raw: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor's bytes as float32 in torch (row-major) shape."""
    try:
        return ggml_quants.dequantize(raw, info.qtype, info.shape)
    except NotImplementedError as err:
        raise ValueError(f"tensor {info.name}: cannot dequantize GGML type {info.ggml_type}: {err}") from err


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
    """Run `action`; report a corrupt or truncated file as a ValueError that names it."""
    try:
        return action()
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
        raise ValueError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from err
