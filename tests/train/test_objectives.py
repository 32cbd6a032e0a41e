"""Objectives: losses against hand-written references, evaluation metrics, distillation."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmsmith.data import encode_chat
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.tokenizer import Tokenizer
from lmsmith.train.objectives import (
    Distillation,
    causal_lm,
    chat_sft,
    classification_scores,
    distillation_kl,
    hidden_mse,
    masked_lm,
    objective_for,
    sequence_classification,
    token_classification,
    token_cross_entropy,
)

from .conftest import save_chat_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ("neg", "neu", "pos")


def tiny(task="causal-lm", preset="tiny-llama", **changes):
    torch.manual_seed(0)
    labels = LABELS if "classification" in task else ()
    return Transformer(PRESETS[preset].replace(task=task, labels=labels, num_layers=1, **changes)).eval()


def test_causal_lm_loss_shifts_by_one_and_ignores_minus_100():
    model = tiny()
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    loss, metrics = causal_lm()(model, {"input_ids": ids, "labels": labels})
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-6) and metrics["loss"] == pytest.approx(float(expected.detach()))
    assert causal_lm().num_targets({"labels": labels}) == 9 + 6


def test_masked_lm_loss_is_unshifted():
    model = tiny("masked-lm", "tiny-bert")
    ids = torch.randint(5, 512, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    loss, _ = masked_lm()(model, {"input_ids": ids, "labels": labels})
    logits = model(ids).logits
    assert torch.allclose(loss, F.cross_entropy(logits[:, 3], ids[:, 3]), atol=1e-6)
    assert masked_lm().num_targets({"labels": labels}) == 2


def test_batch_without_targets_gives_zero_loss_that_backpropagates():
    model = tiny().train()
    ids = torch.randint(0, 512, (1, 6))
    loss, _ = causal_lm()(model, {"input_ids": ids, "labels": torch.full_like(ids, -100)})
    assert float(loss.detach()) == 0.0
    loss.backward()  # no NaN, and the graph exists
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_language_model_evaluation_reports_token_weighted_loss_and_perplexity():
    model = tiny()
    batches = [{"input_ids": (ids := torch.randint(0, 512, (2, n))), "labels": ids} for n in (5, 9)]
    metrics = causal_lm().evaluate(model, batches)
    with torch.no_grad():
        nll = sum(float(token_cross_entropy(*_shift(model, b), reduction="sum")) for b in batches)
    assert metrics["tokens"] == 2 * 4 + 2 * 8
    assert metrics["loss"] == pytest.approx(nll / 24, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    assert 0 <= metrics["token_accuracy"] <= 1


def _shift(model, batch):
    logits = model(batch["input_ids"]).logits
    return logits[:, :-1], batch["labels"][:, 1:]


def test_sequence_classification_loss_and_metrics():
    model = tiny("sequence-classification", "tiny-bert")
    ids = torch.randint(5, 512, (4, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 1])}
    objective = sequence_classification(LABELS)
    loss, metrics = objective(model, batch)
    assert 0 <= metrics["accuracy"] <= 1
    logits = model(ids, attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(loss, F.cross_entropy(logits, batch["labels"]), atol=1e-6)
    result = objective.evaluate(model, [batch])
    assert result["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert {"accuracy", "macro_f1", "precision/pos", "recall/neg"} <= set(result)


def test_classification_scores_match_hand_counts():
    scores = classification_scores([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], LABELS)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["precision/neg"] == pytest.approx(1 / 2) and scores["recall/neg"] == pytest.approx(1 / 2)
    assert scores["precision/neu"] == pytest.approx(1 / 2) and scores["recall/neu"] == pytest.approx(1.0)
    assert scores["precision/pos"] == pytest.approx(1.0) and scores["recall/pos"] == pytest.approx(2 / 3)
    f1 = [0.5, 2 / 3, 0.8]
    assert scores["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_token_classification_ignores_special_positions():
    model = tiny("token-classification", "tiny-bert")
    ids = torch.randint(5, 512, (2, 6))
    labels = torch.tensor([[-100, 0, 1, 2, -100, -100], [-100, 2, 2, -100, -100, -100]])
    objective = token_classification(LABELS)
    loss, _ = objective(model, {"input_ids": ids, "labels": labels})
    logits = model(ids).logits
    keep = labels != -100
    assert torch.allclose(loss, F.cross_entropy(logits[keep], labels[keep]), atol=1e-6)
    assert objective.num_targets({"labels": labels}) == 5
    assert objective.evaluate(model, [{"input_ids": ids, "labels": labels}])["accuracy"] <= 1


def test_chat_sft_loss_counts_only_assistant_tokens(tmp_path):
    tokenizer = Tokenizer.from_folder(save_chat_tokenizer(tmp_path))
    messages = [{"role": "user", "content": "the cat sat on a mat"}, {"role": "assistant", "content": "positive"}]
    feature = encode_chat(messages, tokenizer, max_length=64)
    ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor([feature["labels"]])
    model = tiny(vocab_size=tokenizer.vocab_size)
    loss, _ = chat_sft()(model, {"input_ids": ids, "labels": labels})
    assistant = labels[0] != -100
    assert 0 < int(assistant.sum()) < len(feature["input_ids"]) / 2
    logits = model(ids).logits[0, :-1]
    targets = labels[0, 1:]
    expected = F.cross_entropy(logits[targets != -100], targets[targets != -100])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert tokenizer.decode(labels[0][assistant].tolist()) == "positive<|im_end|>"


def test_distillation_kl_matches_the_formula():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    T = 2.0
    p_t = F.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert torch.allclose(distillation_kl(s, t, T), expected, atol=1e-6)
    assert float(distillation_kl(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([True, False, True])
    assert torch.allclose(distillation_kl(s, t, T, mask), distillation_kl(s[mask], t[mask], T), atol=1e-6)


def test_distillation_objective_mixes_kl_and_task_loss():
    student, teacher = tiny(), tiny(hidden_size=64)
    torch.manual_seed(1)
    teacher = Transformer(teacher.config).eval()
    ids = torch.randint(0, 512, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    task_loss, _ = causal_lm()(student, batch)
    pure_task = Distillation(causal_lm(), teacher, temperature=2.0, alpha=0.0)
    assert torch.allclose(pure_task(student, batch)[0], task_loss, atol=1e-6)
    mixed, metrics = Distillation(causal_lm(), teacher, temperature=2.0, alpha=0.7)(student, batch)
    kl = distillation_kl(student(ids).logits[:, :-1], teacher(ids).logits[:, :-1], 2.0)
    assert torch.allclose(mixed, 0.7 * kl + 0.3 * task_loss, atol=1e-5)
    assert metrics["kl"] == pytest.approx(float(kl.detach()), rel=1e-5)
    self_taught = Distillation(causal_lm(), student, temperature=3.0, alpha=1.0)
    assert float(self_taught(student, batch)[0]) == pytest.approx(0.0, abs=1e-5)
    precomputed = {**batch, "teacher_logits": teacher(ids).logits}
    assert torch.allclose(Distillation(causal_lm(), None, 2.0, 0.7)(student, precomputed)[0], mixed, atol=1e-6)
    assert list(Distillation(causal_lm(), teacher).parameters()) == []  # the teacher is not trained


def test_distillation_hidden_state_term_and_errors():
    student = tiny()
    ids = torch.randint(0, 512, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    with_hidden = Distillation(causal_lm(), student, alpha=0.5, hidden_weight=2.0)
    loss, metrics = with_hidden(student, batch)
    assert metrics["hidden_mse"] == pytest.approx(0.0, abs=1e-10)  # a student is its own perfect teacher
    assert float(loss.detach()) == pytest.approx(0.5 * metrics["task_loss"], rel=1e-5)
    wide = torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match="projection"):
        hidden_mse(torch.randn(2, 8, 32), wide)
    assert float(hidden_mse(torch.randn(2, 8, 32), wide, torch.nn.Linear(32, 64)).detach()) > 0
    with pytest.raises(ValueError, match="temperature"):
        Distillation(causal_lm(), student, temperature=0)
    with pytest.raises(ValueError, match="teacher"):
        Distillation(causal_lm(), None)(student, batch)


def test_objective_for_names_and_errors():
    assert objective_for("masked-lm").name == "masked-lm"
    assert objective_for("sequence-classification", LABELS).labels == LABELS
    with pytest.raises(ValueError, match="needs the class labels"):
        objective_for("token-classification")
    with pytest.raises(ValueError, match="unknown objective"):
        objective_for("regression")
