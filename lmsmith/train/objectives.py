"""Objectives: what the one training loop minimises and how it scores a validation set.

An objective is called as `loss, metrics = objective(model, batch)`: `loss` is the mean over the
batch's targets, `metrics` a dict of floats for logging. `num_targets(batch)` says how many targets
that mean is over, so the loop can weight micro-batches (gradient accumulation, data parallel ranks)
exactly as one big batch would be weighted. `evaluate(model, batches)` returns the validation
metrics (loss plus accuracy / macro-F1 / per-class precision and recall, or perplexity).

Labels follow the data package's convention: aligned with input_ids, -100 = no loss. Causal-LM
losses shift by one (position i predicts token i+1). Sequence-to-sequence labels are the target ids
(their own length); the decoder reads them shifted right behind decoder_start_token_id.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluate.metrics import classification_metrics
from .distributed import unwrap
from .peft import prefix_for

IGNORE_INDEX = -100
Batch = Mapping[str, torch.Tensor]
MODEL_INPUTS = ("attention_mask", "token_type_ids", "position_ids")


@runtime_checkable
class Objective(Protocol):
    name: str

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...

    def num_targets(self, batch: Batch) -> int: ...

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]: ...


def forward(model: nn.Module, batch: Batch, **kwargs):
    """Run the model on a batch's inputs; prefix-tuning key/values are added when the model has them."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    prefix = prefix_for(unwrap(model), batch["input_ids"].shape[0])
    if prefix is not None:
        inputs["prefix"] = prefix
    return model(batch["input_ids"], **inputs, **kwargs)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over positions whose label is not -100; a batch without targets gives 0 (not NaN)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # loss in fp32 even under autocast
    flat_labels = labels.reshape(-1)
    if reduction == "mean" and not bool((flat_labels != IGNORE_INDEX).any()):
        return flat_logits.sum() * 0.0  # keeps the graph, so backward still works on every rank
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction=reduction)


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM alignment: logits at position i are scored against the label at i+1."""
    return logits[:, :-1], labels[:, 1:]


# --- language modelling ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LanguageModeling:
    """Causal LM (pretraining, continued pretraining, chat SFT: labels are -100 outside assistant turns)
    or masked LM (labels only at masked positions); the difference is the one-token shift."""

    causal: bool = True
    name: str = "causal-lm"

    def targets(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return shifted(logits, labels) if self.causal else (logits, labels)

    def num_targets(self, batch: Batch) -> int:
        labels = batch["labels"][:, 1:] if self.causal else batch["labels"]
        return int((labels != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits, labels = self.targets(forward(model, batch).logits, batch["labels"])
        loss = token_cross_entropy(logits, labels)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        return token_scores(self.targets(forward(model, b).logits, b["labels"]) for b in batches)


def token_scores(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Loss, perplexity and token accuracy over (logits, labels) pairs, ignoring -100 labels."""
    total_nll, count, correct = 0.0, 0, 0
    for logits, labels in pairs:
        total_nll += float(token_cross_entropy(logits, labels, reduction="sum"))
        keep = labels != IGNORE_INDEX
        count += int(keep.sum())
        correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
    if count == 0:
        raise ValueError("the validation batches have no target tokens (all labels are -100)")
    mean = total_nll / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "token_accuracy": correct / count,
            "tokens": float(count)}


def causal_lm() -> LanguageModeling:
    return LanguageModeling(causal=True, name="causal-lm")


def masked_lm() -> LanguageModeling:
    return LanguageModeling(causal=False, name="masked-lm")


def chat_sft() -> LanguageModeling:
    """Chat SFT is causal LM over `encode_chat` features, whose labels cover assistant tokens only."""
    return LanguageModeling(causal=True, name="chat-sft")


# --- sequence to sequence -------------------------------------------------------------------------------

