"""`evaluate(model, tokenizer, data)`: quality, latency and memory of one model in one report.

    model, tok = lmsmith.load("runs/tune-full-1/model")
    report = evaluate(model, tok, "tweets-sentiment", limit=300)    # accuracy, macro-F1, per class, …
    report = evaluate(*lmsmith.load("smollm2-135m-instruct"))       # perplexity on the held-out text
    print(report.to_markdown()); report.save("runs/eval")            # report.json/.md + PNGs

Quality by the model's task: classifiers get accuracy, macro/weighted F1, per-class precision/recall/F1
and the confusion matrix (token classifiers per labelled token); causal LMs get perplexity, exp(mean
NLL) over windows of `seq_len` tokens; masked LMs get the perplexity of a fixed seeded BERT-style
mask (15% of tokens, seed `mask_seed`), not pseudo-perplexity. Latency: per-forward p50/p90/p99 at
each batch size; causal LMs also time greedy generation at batch 1 (time to first token, decode
tokens/s). Memory: parameters and their bytes, the peak growth of the resident set (CPU) or CUDA's
peak allocated bytes over the whole evaluation, and KV-cache bytes per token for causal LMs.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import data as D
from ..api import resolve_device
from ..train.objectives import causal_lm, masked_lm, sequence_classification, token_classification
from .batches import classification_batches, lm_batches, lm_blocks, pad_id_of
from .data import CLASSIFICATION_TASKS, LM_TASKS, EvalRecords, check_labels, check_limit, eval_records
from .heldout import heldout_text
from .memory import MemoryTracker, count_parameters, kv_cache_bytes_per_token, model_size_bytes
from .metrics import ClassificationMetrics, classification_metrics
from .report import EvalReport, MemoryStats
from .speed import DecodeTiming, LatencyStats, cycled_rows, latency_stats, time_decode, time_forwards

DEFAULT_BATCH_SIZE = {"classifier": 32, "lm": 4}  # LM batches hold vocab-sized logits per token


@dataclass(frozen=True)
class EvalSettings:
    """How to measure (keyword arguments of `evaluate`)."""

    batch_sizes: tuple[int, ...] = (1, 8)  # latency runs
    batch_size: int | None = None  # quality batches; None: 32 examples (classifiers), 4 windows (LMs)
    max_length: int = 128  # tokens per classifier example / masked-LM sequence
    seq_len: int = 256  # causal-LM perplexity window
    latency_tokens: int = 128  # tokens per row in latency runs and in the generation prompt (at most)
    repeats: int = 10  # timed forwards per batch size
    new_tokens: int = 32  # generated tokens in the generation timing
    mask_seed: int = 0  # masked LM: seed of the fixed mask
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        checks = {"batch_size": (self.batch_size or 1) >= 1, "max_length": self.max_length >= 2,
                  "seq_len": self.seq_len >= 2, "latency_tokens": self.latency_tokens >= 1,
                  "repeats": self.repeats >= 1, "new_tokens": self.new_tokens >= 2}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid evaluation settings {bad} (batch_size, repeats, latency_tokens >= 1; "
                             f"max_length, seq_len, new_tokens >= 2): {self}")


@dataclass(frozen=True)
class Scored:
    """What scoring the quality data gives: metrics, optional per-class detail, latency inputs."""

    quality: dict[str, float]
    classification: ClassificationMetrics | None
    examples: int
    speed_rows: tuple[tuple[int, ...], ...]  # token ids the latency runs cycle through
    notes: tuple[str, ...] = ()


def evaluate(model: nn.Module, tokenizer, data=None, *, task: str | None = None, split: str = "test",
             limit: int | None = None, batch_sizes: Sequence[int] = (1, 8), text_column: str | None = None,
             label_column: str | None = None, device: str | torch.device | None = "auto",
             quality: bool = True, name: str | None = None, **settings) -> EvalReport:
    """Measure `model` (see the module docstring). `data`: a registered dataset name, a CSV/JSONL/
    CoNLL file, a text file or folder, or None (classifiers: the dataset the model was fine-tuned on,
    per its manifest; LMs: the built-in held-out text). `limit` keeps the first examples (causal LMs:
    windows). Other keyword arguments are `EvalSettings` fields (batch_size, seq_len, repeats, …).
    The model is moved to `device` and left there, in eval mode."""
    options = EvalSettings(batch_sizes=tuple(batch_sizes), **settings)
    check_limit(limit)
    if tokenizer is None:
        raise ValueError("evaluating needs the model's tokenizer; this model folder has none (no tokenizer.json)")
    task = _task_of(model, task)
    device = resolve_device(device)
    model.to(device).eval()
    records = None
    if quality and task in CLASSIFICATION_TASKS + LM_TASKS:  # read before tracking memory: not the model's
        records = eval_records(data, task, split=split, limit=None if task == "causal-lm" else limit,
                               text_column=text_column, label_column=label_column,
                               manifest=getattr(model, "manifest", None))
    with MemoryTracker(device) as tracker:
        scored = score(model, tokenizer, task, records, options, limit=limit) if records else None
        latency, generation = time_model(model, tokenizer, task, scored, options)
    return EvalReport(
        name or _model_name(model), task, str(device), str(model.dtype).removeprefix("torch."),
        records.source if records else "", records.split if records else None, scored.examples if scored else 0,
        scored.quality if scored else {}, scored.classification if scored else None, latency, generation,
        _memory_stats(model, task, device, tracker), _notes(task, records, scored, options.repeats, quality))


def _task_of(model: nn.Module, task: str | None) -> str:
    """The task to evaluate: the model's head decides; `task` may only confirm it."""
    own = model.config.task
    if task is not None and task != own:
        raise ValueError(f"task={task!r} asked for, but the model has a {own!r} head; load it with "
                         f"lmsmith.load(..., task={task!r}) to evaluate it as {task}")
    return own


