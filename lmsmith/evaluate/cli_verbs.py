"""The `evaluate` verb, merged into `lmsmith.cli.VERBS`:

    lmsmith evaluate runs/tune-full-1/model --data tweets-sentiment --limit 300
    lmsmith evaluate smollm2-135m-instruct --limit 2 --batch-sizes 1,4 --out runs/eval-smollm2
    lmsmith evaluate my-classifier --data reviews.csv --text-column body --label-column stars

"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

SPLITS = ("train", "validation", "test")


def batch_sizes(text: str) -> tuple[int, ...]:
    """"1,8" → (1, 8); argparse reports the ValueError as a usage error."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def setup_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="embedded model name, HF folder, GGUF file or lmsmith artifact")
    p.add_argument("--data", default=None,
                   help="registered dataset (e.g. tweets-sentiment), CSV/JSONL/CoNLL file, or text file/folder; "
                        "default: classifiers the dataset they were fine-tuned on, LMs the built-in held-out text")
    p.add_argument("--text-column", default=None, help="CSV/JSONL column with the text (default: text)")
    p.add_argument("--label-column", default=None, help="CSV/JSONL column with the label (default: label)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split of a registered dataset")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples (causal LMs: windows)")
    p.add_argument("--batch-sizes", type=batch_sizes, default=(1, 8), help="latency batch sizes, e.g. 1,8")
    p.add_argument("--device", default="auto", help="auto (a GPU when CUDA is available), cpu, cuda or cuda:N")
    p.add_argument("--task", default=None, help="load the model with this head (e.g. masked-lm for a base encoder)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per batch size")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the causal-LM generation timing")
    p.add_argument("--seq-len", type=int, default=256, help="causal-LM perplexity window in tokens")
    p.add_argument("--max-length", type=int, default=128, help="tokens per classifier example")
    p.add_argument("--out", default=None, help="folder for report.json, report.md and the PNGs "
                                               "(default: runs/evaluate/<model>)")


def default_out(model: str) -> Path:
    return Path("runs/evaluate") / (re.sub(r"[^\w.-]+", "-", model).strip("-.") or "model")


def run_evaluate(a: argparse.Namespace) -> None:
    from ..api import load
    from .run import evaluate

    model, tokenizer = load(a.model, task=a.task, device=a.device)
    report = evaluate(model, tokenizer, a.data, split=a.split, limit=a.limit, batch_sizes=a.batch_sizes,
                      text_column=a.text_column, label_column=a.label_column, device=a.device, name=a.model,
                      repeats=a.repeats, new_tokens=a.new_tokens, seq_len=a.seq_len, max_length=a.max_length,
                      progress=True)
    paths = report.save(a.out or default_out(a.model))
    print(report.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths))


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "evaluate": ("measure a model: accuracy/F1 or perplexity, latency, memory (report.json/.md + PNGs)",
                 setup_evaluate, run_evaluate),
}

