"""Knowledge distillation: a smaller student learns from a teacher's softened outputs.

Training goes through the one training loop (`lmsmith.train.loop.train`) with the `Distillation`
objective of `lmsmith.train.objectives`: alpha · KL(teacher/T ‖ student/T) · T² + (1 − alpha) · task
loss, plus optionally beta · MSE between final hidden states. This module builds students and wires
the pieces together; it has no training code of its own.

Students: `student_from_teacher(teacher, keep_layers)` copies the teacher and keeps a subset of its
blocks (e.g. every other layer, as DistilBERT did), so it starts close to the teacher;
`student_from_config(config, teacher)` builds any smaller shape and copies every tensor whose name
and shape match (embeddings, norms, heads).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..model.config import ModelConfig
from ..model.transformer import Transformer
from ..train.distributed import pick_device
from ..train.loop import TrainData, TrainResult, TrainSettings, train
from ..train.objectives import Distillation, Objective, distillation_kl, forward, objective_for
from .structured import keep_layers

STUDENT_TASKS = ("causal-lm", "masked-lm", "sequence-classification", "token-classification")


# --------------------------------------------------------------------------------------------------
# Which layers a student keeps
# --------------------------------------------------------------------------------------------------
def every_kth_layer(num_layers: int, k: int) -> list[int]:
    """Layers 0, k, 2k, …: DistilBERT's choice for k=2."""
    if not isinstance(k, int) or not 1 <= k <= num_layers:
        raise ValueError(f"every must be an integer in [1, {num_layers}], got {k!r}")
    return list(range(0, num_layers, k))


def spread_layers(num_layers: int, num_keep: int) -> list[int]:
    """`num_keep` layers evenly spread from the first to the last (both kept: the first layers build
    the token representations, the last one is what the head was trained on)."""
    if not isinstance(num_keep, int) or not 1 <= num_keep <= num_layers:
        raise ValueError(f"num_layers must be an integer in [1, {num_layers}], got {num_keep!r}")
    if num_keep == 1:
        return [num_layers - 1]
    step = (num_layers - 1) / (num_keep - 1)
    return [int(i * step + 0.5) for i in range(num_keep)]  # half-up: no banker's rounding surprises


# --------------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------------
def student_from_teacher(teacher: Transformer, keep: Sequence[int]) -> Transformer:
    """A copy of `teacher` with only the blocks `keep` (ascending, renumbered); the teacher is untouched."""
    if getattr(teacher, "quantization_config", None) is not None:
        raise ValueError("the teacher is quantized; distil from the float model")
    student = copy.deepcopy(teacher)
    for attribute in ("manifest",):
        student.__dict__.pop(attribute, None)
    keep_layers(student, keep)
    return student.requires_grad_(True).train()  # the teacher may be frozen (e.g. by an earlier distill)


def student_from_config(config: ModelConfig, teacher: Transformer | None = None, seed: int = 0) -> Transformer:
    """A freshly initialised student of any shape; tensors of the teacher with the same name and shape
    (embeddings, norms, heads) are copied so the student does not start from scratch there."""
    torch.manual_seed(seed)
    student = Transformer(config)
    if teacher is not None:
        _check_compatible(teacher.config, config)
        mine = student.state_dict()
        same = {k: v for k, v in teacher.state_dict().items() if k in mine and mine[k].shape == v.shape}
        student.load_state_dict(same, strict=False)
        student.tie_weights()
    return student


def _check_compatible(teacher: ModelConfig, student: ModelConfig) -> None:
    if teacher.task != student.task:
        raise ValueError(f"teacher task {teacher.task!r} and student task {student.task!r} differ")
    if student.task not in STUDENT_TASKS:
        raise ValueError(f"distillation needs a task with logits {STUDENT_TASKS}, got {student.task!r}")
    if teacher.vocab_size != student.vocab_size or teacher.labels != student.labels:
        raise ValueError("teacher and student must share the vocabulary and the labels (their logits are "
                         f"compared): vocab {teacher.vocab_size} vs {student.vocab_size}, labels "
                         f"{teacher.labels} vs {student.labels}")


def task_objective(model: Transformer) -> Objective:
    """The training objective of the model's own task (the `Distillation` task term)."""
    return objective_for(model.config.task, model.config.labels)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def distill(teacher: Transformer, student: Transformer, data: TrainData, settings: TrainSettings,
            run_dir: str | Path, *, temperature: float = 2.0, alpha: float = 0.5, hidden_weight: float = 0.0,
            eval_batches: Sequence[Mapping[str, torch.Tensor]] | None = None) -> TrainResult:
    """Train `student` in place to match `teacher` (frozen) through the training loop.

    With `hidden_weight` > 0 the final hidden states are matched too; when the widths differ a linear
    projection (student → teacher width) is trained alongside and dropped afterwards.
    """
    _check_compatible(teacher.config, student.config)
    teacher.to(pick_device(settings.device)).eval()
    trainable = [p for p in teacher.parameters() if p.requires_grad]  # Distillation freezes the teacher
    projection = _projection(teacher.config, student.config) if hidden_weight > 0 else None
    if projection is not None:
        student.distill_projection = projection  # a submodule, so the loop's optimizer trains it
    objective = Distillation(task_objective(student), teacher, temperature, alpha, hidden_weight, projection)
    try:
        return train(student, objective, data, settings, run_dir, eval_batches=eval_batches)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        if projection is not None:
            del student.distill_projection


def _projection(teacher: ModelConfig, student: ModelConfig) -> nn.Module | None:
    if teacher.hidden_size == student.hidden_size:
        return None
    return nn.Linear(student.hidden_size, teacher.hidden_size, bias=False)


@torch.no_grad()
def mean_kl(teacher: nn.Module, student: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
            temperature: float = 1.0) -> float:
    """Mean KL(teacher ‖ student) per example (classifiers) or per real token (LMs) over `batches`."""
    total, count = 0.0, 0
    was_training = student.training
    student.eval()
    try:
        for batch in batches:
            target, logits = forward(teacher, batch).logits, forward(student, batch).logits
            mask = batch.get("attention_mask")
            mask = mask.bool() if mask is not None and logits.dim() == 3 else None
            n = int(mask.sum()) if mask is not None else logits.shape[0] * (logits.shape[1] if logits.dim() == 3 else 1)
            total += float(distillation_kl(logits, target, temperature, mask)) / temperature**2 * n
            count += n
    finally:
        student.train(was_training)
    if count == 0:
        raise ValueError("mean_kl got no batches")
    return total / count