def _model_name(model: nn.Module) -> str:
    manifest = getattr(model, "manifest", None) or {}
    return model.config.name or manifest.get("source") or model.config.family


# --- quality ----------------------------------------------------------------------------------------------

def score(model: nn.Module, tokenizer, task: str, records: EvalRecords, settings: EvalSettings = EvalSettings(),
          *, limit: int | None = None) -> Scored:
    """Quality of `model` on `records` for its `task` (`limit`: causal-LM windows)."""
    s = settings
    batch_size = s.batch_size or DEFAULT_BATCH_SIZE["classifier" if task in CLASSIFICATION_TASKS else "lm"]
    if task in CLASSIFICATION_TASKS:
        return score_classifier(model, tokenizer, task, records.records, batch_size, s.max_length, s.progress)
    if task == "causal-lm":
        return score_causal_lm(model, tokenizer, records.records, batch_size, s.seq_len, limit, s.progress)
    if task == "masked-lm":
        return score_masked_lm(model, tokenizer, records.records, batch_size, s.max_length, s.mask_seed, s.progress)
    raise ValueError(f"no quality metric for task {task!r}")


def score_classifier(model, tokenizer, task: str, records, batch_size: int, max_length: int,
                     progress: bool) -> Scored:
    labels = tuple(model.config.labels)
    records = check_labels(records, labels)
    if task == "token-classification":
        features, objective = D.encode_tagged(records, tokenizer, labels, max_length), token_classification(labels)
    else:
        features = D.encode_classification(records, tokenizer, labels, max_length)
        objective = sequence_classification(labels)
    batches = classification_batches(features, pad_id_of(tokenizer), batch_size)
    true, pred, total_loss, count = objective.predict(model, _on_device(batches, model, progress))
    if count == 0:
        raise ValueError("no labelled examples (or tokens) to score")
    metrics = classification_metrics([labels[i] for i in true], [labels[i] for i in pred], labels)
    quality = {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "macro_precision": metrics.macro_precision,
               "macro_recall": metrics.macro_recall, "weighted_f1": metrics.weighted_f1, "loss": total_loss / count}
    speed_rows = tuple(tuple(f["input_ids"]) for f in features[:8])
    return Scored(quality, metrics, len(records), speed_rows)


def score_causal_lm(model, tokenizer, records, batch_size: int, seq_len: int, limit: int | None,
                    progress: bool) -> Scored:
    seq_len = min(seq_len, model.config.max_position_embeddings)
    blocks = lm_blocks(tokenizer, [r.text for r in records], seq_len)[:limit]
    metrics = causal_lm().evaluate(model, _on_device(lm_batches(blocks, batch_size), model, progress))
    quality = {k: float(metrics[k]) for k in ("perplexity", "loss", "token_accuracy", "tokens")}
    note = f"perplexity: exp(mean next-token NLL) over {blocks.shape[0]} windows of {seq_len} tokens"
    return Scored(quality, None, int(blocks.shape[0]), (tuple(blocks[0].tolist()),), (note,))


def score_masked_lm(model, tokenizer, records, batch_size: int, max_length: int, mask_seed: int,
                    progress: bool) -> Scored:
    features = D.encode_texts([r.text for r in records], tokenizer, max_length)
    collate = D.MLMCollator.from_tokenizer(tokenizer, 0.15, mask_seed)  # masks drawn once, in order
    batches = [collate(features[i:i + batch_size]) for i in range(0, len(features), batch_size)]
    metrics = masked_lm().evaluate(model, _on_device(batches, model, progress))
    quality = {k: float(metrics[k]) for k in ("perplexity", "loss", "token_accuracy", "tokens")}
    note = (f"masked-LM perplexity: exp(mean NLL) at a fixed BERT-style mask of 15% of tokens (seed {mask_seed}), "
            "not pseudo-perplexity")
    return Scored(quality, None, len(features), tuple(tuple(f["input_ids"]) for f in features[:8]), (note,))


