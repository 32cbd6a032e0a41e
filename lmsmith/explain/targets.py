"""What is being explained (a class, a next token, a continuation) and the score function over
token embeddings that the attribution methods differentiate."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .attribution import ScoreFn

SUPPORTED_TASKS = ("sequence-classification", "causal-lm")
SCORES = ("log-prob", "logit")


@dataclass(frozen=True)
class Target:
    """A class of a classifier (`class_index`) or tokens a causal LM should produce next (`token_ids`)."""

    label: str
    class_index: int | None = None
    token_ids: tuple[int, ...] = ()


def check_task(model) -> str:
    task = model.config.task
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"explain supports models with task in {SUPPORTED_TASKS}; this one is {task!r}")
    return task


def check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    return score


def resolve_target(model, tokenizer, target: str | int | None, logits: torch.Tensor) -> Target:
    """The target named by the caller, or the model's own prediction when `target` is None.

    logits: the model's output on the text alone, (C,) for a classifier or (V,) at the last position.
    """
    if model.config.task == "sequence-classification":
        return _class_target(model.config.labels, target, logits)
    return _token_target(tokenizer, target, logits)


def _class_target(labels: tuple[str, ...], target, logits: torch.Tensor) -> Target:
    if target is None:
        index = int(logits.argmax())
    elif isinstance(target, str) and target in labels:
        index = labels.index(target)
    elif isinstance(target, int) and 0 <= target < len(labels):
        index = target
    elif isinstance(target, str) and target.isdigit() and int(target) < len(labels):
        index = int(target)
    else:
        raise ValueError(f"unknown target {target!r}; this classifier's labels are {list(labels)}")
    return Target(labels[index], class_index=index)


def _token_target(tokenizer, target, logits: torch.Tensor) -> Target:
    vocab = logits.shape[-1]
    if target is None:
        ids = (int(logits.argmax()),)
    elif isinstance(target, int):
        if not 0 <= target < vocab:
            raise ValueError(f"target token id {target} is outside the vocabulary (0..{vocab - 1})")
        ids = (target,)
    elif isinstance(target, str) and target:
        ids = tuple(tokenizer.encode(target, add_special_tokens=False))
    else:
        raise ValueError(f"target must be a token id, a non-empty continuation string or None; got {target!r}")
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    label = token_name(tokenizer, ids[0]) if len(ids) == 1 else tokenizer.decode(list(ids))
    return Target(label, token_ids=ids)


def token_name(tokenizer, token_id: int) -> str:
    """A token as text; a byte fragment that decodes to nothing readable ('\ufffd') keeps its vocabulary
    form so different tokens stay different."""
    text = tokenizer.decode([token_id])
    if text and "\ufffd" not in text:
        return text
    piece = tokenizer.id_to_token(token_id) if hasattr(tokenizer, "id_to_token") else None
    return piece or f"<{token_id}>"


def model_input_ids(prompt_ids: tuple[int, ...], target: Target) -> tuple[int, ...]:
    """The ids to run: the prompt, plus for a continuation every target token but the last (each one is
    predicted from the ones before it)."""
    return prompt_ids + target.token_ids[:-1]


def target_scores(logits: torch.Tensor, target: Target, score: str) -> torch.Tensor:
    """One score per batch row from the model's logits.

    Classifier: logits (N, C) → the class's logit or log-probability.
    Causal LM: logits (N, K, V) for the K positions that predict the K target tokens → the summed
    logits or log-probabilities of those tokens (the log-probability of the whole continuation).
    """
    logits = logits.float()
    values = logits.log_softmax(-1) if score == "log-prob" else logits
    if target.class_index is not None:
        return values[:, target.class_index]
    ids = torch.tensor(target.token_ids, device=logits.device)
    picked = values.gather(-1, ids.view(1, -1, 1).expand(values.shape[0], -1, 1))
    return picked.squeeze(-1).sum(-1)


# --- the model as a function of its token embeddings ------------------------------------------------
@contextmanager
def replaced_token_embeddings(model, embeds: torch.Tensor) -> Iterator[None]:
    """While active, `model.embed.tokens` returns `embeds` (N, T, H) instead of looking the ids up.
    Positions, token types and the embedding norm still apply on top, as in a normal forward."""
    def hook(module, inputs, output):
        assert output.shape == embeds.shape, (output.shape, embeds.shape)
        return embeds.to(output.dtype)

    handle = model.embed.tokens.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def token_embeddings(model, ids: tuple[int, ...]) -> torch.Tensor:
    """(T, H) output of the token-embedding layer for these ids (no gradient)."""
    with torch.no_grad():
        return model.embed.tokens(torch.tensor([ids], device=model.device))[0].detach()


def make_score_fn(model, ids: tuple[int, ...], target: Target, score: str) -> ScoreFn:
    """embeds (N, T, H) → (N,) target scores of the model run on those token embeddings."""
    input_ids = torch.tensor([ids], device=model.device)
    keep = len(target.token_ids)  # causal LM: only the positions that predict the target need logits

    def fn(embeds: torch.Tensor) -> torch.Tensor:
        batch = input_ids.expand(embeds.shape[0], -1)
        with replaced_token_embeddings(model, embeds):
            if target.class_index is not None:
                return target_scores(model(batch).logits, target, score)
            return target_scores(model(batch, logits_to_keep=keep).logits, target, score)

    return fn
