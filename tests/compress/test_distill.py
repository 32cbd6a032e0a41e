"""Students from teachers, and distillation through the training loop's objective."""
from dataclasses import replace

import pytest
import torch

from lmsmith.compress.batches import (
    classification_batches,
    classification_features,
    classification_train_data,
)
from lmsmith.compress.distill import (
    distill,
    every_kth_layer,
    mean_kl,
    spread_layers,
    student_from_config,
    student_from_teacher,
    task_objective,
)
from lmsmith.train.loop import TrainSettings, train

from .conftest import TINY_LABELS, tiny_classifier, tiny_records

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_choices():
    assert every_kth_layer(6, 2) == [0, 2, 4]
    assert spread_layers(6, 3) == [0, 3, 5]
    assert spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert spread_layers(6, 1) == [5] and spread_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="every"):
        every_kth_layer(6, 0)
    with pytest.raises(ValueError, match="num_layers"):
        spread_layers(6, 7)


def test_student_from_teacher_copies_the_chosen_layers(tok):
    teacher = tiny_classifier(tok, num_layers=4)
    student = student_from_teacher(teacher, [1, 3])
    assert student.config.num_layers == 2 and teacher.config.num_layers == 4
    for new, old in enumerate([1, 3]):
        for (name, p), (_, q) in zip(student.layers[new].named_parameters(), teacher.layers[old].named_parameters()):
            assert torch.equal(p, q), name
        assert student.layers[new].attn.layer_idx == new
    assert torch.equal(student.embed.tokens.weight, teacher.embed.tokens.weight)
    assert torch.equal(student.classifier.out.weight, teacher.classifier.out.weight)
    with torch.no_grad():
        student.layers[0].attn.q_proj.weight.add_(1.0)  # a copy, not shared storage
    assert not torch.equal(student.layers[0].attn.q_proj.weight, teacher.layers[1].attn.q_proj.weight)


def test_student_from_config_copies_matching_tensors(tok):
    teacher = tiny_classifier(tok)
    smaller = teacher.config.replace(num_layers=1, intermediate_size=64)
    student = student_from_config(smaller, teacher)
    assert torch.equal(student.embed.tokens.weight, teacher.embed.tokens.weight)
    assert torch.equal(student.layers[0].attn.q_proj.weight, teacher.layers[0].attn.q_proj.weight)
    assert student.layers[0].mlp.up_proj.weight.shape == (64, 64)
    with pytest.raises(ValueError, match="labels"):
        student_from_config(smaller.replace(labels=("a", "b")), teacher)


def _data(tok):
    features = classification_features(tiny_records(96), tok, TINY_LABELS, max_length=16)
    return (classification_train_data(features, tok.pad_id),
            classification_batches(features[:48], tok.pad_id, batch_size=16))


def test_distillation_through_the_training_loop_reduces_kl(tok, tmp_path):
    data, batches = _data(tok)
    teacher = tiny_classifier(tok, seed=0)
    settings = TrainSettings(max_steps=30, batch_size=16, lr=3e-3, progress=False, tensorboard=False, device="cpu")
    train(teacher, task_objective(teacher), data, settings, tmp_path / "teacher")  # a teacher worth copying
    student = student_from_teacher(teacher, [1])
    torch.manual_seed(1)
    with torch.no_grad():  # fresh weights in the kept block: the student starts far from the teacher
        for p in student.layers.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    before = mean_kl(teacher, student, batches)
    result = distill(teacher, student, data, replace(settings, max_steps=20, weight_decay=0.0), tmp_path / "run",
                     temperature=2.0, alpha=1.0)
    after = mean_kl(teacher, student, batches)
    assert result.steps == 20
    assert after < 0.5 * before, (before, after)
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher is unfrozen afterwards


def test_hidden_state_matching_with_a_projection_for_a_narrower_student(tok, tmp_path):
    teacher = tiny_classifier(tok).eval()
    narrow = teacher.config.replace(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1)
    student = student_from_config(narrow, teacher)
    data, _ = _data(tok)
    settings = TrainSettings(max_steps=2, batch_size=16, progress=False, tensorboard=False, device="cpu")
    result = distill(teacher, student, data, settings, tmp_path / "run", hidden_weight=1.0)
    assert result.steps == 2
    assert not hasattr(student, "distill_projection")  # dropped after training
    assert "distill_projection.weight" not in student.state_dict()


def test_incompatible_teacher_is_refused(tok, tmp_path):
    teacher = tiny_classifier(tok)
    other = student_from_config(teacher.config.replace(task="masked-lm", labels=()), None)
    data, _ = _data(tok)
    with pytest.raises(ValueError, match="task"):
        distill(teacher, other, data, TrainSettings(max_steps=1, progress=False, tensorboard=False), tmp_path)


def test_quantized_teacher_is_refused(tok):
    from lmsmith.compress.quantize import quantize_model

    teacher = tiny_classifier(tok)
    quantize_model(teacher, "int8")
    with pytest.raises(ValueError, match="quantized"):
        student_from_teacher(teacher, [0])
