"""The numbers evaluate() reports equal a direct computation from the model's outputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmsmith.data import encode_classification, load_dataset
from lmsmith.evaluate import evaluate
from lmsmith.evaluate.batches import lm_blocks
from lmsmith.evaluate.data import DEFAULT_SPLIT, split_options
from lmsmith.evaluate.heldout import heldout_text
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer

from .conftest import FAST, TINY_DATASET, TINY_LABELS, tiny_lm, varied_classifier


def hand_macro_f1(true: list[str], pred: list[str], labels) -> float:
    scores = []
    for label in labels:
        tp = sum(t == p == label for t, p in zip(true, pred))
        predicted, actual = pred.count(label), true.count(label)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


@torch.no_grad()
def predict_one_by_one(model, tok, records) -> list[str]:
    """No batching, no padding: one forward per example."""
    features = encode_classification(records, tok, TINY_LABELS, max_length=128)
    return [TINY_LABELS[int(model(torch.tensor([f["input_ids"]])).logits.argmax(-1))] for f in features]


def test_classifier_accuracy_and_f1_equal_a_direct_computation(tok):
    model = varied_classifier(tok)
    report = evaluate(model, tok, TINY_DATASET, device="cpu", batch_size=5, **FAST)
    records = load_dataset(TINY_DATASET, **DEFAULT_SPLIT).splits.test
    true, pred = [r.label for r in records], predict_one_by_one(model, tok, records)
    assert len(set(pred)) > 1  # the check below would be weak against a constant prediction
    assert report.examples == len(records) == 24
    assert report.quality["accuracy"] == pytest.approx(sum(t == p for t, p in zip(true, pred)) / len(true))
    assert report.quality["macro_f1"] == pytest.approx(hand_macro_f1(true, pred, TINY_LABELS))
    m = report.classification
    assert m.labels == TINY_LABELS and sum(map(sum, m.confusion)) == len(records)
    for i, label in enumerate(TINY_LABELS):
        assert m.per_class[label].support == true.count(label) == sum(m.confusion[i])
        assert sum(row[i] for row in m.confusion) == pred.count(label)


def test_limit_keeps_the_first_examples_of_the_split(tok):
    report = evaluate(varied_classifier(tok), tok, TINY_DATASET, limit=7, device="cpu", **FAST)
    assert report.examples == 7 == sum(map(sum, report.classification.confusion))
    assert report.split == "test" and report.data == TINY_DATASET


def test_csv_and_jsonl_with_column_mapping(tok, tmp_path):
    model = varied_classifier(tok)
    rows = [("good great love", "positive"), ("bad awful sad", "negative"), ("the table chair", "neutral"),
            ("happy love", "positive")]
    csv = tmp_path / "data.csv"
    csv.write_text("tweet,sentiment\n" + "".join(f"{t},{label}\n" for t, label in rows))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(f'{{"tweet": "{t}", "sentiment": "{label}"}}\n' for t, label in rows))
    reports = [evaluate(model, tok, path, text_column="tweet", label_column="sentiment", device="cpu", **FAST)
               for path in (csv, jsonl)]
    expected = predict_one_by_one(model, tok, [r for r in load_records(rows)])
    accuracy = sum(p == label for p, (_, label) in zip(expected, rows)) / len(rows)
    for report in reports:
        assert report.examples == 4 and report.split is None
        assert report.quality["accuracy"] == pytest.approx(accuracy)
    assert reports[0].quality == reports[1].quality


def load_records(rows):
    from lmsmith.data import TextRecord

    return [TextRecord(text, label) for text, label in rows]


def test_split_options_follow_the_fine_tuning_recipe(tok):
    model = varied_classifier(tok)
    data = {"source": TINY_DATASET, "sizes": {"train": 100, "validation": 20, "test": 30}, "seed": 3,
            "stratify": True}
    model.manifest = {"history": [{"op": "finetune", "recipe": {"data": data}}]}
    assert split_options(TINY_DATASET, model.manifest) == {"ratios": (0.8, 0.1, 0.1), "sizes": data["sizes"],
                                                           "seed": 3, "stratify": True}
    assert split_options("other", model.manifest) == DEFAULT_SPLIT
    report = evaluate(model, tok, device="cpu", **FAST)  # data=None: the dataset it was fine-tuned on
    assert report.data == TINY_DATASET and report.examples == 30
    assert "seed 3" in report.notes[0]
    expected = load_dataset(TINY_DATASET, sizes=data["sizes"], seed=3).splits.test
    assert sum(r.label == "positive" for r in expected) == report.classification.per_class["positive"].support


@torch.no_grad()
def test_perplexity_is_exp_of_the_mean_nll_computed_by_hand(tok):
    model = tiny_lm(tok)
    report = evaluate(model, tok, device="cpu", seq_len=64, limit=5, batch_size=2, **FAST)
    blocks = lm_blocks(tok, [heldout_text()], 64)[:5]
    total, count = 0.0, 0
    for block in blocks:
        logits = model(block[None]).logits[0]
        total += float(F.cross_entropy(logits[:-1], block[1:], reduction="sum"))
        count += len(block) - 1
    assert report.examples == 5 and report.quality["tokens"] == count == 5 * 63
    assert report.quality["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert report.quality["loss"] == pytest.approx(total / count, rel=1e-5)


def test_perplexity_of_a_text_file(tok, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    report = evaluate(tiny_lm(tok), tok, text, device="cpu", seq_len=32, **FAST)
    assert report.data == str(text) and report.examples == lm_blocks(tok, [text.read_text()], 32).shape[0]
    assert 1 < report.quality["perplexity"] < 10 * tok.vocab_size


def minilm_tokenizer():
    from lmsmith.api import resolve
    from lmsmith.tokenizer import Tokenizer

    return Tokenizer.from_folder(resolve("minilm-l6"))


def test_masked_lm_perplexity_uses_a_fixed_seeded_mask():
    tok = minilm_tokenizer()
    torch.manual_seed(0)
    config = PRESETS["tiny-bert"].replace(vocab_size=tok.vocab_size, task="masked-lm", pad_token_id=tok.pad_id)
    model = Transformer(config).eval()
    quick = {"device": "cpu", "limit": 3, "max_length": 32, "repeats": 1, "batch_sizes": (1,)}  # 30k-word MLM head
    first = evaluate(model, tok, **quick)
    again = evaluate(model, tok, **quick)
    other = evaluate(model, tok, mask_seed=1, **quick)
    assert first.examples == 3 and first.quality == again.quality
    assert first.quality["perplexity"] != other.quality["perplexity"]
    assert math.isclose(first.quality["perplexity"], math.exp(first.quality["loss"]), rel_tol=1e-9)
    assert any("not pseudo-perplexity" in note for note in first.notes)
    assert first.generation is None and first.memory.kv_cache_bytes_per_token is None


TAGS = ("O", "B-LOC", "I-LOC")
CONLL = """Paris O
is O
the B-LOC
capital I-LOC

