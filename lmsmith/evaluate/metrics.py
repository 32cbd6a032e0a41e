"""Classification, token-classification and language-model metrics as pure functions.

Inputs are sequences of labels (ints or strings; tensors and arrays are accepted through `.tolist()`).
Results are plain frozen dataclasses. A ratio with a zero denominator is 0.0, as in scikit-learn's
`zero_division=0`.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int  # how many true examples of the class


@dataclass(frozen=True)
class ClassificationMetrics:
    labels: tuple[Hashable, ...]  # order of per_class and of the confusion matrix rows/columns
    accuracy: float
    per_class: dict[Hashable, ClassScores]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    micro_precision: float
    micro_recall: float
    micro_f1: float
    weighted_f1: float
    confusion: tuple[tuple[int, ...], ...]  # confusion[true][predicted]
    count: int


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _checked_pair(y_true: Any, y_pred: Any) -> tuple[list, list]:
    true, pred = _as_list(y_true), _as_list(y_pred)
    if len(true) != len(pred):
        raise ValueError(f"y_true has {len(true)} items, y_pred {len(pred)}; they must match")
    if not true:
        raise ValueError("no examples to score")
    return true, pred


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def accuracy(y_true: Any, y_pred: Any) -> float:
    true, pred = _checked_pair(y_true, y_pred)
    return sum(t == p for t, p in zip(true, pred)) / len(true)


def confusion_matrix(y_true: Any, y_pred: Any, labels: Sequence[Hashable] | None = None) -> list[list[int]]:
    """matrix[i][j] = examples of true label labels[i] predicted as labels[j]. Without `labels`, the
    sorted union of both inputs. A label outside `labels` raises ValueError."""
    true, pred = _checked_pair(y_true, y_pred)
    labels = list(labels) if labels is not None else sorted(set(true) | set(pred))
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, pred):
        if t not in index or p not in index:
            raise ValueError(f"label {t if t not in index else p!r} is not among labels {labels}")
        matrix[index[t]][index[p]] += 1
    return matrix


def classification_metrics(y_true: Any, y_pred: Any,
                           labels: Sequence[Hashable] | None = None) -> ClassificationMetrics:
    """Accuracy, per-class precision/recall/F1, their macro, micro and support-weighted averages."""
    true, pred = _checked_pair(y_true, y_pred)
    labels = tuple(labels) if labels is not None else tuple(sorted(set(true) | set(pred)))
    matrix = confusion_matrix(true, pred, labels)
    per_class = {label: _class_scores(matrix, i) for i, label in enumerate(labels)}
    scores = list(per_class.values())
    correct = sum(matrix[i][i] for i in range(len(labels)))
    micro = _ratio(correct, len(true))  # single-label: every error is one FP and one FN
    return ClassificationMetrics(
        labels=labels,
        accuracy=correct / len(true),
        per_class=per_class,
        macro_precision=_mean([s.precision for s in scores]),
        macro_recall=_mean([s.recall for s in scores]),
        macro_f1=_mean([s.f1 for s in scores]),
        micro_precision=micro, micro_recall=micro, micro_f1=micro,
        weighted_f1=_ratio(sum(s.f1 * s.support for s in scores), sum(s.support for s in scores)),
        confusion=tuple(map(tuple, matrix)),
        count=len(true),
    )


def _class_scores(matrix: list[list[int]], i: int) -> ClassScores:
    true_positive = matrix[i][i]
    predicted = sum(row[i] for row in matrix)
    support = sum(matrix[i])
    precision, recall = _ratio(true_positive, predicted), _ratio(true_positive, support)
    return ClassScores(precision, recall, _f1(precision, recall), support)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def macro_f1(y_true: Any, y_pred: Any, labels: Sequence[Hashable] | None = None) -> float:
    return classification_metrics(y_true, y_pred, labels).macro_f1


def perplexity(total_nll: float, token_count: int) -> float:
    """exp(mean negative log-likelihood in nats) from a summed NLL over `token_count` tokens."""
    if token_count <= 0:
        raise ValueError(f"token_count must be positive, got {token_count}")
    if total_nll < 0 or math.isnan(total_nll):
        raise ValueError(f"total_nll must be a non-negative number, got {total_nll}")
    mean = total_nll / token_count
    return math.exp(mean) if mean < 709 else math.inf  # exp overflows a float past ~709.78


def flatten_token_labels(y_true: Any, y_pred: Any, ignore_index: int = IGNORE_INDEX) -> tuple[list, list]:
    """Per-token (true, predicted) pairs from nested or flat sequences, dropping positions whose true
    label is `ignore_index` (padding, special tokens, non-first sub-tokens)."""
    true, pred = _as_list(y_true), _as_list(y_pred)
    if len(true) != len(pred):
        raise ValueError(f"y_true has {len(true)} sequences, y_pred {len(pred)}; they must match")
    flat_true, flat_pred = [], []
    for position, (t, p) in enumerate(zip(true, pred)):
        if isinstance(t, (list, tuple)):
            if not isinstance(p, (list, tuple)) or len(t) != len(p):
                raise ValueError(f"sequence {position}: true and predicted lengths differ")
            inner_true, inner_pred = flatten_token_labels(t, p, ignore_index)
            flat_true += inner_true
            flat_pred += inner_pred
        elif t != ignore_index:
            flat_true.append(t)
            flat_pred.append(p)
    return flat_true, flat_pred


def token_classification_metrics(y_true: Any, y_pred: Any, labels: Sequence[Hashable] | None = None,
                                 ignore_index: int = IGNORE_INDEX) -> ClassificationMetrics:
    """Classification metrics over tokens, ignoring positions labelled `ignore_index`."""
    true, pred = flatten_token_labels(y_true, y_pred, ignore_index)
    return classification_metrics(true, pred, labels)
