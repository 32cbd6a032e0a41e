"""The encoder-decoder layout (T5) of the generic Transformer: caching, generation, errors, config."""
import pytest
import torch

from lmsmith.generation import GenerationConfig, generate, iter_tokens
from lmsmith.model.cache import EncoderDecoderCache, StaticKVCache
from lmsmith.model.config import PRESETS, ModelConfig
from lmsmith.model.ops import relative_position_bucket
from lmsmith.model.transformer import Transformer
from tests.fakes import ByteTokenizer


class T5Tokenizer(ByteTokenizer):
    eos_id, eos_ids = 1, {1}


def tiny(**changes):
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-t5"].replace(**{"vocab_size": 259, **changes})).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy decoding is not one repeated token
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def _inputs(B=2, S=9, T=6):
    torch.manual_seed(1)
    ids = torch.randint(3, 259, (B, S))
    mask = torch.ones_like(ids)
    mask[-1, 5:] = 0  # the last row is right-padded
    return ids, mask, torch.randint(3, 259, (B, T))


def test_state_dict_names_follow_our_style():
    keys = set(tiny().state_dict())
    assert {"embed.tokens.weight", "encoder.layers.0.attn.q_proj.weight", "encoder.layers.0.attn.relative_bias.weight",
            "decoder.layers.1.cross_attn.q_proj.weight", "decoder.layers.1.cross_attn_norm.weight",
            "decoder.layers.0.attn.relative_bias.weight", "encoder.norm.weight", "decoder.norm.weight",
            "lm_head.weight"} <= keys
    assert "encoder.layers.1.attn.relative_bias.weight" not in keys  # one table per stack, in layer 0
    assert not any(k.startswith("layers.") for k in keys)


def test_cached_decoding_equals_uncached():
    model = tiny()
    ids, mask, dec = _inputs()
    cache = EncoderDecoderCache(model.config, batch_size=2, max_len=6)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
        steps = [model(ids, attention_mask=mask, decoder_input_ids=dec[:, :2], cache=cache).logits]
        steps += [model(decoder_input_ids=dec[:, t:t + 1], cache=cache).logits for t in range(2, 6)]
    assert cache.length == 6
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_precomputed_encoder_states_give_the_same_logits():
    model = tiny()
    ids, mask, dec = _inputs()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, decoder_input_ids=dec)
        encoded = model.encode(ids, attention_mask=mask).hidden_states
        again = model(attention_mask=mask, decoder_input_ids=dec, encoder_hidden_states=encoded)
    assert torch.equal(full.encoder_hidden_states, encoded)
    assert torch.allclose(full.logits, again.logits, atol=1e-6)


def test_encoder_padding_does_not_change_the_real_rows():
    model = tiny()
    ids, _, dec = _inputs(B=1)
    padded = torch.cat((ids, torch.zeros(1, 4, dtype=torch.long)), dim=1)
    mask = torch.cat((torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)), dim=1)
    with torch.no_grad():
        alone = model(ids, decoder_input_ids=dec).logits
        with_pad = model(padded, attention_mask=mask, decoder_input_ids=dec).logits
    assert (alone - with_pad).abs().max() < 1e-4


def test_attention_maps_of_all_three_kinds():
    model = tiny()
    ids, mask, dec = _inputs()
    out = model(ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True, output_hidden_states=True)
    assert [a.shape for a in out.attentions] == [(2, 4, 9, 9)] * 2  # encoder self-attention
    assert [a.shape for a in out.decoder_attentions] == [(2, 4, 6, 6)] * 2
    assert [a.shape for a in out.cross_attentions] == [(2, 4, 6, 9)] * 2
    assert out.decoder_attentions[0].triu(1).abs().max() == 0  # causal
    assert out.cross_attentions[0][1, :, :, 5:].abs().max() == 0  # encoder padding gets no weight
    assert torch.allclose(out.cross_attentions[1].sum(-1), torch.ones(2, 4, 6))
    assert len(out.all_hidden_states) == 3 and len(out.decoder_all_hidden_states) == 3
    assert torch.equal(out.decoder_all_hidden_states[-1], out.hidden_states)


