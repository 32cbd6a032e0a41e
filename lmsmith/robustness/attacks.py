"""Adversarial attacks on sequence classifiers: how few edits flip a prediction?

* `greedy_word_attack` (black-box, queries only): rank words by leave-one-out importance (one batched
  pass), then for each word in that order try typo variants and, for words that are one token, the
  nearest tokens in the model's own input-embedding space; keep the candidate that lowers the
  true-class probability most (if it lowers it at all), stop on a label flip or when the word budget
  (`max_change_fraction` of the words) is spent.
* `hotflip_attack` (white-box): first-order HotFlip scores (e_new − e_old) · ∂loss/∂e over the
  embedding matrix pick the token swaps; the best few are checked with real forward passes.

Only examples the model classifies correctly are attacked ("skipped" otherwise). A success is judged
on the adversarial *text* (re-tokenized), so it is a real input, not an unreachable token sequence.
Both attacks are seeded and deterministic.
"""
from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .classify import Victim, label_ids
from .embedding import embedding_offset, token_embedding, zero_offset
from .perturbations import TYPO_EDITS, TYPO_ELIGIBLE, is_markup, split_words, text_rng

ATTACKS = ("greedy", "hotflip")
_AFFIXES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass(frozen=True)
class AttackExample:
    index: int
    original: str
    adversarial: str
    label: str
    before: str  # predicted label on the original
    after: str  # predicted label on the adversarial text
    true_prob_before: float
    true_prob_after: float
    changed: int  # words (greedy) or tokens (hotflip) replaced
    units: int  # words or tokens that could be replaced
    queries: int  # texts (or gradient passes) the model scored for this example
    status: str  # success, failed, skipped (already misclassified)


@dataclass(frozen=True)
class AttackReport:
    method: str
    count: int
    attacked: int  # examples classified correctly before the attack
    successes: int
    success_rate: float  # successes / attacked
    accuracy_before: float
    accuracy_after: float  # accuracy under attack
    mean_changed: float  # over successes
    mean_change_fraction: float  # changed / units, over successes
    mean_queries: float  # over attacked examples
    examples: tuple[AttackExample, ...]

    def to_dict(self) -> dict:
        return asdict(self)


# --- candidates -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WordVocab:
    """The vocabulary entries that are whole alphabetic words, with unit-normalised input embeddings."""

    ids: torch.Tensor  # (W,)
    words: tuple[str, ...]
    unit: torch.Tensor  # (W, H)
    row: dict[int, int]  # token id → row in ids/words/unit


def word_vocab(model: nn.Module, tokenizer, special_ids: frozenset[int]) -> WordVocab:
    weight = token_embedding(model).weight.detach().float().cpu()
    ids, words = [], []
    for token_id in range(weight.shape[0]):
        word = whole_word(tokenizer, token_id)
        if word is not None and token_id not in special_ids:
            ids.append(token_id)
            words.append(word)
    ids_t = torch.tensor(ids, dtype=torch.long)
    unit = F.normalize(weight[ids_t], dim=-1) if ids else torch.empty(0, weight.shape[1])
    return WordVocab(ids_t, tuple(words), unit, {t: i for i, t in enumerate(ids)})


def whole_word(tokenizer, token_id: int) -> str | None:
    """The token's text when it is a word start of >= 2 letters (not a '##' WordPiece continuation)."""
    raw = tokenizer.id_to_token(token_id)
    if raw is None or raw.startswith("##"):
        return None
    text = tokenizer.decode([token_id]).strip()
    return text if len(text) >= 2 and text.isalpha() else None


