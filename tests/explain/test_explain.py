"""explain() on tiny random models: the numbers agree with hand computations and with completeness."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models

from lmsmith.explain import Explanation, explain
from lmsmith.explain.targets import token_name
from lmsmith.explain.tokens import tokenize
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.tokenizer import SpecialTokens, Tokenizer
from tests.conftest import requires_cuda

from .conftest import LABELS, spread_weights

TEXT = "I hate the movie, unbelievably bad!"


def _ids(tokenizer, text=TEXT) -> torch.Tensor:
    return torch.tensor([tokenize(tokenizer, text).ids])


def _llama_classifier(tokenizer, std: float = 0.05, **changes) -> Transformer:
    """Bidirectional, pre-norm, RoPE (nothing added to the token embeddings), mean pooling, no final norm."""
    torch.manual_seed(0)
    config = PRESETS["tiny-llama"].replace(vocab_size=tokenizer.vocab_size, task="sequence-classification",
                                           labels=LABELS, classifier_pooler="mean", final_norm=False,
                                           causal=False, max_position_embeddings=64, **changes)
    return spread_weights(Transformer(config), std)


def _linear_classifier(tokenizer) -> Transformer:
    """Zero every block's output projections: each block is the identity, so logits = W·mean(x) + b."""
    model = _llama_classifier(tokenizer)
    with torch.no_grad():
        for block in model.layers:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return model


# --- the numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["log-prob", "logit"])
def test_integrated_gradients_completeness_holds_on_a_nonlinear_classifier(classifier, wp_tokenizer, score):
    e = explain(classifier, wp_tokenizer, TEXT, method="ig", score=score, n_steps=64, progress=False)
    delta = e.target_score - e.baseline_score
    assert abs(delta) > 0.05  # the test means something: the baseline really changes the output
    assert e.completeness_gap == pytest.approx(abs(sum(e.scores) - delta), abs=1e-5)
    assert e.completeness_gap < 1e-3 * max(1.0, abs(delta))
    coarse = explain(classifier, wp_tokenizer, TEXT, method="ig", score=score, n_steps=2, progress=False)
    assert coarse.completeness_gap > e.completeness_gap  # the gap tells users when steps are too few
    assert coarse.relative_gap > 0.05 and "raise n_steps" in coarse.summary() and "raise n_steps" in coarse.to_html()
    assert e.relative_gap < 1e-3 and "raise n_steps" not in e.summary() + e.to_html()


def test_integrated_gradients_completeness_holds_for_a_continuation(causal_lm, bpe_tokenizer):
    e = explain(causal_lm, bpe_tokenizer, "The quick brown fox", method="ig", target=" jumps over",
                n_steps=48, batch_size=12, progress=False)
    assert e.target == " jumps over" and e.tokens[0] == "<|im_start|>" and e.special[0]
    assert e.scores[0] == 0.0  # BOS stays in the baseline, so it gets no attribution
    assert e.completeness_gap < 1e-3 * max(1.0, abs(e.target_score - e.baseline_score))


def test_gradient_x_input_equals_the_hand_computed_linear_value(wp_tokenizer):
    model = _linear_classifier(wp_tokenizer)
    e = explain(model, wp_tokenizer, TEXT, method="gradxinput", target="pos", score="logit")
    x = model.embed.tokens(_ids(wp_tokenizer))[0]
    expected = (x @ model.classifier.out.weight[1]) / x.shape[0]  # logit = W·mean_t(x_t) + b
    assert torch.allclose(torch.tensor(e.scores), expected.detach(), atol=1e-5)
    assert e.target_score == pytest.approx(float(model(_ids(wp_tokenizer)).logits[0, 1].detach()), abs=1e-5)


