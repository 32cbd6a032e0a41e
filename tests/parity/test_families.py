"""Our logits vs `transformers` on tiny random configs, for every family and head."""
import pytest
import torch
import transformers as tf

from lmsmith.io.checkpoint import load_hf_folder, save_hf_folder
from lmsmith.model.cache import StaticKVCache

TOL = 1e-4
SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)

DECODERS = {
    "llama": lambda: tf.LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False),
    "llama3-scaled": lambda: tf.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-scaled": lambda: tf.LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": lambda: tf.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": lambda: tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**SMALL, rotary_pct=0.5, use_parallel_residual=True),
    "gpt_neox-sequential": lambda: tf.GPTNeoXConfig(**SMALL, rotary_pct=0.25, use_parallel_residual=False),
}
ENCODERS = {
    "bert": lambda: tf.BertConfig(**SMALL, type_vocab_size=2),
    "distilbert": lambda: tf.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                              max_position_embeddings=64),
}
HEADS = {
    "causal-lm": tf.AutoModelForCausalLM,
    "masked-lm": tf.AutoModelForMaskedLM,
    "sequence-classification": tf.AutoModelForSequenceClassification,
    "token-classification": tf.AutoModelForTokenClassification,
    "base": tf.AutoModel,
}


def _pair(tmp_path, make_config, task):
    torch.manual_seed(0)
    config = make_config()
    config.num_labels = 3
    if config.pad_token_id is None:
        config.pad_token_id = 0
    hf = HEADS[task].from_config(config, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_folder(tmp_path / "hf").eval()
    assert ours.config.task == task
    return hf, ours


def _output(hf_out, task):
    return hf_out.last_hidden_state if task == "base" else hf_out.logits


def _ours(out, task):
    return out.hidden_states if task == "base" else out.logits


@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_decoder_full_forward(tmp_path, family, task):
    hf, ours = _pair(tmp_path, DECODERS[family], task)
    ids = torch.randint(1, 99, (2, 11))
    with torch.no_grad():
        diff = (_output(hf(ids), task) - _ours(ours(ids), task)).abs().max()
    assert diff < TOL


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_cached_incremental_decoding(tmp_path, family):
    hf, ours = _pair(tmp_path, DECODERS[family], "causal-lm")
    ids = torch.randint(1, 99, (2, 12))
    cache = StaticKVCache(ours.config, batch_size=2, max_len=16)
    with torch.no_grad():
        expected = hf(ids).logits
        steps = [ours(ids[:, :5], cache=cache).logits]
        steps += [ours(ids[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    assert (torch.cat(steps, dim=1) - expected).abs().max() < TOL


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_decoder_left_padded_batch(tmp_path, family):
    hf, ours = _pair(tmp_path, DECODERS[family], "causal-lm")
    ids = torch.randint(1, 99, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
    assert (expected - got)[mask.bool()].abs().max() < TOL


@pytest.mark.parametrize("family", sorted(ENCODERS))
@pytest.mark.parametrize("task", ["base", "masked-lm", "sequence-classification", "token-classification"])
def test_encoder_forward_with_padding(tmp_path, family, task):
    hf, ours = _pair(tmp_path, ENCODERS[family], task)
    ids = torch.randint(1, 99, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = _output(hf(input_ids=ids, attention_mask=mask), task)
        got = _ours(ours(ids, attention_mask=mask), task)
    if task in ("base", "masked-lm", "token-classification"):
        expected, got = expected[mask.bool()], got[mask.bool()]
    assert (expected - got).abs().max() < TOL


@pytest.mark.parametrize("family,task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("gpt_neox", "causal-lm"),
                                         ("qwen2", "causal-lm"), ("bert", "masked-lm"),
                                         ("bert", "sequence-classification"), ("distilbert", "masked-lm")])
def test_save_round_trip_loads_in_transformers(tmp_path, family, task):
    make = {**DECODERS, **ENCODERS}[family]
    hf, ours = _pair(tmp_path, make, task)
    save_hf_folder(ours, tmp_path / "ours")
    reloaded = HEADS[task].from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(1, 99, (2, 8))
    with torch.no_grad():
        assert (_output(reloaded(ids), task) - _output(hf(ids), task)).abs().max() < TOL