def test_gradients_reach_the_shared_relative_tables_and_checkpointing_agrees():
    model = tiny().train()
    ids, mask, dec = _inputs()
    model(ids, attention_mask=mask, decoder_input_ids=dec).logits.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert expected["encoder.layers.0.attn.relative_bias.weight"].abs().sum() > 0
    assert expected["decoder.layers.0.attn.relative_bias.weight"].abs().sum() > 0
    model.zero_grad()
    model.activation_checkpointing = True
    model(ids, attention_mask=mask, decoder_input_ids=dec).logits.sum().backward()
    assert all(torch.allclose(p.grad, expected[n], atol=1e-5) for n, p in model.named_parameters())


def test_greedy_generate_equals_step_by_step_argmax():
    model = tiny()
    prompt = [5, 6, 7, 8]
    got = generate(model, T5Tokenizer(), [prompt], max_new_tokens=6, stop_token_ids=())[0].token_ids
    dec = [0]
    with torch.no_grad():
        for _ in range(6):
            logits = model(torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])).logits[0, -1]
            dec.append(int(logits.argmax()))
    assert got == dec[1:]
    assert len(set(got)) > 1


def test_batched_generate_equals_one_prompt_at_a_time():
    model = tiny()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    together = generate(model, T5Tokenizer(), prompts, max_new_tokens=5, stop_token_ids=())
    alone = [generate(model, T5Tokenizer(), [p], max_new_tokens=5, stop_token_ids=())[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_sampled_generate_is_reproducible_with_a_seed():
    model = tiny()
    settings = {"max_new_tokens": 8, "temperature": 1.5, "top_k": 50, "seed": 7, "stop_token_ids": ()}
    first = generate(model, T5Tokenizer(), [[5, 6, 7]], **settings)[0].token_ids
    again = generate(model, T5Tokenizer(), [[5, 6, 7]], **settings)[0].token_ids
    greedy = generate(model, T5Tokenizer(), [[5, 6, 7]], max_new_tokens=8, stop_token_ids=())[0].token_ids
    assert first == again and len(first) == 8
    assert first != greedy
    assert all(0 <= t < 259 for t in first)


def test_iter_tokens_stops_at_the_decoder_budget():
    model = tiny(max_position_embeddings=8)
    steps = list(iter_tokens(model, [[5, 6, 7, 8, 9, 10, 11, 12]], GenerationConfig(max_new_tokens=50), 0))
    assert len(steps) == 7  # the decoder window holds its start token + 7 new ones


# --- errors -------------------------------------------------------------------------------------------------
def test_missing_decoder_inputs_are_named():
    model = tiny()
    ids, _, dec = _inputs()
    with pytest.raises(ValueError, match="needs decoder_input_ids .*decoder_start_token_id=0"):
        model(ids)
    with pytest.raises(ValueError, match="needs input_ids \\(or encoder_hidden_states\\)"):
        model(decoder_input_ids=dec)


def test_too_long_inputs_name_the_numbers():
    model = tiny(max_position_embeddings=8)
    with pytest.raises(ValueError, match="encoder input of 9 tokens exceeds the context window of 8 tokens"):
        model(torch.ones(1, 9, dtype=torch.long), decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder sequence of 10 tokens exceeds the context window of 8"):
        model(torch.ones(1, 3, dtype=torch.long), decoder_input_ids=torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt has 9 tokens but the encoder's context window is 8 tokens"):
        generate(model, T5Tokenizer(), [list(range(3, 12))], max_new_tokens=2)
    kept = generate(model, T5Tokenizer(), [list(range(3, 12))], max_new_tokens=2, truncate_prompt=True)[0]
    assert kept.prompt_tokens == 9 and len(kept.token_ids) <= 2


def test_a_used_cache_refuses_a_second_input():
    model = tiny()
    ids, _, dec = _inputs()
    cache = EncoderDecoderCache(model.config, batch_size=2, max_len=8)
    model(ids, decoder_input_ids=dec[:, :1], cache=cache)
    with pytest.raises(ValueError, match="cache already holds an encoded input"):
        model(ids, decoder_input_ids=dec[:, 1:2], cache=cache)


def test_decoder_inputs_to_a_decoder_only_model_are_refused():
    model = Transformer(PRESETS["tiny-llama"]).eval()
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="decoder_input_ids and encoder_hidden_states are for encoder-decoder"):
        model(ids, decoder_input_ids=ids)
    with pytest.raises(ValueError, match="needs input_ids"):
        model()
    with pytest.raises(ValueError, match="encode\\(\\) is for encoder-decoder models"):
        model.encode(ids)


def test_generate_without_a_start_token_is_refused():
    model = tiny(decoder_start_token_id=None)
    with pytest.raises(ValueError, match="no decoder_start_token_id"):
        generate(model, T5Tokenizer(), [[5, 6]], max_new_tokens=2)


@pytest.mark.parametrize("bad,match", [
    ({"task": "causal-lm"}, "encoder-decoder model supports task"),
    ({"encoder_decoder": False}, "task='seq2seq-lm' needs encoder_decoder=True"),
    ({"num_decoder_layers": 0}, "num_decoder_layers must be a positive integer"),
    ({"relative_num_buckets": 2}, "relative_num_buckets=2 must be >= 4"),
    ({"relative_max_distance": 16}, "relative_max_distance=16 must exceed relative_num_buckets // 2 = 16"),
])
def test_invalid_encoder_decoder_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        PRESETS["tiny-t5"].replace(**bad)


def test_relative_positions_without_an_encoder_decoder_are_not_implemented():
    with pytest.raises(NotImplementedError, match="encoder-decoder models \\(T5\\) only"):
        Transformer(PRESETS["tiny-llama"].replace(position="relative"))


def test_config_round_trips_and_defaults_keep_decoder_only_models_as_they_were():
    cfg = PRESETS["tiny-t5"].replace(num_decoder_layers=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.decoder_layers == 3 and PRESETS["tiny-llama"].decoder_layers == 2
    llama = PRESETS["tiny-llama"]
    assert (llama.encoder_decoder, llama.attention_scale, llama.scale_lm_head_input) == (False, None, False)


def test_cache_reorder_keeps_rows_of_every_part():
    model = tiny()
    ids, mask, dec = _inputs()
    cache = EncoderDecoderCache(model.config, batch_size=2, max_len=4)
    model(ids, attention_mask=mask, decoder_input_ids=dec[:, :1], cache=cache)
    cache.reorder(torch.tensor([1]))
    assert cache.memory_kv[0][0].shape[0] == 1 and cache.memory_mask.shape[0] == 1
    with torch.no_grad():
        step = model(decoder_input_ids=dec[1:, 1:2], cache=cache).logits
        full = model(ids[1:], attention_mask=mask[1:], decoder_input_ids=dec[1:, :2]).logits
    assert (step[:, -1] - full[:, -1]).abs().max() < 1e-4


def test_static_cache_can_size_for_the_decoder_stack():
    cfg = PRESETS["tiny-t5"].replace(num_decoder_layers=3)
    assert len(StaticKVCache(cfg, 1, 4, num_layers=cfg.decoder_layers).k) == 3
    assert len(EncoderDecoderCache(cfg, 1, 4).self_attn.k) == 3


def test_relative_buckets_are_symmetric_halves_and_grow_with_distance():
    distance = torch.arange(0, 300)
    after = relative_position_bucket(distance, True, 32, 128)
    before = relative_position_bucket(-distance, True, 32, 128)
    assert torch.equal(after[1:] - 16, before[1:])  # keys after the query use the upper half
    assert (before.diff() >= 0).all() and int(before.max()) == 15
    assert torch.equal(before[:8], torch.arange(8))  # exact buckets for short distances
    causal = relative_position_bucket(-distance, False, 32, 128)
    assert (causal.diff() >= 0).all() and int(causal.max()) == 31
    assert int(relative_position_bucket(torch.tensor(5), False, 32, 128)) == 0  # future keys share bucket 0


def test_lora_and_int8_quantization_wrap_t5_linears_by_name():
    from lmsmith.compress.quantize import quantize_model
    from lmsmith.train.peft.config import LoraConfig
    from lmsmith.train.peft.core import apply_peft

    ids, mask, dec = _inputs()
    model = tiny()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    adapted = apply_peft(model, LoraConfig(target_modules=("q_proj", "v_proj")))
    wrapped = [n for n, m in adapted.named_modules() if n.endswith("cross_attn.q_proj") and hasattr(m, "lora_A")]
    assert len(wrapped) == 2
    with torch.no_grad():  # LoRA's B starts at zero: same function until trained
        assert torch.allclose(adapted(ids, attention_mask=mask, decoder_input_ids=dec).logits, ref, atol=1e-5)
    # default init: tiny()'s spread-out weights make unscaled attention sharp enough to amplify int8 noise
    torch.manual_seed(0)
    quantized = Transformer(PRESETS["tiny-t5"].replace(vocab_size=259)).eval()
    with torch.no_grad():
        ref = quantized(ids, attention_mask=mask, decoder_input_ids=dec).logits
        quantize_model(quantized, "int8")
        got = quantized(ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert type(quantized.decoder.layers[0].cross_attn.k_proj).__name__ == "Int8WeightOnlyLinear"
    assert (got - ref).norm() < 0.05 * ref.norm()


def test_bfloat16_decoding_is_close_to_fp32():
    torch.manual_seed(0)  # default init (see the int8 test: tiny()'s weights amplify rounding)
    model = Transformer(PRESETS["tiny-t5"].replace(vocab_size=259)).eval()
    ids, mask, dec = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
        model = model.to(torch.bfloat16)
        cache = EncoderDecoderCache(model.config, batch_size=2, max_len=6, dtype=torch.bfloat16)
        steps = [model(ids, attention_mask=mask, decoder_input_ids=dec[:, :3], cache=cache).logits]
        steps += [model(decoder_input_ids=dec[:, t:t + 1], cache=cache).logits for t in range(3, 6)]
    low = torch.cat(steps, dim=1).float()
    assert (low - ref).norm() < 0.05 * ref.norm()


def test_t5_dropout_rate_reaches_the_mlp_and_the_stack_outputs():
    from lmsmith.model.families import config_from_hf

    hf = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 64, "d_model": 16,
          "d_kv": 4, "d_ff": 32, "num_layers": 1, "num_heads": 4, "dropout_rate": 0.2,
          "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    c = config_from_hf(hf, task="seq2seq-lm")
    assert (c.hidden_dropout, c.attention_dropout, c.mlp_dropout, c.final_dropout) == (0.2, 0.2, 0.2, 0.2)


def test_mlp_and_final_dropout_act_in_training_only():
    torch.manual_seed(0)
    plain = Transformer(PRESETS["tiny-t5"]).eval()
    noisy = Transformer(PRESETS["tiny-t5"].replace(mlp_dropout=0.5, final_dropout=0.5))
    noisy.load_state_dict(plain.state_dict())  # dropout adds no weights: same keys
    inputs = {"input_ids": torch.randint(3, 64, (2, 7)), "decoder_input_ids": torch.randint(3, 64, (2, 5))}
    with torch.no_grad():
        torch.testing.assert_close(noisy.eval()(**inputs).logits, plain(**inputs).logits)
        noisy.train()
        first, second = noisy(**inputs).logits, noisy(**inputs).logits
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, plain(**inputs).logits)
    decoder_only = Transformer(PRESETS["tiny-llama"])
    assert all(block.mlp.dropout is None for block in decoder_only.layers)  # nothing added to the decode path
