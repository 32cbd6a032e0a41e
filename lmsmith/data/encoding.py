"""Turn records into token-id features for each objective.

Every feature is a dict of plain lists (ints); `collators.py` pads them into tensors.

Label convention, the same for every objective: `labels` are aligned with `input_ids` (position i
holds the target for token i itself, -100 where there is no loss). Causal-LM loss code shifts by one
(logits[:, :-1] against labels[:, 1:]); masked-LM and token-classification losses use them as they are.
Sequence classification features carry one int `label`.

The tokenizer is anything with `encode(text, add_special_tokens=True) -> list[int]`, `pad_id`,
`mask_id`, `bos_id`, `eos_id`, `vocab_size` and `apply_chat_template(messages, add_generation_prompt)`.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lmsmith.data.records import TaggedRecord, TextRecord

IGNORE_INDEX = -100
SPECIAL_ID_NAMES = ("pad_id", "mask_id", "bos_id", "eos_id", "cls_id", "sep_id")


class TokenizerLike(Protocol):
    pad_id: int | None
    mask_id: int | None
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str: ...


@dataclass(frozen=True)
class SpecialWrapping:
    """The ids `encode(..., add_special_tokens=True)` puts around a text, e.g. [CLS] … [SEP] for BERT."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    def wrap(self, ids: Sequence[int]) -> list[int]:
        return [*self.prefix, *ids, *self.suffix]

    def budget(self, max_length: int, segments: int = 1) -> int:
        """Content tokens that fit in max_length: single texts get prefix+suffix, pairs one more suffix."""
        room = max_length - len(self.prefix) - segments * len(self.suffix)
        if room < segments:
            raise ValueError(f"max_length {max_length} leaves no room for text after special tokens "
                             f"{self.prefix}…{self.suffix}")
        return room


def special_wrapping(tokenizer: TokenizerLike, probe: str = "hello") -> SpecialWrapping:
    """Find which special ids the tokenizer adds, by comparing a probe encoded with and without them."""
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return SpecialWrapping(tuple(full[:start]), tuple(full[start + len(plain):]))
    raise ValueError(f"encode({probe!r}) with special tokens {full} does not contain the plain ids {plain}")


def special_token_ids(tokenizer: TokenizerLike) -> frozenset[int]:
    """Ids that masking must never touch: pad/mask/bos/eos/cls/sep (those the tokenizer names),
    `all_special_ids` if present, and whatever `encode` wraps around text — a BERT tokenizer may
    name no bos/eos yet add [CLS] … [SEP]."""
    ids = {getattr(tokenizer, name, None) for name in SPECIAL_ID_NAMES}
    ids.update(getattr(tokenizer, "all_special_ids", None) or ())
    wrapping = special_wrapping(tokenizer)
    ids.update(wrapping.prefix + wrapping.suffix)
    return frozenset(i for i in ids if i is not None)


# ---- language modelling -----------------------------------------------------------------------

def encode_texts(texts: Sequence[str], tokenizer: TokenizerLike, max_length: int) -> list[dict]:
    """Features {input_ids} for masked-LM: each text wrapped in special tokens, truncated to max_length."""
    wrapping = special_wrapping(tokenizer)
    budget = wrapping.budget(max_length)
    return [{"input_ids": wrapping.wrap(tokenizer.encode(text, add_special_tokens=False)[:budget])}
            for text in texts]


