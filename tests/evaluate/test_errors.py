"""Bad datasets, files, columns, labels, splits and settings are errors that say what is wrong."""
import pytest

from lmsmith.data import DataError
from lmsmith.evaluate import evaluate

from .conftest import FAST, TINY_DATASET, TINY_LABELS, tiny_lm, varied_classifier


@pytest.fixture
def classifier(tok):
    return varied_classifier(tok)


def test_unknown_dataset_or_missing_file(classifier, tok):
    with pytest.raises(FileNotFoundError, match="neither a registered dataset.*tweets-sentiment"):
        evaluate(classifier, tok, "no-such-dataset", device="cpu", **FAST)


def test_a_classifier_without_data_or_training_history(classifier, tok):
    with pytest.raises(ValueError, match="needs data: a registered dataset"):
        evaluate(classifier, tok, device="cpu", **FAST)


def test_missing_column_is_named(classifier, tok, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("tweet,sentiment\nhello,positive\n")
    with pytest.raises(DataError, match="column 'text': missing column"):
        evaluate(classifier, tok, path, device="cpu", **FAST)
    with pytest.raises(DataError, match="'stars'"):
        evaluate(classifier, tok, path, text_column="tweet", label_column="stars", device="cpu", **FAST)


def test_a_label_the_model_does_not_know(classifier, tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "great", "label": "positive"}\n{"text": "meh", "label": "mixed"}\n'
                    '{"text": "odd", "label": "sarcastic"}\n')
    with pytest.raises(ValueError, match=r"\['mixed', 'sarcastic'\].*model's labels \['negative', 'neutral', 'positive'\]"):
        evaluate(classifier, tok, path, device="cpu", **FAST)


def test_rows_without_labels(classifier, tok, tmp_path):
    from lmsmith.data import TextRecord
    from lmsmith.evaluate.data import check_labels

    with pytest.raises(ValueError, match="1 examples have no label"):
        check_labels([TextRecord("a", "positive"), TextRecord("b", None)], TINY_LABELS)


def test_unsupported_file_type(classifier, tok, tmp_path):
    path = tmp_path / "d.xml"
    path.write_text("<x/>")
    with pytest.raises(ValueError, match="use a CSV or JSONL file"):
        evaluate(classifier, tok, path, device="cpu", **FAST)


def test_bad_split_limit_batch_sizes_task_and_device(classifier, tok):
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate(classifier, tok, TINY_DATASET, split="dev", device="cpu", **FAST)
    with pytest.raises(ValueError, match="limit must be a positive"):
        evaluate(classifier, tok, TINY_DATASET, limit=0, device="cpu", **FAST)
    with pytest.raises(ValueError, match="limit must be a positive"):
        evaluate(tiny_lm(tok), tok, limit=-1, device="cpu", **FAST)  # causal LMs limit windows, checked too
    with pytest.raises(ValueError, match="batch sizes must be positive"):
        evaluate(classifier, tok, TINY_DATASET, device="cpu", batch_sizes=(0, 2))
    with pytest.raises(ValueError, match="repeats"):
        evaluate(classifier, tok, TINY_DATASET, device="cpu", repeats=0)
    with pytest.raises(ValueError, match="has a 'sequence-classification' head"):
        evaluate(classifier, tok, TINY_DATASET, task="causal-lm", device="cpu", **FAST)
    with pytest.raises(ValueError, match="device 'tpu'"):
        evaluate(classifier, tok, TINY_DATASET, device="tpu", **FAST)
    with pytest.raises(TypeError):
        evaluate(classifier, tok, TINY_DATASET, device="cpu", no_such_setting=1)


def test_no_tokenizer(classifier):
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        evaluate(classifier, None, TINY_DATASET, device="cpu", **FAST)


def test_text_too_short_for_one_window(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a few words")
    with pytest.raises(ValueError, match="fewer than one block"):
        evaluate(tiny_lm(tok), tok, path, device="cpu", **FAST)
