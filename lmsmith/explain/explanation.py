"""`explain()`: why did the model predict this? One attribution per input token, as plain data."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .attention import attention_rollout, capture_attention, check_length, eval_mode
from .attribution import completeness_gap, gradient_x_input, integrated_gradients, occlusion
from .targets import (
    Target,
    check_score,
    check_task,
    make_score_fn,
    model_input_ids,
    resolve_target,
    target_scores,
    token_embeddings,
    token_name,
)
from .tokens import TokenizedText, group_labels, sum_groups, tokenize, word_groups

METHODS = ("integrated-gradients", "gradient-x-input", "occlusion", "attention-rollout")
ALIASES = {"ig": "integrated-gradients", "integrated_gradients": "integrated-gradients",
           "gradxinput": "gradient-x-input", "grad-x-input": "gradient-x-input", "gxi": "gradient-x-input",
           "rollout": "attention-rollout"}
BASELINES = ("pad", "zero")
LARGE_GAP = 0.05  # relative completeness gap above which integrated gradients needs more steps


@dataclass(frozen=True)
class Explanation:
    """Attributions of one prediction: `scores[i]` is how much `tokens[i]` raised (> 0) or lowered (< 0)
    the target score. For integrated gradients the scores add up to target_score − baseline_score, up
    to `completeness_gap`."""

    text: str
    task: str
    method: str
    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    special: tuple[bool, ...]
    target: str
    target_probability: float  # p(target class), or p(target continuation | text)
    prediction: str  # predicted class, or the greedy next token
    probabilities: dict[str, float]  # every class, or the top next tokens
    score: str  # what was attributed: "log-prob" or "logit" of the target (rollout ignores the target)
    target_score: float  # f(text)
    baseline_score: float | None = None  # f(baseline): integrated gradients only
    completeness_gap: float | None = None  # |Σ scores − (f(x) − f(baseline))|: integrated gradients only
    baseline: str | None = None  # "pad" or "zero": what replaced ordinary tokens
    n_steps: int | None = None
    unit: str = "token"  # or "word" after `words()`
    word_groups: tuple[tuple[int, ...], ...] = field(default=(), repr=False)
    word_labels: tuple[str, ...] = field(default=(), repr=False)

    @property
    def relative_gap(self) -> float | None:
        """completeness_gap / |f(x) − f(baseline)|; above ~0.05 the scores should not be trusted: raise
        n_steps (or use occlusion). None for methods without a completeness property."""
        if self.completeness_gap is None or self.baseline_score is None:
            return None
        return self.completeness_gap / max(abs(self.target_score - self.baseline_score), 1e-12)

    def words(self) -> Explanation:
        """Word pieces merged into words, their scores summed (so completeness still holds)."""
        if self.unit == "word" or not self.word_groups:
            return self
        return replace(self, tokens=self.word_labels, scores=tuple(sum_groups(self.scores, self.word_groups)),
                       special=tuple(all(self.special[i] for i in g) for g in self.word_groups),
                       unit="word", word_groups=(), word_labels=())

    def normalized(self) -> tuple[float, ...]:
        """Scores divided by the largest |score| of an ordinary token (special tokens clipped to ±1)."""
        return normalize(self.scores, self.special)

    def top(self, k: int = 5, sign: int = 1) -> list[tuple[str, float]]:
        """The k ordinary tokens that most support (sign=1) or oppose (sign=-1) the target."""
        ranked = sorted(((t, s) for t, s, sp in zip(self.tokens, self.scores, self.special)
                         if not sp and s * sign > 0), key=lambda p: -p[1] * sign)
        return ranked[:k]

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["word_groups"], d["word_labels"]
        d["tokens"], d["scores"], d["special"] = list(self.tokens), list(self.scores), list(self.special)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_html(self) -> str:
        """A self-contained page: tokens coloured by signed attribution, the prediction and probabilities."""
        from .render import explanation_html

        return explanation_html(self)

    def save_png(self, path: str | Path) -> Path:
        """A bar chart of the attributions, one bar per token (red supports the target, blue opposes)."""
        from .render import plot_attributions

        return plot_attributions(self, Path(path))

    def save(self, out_dir: str | Path, stem: str = "explanation") -> dict[str, Path]:
        """Write `<stem>.html`, `<stem>.png` and `<stem>.json` into out_dir; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"html": out / f"{stem}.html", "png": out / f"{stem}.png", "json": out / f"{stem}.json"}
        paths["html"].write_text(self.to_html(), encoding="utf-8")
        self.save_png(paths["png"])
        paths["json"].write_text(self.to_json(), encoding="utf-8")
        return paths

    def summary(self, k: int = 5) -> str:
        """A few readable lines: prediction, what was explained, top supporting and opposing tokens."""
        probs = ", ".join(f"{name!r} {p:.3f}" for name, p in self.probabilities.items())
        detail = self.method + (f", {self.n_steps} steps, {self.baseline} baseline" if self.n_steps else "")
        if self.completeness_gap is not None:
            detail += f", completeness gap {self.completeness_gap:.2g}"
            if self.relative_gap > LARGE_GAP:
                detail += f" = {self.relative_gap:.0%} of f(x) − f(baseline): too few steps, raise n_steps"
        lines = [f"prediction: {self.prediction!r} ({probs})",
                 (f"explaining: {self.score} of {self.target!r} = {self.target_score:.4g} "
                  f"(p = {self.target_probability:.3f}; {detail})")]
        for name, sign in (("supports", 1), ("opposes", -1)):
            pairs = ", ".join(f"{t.strip() or t!r} {s:+.3g}" for t, s in self.top(k, sign))
            lines.append(f"{name}: {pairs or '-'}")
        return "\n".join(lines)


