"""ggml_quants: the torch decoders are bit-identical to gguf.quants.dequantize; other types fall back to it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from lmsmith.io.ggml_quants import FAST_DEQUANTIZERS, dequantize, has_fast_dequantizer, tensor_nbytes

FAST = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def random_bytes(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Arbitrary bytes for a tensor of `shape` (scales included: NaN, Inf and subnormals occur)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1]))
    return np.random.default_rng(seed).integers(0, 256, (rows, shape[-1] // block_size * type_size), dtype=np.uint8)


def assert_bit_identical(got: torch.Tensor, expected: np.ndarray) -> None:
    got_bits = got.numpy().view(np.int32)
    expected_bits = np.ascontiguousarray(expected, dtype=np.float32).view(np.int32)
    both_nan = np.isnan(got.numpy()) & np.isnan(expected)  # NaN payloads may differ, NaN-ness may not
    mismatched = (got_bits != expected_bits) & ~both_nan
    assert not mismatched.any(), f"{mismatched.sum()} values differ, first at {np.argwhere(mismatched)[0]}"


@pytest.mark.parametrize("qtype", FAST, ids=lambda q: q.name)
def test_fast_decoders_are_bit_identical_to_gguf_on_arbitrary_bytes(qtype):
    assert has_fast_dequantizer(qtype)
    shape = (3, 5, 128)
    raw = random_bytes(qtype, shape, seed=int(qtype))
    with np.errstate(all="ignore"):
        expected = gguf_dequantize(raw, qtype).reshape(shape)
    got = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    assert_bit_identical(got, expected)
    assert np.isfinite(expected).mean() > 0.5  # the comparison covered ordinary values, not only NaNs


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_quantized_real_values_decode_identically_and_close_to_the_input(qtype):
    values = np.random.default_rng(1).standard_normal((16, 96)).astype(np.float32)
    raw = quantize(values, qtype)
    got = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, values.shape)
    assert_bit_identical(got, gguf_dequantize(raw, qtype))
    step = {Q.Q8_0: 0.03, Q.Q5_0: 0.15, Q.Q5_1: 0.15}.get(qtype, 0.35)
    assert np.abs(got.numpy() - values).max() < step


def test_known_block_values():
    # Q8_0: d = 0.5, q = 0..31 → 0, 0.5, 1, …
    block = np.concatenate([np.float16([0.5]).view(np.uint8), np.arange(32, dtype=np.int8).view(np.uint8)])
    assert dequantize(torch.from_numpy(block), Q.Q8_0, (32,)).tolist() == [i * 0.5 for i in range(32)]
    # Q4_1: d = 1, m = -8, byte j = (j+16)<<4 | j → values 0..31 minus 8 (low nibbles first, then high)
    nibbles = np.array([(j & 15) | (((j + 16) & 15) << 4) for j in range(16)], np.uint8)
    block = np.concatenate([np.float16([1.0, -8.0]).view(np.uint8), nibbles])
    expected = [float((j & 15) - 8) for j in range(16)] + [float(((j + 16) & 15) - 8) for j in range(16)]
    assert dequantize(torch.from_numpy(block), Q.Q4_1, (32,)).tolist() == expected
    # Q5_0: d = 1, all nibbles 0, qh = bit j set for odd j → value 16·bit − 16
    qh = np.array([0xAAAAAAAA], "<u4").view(np.uint8)
    block = np.concatenate([np.float16([1.0]).view(np.uint8), qh, np.zeros(16, np.uint8)])
    assert dequantize(torch.from_numpy(block), Q.Q5_0, (32,)).tolist() == [0.0 if j % 2 else -16.0 for j in range(32)]


def test_result_owns_its_memory():
    values = np.arange(8, dtype=np.float32)
    raw = torch.from_numpy(values.view(np.uint8).copy())
    got = dequantize(raw, Q.F32, (2, 4))
    raw.zero_()
    assert got.flatten().tolist() == list(range(8))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.IQ4_NL], ids=lambda q: q.name)
def test_other_types_fall_back_to_gguf(qtype):
    assert not has_fast_dequantizer(qtype) and qtype not in FAST_DEQUANTIZERS
    shape = (2, 256)
    raw = random_bytes(qtype, shape, seed=5)
    with np.errstate(all="ignore"):
        expected = gguf_dequantize(raw, qtype).reshape(shape)
        got = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, shape)
    assert_bit_identical(got, expected)


def test_integer_types_are_not_dequantized():
    with pytest.raises(NotImplementedError):
        dequantize(torch.zeros(16, dtype=torch.uint8), Q.I32, (4,))


def test_tensor_nbytes():
    assert tensor_nbytes(Q.Q4_1, (576, 1536)) == 576 * 1536 // 32 * 20
    assert tensor_nbytes(Q.F16, (3, 7)) == 42 and tensor_nbytes(Q.F32, ()) == 4
    with pytest.raises(ValueError, match="row length 33.*Q8_0 block size 32"):
        tensor_nbytes(Q.Q8_0, (4, 33))
