"""Text → the token ids a model sees, with readable labels, special-token flags and word groups."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Structural tokens only: [UNK] and [MASK] stand for real text and are attributed like any word.
SPECIAL_NAMES = ("bos", "eos", "pad", "cls", "sep")


@dataclass(frozen=True)
class TokenizedText:
    """One encoded text: ids plus what a reader needs to see them."""

    text: str
    ids: tuple[int, ...]
    labels: tuple[str, ...]  # what to print for each token (the original text where we know it)
    special: tuple[bool, ...]  # [CLS]/[SEP]/BOS/…: shown, but never occluded or normalised against
    word_ids: tuple[int | None, ...]  # tokens of one word share an id; None for special tokens
    offsets: tuple[tuple[int, int], ...]  # character span of each token in `text` ((0, 0) if none)

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tokenizer, text: str) -> TokenizedText:
    """Encode `text` with special tokens, as the model would see it for classification / next-token use."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text to explain must be a non-empty string, got {text!r}")
    backend = getattr(tokenizer, "backend", None)
    if backend is None:  # a minimal tokenizer (encode/decode only): each token its own word
        return _tokenize_plain(tokenizer, text)
    enc = backend.encode(text, add_special_tokens=True)
    special_ids = special_token_ids(tokenizer)
    special = tuple(bool(m) or i in special_ids for i, m in zip(enc.ids, enc.special_tokens_mask))
    labels = tuple(_label(text, tok, off, sp) for tok, off, sp in zip(enc.tokens, enc.offsets, special))
    word_ids = tuple(None if sp else w for w, sp in zip(enc.word_ids, special))
    result = TokenizedText(text, tuple(enc.ids), labels, special, word_ids, tuple(enc.offsets))
    _check_not_empty(result)
    return result


def _tokenize_plain(tokenizer, text: str) -> TokenizedText:
    ids = tuple(tokenizer.encode(text))
    special_ids = special_token_ids(tokenizer)
    special = tuple(i in special_ids for i in ids)
    labels = tuple(tokenizer.decode([i]) for i in ids)
    word_ids = tuple(None if sp else n for n, sp in enumerate(special))
    result = TokenizedText(text, ids, labels, special, word_ids, tuple((0, 0) for _ in ids))
    _check_not_empty(result)
    return result


def _check_not_empty(tokens: TokenizedText) -> None:
    if not any(not s for s in tokens.special):
        raise ValueError(f"text {tokens.text!r} encodes to no ordinary tokens (only {list(tokens.labels)})")


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's named special tokens (BOS, EOS, PAD, CLS, SEP, …)."""
    ids = {getattr(tokenizer, f"{name}_id", None) for name in SPECIAL_NAMES}
    special = getattr(tokenizer, "special", None)
    for name in ("cls", "sep"):
        token = getattr(special, name, None)
        if token is not None and hasattr(tokenizer, "token_to_id"):
            ids.add(tokenizer.token_to_id(token))
    return {i for i in ids if i is not None}


def _label(text: str, token: str, offset: tuple[int, int], special: bool) -> str:
    """The original characters of a token where the offsets give them (BERT lower-cases, byte-level BPE
    shows 'Ġ'); WordPiece continuation pieces keep their '##' so readers see they are pieces."""
    start, end = offset
    if special or token.startswith("##") or end <= start:
        return token
    return text[start:end]


# --- merging pieces into words (pure) -----------------------------------------------------------------
def word_groups(word_ids: Sequence[int | None]) -> list[list[int]]:
    """Consecutive token positions sharing a word id form one group; special tokens (None) stand alone."""
    groups: list[list[int]] = []
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word == previous and groups:
            groups[-1].append(position)
        else:
            groups.append([position])
        previous = word
    return groups


def sum_groups(values: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    """One value per group: the sum of its members (attributions add up, so words keep completeness)."""
    return [float(sum(values[i] for i in group)) for group in groups]


def group_labels(tokens: TokenizedText, groups: Sequence[Sequence[int]]) -> list[str]:
    """A word's label: its span of the original text, or its pieces joined when offsets are unknown."""
    labels = []
    for group in groups:
        first, last = tokens.offsets[group[0]], tokens.offsets[group[-1]]
        if len(group) == 1 or last[1] <= first[0]:
            labels.append("".join(tokens.labels[i].removeprefix("##") for i in group) if len(group) > 1
                          else tokens.labels[group[0]])
        else:
            labels.append(tokens.text[first[0]:last[1]])
    return labels
