from collections import Counter

import pytest

from lmsmith.data import CleaningReport, Splits, TextRecord, clean, split


def test_clean_strips_drops_empty_and_duplicates():
    records = [
        TextRecord("  a  ", "x"), TextRecord("", "x"), TextRecord("   \n", "y"), TextRecord("a", "x"),
        TextRecord("a", "y", repaired=True), TextRecord("b", "y", repaired=True),
        TextRecord("a", "x", text_pair="q"), TextRecord("c", "x", text_pair="  "),
    ]
    kept, report = clean(records)
    assert kept == [TextRecord("a", "x"), TextRecord("b", "y"), TextRecord("a", "x", text_pair="q")]
    assert report == CleaningReport(total=8, kept=3, stripped=3, empty=3, duplicates=2,
                                    conflicting_labels=1, repaired=1)
    assert report.kept == report.total - report.empty - report.duplicates
    assert "kept 3" in str(report)


def labelled(n_per_label: dict[str, int]) -> list[TextRecord]:
    return [TextRecord(f"{label}-{i}", label) for label, n in n_per_label.items() for i in range(n)]


def test_split_ratios_cover_everything_once_and_are_deterministic():
    records = labelled({"a": 503})
    first = split(records, (0.8, 0.1, 0.1), seed=7)
    # 402.4 / 50.3 / 50.3: the one leftover record goes to the largest remainder (train)
    assert first.sizes() == {"train": 403, "validation": 50, "test": 50}
    assert sorted(first.train + first.validation + first.test, key=lambda r: r.text) == \
        sorted(records, key=lambda r: r.text)
    assert split(records, (0.8, 0.1, 0.1), seed=7) == first
    other = split(records, (0.8, 0.1, 0.1), seed=8)
    assert other.train != first.train
    assert first.train[:5] != records[:5]  # shuffled


def test_split_sizes_limit_and_mapping_form():
    records = labelled({"a": 100})
    parts = split(records, sizes={"train": 30, "test": 20}, seed=0)
    assert parts.sizes() == {"train": 30, "validation": 0, "test": 20}
    assert not set(parts.train) & set(parts.test)
    assert split(records, sizes=(30, 0, 20), seed=0) == parts
    assert parts["train"] is parts.train


def test_stratified_split_keeps_label_proportions():
    records = labelled({"neg": 600, "neu": 300, "pos": 100})
    parts = split(records, (0.8, 0.1, 0.1), seed=3, stratify=True)
    assert Counter(r.label for r in parts.train) == {"neg": 480, "neu": 240, "pos": 80}
    for name in ("validation", "test"):
        assert Counter(r.label for r in parts[name]) == {"neg": 60, "neu": 30, "pos": 10}
    limited = split(records, sizes={"train": 200, "test": 50}, seed=3, stratify=True)
    assert Counter(r.label for r in limited.train) == {"neg": 120, "neu": 60, "pos": 20}
    assert Counter(r.label for r in limited.test) == {"neg": 30, "neu": 15, "pos": 5}
    assert limited.train[:10] != sorted(limited.train[:10], key=lambda r: r.label)  # not grouped by label


def test_stratified_split_accepts_dicts_and_is_deterministic():
    records = [{"text": str(i), "label": i % 3} for i in range(90)]
    assert split(records, seed=1, stratify=True) == split(records, seed=1, stratify=True)
    assert Counter(r["label"] for r in split(records, seed=1, stratify=True).test) == {0: 3, 1: 3, 2: 3}


@pytest.mark.parametrize("kwargs, message", [
    ({"ratios": (0.8, 0.1)}, "train, validation, test"),
    ({"ratios": (0.8, 0.3, 0.1)}, "sum to 1"),
    ({"ratios": (1.2, -0.1, -0.1)}, "sum to 1"),
    ({"ratios": None}, "ratios or sizes"),
    ({"sizes": (5, 5, 1)}, "more than the 10"),
    ({"sizes": (5, 1.5, 1)}, "non-negative ints"),
    ({"sizes": {"train": 5, "dev": 1}}, "'dev'"),
])
def test_split_rejects_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split(labelled({"a": 10}), **kwargs)


def test_stratify_needs_labels():
    with pytest.raises(ValueError, match="record 1 has no label"):
        split([TextRecord("a", "x"), TextRecord("b")], stratify=True)


def test_splits_unknown_name():
    with pytest.raises(KeyError, match="dev"):
        Splits()["dev"]
