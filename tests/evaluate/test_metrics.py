import math
import random

import pytest
import torch

from lmsmith.evaluate.metrics import (
    ClassScores,
    accuracy,
    classification_metrics,
    confusion_matrix,
    flatten_token_labels,
    macro_f1,
    perplexity,
    token_classification_metrics,
)

# Hand-computed case: 3 classes, 8 examples.
Y_TRUE = ["a", "a", "a", "b", "b", "c", "c", "c"]
Y_PRED = ["a", "b", "a", "b", "c", "c", "c", "a"]


def test_hand_computed_classification_metrics():
    m = classification_metrics(Y_TRUE, Y_PRED)
    assert m.labels == ("a", "b", "c")
    assert m.confusion == ((2, 1, 0), (0, 1, 1), (1, 0, 2))
    assert m.accuracy == 5 / 8 == m.micro_f1 == m.micro_precision == m.micro_recall
    # a: P 2/3 R 2/3; b: P 1/2 R 1/2; c: P 2/3 R 2/3
    assert m.per_class["a"] == ClassScores(pytest.approx(2 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert m.per_class["b"].f1 == pytest.approx(0.5) and m.per_class["b"].support == 2
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)
    assert m.weighted_f1 == pytest.approx((3 * 2 / 3 + 2 * 0.5 + 3 * 2 / 3) / 8)
    assert m.count == 8


def test_zero_division_is_zero_and_label_order_is_respected():
    m = classification_metrics([0, 0, 1], [0, 0, 0], labels=[1, 0, 2])
    assert m.confusion == ((0, 1, 0), (0, 2, 0), (0, 0, 0))
    assert m.per_class[1] == ClassScores(0.0, 0.0, 0.0, 1)  # never predicted
    assert m.per_class[2] == ClassScores(0.0, 0.0, 0.0, 0)  # absent from both
    assert m.per_class[0].precision == pytest.approx(2 / 3) and m.per_class[0].recall == 1.0


def test_accuracy_confusion_and_macro_f1_helpers_accept_tensors():
    assert accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0])) == pytest.approx(2 / 3)
    assert confusion_matrix([1, 0], [1, 1]) == [[0, 1], [0, 1]]
    assert macro_f1(Y_TRUE, Y_PRED) == classification_metrics(Y_TRUE, Y_PRED).macro_f1


@pytest.mark.parametrize("call, message", [
    (lambda: accuracy([1, 2], [1]), "2 items, y_pred 1"),
    (lambda: accuracy([], []), "no examples"),
    (lambda: confusion_matrix([0, 5], [0, 0], labels=[0, 1]), "label 5 is not among"),
    (lambda: perplexity(10.0, 0), "token_count must be positive"),
    (lambda: perplexity(-1.0, 3), "non-negative"),
    (lambda: flatten_token_labels([[1, 2]], [[1]]), "sequence 0"),
])
def test_metric_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_perplexity():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)  # uniform over 4 tokens
    assert perplexity(1e6, 1) == math.inf


def test_token_classification_ignores_minus_100():
    true = [[-100, 1, -100, 0, -100], [-100, 2, 2, -100, -100]]
    pred = [[7, 1, 7, 1, 7], [0, 2, 1, 0, 0]]
    assert flatten_token_labels(true, pred) == ([1, 0, 2, 2], [1, 1, 2, 1])
    m = token_classification_metrics(torch.tensor(true), torch.tensor(pred), labels=[0, 1, 2])
    assert m.accuracy == 0.5 and m.count == 4
    assert m.per_class[1] == ClassScores(pytest.approx(1 / 3), 1.0, pytest.approx(0.5), 1)


def test_against_sklearn_on_random_labels():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    labels = [0, 1, 2, 3]
    true = [rng.choice(labels) for _ in range(500)]
    pred = [t if rng.random() < 0.6 else rng.choice(labels[:3]) for t in true]  # class 3 rarely predicted
    m = classification_metrics(true, pred, labels)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        true, pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        got = m.per_class[label]
        assert (got.precision, got.recall, got.f1, got.support) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]))
    assert m.macro_f1 == pytest.approx(sklearn_metrics.f1_score(true, pred, average="macro", zero_division=0))
    assert m.micro_f1 == pytest.approx(sklearn_metrics.f1_score(true, pred, average="micro"))
    assert m.weighted_f1 == pytest.approx(sklearn_metrics.f1_score(true, pred, average="weighted", zero_division=0))
    assert m.accuracy == pytest.approx(sklearn_metrics.accuracy_score(true, pred))
    assert [list(row) for row in m.confusion] == sklearn_metrics.confusion_matrix(true, pred, labels=labels).tolist()