def test_ig_on_a_linear_model_with_zero_baseline_equals_gradient_x_input(wp_tokenizer):
    model = _linear_classifier(wp_tokenizer)
    kw = {"target": "pos", "score": "logit"}
    ig = explain(model, wp_tokenizer, TEXT, method="ig", baseline="zero", n_steps=3, progress=False, **kw)
    gxi = explain(model, wp_tokenizer, TEXT, method="gradxinput", **kw)
    ordinary = [i for i, sp in enumerate(ig.special) if not sp]
    assert torch.allclose(torch.tensor(ig.scores)[ordinary], torch.tensor(gxi.scores)[ordinary], atol=1e-5)
    assert ig.completeness_gap < 1e-5


def test_occlusion_equals_logit_drops_computed_by_hand(classifier, wp_tokenizer):
    e = explain(classifier, wp_tokenizer, TEXT, method="occlusion", target="neg", score="logit", batch_size=3)
    ids = _ids(wp_tokenizer)
    with torch.no_grad():
        full = classifier(ids).logits[0, 0]
        for i, special in enumerate(e.special):
            occluded = ids.clone()
            occluded[0, i] = wp_tokenizer.pad_id
            expected = 0.0 if special else float(full - classifier(occluded).logits[0, 0])
            assert e.scores[i] == pytest.approx(expected, abs=1e-5), e.tokens[i]
    assert any(abs(s) > 1e-3 for s in e.scores)


@pytest.mark.parametrize("method", ["ig", "gradxinput", "occlusion"])
def test_a_planted_token_gets_all_the_attribution(wp_tokenizer, method):
    # Every embedding is zero except that of "hate" (the pad baseline is zero too): with RoPE, RMSNorm
    # and no biases a zero token carries nothing, so the output provably depends on "hate" alone.
    # norm_eps=1 keeps RMSNorm smooth near zero (at 1e-6 it jumps from 0 to unit scale right at the
    # baseline, which no quadrature follows: the completeness gap would rightly be large).
    model = _llama_classifier(wp_tokenizer, std=0.2, norm_eps=1.0)
    planted = wp_tokenizer.token_to_id("hate")
    with torch.no_grad():
        keep = model.embed.tokens.weight[planted].clone() * 3
        model.embed.tokens.weight.zero_()
        model.embed.tokens.weight[planted] = keep
    e = explain(model, wp_tokenizer, TEXT, method=method, n_steps=32, progress=False)
    top = max(range(len(e.scores)), key=lambda i: abs(e.scores[i]))
    assert e.tokens[top] == "hate" and abs(e.scores[top]) > 1e-2
    assert all(s == 0.0 for i, s in enumerate(e.scores) if i != top)
    if method == "ig":  # then "hate" carries the whole change from the baseline
        assert e.scores[top] == pytest.approx(e.target_score - e.baseline_score, abs=1e-4)


def test_rollout_scores_are_the_row_the_output_is_read_from(classifier, wp_tokenizer, causal_lm, bpe_tokenizer):
    from lmsmith.explain import attention_maps

    from .conftest import tiny_classifier

    cls_pooled = tiny_classifier(wp_tokenizer, classifier_pooler="cls_dense_tanh")
    cases = [(cls_pooled, wp_tokenizer, lambda r: r[0]), (classifier, wp_tokenizer, lambda r: r.mean(0)),
             (causal_lm, bpe_tokenizer, lambda r: r[-1])]
    for model, tokenizer, row in cases:
        e = explain(model, tokenizer, TEXT, method="rollout")
        expected = row(attention_maps(model, tokenizer, TEXT).rollout())
        assert torch.allclose(torch.tensor(e.scores), expected, atol=1e-6)
        assert sum(e.scores) == pytest.approx(1.0, abs=1e-5) and e.completeness_gap is None


# --- targets, predictions, words --------------------------------------------------------------------
def test_classifier_default_target_is_the_prediction(classifier, wp_tokenizer):
    e = explain(classifier, wp_tokenizer, TEXT, method="gradxinput")
    probs = classifier(_ids(wp_tokenizer)).logits[0].softmax(-1)
    assert e.prediction == LABELS[int(probs.argmax())] == e.target
    assert e.probabilities == pytest.approx(dict(zip(LABELS, probs.tolist())), abs=1e-6)
    assert e.target_probability == pytest.approx(e.probabilities[e.target], abs=1e-6)
    other = explain(classifier, wp_tokenizer, TEXT, method="gradxinput", target=1 - LABELS.index(e.target))
    assert other.target != e.target and other.prediction == e.prediction


