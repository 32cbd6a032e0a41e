"""T5 (original and v1.1 / flan-t5) against `transformers` on tiny random configs."""
import json

import pytest
import torch
import transformers as tf
from transformers.models.t5.modeling_t5 import T5Attention

from lmsmith.generation import generate
from lmsmith.io.checkpoint import load_hf_folder, save_hf_folder
from lmsmith.model.cache import EncoderDecoderCache
from lmsmith.model.ops import relative_position_bucket
from tests.fakes import ByteTokenizer

TOL = 1e-4
# 8 buckets up to distance 20 with 30-token inputs: both the exact and the log-spaced buckets are hit.
SMALL = {"vocab_size": 99, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4,
             "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20, "decoder_start_token_id": 0,
             "pad_token_id": 0, "eos_token_id": 1}
VARIANTS = {
    "t5": {"feed_forward_proj": "relu"},  # tied head, hidden_size**-0.5 rescaling
    "t5-v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},  # untied head, no rescaling
}


class T5Tokenizer(ByteTokenizer):
    eos_id, eos_ids = 1, {1}


def _hf_model(variant: str, cls=tf.T5ForConditionalGeneration, **overrides):
    torch.manual_seed(0)
    config = tf.T5Config(**{**SMALL, **overrides}, **VARIANTS[variant])
    hf = cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF's init gives a tiny model that repeats one token; spread the weights out
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "layer_norm" in name else p.normal_(0.0, 0.2)
        if variant == "t5-v1.1" and hasattr(hf, "lm_head"):  # a head of its own, as flan-t5 has
            hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.2)
    return hf


def _pair(tmp_path, variant, **overrides):
    hf = _hf_model(variant, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_hf_folder(tmp_path / "hf").eval(), variant


@pytest.fixture(params=sorted(VARIANTS))
def pair(request, tmp_path):
    return _pair(tmp_path, request.param)


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(2, 99, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 21:] = 0  # row 1 is right-padded
    return ids, mask, torch.randint(2, 99, (2, 25))


def test_config_reads_both_variants(pair):
    _hf, ours, variant = pair
    c = ours.config
    assert (c.task, c.family, c.encoder_decoder, c.num_layers, c.decoder_layers) == ("seq2seq-lm", "t5", True, 2, 3)
    assert (c.position, c.attention_scale, c.relative_num_buckets, c.relative_max_distance) == ("relative", 1.0, 8, 20)
    original = variant == "t5"
    assert (c.tie_word_embeddings, c.scale_lm_head_input, c.gated_mlp) == (original, original, not original)
    assert c.activation == ("relu" if original else "gelu_tanh")
    assert (ours.lm_head.weight is ours.embed.tokens.weight) == original


def test_logits_match_with_encoder_padding(pair):
    hf, ours, _ = pair
    ids, mask, dec = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert got.shape == (2, 25, 99)
    assert (expected - got).abs().max() < TOL


def test_logits_match_with_decoder_padding(pair):
    hf, ours, _ = pair
    ids, mask, dec = _inputs()
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 20:] = 0  # row 0's decoder input is right-padded
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    assert (expected - got)[dec_mask.bool()].abs().max() < TOL


def test_attention_weights_match(pair):
    hf, ours, _ = pair
    ids, mask, dec = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
        out = ours(ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
    for theirs, mine in ((ref.encoder_attentions, out.attentions), (ref.decoder_attentions, out.decoder_attentions),
                         (ref.cross_attentions, out.cross_attentions)):
        assert len(theirs) == len(mine)
        # padded encoder queries (row 1, positions 21+) see everything in ours; compare real rows only
        assert all((t[0] - m[0]).abs().max() < TOL for t, m in zip(theirs, mine))


def test_cached_decoding_matches_full_forward(pair):
    hf, ours, _ = pair
    ids, mask, dec = _inputs()
    cache = EncoderDecoderCache(ours.config, batch_size=2, max_len=25)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        steps = [ours(ids, attention_mask=mask, decoder_input_ids=dec[:, :4], cache=cache).logits]
        steps += [ours(decoder_input_ids=dec[:, t:t + 1], cache=cache).logits for t in range(4, 25)]
    assert (torch.cat(steps, dim=1) - expected).abs().max() < TOL


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generate_matches_transformers(tmp_path, variant):
    # transformers 5.24's generate sizes its decoder cache by num_layers: keep the stacks equal here
    hf, ours, _ = _pair(tmp_path, variant, num_decoder_layers=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = generate(ours, T5Tokenizer(), prompts, max_new_tokens=12)
    seen = set()
    for row, completion in zip(ref.tolist(), got):
        expected = row[1:]  # drop decoder_start_token_id
        if 1 in expected:  # eos: ours stops there and leaves it out
            expected = expected[:expected.index(1)]
        assert completion.token_ids == expected
        seen.update(expected)
    assert len(seen) > 3  # the weights are spread enough for non-trivial sequences


def test_save_round_trip_loads_in_transformers(pair, tmp_path):
    hf, ours, variant = pair
    save_hf_folder(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == ["T5ForConditionalGeneration"]
    assert saved["scale_decoder_outputs"] == (variant == "t5")
    reloaded = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids, mask, dec = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (expected - got).abs().max() < TOL


def test_bare_t5_model_loads_as_base(tmp_path):
    hf = _hf_model("t5-v1.1", tf.T5Model)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_folder(tmp_path / "hf").eval()
    assert ours.config.task == "base" and not hasattr(ours, "lm_head")
    ids, mask, dec = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state
        out = ours(ids, attention_mask=mask, decoder_input_ids=dec)
    assert out.logits is None
    assert (expected - out.hidden_states).abs().max() < TOL


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 40), (6, 7)])
def test_relative_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-1000, 1001).view(1, -1) + torch.tensor([[0], [3]])  # (2, 2001)
    expected = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    got = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(got, expected)
    assert int(got.max()) < num_buckets