def normalize(scores, special) -> tuple[float, ...]:
    """Divide by the largest magnitude among ordinary tokens, so special tokens (often huge for [CLS] or
    BOS attention sinks) do not wash out the colours of the words."""
    scale = max((abs(s) for s, sp in zip(scores, special) if not sp), default=0.0)
    if scale == 0.0:
        return tuple(0.0 for _ in scores)
    return tuple(max(-1.0, min(1.0, s / scale)) for s in scores)


def canonical_method(method: str) -> str:
    name = ALIASES.get(method, method)
    if name not in METHODS:
        allowed = sorted(METHODS + tuple(ALIASES))
        hint = " (attention maps come from attention_maps())" if method == "attention" else ""
        raise ValueError(f"unknown method {method!r}; choose one of {allowed}{hint}")
    return name


# --- the entry point ---------------------------------------------------------------------------------
def explain(model, tokenizer, text: str, method: str = "integrated-gradients", target: str | int | None = None,
            *, score: str = "log-prob", baseline: str | None = None, n_steps: int = 50, batch_size: int = 16,
            merge_words: bool = False, progress: bool | None = None) -> Explanation:
    """Attribute the model's score for `target` to the tokens of `text`.

    model: a sequence classifier (target = a label name or index; default the predicted class) or a
    causal LM (target = a token id or a continuation string; default the greedy next token).
    method: integrated-gradients (ig), gradient-x-input (gradxinput), occlusion, attention-rollout (rollout).
    score: attribute the target's "log-prob" or raw "logit".
    baseline: what replaces ordinary tokens for integrated gradients and occlusion: "pad" (the pad
    token's embedding; the default when the tokenizer has one) or "zero". Special tokens stay as they are.
    n_steps / batch_size: integration points for integrated gradients, and how many run per forward.
    merge_words: sum word pieces into words. progress: a tqdm bar (None: when slow and on a terminal).
    """
    method, score = canonical_method(method), check_score(score)
    task = check_task(model)
    tokens = tokenize(tokenizer, text)
    baseline = _check_baseline(baseline, tokenizer)
    with eval_mode(model):
        prompt_logits = _prompt_logits(model, tokens)
        tgt = resolve_target(model, tokenizer, target, prompt_logits)
        ids = model_input_ids(tokens.ids, tgt)
        check_length(model, len(ids))
        fn = make_score_fn(model, ids, tgt, score)
        x = token_embeddings(model, ids)
        base = _baseline_embeddings(model, tokenizer, x, tokens, baseline)
        with torch.no_grad():
            logits = _logits_for_target(model, ids, tgt)
            f_x = float(target_scores(logits, tgt, score)[0])
            p_target = float(target_scores(logits, tgt, "log-prob")[0].exp())
        attrs, extra = _attribute(method, model, fn, x, base, tokens, n_steps, batch_size, progress)
    result = Explanation(
        text=text, task=task, method=method, tokens=tokens.labels, scores=tuple(attrs[:len(tokens)].tolist()),
        special=tokens.special, target=tgt.label, target_probability=p_target,
        prediction=_prediction(model, tokenizer, prompt_logits),
        probabilities=_probabilities(model, tokenizer, prompt_logits),
        score=score, target_score=f_x,
        baseline=None if method in ("gradient-x-input", "attention-rollout") else baseline,
        word_groups=tuple(tuple(g) for g in word_groups(tokens.word_ids)), **extra)
    result = replace(result, word_labels=tuple(group_labels(tokens, result.word_groups)))
    return result.words() if merge_words else result