def test_causal_lm_default_target_is_the_greedy_next_token(causal_lm, bpe_tokenizer):
    e = explain(causal_lm, bpe_tokenizer, "Hello world", method="gradxinput")
    logits = causal_lm(_ids(bpe_tokenizer, "Hello world")).logits[0, -1].detach()
    assert e.target == token_name(bpe_tokenizer, int(logits.argmax())) == e.prediction
    assert e.target_probability == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)
    assert e.target_score == pytest.approx(float(logits.log_softmax(-1).max()), abs=1e-5)
    assert len(e.probabilities) == 5 and max(e.probabilities.values()) == pytest.approx(e.target_probability)


def test_continuation_probability_is_the_product_of_next_token_probabilities(causal_lm, bpe_tokenizer):
    cont = bpe_tokenizer.encode(" today?", add_special_tokens=False)
    assert len(cont) > 1
    e = explain(causal_lm, bpe_tokenizer, "How are you", method="gradxinput", target=" today?")
    ids = _ids(bpe_tokenizer, "How are you")
    full = torch.cat((ids, torch.tensor([cont])), dim=1)
    logp = causal_lm(full).logits[0].detach().log_softmax(-1)
    start = ids.shape[1] - 1
    expected = sum(float(logp[start + j, t]) for j, t in enumerate(cont))
    assert e.target_score == pytest.approx(expected, abs=1e-4)
    assert e.target_probability == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-4)
    assert len(e.tokens) == ids.shape[1]  # the continuation is the target, not an input to explain


def test_word_pieces_merge_into_words_with_summed_scores(classifier, wp_tokenizer):
    tokens = explain(classifier, wp_tokenizer, TEXT, method="ig", n_steps=16, progress=False)
    words = tokens.words()
    assert "##ably" in tokens.tokens and "unbelievably" in words.tokens and words.unit == "word"
    pieces = [i for i, t in enumerate(tokens.tokens) if t in ("un", "##believ", "##ably")]
    assert words.scores[words.tokens.index("unbelievably")] == pytest.approx(sum(tokens.scores[i] for i in pieces))
    assert sum(words.scores) == pytest.approx(sum(tokens.scores), abs=1e-6)  # completeness survives merging
    assert words.tokens[0] == "[CLS]" and words.special[0] and words.tokens[1] == "I"  # original casing
    merged = explain(classifier, wp_tokenizer, TEXT, method="ig", n_steps=16, progress=False, merge_words=True)
    assert merged.tokens == words.tokens and merged.words() is merged


def test_normalisation_ignores_special_tokens():
    e = Explanation(text="a b", task="causal-lm", method="gradient-x-input", tokens=("<s>", "a", "b"),
                    scores=(10.0, 0.5, -0.25), special=(True, False, False), target="c", target_probability=0.5,
                    prediction="c", probabilities={"c": 0.5}, score="log-prob", target_score=-0.69)
    assert e.normalized() == (1.0, 1.0, -0.5)
    assert e.top(1) == [("a", 0.5)] and e.top(5, sign=-1) == [("b", -0.25)]


def test_dropout_is_off_while_explaining_and_the_mode_is_restored(wp_tokenizer):
    from .conftest import tiny_classifier

    model = tiny_classifier(wp_tokenizer, hidden_dropout=0.5, attention_dropout=0.5)
    model.train()
    first = explain(model, wp_tokenizer, TEXT, method="gradxinput")
    second = explain(model, wp_tokenizer, TEXT, method="gradxinput")
    assert first.scores == second.scores and model.training
    from lmsmith.explain import attention_maps

    maps = [attention_maps(model, wp_tokenizer, TEXT).weights for _ in range(2)]
    assert torch.equal(maps[0], maps[1]) and model.training