def pack_for_causal_lm(token_lists: Sequence[Sequence[int]], seq_len: int, *, eos_id: int) -> torch.Tensor:
    """Concatenate documents with `eos_id` after each and cut into rows of `seq_len` tokens.

    Returns a (num_blocks, seq_len) int64 tensor; the remainder shorter than seq_len is dropped.
    Use each row as both `input_ids` and `labels` (the loss shifts; see the module docstring).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 to predict anything, got {seq_len}")
    stream = [token for tokens in token_lists for token in (*tokens, eos_id)]
    num_blocks = len(stream) // seq_len
    if num_blocks == 0:
        raise ValueError(f"{len(stream)} tokens (with eos) are fewer than one block of seq_len {seq_len}")
    return torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: frozenset[int] | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT dynamic masking: pick `probability` of the non-special, non-padding positions; of those
    80% become `mask_id`, 10% a random token, 10% stay. Returns (masked_ids, labels) with labels the
    original id at picked positions and -100 elsewhere. Inputs are not modified."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    candidates = ~torch.isin(input_ids, torch.tensor(sorted(special_ids), dtype=input_ids.dtype))
    if attention_mask is not None:
        candidates &= attention_mask.bool()
    picked = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    roll = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked = input_ids.clone()
    masked[picked & (roll < 0.8)] = mask_id
    swap = picked & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_ids[swap]
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


# ---- sequence classification ------------------------------------------------------------------

def encode_pair(tokenizer: TokenizerLike, text: str, text_pair: str, max_length: int,
                wrapping: SpecialWrapping | None = None) -> tuple[list[int], list[int]]:
    """BERT-style pair: prefix a suffix b suffix, with token_type_ids 0 for the first part, 1 for the
    second; the longer text is truncated first. Returns (input_ids, token_type_ids)."""
    wrapping = wrapping or special_wrapping(tokenizer)
    first = tokenizer.encode(text, add_special_tokens=False)
    second = tokenizer.encode(text_pair, add_special_tokens=False)
    first, second = truncate_longest_first(first, second, wrapping.budget(max_length, segments=2))
    head = wrapping.wrap(first)
    tail = [*second, *wrapping.suffix]
    return head + tail, [0] * len(head) + [1] * len(tail)


def truncate_longest_first(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Drop tokens from the end of the longer list until both fit in budget (HF 'longest_first')."""
    if len(first) + len(second) <= budget:
        return first, second
    shorter = min(len(first), len(second))
    if budget - shorter >= shorter:  # the shorter one fits whole
        if len(first) > len(second):
            return first[: budget - len(second)], second
        return first, second[: budget - len(first)]
    return first[: budget - budget // 2], second[: budget // 2]


def encode_classification(
    records: Sequence[TextRecord],
    tokenizer: TokenizerLike,
    labels: Sequence[Hashable],
    max_length: int = 512,
) -> list[dict]:
    """Features {input_ids, label[, token_type_ids]}; `label` is the index in `labels` (absent for
    unlabelled records). Records with a text_pair get token_type_ids."""
    wrapping = special_wrapping(tokenizer)
    label_ids = {label: index for index, label in enumerate(labels)}
    features = []
    for record in records:
        if record.text_pair is None:
            ids = tokenizer.encode(record.text, add_special_tokens=False)[: wrapping.budget(max_length)]
            feature = {"input_ids": wrapping.wrap(ids)}
        else:
            ids, types = encode_pair(tokenizer, record.text, record.text_pair, max_length, wrapping)
            feature = {"input_ids": ids, "token_type_ids": types}
        if record.label is not None:
            feature["label"] = _label_index(record.label, label_ids, record.origin)
        features.append(feature)
    return features


def _label_index(label: Hashable, label_ids: Mapping[Hashable, int], origin: str) -> int:
    if label not in label_ids:
        raise ValueError(f"unknown label {label!r} in record {origin or '?'} (labels: {list(label_ids)})")
    return label_ids[label]


# ---- token classification ---------------------------------------------------------------------

def encode_tagged(
    records: Sequence[TaggedRecord],
    tokenizer: TokenizerLike,
    tags: Sequence[str],
    max_length: int = 512,
) -> list[dict]:
    """Features {input_ids, labels}: each word encoded on its own; its first sub-token gets the tag
    index, the other sub-tokens and special tokens -100. Words are encoded independently, which is
    exact for WordPiece; words that encode to nothing are dropped with their tag."""
    wrapping = special_wrapping(tokenizer)
    tag_ids = {tag: index for index, tag in enumerate(tags)}
    budget = wrapping.budget(max_length)
    features = []
    for record in records:
        ids, labels = [], []
        for word, tag in zip(record.tokens, record.tags):
            pieces = tokenizer.encode(word, add_special_tokens=False)
            ids.extend(pieces)
            labels.extend([_label_index(tag, tag_ids, record.origin)] + [IGNORE_INDEX] * (len(pieces) - 1))
        outside = [IGNORE_INDEX] * len(wrapping.prefix), [IGNORE_INDEX] * len(wrapping.suffix)
        features.append({"input_ids": wrapping.wrap(ids[:budget]),
                         "labels": outside[0] + labels[:budget] + outside[1]})
    return features


# ---- sequence to sequence --------------------------------------------------------------------

def encode_seq2seq(records: Sequence[TextRecord], tokenizer: TokenizerLike, max_length: int,
                   max_target_length: int | None = None) -> list[dict]:
    """Features {input_ids, labels} for an encoder-decoder model: `input_ids` is the source text with the
    tokenizer's special tokens (T5: text </s>), `labels` the target's ids followed by eos, each truncated to
    its own length. The two have different lengths; `collate_seq2seq` pads them separately."""
    if tokenizer.eos_id is None:
        raise ValueError("sequence-to-sequence targets end with eos; the tokenizer has no eos token")
    wrapping = special_wrapping(tokenizer)
    source_budget = wrapping.budget(max_length)
    target_budget = (max_target_length or max_length) - 1
    if target_budget < 1:
        raise ValueError(f"max_target_length {max_target_length} leaves no room for a target before eos")
    features = []
    for record in records:
        if not getattr(record, "target", None):
            raise ValueError(f"record {record.origin or '?'} has no target (text: {record.text[:40]!r}); "
                             "map a target column, e.g. data.columns: {text: source, target: summary}")
        source = tokenizer.encode(record.text, add_special_tokens=False)[:source_budget]
        target = tokenizer.encode(record.target, add_special_tokens=False)[:target_budget]
        features.append({"input_ids": wrapping.wrap(source), "labels": [*target, tokenizer.eos_id]})
    return features


# ---- chat supervised fine-tuning --------------------------------------------------------------

def encode_chat(
    messages: Sequence[Mapping[str, str]],
    tokenizer: TokenizerLike,
    max_length: int,
    *,
    train_on_turn_end: bool = True,
) -> dict:
    """Feature {input_ids, labels} for one conversation: the chat-template text, with labels only on
    assistant contents (plus, with `train_on_turn_end`, the template's end-of-turn text that follows
    each, e.g. "<|im_end|>" but not the newline after it, so the model learns to stop). Everything
    else, system/user turns and template markup, is -100. Truncated to
    max_length from the right.

    Spans are found by rendering growing prefixes of the conversation, so the template must render
    each prefix as a prefix of the whole (true for ChatML/Llama-style templates). Pieces are encoded
    separately and without added special tokens: the template itself writes bos and turn markers.
    """
    text, spans = assistant_spans(messages, tokenizer, train_on_turn_end)
    ids, labels, cursor = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        ids.extend(context := tokenizer.encode(text[cursor:start], add_special_tokens=False))
        labels.extend([IGNORE_INDEX] * len(context))
        ids.extend(target := tokenizer.encode(text[start:end], add_special_tokens=False))
        labels.extend(target)
        cursor = end
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def assistant_spans(messages: Sequence[Mapping[str, str]], tokenizer: TokenizerLike,
                    with_turn_end: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of assistant contents in it."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(list(messages[:index]), add_generation_prompt=True) if index else ""
        through = tokenizer.apply_chat_template(list(messages[: index + 1]), add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(f"chat template does not render message {index} as an extension of the "
                             "conversation before it; cannot locate the assistant text")
        content = message["content"].strip()
        offset = through.find(content, len(before))
        if offset < 0 or not content:
            raise ValueError(f"assistant message {index} content {content!r} not found in the rendered template")
        # The turn end is the template text after the content, less trailing whitespace: "<|im_end|>".
        end = max(len(through.rstrip()), offset + len(content)) if with_turn_end else offset + len(content)
        spans.append((offset, end))
    return text, spans
