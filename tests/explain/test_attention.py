"""Attention capture and the aggregations over it."""
from __future__ import annotations

import pytest
import torch

from lmsmith.explain import AttentionMaps, attention_maps, attention_rollout, head_mean
from lmsmith.explain.tokens import tokenize

TEXT = "I hate the movie, unbelievably bad!"


def _reference(model, tokenizer, text):
    ids = torch.tensor([tokenize(tokenizer, text).ids])
    with torch.no_grad():
        return torch.stack([w[0] for w in model(ids, output_attentions=True).attentions])


def test_attention_maps_match_output_attentions(classifier, wp_tokenizer):
    maps = attention_maps(classifier, wp_tokenizer, TEXT)
    assert maps.tokens[0] == "[CLS]" and maps.tokens[-1] == "[SEP]" and maps.special[0]
    assert "unbelievably" not in maps.tokens and "##ably" in maps.tokens  # pieces, as the model sees them
    reference = _reference(classifier, wp_tokenizer, TEXT)
    assert maps.weights.shape == reference.shape == (2, 4, len(maps.tokens), len(maps.tokens))
    assert torch.allclose(maps.weights, reference)
    assert torch.allclose(maps.weights.sum(-1), torch.ones(2, 4, len(maps.tokens)), atol=1e-5)


def test_layer_and_head_selection_slices_the_same_weights(causal_lm, bpe_tokenizer):
    full = attention_maps(causal_lm, bpe_tokenizer, "Hello world")
    part = attention_maps(causal_lm, bpe_tokenizer, "Hello world", layers=[-1], heads=[3, 1])
    assert part.layers == (1,) and part.heads == (3, 1)
    assert torch.equal(part.weights, full.weights[1:2][:, [3, 1]])
    T = len(full.tokens)
    assert torch.all(full.weights.triu(diagonal=1) == 0)  # causal: no token reads the future
    assert full.causal and full.weights.shape[-2:] == (T, T)


@pytest.mark.parametrize("kwargs, match", [({"layers": [2]}, "layer 2 does not exist.*0..1"),
                                           ({"heads": [4]}, "head 4 does not exist.*0..3"),
                                           ({"layers": []}, "no layers chosen")])
def test_bad_layer_or_head_names_the_allowed_range(classifier, wp_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_maps(classifier, wp_tokenizer, TEXT, **kwargs)


def test_rollout_rows_sum_to_one(classifier, wp_tokenizer):
    rollout = attention_maps(classifier, wp_tokenizer, TEXT).rollout()
    assert torch.allclose(rollout.sum(-1), torch.ones(rollout.shape[0]), atol=1e-5)
    assert torch.all(rollout >= 0)


def test_rollout_of_one_layer_is_the_renormalised_residual_mix():
    attn = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])  # (L=1, T, T), already head-averaged
    expected = torch.tensor([[0.5, 0.5], [0.25, 0.75]])  # 0.5·A + 0.5·I (rows already sum to 1)
    assert torch.allclose(attention_rollout(attn), expected)
    two = attention_rollout(torch.cat((attn, attn)))
    assert torch.allclose(two, expected @ expected)  # layers compose by matrix product


def test_rollout_of_self_attention_only_is_the_identity_and_non_square_is_refused():
    eye = torch.eye(3).expand(2, 4, 3, 3)  # (L, H, T, T)
    assert torch.allclose(attention_rollout(eye), torch.eye(3))
    with pytest.raises(ValueError, match="square"):
        attention_rollout(torch.ones(1, 2, 3) / 3)


def test_head_mean_and_summary(classifier, wp_tokenizer):
    maps = attention_maps(classifier, wp_tokenizer, TEXT)
    assert torch.allclose(maps.head_mean(), head_mean(maps.weights))
    assert torch.allclose(maps.head_mean()[0], maps.weights[0].mean(0))
    text = maps.summary(layer=1)
    assert text.startswith("layer 1, token '[CLS]' attends most to:")
    with pytest.raises(ValueError, match="captured layers are"):
        maps.summary(layer=7)


def test_to_dict_round_trips_shapes():
    maps = AttentionMaps(("a", "b"), torch.full((1, 1, 2, 2), 0.5), (0,), (0,), (False, False))
    d = maps.to_dict()
    assert d["weights"] == [[[[0.5, 0.5], [0.5, 0.5]]]] and d["tokens"] == ["a", "b"]