# --- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"method": "lime"}, r"unknown method 'lime'; choose one of .*integrated-gradients"),
    ({"method": "attention"}, "attention_maps"),
    ({"target": "maybe"}, r"unknown target 'maybe'; this classifier's labels are \['neg', 'pos'\]"),
    ({"target": 5}, "labels are"),
    ({"score": "prob"}, r"unknown score 'prob'; choose one of \('log-prob', 'logit'\)"),
    ({"baseline": "mean"}, r"unknown baseline 'mean'; choose one of \('pad', 'zero'\)"),
    ({"n_steps": 0}, "n_steps must be a positive integer"),
])
def test_bad_arguments_name_the_allowed_values(classifier, wp_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        explain(classifier, wp_tokenizer, TEXT, **kwargs)


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text_is_refused(classifier, wp_tokenizer, text):
    with pytest.raises(ValueError, match="non-empty string"):
        explain(classifier, wp_tokenizer, text)


def test_too_long_text_and_unsupported_task_are_refused(classifier, wp_tokenizer):
    with pytest.raises(ValueError, match="reads at most 64"):
        explain(classifier, wp_tokenizer, "bad " * 80)
    mlm = Transformer(PRESETS["tiny-bert"].replace(vocab_size=wp_tokenizer.vocab_size))
    with pytest.raises(ValueError, match="explain supports models with task in"):
        explain(mlm, wp_tokenizer, TEXT)


def test_causal_lm_target_errors(causal_lm, bpe_tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        explain(causal_lm, bpe_tokenizer, "Hello", target=10**6)
    with pytest.raises(ValueError, match="non-empty continuation"):
        explain(causal_lm, bpe_tokenizer, "Hello", target="")


def test_pad_baseline_needs_a_pad_token(classifier, wp_tokenizer):
    no_pad = Tokenizer(Backend(models.WordLevel({"[UNK]": 0, "bad": 1}, unk_token="[UNK]")),
                       SpecialTokens(unk="[UNK]"))
    from tokenizers import pre_tokenizers

    no_pad.backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="needs a tokenizer with a pad token"):
        explain(classifier, no_pad, "bad", baseline="pad")
    e = explain(classifier, no_pad, "bad bad", n_steps=4, progress=False)  # default falls back to zero
    assert e.baseline == "zero" and e.special == (False, False)


@pytest.mark.parametrize("method", ["ig", "gradxinput", "occlusion", "rollout"])
@pytest.mark.usefixtures("exact_fp32_on_cuda")
@pytest.mark.cuda
@requires_cuda
def test_explain_on_a_gpu_matches_the_cpu(wp_tokenizer, method):
    from .conftest import tiny_classifier

    model = tiny_classifier(wp_tokenizer)
    on_cpu = explain(model, wp_tokenizer, TEXT, method=method, n_steps=16, progress=False)
    on_gpu = explain(model.to("cuda"), wp_tokenizer, TEXT, method=method, n_steps=16, progress=False)
    assert on_gpu.tokens == on_cpu.tokens and on_gpu.target == on_cpu.target
    assert torch.allclose(torch.tensor(on_gpu.scores), torch.tensor(on_cpu.scores), atol=1e-4)


def test_progress_bar_shows_integration_batches(classifier, wp_tokenizer, capsys):
    explain(classifier, wp_tokenizer, TEXT, method="ig", n_steps=8, batch_size=2, progress=True)
    assert "integrated gradients" in capsys.readouterr().err
    explain(classifier, wp_tokenizer, TEXT, method="ig", n_steps=8, batch_size=2, progress=False)
    assert "integrated gradients" not in capsys.readouterr().err


def test_package_exports_resolve():
    import lmsmith.explain as package

    assert all(getattr(package, name) is not None for name in package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018
