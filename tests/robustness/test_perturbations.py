import random

import pytest

from lmsmith.robustness.perturbations import (
    PERTURBATIONS,
    SUITES,
    get_perturbation,
    keyboard_neighbours,
    perturb,
    register_perturbation,
    resolve_perturbations,
    split_words,
)

TEXTS = [
    "I am so happy with the service today, thanks a lot!",
    "@united my flight was delayed again #fail http://t.co/abc worst airline ever",
    "Not sure what to think about the new update... it looks fine I guess",
    "Great game tonight, we won by three points and the crowd was amazing",
]
CHANGING = sorted(set(PERTURBATIONS) - {"identity"})


def word_changes(a: str, b: str) -> int:
    """A rough edit size: words that differ position by position, plus the length difference."""
    wa, wb = a.split(), b.split()
    return sum(x != y for x, y in zip(wa, wb)) + abs(len(wa) - len(wb)) + abs(len(a) - len(b)) // 3


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_seeded_and_deterministic(name):
    for text in TEXTS:
        assert perturb(text, name, 0.3, seed=7) == perturb(text, name, 0.3, seed=7)
        fn = get_perturbation(name)
        assert fn(text, random.Random(5), 0.3) == fn(text, random.Random(5), 0.3)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_identity_at_severity_zero(name):
    for text in TEXTS:
        assert perturb(text, name, 0.0, seed=1) == text


@pytest.mark.parametrize("name", CHANGING)
def test_changes_every_text_at_positive_severity(name):
    for text in TEXTS:
        assert perturb(text, name, 0.05, seed=3) != text, (name, text)


@pytest.mark.parametrize("name", CHANGING)
def test_more_edits_at_higher_severity(name):
    texts = TEXTS * 5
    low = sum(word_changes(t, perturb(t, name, 0.1, seed=i)) for i, t in enumerate(texts))
    high = sum(word_changes(t, perturb(t, name, 0.6, seed=i)) for i, t in enumerate(texts))
    assert high > low, (name, low, high)


def test_different_seeds_give_different_typos():
    outputs = {perturb(TEXTS[0], "typo", 0.3, seed=s) for s in range(10)}
    assert len(outputs) > 5


def test_typos_use_keyboard_neighbours_and_keep_case():
    assert set(keyboard_neighbours("g")) == set("fhtyvb")
    assert keyboard_neighbours("Q").isupper() and "W" in keyboard_neighbours("Q")
    assert keyboard_neighbours("7") == ""
    text = "Hello"
    out = perturb(text, "typo_substitute", 1.0, seed=0)
    [(i, new)] = [(i, c) for i, (c, o) in enumerate(zip(out, text)) if c != o]
    assert new.lower() in keyboard_neighbours(text[i].lower())


def test_typo_kinds_have_their_shape():
    word = "wonderful"
    assert sorted(perturb(word, "typo_swap", 1.0)) == sorted(word)
    assert len(perturb(word, "typo_delete", 1.0)) == len(word) - 1
    assert len(perturb(word, "typo_insert", 1.0)) == len(word) + 1
    assert len(perturb(word, "typo_substitute", 1.0)) == len(word)


def test_markup_is_not_typoed():
    text = "@united http://t.co/abc #fail"
    assert perturb(text, "typo", 1.0) == text  # nothing eligible: URLs and mentions are left alone


def test_word_perturbations():
    text = "one two three four five six"
    dropped = perturb(text, "word_dropout", 0.5)
    assert len(dropped.split()) == 3 and set(dropped.split()) < set(text.split())
    assert perturb(text, "word_dropout", 1.0).count(" ") == 0  # at least one word is kept
    swapped = perturb(text, "word_swap", 1.0)
    assert swapped == "two one four three six five"


def test_repeat_letters_and_tweet_noise():
    assert perturb("so", "repeat_letters", 1.0) in {"so" + "o" * k for k in range(2, 6)}
    noisy = perturb(TEXTS[1], "tweet_noise", 1.0, seed=0)
    assert "http://t.co/abc" not in noisy and "@united" not in noisy  # existing markup stripped
    added = perturb("just plain words here", "tweet_noise", 0.5, seed=0)
    assert len(added.split()) == 6


def test_split_words_round_trips():
    for text in TEXTS + ["  leading and trailing  ", ""]:
        assert "".join(split_words(text)) == text


def test_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match="unknown perturbation 'typoo'.*typo_swap"):
        perturb("x", "typoo", 0.1)
    with pytest.raises(ValueError, match=r"severity must be in \[0, 1\]"):
        perturb("x", "typo", 1.5)
    with pytest.raises(ValueError, match="already registered"):
        register_perturbation("typo")(lambda t, r, s: t)
    with pytest.raises(ValueError, match="no perturbations given"):
        resolve_perturbations([])


def test_suites_expand_in_order_without_repeats():
    assert resolve_perturbations(["typos", "typo_swap", "case"]) == (*SUITES["typos"], "case")
    assert resolve_perturbations("word_swap,identity") == ("word_swap", "identity")
    assert set(resolve_perturbations(["all"])) == set(PERTURBATIONS) - {"identity"}