def _on_device(batches: list[dict], model: nn.Module, progress: bool) -> Iterable[dict]:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True):
        yield {k: v.to(device) for k, v in batch.items()}


# --- latency and memory -----------------------------------------------------------------------------------

def time_model(model, tokenizer, task: str, scored: Scored | None,
               settings: EvalSettings) -> tuple[tuple[LatencyStats, ...], DecodeTiming | None]:
    """Latency at each batch size on the evaluation's inputs (the held-out text when quality was not
    measured); causal LMs also time generation at batch 1, prompted with the first row's first tokens."""
    s = settings
    rows = scored.speed_rows if scored else _heldout_rows(tokenizer, s.latency_tokens)
    latency = time_latency(model, tokenizer, task, rows, s.batch_sizes, s.repeats, s.latency_tokens)
    prompt = rows[0][:s.latency_tokens]
    return latency, time_generation(model, tokenizer, prompt, s.new_tokens) if task == "causal-lm" else None


def time_latency(model, tokenizer, task: str, rows: Sequence[Sequence[int]], batch_sizes: Sequence[int],
                 repeats: int, latency_tokens: int) -> tuple[LatencyStats, ...]:
    """Per-forward latency at each batch size over `rows` (cycled, cut to `latency_tokens`, padded)."""
    unit = "examples/s" if task in CLASSIFICATION_TASKS else "tokens/s"
    device = next(model.parameters()).device
    out = []
    for batch in sorted(set(batch_sizes)):
        features = [{"input_ids": r[:latency_tokens]} for r in cycled_rows(rows, batch)]
        inputs = {k: v.to(device) for k, v in D.collate_padded(features, pad_id_of(tokenizer)).items()}
        if bool(inputs["attention_mask"].all()):
            del inputs["attention_mask"]  # equal rows: no mask, the causal fast path (as in generation)
        seconds = time_forwards(model, inputs, repeats)
        out.append(latency_stats(seconds, batch, int(inputs["input_ids"].numel()), unit))
    return tuple(out)


def time_generation(model, tokenizer, prompt: Sequence[int], new_tokens: int, runs: int = 3) -> DecodeTiming:
    """Greedy generation at batch 1; the median of `runs` timings (the first run also warms up)."""
    timings = [time_decode(model, [prompt], new_tokens, pad_id_of(tokenizer), warmup=i == 0) for i in range(runs)]
    return DecodeTiming(1, len(prompt), timings[0].new_tokens,
                        statistics.median(t.ttft_ms for t in timings),
                        statistics.median(t.decode_ms_per_step for t in timings),
                        statistics.median(t.decode_tokens_per_s for t in timings))


def _heldout_rows(tokenizer, latency_tokens: int) -> tuple[tuple[int, ...], ...]:
    return (tuple(tokenizer.encode(heldout_text())[:latency_tokens]),)


def _memory_stats(model, task: str, device: torch.device, tracker: MemoryTracker) -> MemoryStats:
    total, nonzero = count_parameters(model)
    cuda = device.type == "cuda"
    kv = kv_cache_bytes_per_token(model.config, model.dtype) if task == "causal-lm" else None
    return MemoryStats(total, nonzero, model_size_bytes(model), None if cuda else tracker.growth_bytes,
                       tracker.peak_bytes if cuda else None, kv)


def _notes(task: str, records: EvalRecords | None, scored: Scored | None, repeats: int,
           quality: bool) -> tuple[str, ...]:
    notes = [_split_note(records)] if records is not None and records.split_options is not None else []
    notes += list(scored.notes) if scored else []
    if scored is None:
        notes.append("quality not measured" + ("" if quality else " (quality=False)")
                     + ("" if task in CLASSIFICATION_TASKS + LM_TASKS else f": no metric for a {task!r} model"))
    notes.append(f"latency: percentiles over {repeats} timed forwards after one warm-up, linear interpolation")
    return tuple(notes)


def _split_note(records: EvalRecords) -> str:
    o = records.split_options
    how = f"sizes {dict(o['sizes'])}" if o["sizes"] else f"ratios {tuple(o['ratios'])}"
    return (f"data: the {records.split} split of {records.source}, split with {how}, seed {o['seed']}"
            f"{', stratified' if o['stratify'] else ''} (as the model's fine-tuning recipe did, else its defaults)")