def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Teacher forcing for an encoder-decoder model (transformers' `_shift_right`): the decoder reads
    [start, y0, …, y_{n-2}] and predicts [y0, …, y_{n-1}]; -100 padding becomes pad_token_id."""
    decoder_input_ids = labels.new_full(labels.shape, decoder_start_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    return decoder_input_ids.masked_fill(decoder_input_ids == IGNORE_INDEX, pad_token_id)


def decoder_ids(config) -> tuple[int, int]:
    """(decoder_start_token_id, pad_token_id) of an encoder-decoder config; T5 starts with its pad token."""
    if not getattr(config, "encoder_decoder", False):
        raise ValueError(f"objective 'seq2seq-lm' needs an encoder-decoder model (T5); this is a {config.family} "
                         f"{config.task} model")
    start = config.decoder_start_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else start
    if start is None or pad is None:
        raise ValueError("the model config has no decoder_start_token_id (and no pad_token_id): set "
                         "model.config.decoder_start_token_id")
    return start, pad


def seq2seq_forward(model: nn.Module, batch: Batch):
    """Encoder reads input_ids/attention_mask; the decoder reads the labels shifted right."""
    start, pad = decoder_ids(unwrap(model).config)
    return forward(model, batch, decoder_input_ids=shift_right(batch["labels"], start, pad))


@torch.no_grad()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  max_new_tokens: int) -> torch.Tensor:
    """Greedy generations (B, ≤ max_new_tokens) of an encoder-decoder model, pad after a row's eos.
    The encoder runs once; the decoder re-reads its prefix each step (targets here are short)."""
    model = unwrap(model)
    start, pad = decoder_ids(model.config)
    eos = model.config.eos_token_id
    memory = model.encode(input_ids, attention_mask).hidden_states
    decoded = input_ids.new_full((input_ids.shape[0], 1), start)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model(attention_mask=attention_mask, decoder_input_ids=decoded, encoder_hidden_states=memory,
                       logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1).masked_fill(done, pad)
        decoded = torch.cat((decoded, token[:, None]), dim=1)
        done |= token == eos
        if bool(done.all()):
            break
    return decoded[:, 1:]


def until_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """The tokens before the first eos (all of them when there is none)."""
    ids = list(ids)
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def exact_matches(predicted: torch.Tensor, labels: torch.Tensor, eos_id: int | None) -> int:
    """Rows whose generation (up to eos) equals the target (the non-ignored labels, up to eos)."""
    return sum(until_eos(p, eos_id) == until_eos([t for t in row if t != IGNORE_INDEX], eos_id)
               for p, row in zip(predicted.tolist(), labels.tolist()))


@dataclass(frozen=True)
class Seq2SeqLM:
    """Encoder-decoder LM (T5): mean cross-entropy of the decoder over the non-ignored target tokens.

    Validation adds perplexity, token accuracy and, when every target is at most `exact_match_max_tokens`
    long (labels, closing eos included), the exact-match rate of greedy generations.
    """

    exact_match_max_tokens: int = 16
    name: str = "seq2seq-lm"

    def num_targets(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = token_cross_entropy(seq2seq_forward(model, batch).logits, batch["labels"])
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        batches = list(batches)
        scores = token_scores((seq2seq_forward(model, b).logits, b["labels"]) for b in batches)
        return {**scores, **self.exact_match(model, batches)}

    def exact_match(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        """{"exact_match": fraction} when the targets are short enough to generate; {} otherwise."""
        longest = max(int((b["labels"] != IGNORE_INDEX).sum(-1).max()) for b in batches)
        if longest > self.exact_match_max_tokens:
            return {}
        eos = unwrap(model).config.eos_token_id
        matched = rows = 0
        for batch in batches:
            predicted = greedy_decode(model, batch["input_ids"], batch.get("attention_mask"), longest)
            matched += exact_matches(predicted, batch["labels"], eos)
            rows += batch["labels"].shape[0]
        return {"exact_match": matched / rows}


def seq2seq_lm() -> Seq2SeqLM:
    return Seq2SeqLM()


# --- classification -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Classification:
    """Sequence classification (labels (B,)) or token classification (labels (B, T), -100 ignored)."""

    labels: tuple[str, ...]
    per_token: bool = False
    name: str = "sequence-classification"

    def num_targets(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = forward(model, batch).logits
        loss = token_cross_entropy(logits, batch["labels"])
        keep = batch["labels"] != IGNORE_INDEX
        accuracy = (logits.detach().argmax(-1)[keep] == batch["labels"][keep]).float().mean()
        return loss, {"loss": float(loss.detach()), "accuracy": float(accuracy)}

    @torch.no_grad()
    def predict(self, model: nn.Module, batches: Iterable[Batch]) -> tuple[list[int], list[int], float, int]:
        """(true ids, predicted ids, summed loss, count) over every labelled position."""
        true, pred, total, count = [], [], 0.0, 0
        for batch in batches:
            logits = forward(model, batch).logits
            total += float(token_cross_entropy(logits, batch["labels"], reduction="sum"))
            keep = batch["labels"] != IGNORE_INDEX
            true += batch["labels"][keep].tolist()
            pred += logits.argmax(-1)[keep].tolist()
            count += int(keep.sum())
        return true, pred, total, count

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        true, pred, total, count = self.predict(model, batches)
        if count == 0:
            raise ValueError("the validation batches have no labels")
        return {"loss": total / count, **classification_scores(true, pred, self.labels)}


def classification_scores(true: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro-F1, and precision/recall/F1 per class, keyed like "precision/positive"."""
    m = classification_metrics(true, pred, labels=list(range(len(labels))))
    scores = {"accuracy": m.accuracy, "macro_f1": m.macro_f1, "weighted_f1": m.weighted_f1}
    for index, name in enumerate(labels):
        s = m.per_class[index]
        scores.update({f"precision/{name}": s.precision, f"recall/{name}": s.recall, f"f1/{name}": s.f1})
    return scores


def sequence_classification(labels: Sequence[str]) -> Classification:
    return Classification(tuple(labels), per_token=False, name="sequence-classification")


def token_classification(labels: Sequence[str]) -> Classification:
    return Classification(tuple(labels), per_token=True, name="token-classification")


# --- distillation ---------------------------------------------------------------------------------------

def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher_T ‖ student_T) · T², averaged over the positions in `mask` (Hinton et al.).

    Both distributions are softened by T; the T² keeps gradient sizes comparable across temperatures.
    Logits are (..., V); `mask` (...) selects the positions that count (all when None).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        per_position = per_position[mask]
    if per_position.numel() == 0:
        return student_logits.sum() * 0.0
    return per_position.mean() * temperature**2


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               projection: nn.Module | None = None) -> torch.Tensor:
    """MSE between final hidden states, through a projection when the widths differ."""
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student hidden states {tuple(student_hidden.shape)} and teacher's "
                         f"{tuple(teacher_hidden.shape)} differ; pass a projection")
    return F.mse_loss(student_hidden.float(), teacher_hidden.float())


