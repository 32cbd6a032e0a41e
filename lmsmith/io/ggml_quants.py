"""GGML tensor encodings → float32 torch tensors, vectorised over all blocks at once.

The legacy block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the float types are decoded here with
a handful of whole-tensor torch ops; results are bit-identical to `gguf.quants.dequantize`, which
does the same arithmetic in numpy 16 rows at a time (and is several times slower). Every other
type (k-quants, i-quants, …) is handed to `gguf.quants.dequantize`.

Block layouts (ggml-common.h), each block covering 32 values, little-endian:
    Q8_0  d:f16 | q:int8[32]                    x = d·q
    Q4_0  d:f16 | q:u4[32]                      x = d·(q − 8)
    Q4_1  d:f16 | m:f16 | q:u4[32]              x = d·q + m
    Q5_0  d:f16 | qh:u32 | q:u4[32]             x = d·(q + 16·bit − 16)
    Q5_1  d:f16 | m:f16 | qh:u32 | q:u4[32]     x = d·(q + 16·bit) + m
u4[32] packs value j in the low nibble of byte j and value j + 16 in the high nibble of byte j;
bit j of qh is the fifth bit of value j.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

Q = GGMLQuantizationType
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)  # bit i of a byte: (byte >> i) & 1


def tensor_nbytes(qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes a tensor of this type and (row-major) shape occupies; ValueError if rows split a block."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_elements = math.prod(shape)  # Python ints: corrupt dims must not wrap around
    row = shape[-1] if len(shape) else 1
    if row % block_size:
        raise ValueError(f"row length {row} is not a multiple of the {qtype.name} block size {block_size}")
    return n_elements // block_size * type_size


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: Sequence[int]) -> torch.Tensor:
    """`raw` (the tensor's bytes, uint8) decoded to a new float32 tensor of `shape` (row-major).

    Raises NotImplementedError for types neither we nor `gguf` can decode (e.g. integer tensors).
    """
    assert raw.dtype == torch.uint8 and raw.dim() == 1, (raw.dtype, raw.shape)
    shape = tuple(int(d) for d in shape)
    decode = FAST_DEQUANTIZERS.get(qtype)
    if decode is None:
        return _dequantize_with_gguf(raw, qtype, shape)
    _, type_size = GGML_QUANT_SIZES[qtype]
    return decode(raw.view(-1, type_size)).reshape(shape)


def has_fast_dequantizer(qtype: GGMLQuantizationType) -> bool:
    return qtype in FAST_DEQUANTIZERS


# ==================================================================== float types
def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32).clone()  # clone: never alias the caller's buffer


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).to(torch.float32)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an f32: shift the bits into place (exact, NaN payloads included).
    return (blocks.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# ==================================================================== legacy block quants
def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 at byte `start` of every block, as a float32 (n_blocks, 1) column."""
    return blocks[:, start:start + 2].view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes → (n, 32) uint8 values: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian u32 → (n, 32) uint8 with bit j of the u32 at column j."""
    return ((qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1).reshape(qh.shape[0], 32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).to(torch.float32).mul_(_half(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # q − 8 is exact in float32, so subtracting after the conversion equals gguf's int8 arithmetic.
    return _nibbles(blocks[:, 2:]).to(torch.float32).sub_(8).mul_(_half(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # Separate multiply and add (no fused multiply-add) to round exactly as gguf's numpy code does.
    return _nibbles(blocks[:, 4:]).to(torch.float32).mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 6:]) | (_fifth_bits(blocks[:, 2:6]) << 4)
    return q.to(torch.float32).sub_(16).mul_(_half(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 8:]) | (_fifth_bits(blocks[:, 4:8]) << 4)
    return q.to(torch.float32).mul_(_half(blocks, 0)).add_(_half(blocks, 2))


FAST_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: _f32, Q.F16: _f16, Q.BF16: _bf16,
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
}


# ==================================================================== everything else
def _dequantize_with_gguf(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.numpy().reshape(-1, shape[-1] // block_size * type_size if shape else type_size)
    values = np.asarray(gguf_dequantize(rows, qtype), dtype=np.float32)
    # gguf may return a view of the input (F32): copy so the result owns writable memory.
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).reshape(shape)
