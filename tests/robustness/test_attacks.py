import pytest

from lmsmith.robustness import attack, attack_markdown, attacks, greedy_word_attack, hotflip_attack
from lmsmith.robustness.attacks import typo_variants, word_budget, word_candidates, word_vocab
from lmsmith.robustness.classify import Victim
from lmsmith.robustness.perturbations import text_rng

from .conftest import sentences


def test_greedy_flips_the_planted_keyword_model(planted, tokenizer):
    texts, labels = sentences(12)
    report = greedy_word_attack(planted, tokenizer, texts, labels, max_change_fraction=0.2, progress=False)
    assert report.accuracy_before == 1.0 and report.attacked == 12
    positives = [e for e in report.examples if e.label == "pos"]
    assert all(e.status == "success" for e in positives)  # one typo in "happy" removes the keyword
    for e in positives:
        assert e.changed == 1 and "happy" not in e.adversarial.split() and e.after == "neg"
        assert e.true_prob_after < 0.5 < e.true_prob_before
    # "sad" texts stay negative without their keyword too: the attack cannot win and says so
    assert all(e.status == "failed" for e in report.examples if e.label == "neg")
    assert report.success_rate == pytest.approx(0.5)
    assert report.accuracy_after == pytest.approx(0.5)


def test_greedy_respects_the_word_budget_and_counts_queries(planted, tokenizer):
    texts, labels = sentences(10)
    report = greedy_word_attack(planted, tokenizer, texts, labels, max_change_fraction=0.1, typos=3,
                                neighbours=2, progress=False)
    for e, text in zip(report.examples, texts):
        words = len(text.split())
        assert e.units == words and e.changed <= word_budget(words, 0.1)
        changed = sum(a != b for a, b in zip(text.split(), e.adversarial.split()))
        assert changed == e.changed
        # 1 clean + `words` leave-one-out texts + at most 5 candidates for each word tried
        assert 1 + words <= e.queries <= 1 + words + 5 * words
    assert report.mean_queries == pytest.approx(sum(e.queries for e in report.examples) / 10)


def test_query_counts_are_what_the_model_scored(planted, tokenizer, monkeypatch):
    texts, labels = sentences(4)
    scored = []
    original = Victim.probs_of_ids

    def counting(self, ids):
        scored.append(len(ids))
        return original(self, ids)

    monkeypatch.setattr(Victim, "probs_of_ids", counting)
    report = greedy_word_attack(planted, tokenizer, texts, labels, progress=False)
    assert sum(e.queries for e in report.examples) == sum(scored)
    scored.clear()
    gradients = []
    real_gradient = attacks.embedding_gradient

    def counting_gradient(victim, ids, y):
        gradients.append(1)
        return real_gradient(victim, ids, y)

    monkeypatch.setattr(attacks, "embedding_gradient", counting_gradient)
    flips = hotflip_attack(planted, tokenizer, texts, labels, progress=False)
    assert gradients and sum(e.queries for e in flips.examples) == sum(scored) + len(gradients)


def test_attacks_are_deterministic(random_classifier, tokenizer):
    texts, labels = sentences(8)
    first = greedy_word_attack(random_classifier, tokenizer, texts, labels, seed=3, progress=False)
    assert first == greedy_word_attack(random_classifier, tokenizer, texts, labels, seed=3, progress=False)
    flips = hotflip_attack(random_classifier, tokenizer, texts, labels, progress=False)
    assert flips == hotflip_attack(random_classifier, tokenizer, texts, labels, progress=False)


def test_misclassified_examples_are_skipped(planted, tokenizer):
    texts, labels = sentences(6)
    wrong = ["neg" if y == "pos" else "pos" for y in labels]
    report = greedy_word_attack(planted, tokenizer, texts, wrong, progress=False)
    assert report.attacked == 0 and report.success_rate == 0.0
    assert all(e.status == "skipped" and e.adversarial == e.original and e.queries == 1 for e in report.examples)


def test_hotflip_flips_the_planted_model_within_budget(planted, tokenizer):
    texts, labels = sentences(10)
    report = hotflip_attack(planted, tokenizer, texts, labels, max_change_fraction=0.2, progress=False)
    positives = [e for e in report.examples if e.label == "pos"]
    assert all(e.status == "success" for e in positives)
    for e in report.examples:
        assert e.changed <= word_budget(e.units, 0.2)
    for e in positives:
        # one word swapped in place (the keyword, or another word for "sad", which cancels it)
        assert e.changed == 1 and sum(a != b for a, b in zip(e.original.split(), e.adversarial.split())) == 1
    assert report.successes >= len(positives) and report.mean_changed >= 1.0


def test_candidates(planted, tokenizer):
    vocab = word_vocab(planted, tokenizer, frozenset({0, 1, 2, 3, 4}))
    assert "happy" in vocab.words and all(w.isalpha() and len(w) >= 2 for w in vocab.words)
    typos = typo_variants("happy", text_rng(0, "t"), 5)
    assert len(typos) == 5 and len(set(typos)) == 5 and "happy" not in typos
    candidates = word_candidates("happy!", text_rng(0, "t"), vocab, tokenizer, typos=2, neighbours=3)
    assert len(candidates) == 5 and all(c.endswith("!") for c in candidates)
    assert word_candidates("@united", text_rng(0, "t"), vocab, tokenizer, 2, 2) == []
    assert word_candidates("a", text_rng(0, "t"), vocab, tokenizer, 2, 2) == []


def test_markdown_and_errors(planted, tokenizer):
    texts, labels = sentences(4)
    report = attack("greedy", planted, tokenizer, texts, labels, progress=False)
    text = attack_markdown(report)
    assert "success rate 0.500" in text and "| original | adversarial |" in text
    with pytest.raises(ValueError, match=r"unknown attack 'pgd'; choose one of \['greedy', 'hotflip'\]"):
        attack("pgd", planted, tokenizer, texts, labels)
    with pytest.raises(ValueError, match="max_change_fraction must be in"):
        greedy_word_attack(planted, tokenizer, texts, labels, max_change_fraction=0)
    with pytest.raises(ValueError, match="data is empty"):
        hotflip_attack(planted, tokenizer, [], [])