def embedding_neighbours(vocab: WordVocab, tokenizer, word: str, k: int) -> list[str]:
    """Up to k words whose input embeddings are nearest (cosine) to `word`'s, when it is one token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if k <= 0 or len(ids) != 1 or ids[0] not in vocab.row:
        return []
    sims = vocab.unit @ vocab.unit[vocab.row[ids[0]]]
    out = []
    for row in sims.argsort(descending=True).tolist():
        candidate = vocab.words[row]
        if candidate.lower() != word.lower():
            out.append(match_case(candidate, word))
        if len(out) == k:
            break
    return out


def match_case(candidate: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return candidate.upper()
    return candidate.capitalize() if like[:1].isupper() else candidate.lower()


def typo_variants(word: str, rng, k: int) -> list[str]:
    """Up to k distinct one-edit typos of `word` (swap, delete, insert, substitute), drawn by `rng`."""
    kinds = [name for name, ok in TYPO_ELIGIBLE.items() if ok(word)]
    out: list[str] = []
    for _ in range(8 * k):
        if not kinds or len(out) == k:
            break
        variant = TYPO_EDITS[rng.choice(kinds)](word, rng)
        if variant != word and variant not in out:
            out.append(variant)
    return out


def word_candidates(word: str, rng, vocab: WordVocab, tokenizer, typos: int, neighbours: int) -> list[str]:
    """Replacements for a whole word, its leading/trailing punctuation kept."""
    prefix, core, suffix = _AFFIXES.match(word).groups()
    if sum(c.isalpha() for c in core) < 2 or is_markup(word):
        return []
    cores = typo_variants(core, rng, typos) + embedding_neighbours(vocab, tokenizer, core, neighbours)
    return [prefix + c + suffix for c in dict.fromkeys(cores)]


# --- greedy word attack ------------------------------------------------------------------------------------

def greedy_word_attack(model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[Hashable], *,
                       max_change_fraction: float = 0.25, typos: int = 6, neighbours: int = 6, seed: int = 0,
                       batch_size: int = 32, max_length: int = 128, progress: bool = True) -> AttackReport:
    """Black-box greedy word substitution (see the module docstring). Per word: `typos` typo variants
    plus `neighbours` embedding-space neighbours are tried in one batch."""
    victim, truth = _setup(model, tokenizer, texts, labels, max_change_fraction, batch_size, max_length)
    vocab = word_vocab(model, tokenizer, victim.special_ids)
    examples = [_greedy_one(victim, vocab, i, text, y, max_change_fraction, typos, neighbours, seed)
                for i, (text, y) in _progress(list(enumerate(zip(texts, truth))), "greedy attack", progress)]
    return summarize("greedy", examples)


def _greedy_one(victim: Victim, vocab: WordVocab, index: int, text: str, y: int, fraction: float,
                typos: int, neighbours: int, seed: int) -> AttackExample:
    start = victim.queries
    parts = split_words(text)
    slots = [i for i in range(0, len(parts), 2) if parts[i]]
    p0 = victim.probs([text])[0]
    result = _Outcome(text, p0, 0)
    if int(p0.argmax()) == y and slots:
        result = _greedy_search(victim, vocab, parts, slots, y, p0, fraction, text_rng(seed, "greedy", index),
                                typos, neighbours)
    return _example(victim, index, text, y, p0, result, len(slots), victim.queries - start)


@dataclass(frozen=True)
class _Outcome:
    text: str
    probs: torch.Tensor
    changed: int


def _greedy_search(victim, vocab, parts, slots, y, p0, fraction, rng, typos, neighbours) -> _Outcome:
    budget = word_budget(len(slots), fraction)
    without = [_joined(parts, {slot: ""}) for slot in slots]
    importance = p0[y] - victim.probs(without)[:, y]  # leave-one-out: how much each word supports y
    order = sorted(range(len(slots)), key=lambda k: (-float(importance[k]), k))
    current, best, changed = {}, p0, 0
    for k in order:
        if changed == budget or int(best.argmax()) != y:
            break
        candidates = word_candidates(parts[slots[k]], rng, vocab, victim.tokenizer, typos, neighbours)
        if not candidates:
            continue
        trials = [_joined(parts, {**current, slots[k]: c}) for c in candidates]
        probs = victim.probs(trials)
        pick = int(probs[:, y].argmin())
        if probs[pick, y] < best[y]:
            current[slots[k]], best, changed = candidates[pick], probs[pick], changed + 1
    return _Outcome(_joined(parts, current), best, changed)


def word_budget(units: int, fraction: float) -> int:
    """How many units (words or tokens) an attack may change: at least one."""
    return max(1, math.floor(fraction * units))


def _joined(parts: list[str], replace: dict[int, str]) -> str:
    return "".join(replace.get(i, p) for i, p in enumerate(parts))


# --- HotFlip ------------------------------------------------------------------------------------------------

def hotflip_attack(model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[Hashable], *,
                   max_change_fraction: float = 0.25, candidates: int = 8, seed: int = 0, batch_size: int = 32,
                   max_length: int = 128, progress: bool = True) -> AttackReport:
    """White-box HotFlip: each step takes ∂loss/∂(token embeddings), scores every (position, word token)
    swap by the first-order loss increase (e_new − e_old) · grad, tries the best `candidates` swaps in one
    batch and keeps the one that lowers the true-class probability most. Stops on a flip, when no swap
    helps, or when `max_change_fraction` of the word tokens changed. `seed` is accepted for symmetry:
    the search has no randomness."""
    victim, truth = _setup(model, tokenizer, texts, labels, max_change_fraction, batch_size, max_length)
    vocab = word_vocab(model, tokenizer, victim.special_ids)
    weight = token_embedding(model).weight.detach()
    examples = [_hotflip_one(victim, vocab, weight, i, text, y, max_change_fraction, candidates)
                for i, (text, y) in _progress(list(enumerate(zip(texts, truth))), "hotflip attack", progress)]
    return summarize("hotflip", examples)


def _hotflip_one(victim, vocab, weight, index, text, y, fraction, candidates) -> AttackExample:
    start = victim.queries
    ids = victim.encode([text])[0]
    positions = [i for i, t in enumerate(ids) if t in vocab.row and not _continued(victim.tokenizer, ids, i)]
    p0 = victim.probs_of_ids([ids])[0]
    result = _Outcome(text, p0, 0)
    if int(p0.argmax()) == y and positions:
        flipped, changed = _hotflip_search(victim, vocab, weight, ids, positions, y, p0, fraction, candidates)
        adversarial = swapped_text(victim, text, ids, flipped)
        result = _Outcome(adversarial, victim.probs([adversarial])[0], changed)  # judged on the real text
    return _example(victim, index, text, y, p0, result, len(positions), victim.queries - start)


def swapped_text(victim: Victim, text: str, ids: list[int], flipped: list[int]) -> str:
    """The original text with each swapped token's character span replaced by the new word (case
    matched), so the rest of the text stays as written. Without character offsets: the decoded ids."""
    backend = getattr(victim.tokenizer, "backend", None)
    if backend is None:
        return victim.tokenizer.decode([t for t in flipped if t not in victim.special_ids])
    offsets = backend.encode(text, add_special_tokens=False).offsets
    shift = len(victim.wrapping.prefix)
    out = text
    for i in sorted((i for i, (a, b) in enumerate(zip(ids, flipped)) if a != b), reverse=True):
        start, end = offsets[i - shift]
        out = out[:start] + match_case(vocab_word(victim.tokenizer, flipped[i]), text[start:end]) + out[end:]
    return out


def vocab_word(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]).strip()


def _continued(tokenizer, ids: list[int], i: int) -> bool:
    """Whether the next token continues this word (a '##' piece): swapping a word start would garble it."""
    nxt = tokenizer.id_to_token(ids[i + 1]) if i + 1 < len(ids) else None
    return bool(nxt and nxt.startswith("##"))


def _hotflip_search(victim, vocab, weight, ids, positions, y, p0, fraction, candidates) -> tuple[list[int], int]:
    current, best, changed, free = list(ids), p0, 0, list(positions)
    vocab_emb = weight[vocab.ids.to(weight.device)].float()  # (W, H)
    for _ in range(word_budget(len(positions), fraction)):
        grad = embedding_gradient(victim, current, y)  # (T, H)
        gain = grad[free] @ vocab_emb.T - (grad[free] * weight[[current[i] for i in free]].float()).sum(-1, keepdim=True)
        gain[torch.arange(len(free)), [vocab.row[current[i]] for i in free]] = -math.inf  # no swap to itself
        top = gain.flatten().topk(min(candidates, gain.numel())).indices.tolist()
        swaps = [(free[t // gain.shape[1]], int(vocab.ids[t % gain.shape[1]])) for t in top]
        trials = [_with(current, pos, tok) for pos, tok in swaps]
        probs = victim.probs_of_ids(trials)
        pick = int(probs[:, y].argmin())
        if probs[pick, y] >= best[y]:
            break  # no first-order candidate helps: a local optimum
        current, best, changed = trials[pick], probs[pick], changed + 1
        free.remove(swaps[pick][0])
        if int(best.argmax()) != y or not free:
            break
    return current, changed


def _with(ids: list[int], position: int, token: int) -> list[int]:
    out = list(ids)
    out[position] = token
    return out


def embedding_gradient(victim: Victim, ids: list[int], y: int) -> torch.Tensor:
    """∂ cross-entropy(true class) / ∂ token embeddings for one sequence: (T, H). Counts as one query."""
    batch = victim.batch([ids])
    offset = zero_offset(victim.model, batch["input_ids"])
    with torch.enable_grad(), embedding_offset(victim.model, offset):
        logits = victim.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), torch.tensor([y], device=logits.device))
        (grad,) = torch.autograd.grad(loss, offset)
    victim.queries += 1
    return grad[0].float()


# --- shared ---------------------------------------------------------------------------------------------------

def _setup(model, tokenizer, texts, labels, fraction, batch_size, max_length) -> tuple[Victim, list[int]]:
    if not 0 < fraction <= 1:
        raise ValueError(f"max_change_fraction must be in (0, 1], got {fraction}")
    victim = Victim(model, tokenizer, batch_size, max_length)
    if len(texts) == 0:
        raise ValueError("no texts to attack: the data is empty")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels; they must match")
    return victim, label_ids(labels, victim.labels)


def _example(victim: Victim, index: int, text: str, y: int, p0: torch.Tensor, result: _Outcome, units: int,
             queries: int) -> AttackExample:
    names = victim.labels
    before, after = int(p0.argmax()), int(result.probs.argmax())
    status = "skipped" if before != y else ("success" if after != y else "failed")
    return AttackExample(index, text, result.text, names[y], names[before], names[after], float(p0[y]),
                         float(result.probs[y]), result.changed, units, queries, status)


def summarize(method: str, examples: Sequence[AttackExample]) -> AttackReport:
    attacked = [e for e in examples if e.status != "skipped"]
    wins = [e for e in attacked if e.status == "success"]
    return AttackReport(
        method=method, count=len(examples), attacked=len(attacked), successes=len(wins),
        success_rate=len(wins) / len(attacked) if attacked else 0.0,
        accuracy_before=len(attacked) / len(examples) if examples else 0.0,
        accuracy_after=(len(attacked) - len(wins)) / len(examples) if examples else 0.0,
        mean_changed=_mean([e.changed for e in wins]),
        mean_change_fraction=_mean([e.changed / e.units for e in wins if e.units]),
        mean_queries=_mean([e.queries for e in attacked]),
        examples=tuple(examples))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _progress(items: list, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="text", disable=not enabled)


def attack(method: str, model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[Hashable],
           **options) -> AttackReport:
    """`greedy_word_attack` or `hotflip_attack` by name."""
    if method not in ATTACKS:
        raise ValueError(f"unknown attack {method!r}; choose one of {list(ATTACKS)} (or none)")
    fn = greedy_word_attack if method == "greedy" else hotflip_attack
    return fn(model, tokenizer, texts, labels, **options)


def attack_markdown(report: AttackReport, examples: int = 5) -> str:
    """Summary line plus a few successful examples (original → adversarial, prediction before → after)."""
    unit = "words" if report.method == "greedy" else "tokens"
    lines = [(f"Attack `{report.method}`: {report.successes}/{report.attacked} correctly classified texts flipped "
             f"(success rate {report.success_rate:.3f}); accuracy {report.accuracy_before:.3f} → "
             f"{report.accuracy_after:.3f} under attack; {report.mean_changed:.2f} {unit} changed on average "
             f"({report.mean_change_fraction:.1%} of them), {report.mean_queries:.1f} queries per text."), ""]
    shown = [e for e in report.examples if e.status == "success"][:examples]
    if shown:
        lines += ["| original | adversarial | prediction (true-class p) before → after |", "|---|---|---|"]
        lines += [f"| {_cell(e.original)} | {_cell(e.adversarial)} | {e.before} ({e.true_prob_before:.2f}) → "
                  f"{e.after} ({e.true_prob_after:.2f}) |" for e in shown]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