def _attribute(method, model, fn, x, base, tokens: TokenizedText, n_steps, batch_size, progress):
    """Scores (T,) for the chosen method, plus the Explanation fields only that method fills."""
    if method == "gradient-x-input":
        return gradient_x_input(fn, x).cpu(), {}
    if method == "occlusion":
        positions = [i for i, sp in enumerate(tokens.special) if not sp]
        return occlusion(fn, x, base, positions, batch_size).cpu(), {}
    if method == "attention-rollout":
        return rollout_scores(model, tokens), {}
    show = _show_progress(progress, n_steps, batch_size)
    attrs = integrated_gradients(fn, x, base, n_steps, batch_size, progress=show).cpu()
    with torch.no_grad():
        f_x, f_base = (float(v) for v in fn(torch.stack((x, base))))
    return attrs, {"baseline_score": f_base, "n_steps": n_steps,
                   "completeness_gap": completeness_gap(attrs, f_x, f_base)}


def rollout_scores(model, tokens: TokenizedText) -> torch.Tensor:
    """The rollout row of the position the model's output is read from: [CLS] (or the mean over tokens,
    or the last token) for a classifier, the last token for a causal LM. Ignores the target."""
    rollout = attention_rollout(capture_attention(model, tokens))
    pooling = model.config.classifier_pooler if model.config.task == "sequence-classification" else "last"
    if pooling.startswith("cls"):
        return rollout[0]
    if pooling == "mean":
        return rollout.mean(0)
    return rollout[-1]


# --- small steps ---------------------------------------------------------------------------------------
def _check_baseline(baseline: str | None, tokenizer) -> str:
    pad = getattr(tokenizer, "pad_id", None)
    if baseline is None:
        return "pad" if pad is not None else "zero"
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    if baseline == "pad" and pad is None:
        raise ValueError("baseline='pad' needs a tokenizer with a pad token; this one has none (use 'zero')")
    return baseline


def _baseline_embeddings(model, tokenizer, x: torch.Tensor, tokens: TokenizedText, baseline: str) -> torch.Tensor:
    """x with every ordinary prompt token replaced by the baseline vector; special tokens and (for a
    continuation) the target tokens after the prompt stay, so they get no attribution."""
    vector = torch.zeros_like(x[0]) if baseline == "zero" else token_embeddings(model, (tokenizer.pad_id,))[0]
    replaced = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    replaced[:len(tokens)] = ~torch.tensor(tokens.special, device=x.device)
    return torch.where(replaced.unsqueeze(-1), vector.expand_as(x), x)


def _prompt_logits(model, tokens: TokenizedText) -> torch.Tensor:
    """Logits on the text alone: (C,) for a classifier, (V,) at the last position for a causal LM."""
    check_length(model, len(tokens))
    with torch.no_grad():
        logits = model(torch.tensor([tokens.ids], device=model.device)).logits[0]
    return (logits if logits.dim() == 1 else logits[-1]).float().cpu()


def _logits_for_target(model, ids: tuple[int, ...], tgt: Target) -> torch.Tensor:
    batch = torch.tensor([ids], device=model.device)
    if tgt.class_index is not None:
        return model(batch).logits
    return model(batch, logits_to_keep=len(tgt.token_ids)).logits


def _prediction(model, tokenizer, logits: torch.Tensor) -> str:
    index = int(logits.argmax())
    if model.config.task == "sequence-classification":
        return model.config.labels[index]
    return token_name(tokenizer, index)


def _probabilities(model, tokenizer, logits: torch.Tensor, top: int = 5) -> dict[str, float]:
    probs = logits.softmax(-1)
    if model.config.task == "sequence-classification":
        return {label: float(p) for label, p in zip(model.config.labels, probs)}
    values, indices = probs.topk(min(top, probs.numel()))
    names = [token_name(tokenizer, int(i)) for i in indices]
    return {name if names.count(name) == 1 else f"{name} (#{i})": float(v)
            for name, v, i in zip(names, values, indices.tolist())}



def _show_progress(progress: bool | None, n_steps: int, batch_size: int) -> bool:
    if progress is not None:
        return progress
    return -(-n_steps // batch_size) >= 4 and sys.stderr.isatty()

