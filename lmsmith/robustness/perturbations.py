"""Text perturbations: small, pure, seeded functions `(text, rng, severity) -> text`.

`severity` in [0, 1] is the fraction of eligible units (words, or word gaps) that get one edit; 0 is the
identity, and any severity > 0 edits at least one unit when the text has one. The same `rng` state
always gives the same output, so `perturb(text, "typo", 0.2, seed=3)` is reproducible.

    perturb("so happy today", "repeat_letters", 0.5, seed=0)   # 'sooooo happy today'
    PERTURBATIONS["typo_swap"](text, random.Random(0), 0.3)

Names group into suites (`SUITES`): "typos", "words", "noise", "tweet", "all"; `resolve_perturbations`
expands suite names into perturbation names.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence

Perturbation = Callable[[str, random.Random, float], str]
PERTURBATIONS: dict[str, Perturbation] = {}

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
EMOJI = ("😂", "😍", "🙄", "😭", "🔥", "👍", "❤️", "😡")
HASHTAGS = ("#mood", "#fail", "#blessed", "#tbt", "#news", "#lol")
MENTIONS = ("@user", "@friend", "@news", "@support")
URLS = ("http://t.co/x1y2z3", "https://bit.ly/3abc", "http://example.com/p/42")
PUNCTUATION = ("!", "!!", "?", ".", "...", ",", ";")
_TWEET_MARKUP = re.compile(r"^(#\w+|@\w+|https?://\S+)$")


def register_perturbation(name: str) -> Callable[[Perturbation], Perturbation]:
    """Decorator: `@register_perturbation("name")` on `fn(text, rng, severity) -> text`."""
    def add(fn: Perturbation) -> Perturbation:
        if name in PERTURBATIONS:
            raise ValueError(f"perturbation {name!r} is already registered")
        PERTURBATIONS[name] = fn
        return fn
    return add


def perturbation_names() -> list[str]:
    return sorted(PERTURBATIONS)


def get_perturbation(name: str) -> Perturbation:
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {perturbation_names()} "
                         f"or a suite {sorted(SUITES)}")
    return PERTURBATIONS[name]


def check_severity(severity: float) -> float:
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1] (the fraction of words edited), got {severity}")
    return float(severity)


def text_rng(seed: int, *keys: object) -> random.Random:
    """A generator seeded by (seed, keys): the same text, perturbation and severity always get the same
    draws, whatever else runs before (string seeds are hashed with SHA-512, not Python's salted hash)."""
    return random.Random(":".join(map(str, (seed, *keys))))


def perturb(text: str, name: str, severity: float, seed: int = 0) -> str:
    """One perturbation applied with its own seeded generator."""
    return get_perturbation(name)(text, text_rng(seed, name, severity, text), check_severity(severity))


# --- shared pieces ---------------------------------------------------------------------------------------

def split_words(text: str) -> list[str]:
    """Alternating [word, space, word, …] pieces ("" where the text starts/ends with space); join → text."""
    return re.split(r"(\s+)", text)


def edit_count(eligible: int, severity: float) -> int:
    """How many of `eligible` units to edit: 0 at severity 0, else at least 1."""
    if severity <= 0 or eligible == 0:
        return 0
    return min(eligible, max(1, round(severity * eligible)))


def pick(rng: random.Random, candidates: Sequence[int], severity: float) -> list[int]:
    """The positions to edit, in text order."""
    return sorted(rng.sample(list(candidates), edit_count(len(candidates), severity)))


def edit_words(text: str, rng: random.Random, severity: float, eligible: Callable[[str], bool],
               edit: Callable[[str, random.Random], str], markup: bool = False) -> str:
    """Apply `edit` to a severity-sized sample of the words for which `eligible` holds (tweet markup —
    #hashtags, @mentions, URLs — only when `markup`: a typo in a URL says nothing about robustness)."""
    parts = split_words(text)
    slots = [i for i in range(0, len(parts), 2)
             if parts[i] and eligible(parts[i]) and (markup or not is_markup(parts[i]))]
    for i in pick(rng, slots, severity):
        parts[i] = edit(parts[i], rng)
    return "".join(parts)


def keyboard_neighbours(char: str) -> str:
    """Keys next to `char` on a QWERTY keyboard (same row and the staggered rows above and below)."""
    lower = char.lower()
    for r, row in enumerate(_ROWS):
        i = row.find(lower)
        if i < 0:
            continue
        near = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
        if r > 0:
            near += [_ROWS[r - 1][j] for j in (i, i + 1) if j < len(_ROWS[r - 1])]
        if r < 2:
            near += [_ROWS[r + 1][j] for j in (i - 1, i) if 0 <= j < len(_ROWS[r + 1])]
        return "".join(c.upper() if char.isupper() else c for c in near)
    return ""


def letters(word: str) -> list[int]:
    return [j for j, c in enumerate(word) if c.isalpha()]


def typeable(word: str) -> list[int]:
    """Positions of letters that have keyboard neighbours (ASCII letters)."""
    return [j for j in letters(word) if keyboard_neighbours(word[j])]


# --- character typos ---------------------------------------------------------------------------------------

def _swap_positions(word: str) -> list[int]:
    return [j for j in range(len(word) - 1) if word[j].isalpha() and word[j + 1].isalpha() and word[j] != word[j + 1]]


def swap_letters(word: str, rng: random.Random) -> str:
    j = rng.choice(_swap_positions(word))
    return word[:j] + word[j + 1] + word[j] + word[j + 2:]


def delete_letter(word: str, rng: random.Random) -> str:
    j = rng.choice(letters(word))
    return word[:j] + word[j + 1:]


def insert_letter(word: str, rng: random.Random) -> str:
    """A fat-finger: a neighbour of a letter typed right after it."""
    j = rng.choice(typeable(word))
    return word[:j + 1] + rng.choice(keyboard_neighbours(word[j])) + word[j + 1:]


def substitute_letter(word: str, rng: random.Random) -> str:
    j = rng.choice(typeable(word))
    return word[:j] + rng.choice(keyboard_neighbours(word[j])) + word[j + 1:]


TYPO_EDITS = {"swap": swap_letters, "delete": delete_letter, "insert": insert_letter, "substitute": substitute_letter}


def can_swap(word: str) -> bool:
    return bool(_swap_positions(word))


def can_delete(word: str) -> bool:
    return len(letters(word)) >= 2  # a one-letter word would vanish


def can_type(word: str) -> bool:
    return bool(typeable(word))


TYPO_ELIGIBLE = {"swap": can_swap, "delete": can_delete, "insert": can_type, "substitute": can_type}


@register_perturbation("typo_swap")
def typo_swap(text: str, rng: random.Random, severity: float) -> str:
    """Two adjacent letters of a word swapped ("hapyp")."""
    return edit_words(text, rng, severity, can_swap, swap_letters)


@register_perturbation("typo_delete")
def typo_delete(text: str, rng: random.Random, severity: float) -> str:
    """One letter of a word dropped ("hapy")."""
    return edit_words(text, rng, severity, can_delete, delete_letter)


@register_perturbation("typo_insert")
def typo_insert(text: str, rng: random.Random, severity: float) -> str:
    """A QWERTY neighbour typed after a letter ("hsappy")."""
    return edit_words(text, rng, severity, can_type, insert_letter)


@register_perturbation("typo_substitute")
def typo_substitute(text: str, rng: random.Random, severity: float) -> str:
    """A letter replaced by a QWERTY neighbour ("haopy")."""
    return edit_words(text, rng, severity, can_type, substitute_letter)


def any_typo(word: str, rng: random.Random) -> str:
    kinds = [k for k in TYPO_EDITS if TYPO_ELIGIBLE[k](word)]
    return TYPO_EDITS[rng.choice(kinds)](word, rng)


@register_perturbation("typo")
def typo(text: str, rng: random.Random, severity: float) -> str:
    """One typo of a random kind (swap, delete, insert, substitute) per chosen word."""
    return edit_words(text, rng, severity, lambda w: any(ok(w) for ok in TYPO_ELIGIBLE.values()), any_typo)


# --- words ---------------------------------------------------------------------------------------------------

@register_perturbation("word_dropout")
def word_dropout(text: str, rng: random.Random, severity: float) -> str:
    """Words removed (at least one is kept); the rest are joined by single spaces."""
    words = [w for w in split_words(text)[::2] if w]
    count = min(edit_count(len(words), severity), len(words) - 1)
    if count <= 0:
        return text
    drop = set(rng.sample(range(len(words)), count))
    return " ".join(w for k, w in enumerate(words) if k not in drop)


@register_perturbation("word_swap")
def word_swap(text: str, rng: random.Random, severity: float) -> str:
    """Adjacent word pairs swapped (disjoint pairs, so each word moves at most once)."""
    parts = split_words(text)
    slots = [i for i in range(0, len(parts), 2) if parts[i]]
    pairs = [k for k in range(0, len(slots) - 1, 2) if parts[slots[k]] != parts[slots[k + 1]]]
    for k in pick(rng, pairs, severity):
        a, b = slots[k], slots[k + 1]
        parts[a], parts[b] = parts[b], parts[a]
    return "".join(parts)


# --- surface noise -------------------------------------------------------------------------------------------

def _case_variants(word: str) -> list[str]:
    alternating = "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(word))
    return [v for v in dict.fromkeys((word.upper(), word.lower(), word.capitalize(), alternating)) if v != word]


@register_perturbation("case")
def case(text: str, rng: random.Random, severity: float) -> str:
    """Words in UPPER, lower, Capitalised or aLtErNaTiNg case (always different from the original)."""
    return edit_words(text, rng, severity, lambda w: bool(_case_variants(w)),
                      lambda w, r: r.choice(_case_variants(w)))


def _punctuation_edit(word: str, rng: random.Random) -> str:
    stripped = word.rstrip(".,!?;:")
    if stripped != word and stripped and rng.random() < 0.5:
        return stripped  # punctuation removed
    return word + rng.choice(PUNCTUATION)


@register_perturbation("punctuation")
def punctuation(text: str, rng: random.Random, severity: float) -> str:
    """Punctuation added after words ("!!", "...") or stripped from them."""
    return edit_words(text, rng, severity, bool, _punctuation_edit)


@register_perturbation("whitespace")
def whitespace(text: str, rng: random.Random, severity: float) -> str:
    """Word gaps removed (words run together) or widened (extra spaces)."""
    parts = split_words(text)
    gaps = [i for i in range(1, len(parts) - 1, 2) if parts[i - 1] and parts[i + 1]]
    for i in pick(rng, gaps, severity):
        parts[i] = "" if rng.random() < 0.5 else parts[i] + " " * rng.randint(1, 3)
    return "".join(parts)


def _repeat(word: str, rng: random.Random) -> str:
    """The word's last vowel (or last letter) repeated 2-5 extra times: "so" → "sooooo"."""
    positions = letters(word)
    vowels = [j for j in positions if word[j].lower() in "aeiouy"]
    j = (vowels or positions)[-1]
    return word[:j + 1] + word[j] * rng.randint(2, 5) + word[j + 1:]


@register_perturbation("repeat_letters")
def repeat_letters(text: str, rng: random.Random, severity: float) -> str:
    """Elongated words, as people write them in tweets ("soooo goooood")."""
    return edit_words(text, rng, severity, lambda w: bool(letters(w)), _repeat)


# --- tweet markup --------------------------------------------------------------------------------------------

def is_markup(word: str) -> bool:
    return bool(_TWEET_MARKUP.match(word.rstrip(".,!?;:")))


def _markup(rng: random.Random) -> str:
    pool = rng.choice((EMOJI, HASHTAGS, MENTIONS, URLS))
    return rng.choice(pool)


@register_perturbation("tweet_noise")
def tweet_noise(text: str, rng: random.Random, severity: float) -> str:
    """Tweet markup churn: existing #hashtags, @mentions and URLs stripped, and new ones (or emoji)
    inserted between words. Severity is the fraction of word positions touched."""
    parts = split_words(text)
    words = [parts[i] for i in range(0, len(parts), 2) if parts[i]]
    markup = [k for k, w in enumerate(words) if is_markup(w)]
    n = edit_count(len(words), severity)
    stripped = set(rng.sample(markup, min(len(markup), n)))
    kept = [w for k, w in enumerate(words) if k not in stripped]
    for _ in range(n - len(stripped)):
        kept.insert(rng.randint(0, len(kept)), _markup(rng))
    return " ".join(kept) if n else text


@register_perturbation("hashtags")
def hashtags(text: str, rng: random.Random, severity: float) -> str:
    """Words turned into #hashtags, or existing #hashtags and @mentions turned back into plain words."""
    def edit(word: str, _rng: random.Random) -> str:
        return word[1:] if word[:1] in "#@" and len(word) > 1 else "#" + word
    return edit_words(text, rng, severity, lambda w: bool(letters(w)) and not w.startswith("http"), edit,
                      markup=True)


@register_perturbation("identity")
def identity(text: str, rng: random.Random, severity: float) -> str:
    """No change: a control row (its drop must be 0)."""
    return text


SUITES: dict[str, tuple[str, ...]] = {
    "typos": ("typo_swap", "typo_delete", "typo_insert", "typo_substitute"),
    "words": ("word_dropout", "word_swap"),
    "noise": ("case", "punctuation", "whitespace", "repeat_letters"),
    "tweet": ("tweet_noise", "hashtags"),
}
SUITES["all"] = tuple(n for names in SUITES.values() for n in names) + ("typo",)


def resolve_perturbations(names: Iterable[str] | str) -> tuple[str, ...]:
    """Perturbation and suite names → perturbation names (suites expanded, order kept, no repeats)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    resolved: list[str] = []
    for name in (n.strip() for n in names):
        for item in SUITES.get(name, (name,)):
            get_perturbation(item)
            if item not in resolved:
                resolved.append(item)
    if not resolved:
        raise ValueError(f"no perturbations given; choose from {perturbation_names()} or a suite {sorted(SUITES)}")
    return tuple(resolved)
