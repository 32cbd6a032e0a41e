import logging

import pytest

from lmsmith.data.records import TaggedRecord, TextRecord
from lmsmith.robustness import AugmentSettings, augment, augment_with
from lmsmith.train.build import load_splits
from lmsmith.train.recipes import DataSection, load_recipe

from ..train.conftest import write_labelled_jsonl
from .conftest import sentences

RECORDS = [TextRecord(text, label, origin=f"f:{i}") for i, (text, label) in enumerate(zip(*sentences(20)))]


def test_copies_follow_the_originals_with_their_labels():
    out = augment(RECORDS, ["typo"], copies=2, seed=0)
    assert out[:20] == RECORDS
    added = out[20:]
    assert len(added) == 40  # every sentence has typo-able words, so no copy is dropped
    by_origin = {r.origin: r for r in RECORDS}
    for record in added:
        original = by_origin[record.origin.split(" [")[0]]
        assert record.label == original.label and record.text != original.text
        assert record.origin.endswith("[typo]")


def test_counts_are_right_and_seeded():
    settings = AugmentSettings(("typo_swap", "word_swap", "identity"), copies=3, probability=0.5, seed=1)
    out, counts = augment_with(RECORDS, settings)
    assert counts.original == 20 and counts.added == len(out) - 20
    assert sum(counts.per_perturbation.values()) == counts.added
    assert "identity" not in counts.per_perturbation  # unchanged copies are not added
    assert 0 < counts.added < 60  # probability 0.5 (and identity) leaves some copies out
    assert augment_with(RECORDS, settings) == (out, counts)
    assert augment_with(RECORDS, AugmentSettings(settings.perturbations, 3, 0.5, seed=2))[0] != out
    assert "20 train records + " in counts.describe() and "typo_swap" in counts.describe()


def test_only_the_train_split_is_augmented(tmp_path, caplog):
    path = write_labelled_jsonl(tmp_path / "d.jsonl", n=60)
    plain = DataSection(source=str(path))
    extra = DataSection(source=str(path), augment=AugmentSettings(("typos",), copies=2))
    base, labels = load_splits(plain, "sequence-classification")
    with caplog.at_level(logging.INFO, logger="lmsmith.train.build"):
        more, same_labels = load_splits(extra, "sequence-classification")
    assert labels == same_labels
    assert more.validation == base.validation and more.test == base.test
    assert more.train[:len(base.train)] == base.train
    added = len(more.train) - len(base.train)
    assert added == 2 * len(base.train)
    assert f"{len(base.train)} train records + {added} augmented copies" in caplog.text


def test_recipe_section_and_errors():
    cfg = load_recipe("minilm-sentiment-full", ["data.augment={perturbations: [typos], copies: 2, probability: 0.5}"])
    assert cfg.data.augment == AugmentSettings(("typos",), copies=2, probability=0.5)
    assert load_recipe("minilm-sentiment-full").data.augment is None
    with pytest.raises(ValueError, match="data.augment.perturbations: unknown perturbation 'typoz'"):
        load_recipe("minilm-sentiment-full", ["data.augment={perturbations: [typoz]}"])
    with pytest.raises(ValueError, match="unknown recipe key 'data.augment.copiez'"):
        load_recipe("minilm-sentiment-full", ["data.augment={copiez: 2}"])
    for bad in ({"copies": 0}, {"probability": 0.0}, {"severity": 0.0}, {"severity": 2.0}):
        with pytest.raises(ValueError):
            AugmentSettings(**bad)
    with pytest.raises(TypeError, match="TextRecord"):
        augment([TaggedRecord(("a",), ("O",))])