class Distillation(nn.Module):
    """alpha · KL(teacher/T ‖ student/T) · T² + (1 − alpha) · task loss [+ beta · hidden-state MSE].

    The teacher runs frozen under no_grad; a batch may instead carry precomputed `teacher_logits`
    (and `teacher_hidden`). The KL is taken where the task has targets (shifted for causal LM; every
    example for sequence classification). An nn.Module so a `projection` trains with the student.
    """

    def __init__(self, task: Objective, teacher: nn.Module | None = None, temperature: float = 2.0,
                 alpha: float = 0.5, hidden_weight: float = 0.0, projection: nn.Module | None = None):
        super().__init__()
        if temperature <= 0 or not 0.0 <= alpha <= 1.0 or hidden_weight < 0:
            raise ValueError(f"need temperature > 0, 0 <= alpha <= 1, hidden_weight >= 0; got "
                             f"temperature={temperature}, alpha={alpha}, hidden_weight={hidden_weight}")
        self.task, self.temperature, self.alpha, self.hidden_weight = task, temperature, alpha, hidden_weight
        self.teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []  # not a submodule
        self.projection = projection
        self.name = f"distill-{task.name}"

    def num_targets(self, batch: Batch) -> int:
        return self.task.num_targets(batch)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        return self.task.evaluate(model, batches)

    def teacher_outputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "teacher_logits" in batch:
            return batch["teacher_logits"], batch.get("teacher_hidden")
        if not self.teacher:
            raise ValueError("Distillation needs a teacher model or batches with 'teacher_logits'")
        with torch.no_grad():
            out = forward(self.teacher[0], batch)
        return out.logits, out.hidden_states

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        student = forward(model, batch)
        teacher_logits, teacher_hidden = self.teacher_outputs(batch)
        task_loss = self._task_loss(student.logits, batch)
        logits, target, mask = self._aligned(student.logits, teacher_logits, batch)
        kl = distillation_kl(logits, target, self.temperature, mask)
        loss = self.alpha * kl + (1 - self.alpha) * task_loss
        metrics = {"kl": float(kl.detach()), "task_loss": float(task_loss.detach())}
        if self.hidden_weight > 0:
            if teacher_hidden is None:
                raise ValueError("hidden_weight > 0 needs the teacher's hidden states")
            mse = hidden_mse(student.hidden_states, teacher_hidden, self.projection)
            loss = loss + self.hidden_weight * mse
            metrics["hidden_mse"] = float(mse.detach())
        return loss, {"loss": float(loss.detach()), **metrics}

    def _causal(self) -> bool:
        return isinstance(self.task, LanguageModeling) and self.task.causal

    def _task_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        aligned, labels = shifted(logits, batch["labels"]) if self._causal() else (logits, batch["labels"])
        return token_cross_entropy(aligned, labels)

    def _aligned(self, student: torch.Tensor, teacher: torch.Tensor, batch: Batch):
        """Logits at the positions that have targets (all positions for sequence classification)."""
        labels = batch["labels"]
        if self._causal():
            student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
        mask = labels != IGNORE_INDEX if labels.dim() == student.dim() - 1 else None
        return student, teacher, mask


def objective_for(task: str, labels: Sequence[str] = ()) -> Objective:
    """The objective named by a recipe's `objective` (see OBJECTIVES)."""
    if task not in OBJECTIVES:
        raise ValueError(f"unknown objective {task!r}; choose one of {sorted(OBJECTIVES)}")
    if task in ("sequence-classification", "token-classification"):
        if not labels:
            raise ValueError(f"objective {task!r} needs the class labels")
        return OBJECTIVES[task](labels)
    return OBJECTIVES[task]()


OBJECTIVES = {
    "causal-lm": causal_lm, "masked-lm": masked_lm, "chat-sft": chat_sft,
    "sequence-classification": sequence_classification, "token-classification": token_classification,
    "seq2seq-lm": seq2seq_lm,
}
# The model head each objective trains.
MODEL_TASKS = {"causal-lm": "causal-lm", "chat-sft": "causal-lm", "masked-lm": "masked-lm",
               "sequence-classification": "sequence-classification",
               "token-classification": "token-classification", "seq2seq-lm": "seq2seq-lm"}