The O
quick B-LOC
fox O
jumps O
over I-LOC
dog O

Hello B-LOC
world O
"""


def tagger(tok) -> Transformer:
    torch.manual_seed(0)
    config = PRESETS["tiny-bert"].replace(vocab_size=tok.vocab_size, task="token-classification", labels=TAGS,
                                          pad_token_id=tok.pad_id)
    model = Transformer(config)
    torch.manual_seed(1)
    with torch.no_grad():
        model.classifier.out.weight.copy_(torch.randn_like(model.classifier.out.weight) * 3)
    return model.eval()


@torch.no_grad()
def test_token_classification_on_a_conll_file(tok, tmp_path):
    from lmsmith.data import encode_tagged, read_conll

    path = tmp_path / "tags.conll"
    path.write_text(CONLL)
    model = tagger(tok)
    report = evaluate(model, tok, path, device="cpu", batch_size=2, **FAST)
    true, pred = [], []
    for feature in encode_tagged(read_conll(path), tok, TAGS):  # one sentence per forward: no padding
        logits = model(torch.tensor([feature["input_ids"]])).logits[0]
        for position, label in enumerate(feature["labels"]):
            if label != -100:
                true.append(TAGS[label])
                pred.append(TAGS[int(logits[position].argmax())])
    assert len(true) == 12 and report.examples == 3  # 12 words in 3 sentences
    assert report.classification.count == 12 and len(set(pred)) > 1
    assert report.quality["accuracy"] == pytest.approx(sum(t == p for t, p in zip(true, pred)) / 12)
    assert report.quality["macro_f1"] == pytest.approx(hand_macro_f1(true, pred, TAGS))

    path.write_text(CONLL.replace("B-LOC", "B-PER", 1))
    with pytest.raises(ValueError, match=r"\['B-PER'\] in the data are not among the model's labels"):
        evaluate(model, tok, path, device="cpu", **FAST)


def test_causal_lm_on_a_registered_datasets_texts(tok):
    report = evaluate(tiny_lm(tok), tok, TINY_DATASET, device="cpu", seq_len=16, **FAST)
    records = load_dataset(TINY_DATASET, **DEFAULT_SPLIT).splits.test
    assert report.data == TINY_DATASET and report.split == "test"
    assert report.examples == lm_blocks(tok, [r.text for r in records], 16).shape[0] > 1
