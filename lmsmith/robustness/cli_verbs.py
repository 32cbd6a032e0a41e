"""CLI verb `lmsmith robustness` (merged into lmsmith/cli.py's VERBS table).

    lmsmith robustness runs/tune-full-1/model --limit 500 --perturbations typos --severities 0.1 0.25 0.5 \\
        --attack greedy --out runs/robustness

"""
from __future__ import annotations

import argparse
from collections.abc import Callable


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a sequence-classification model folder (or artifact)")
    p.add_argument("--data", default="tweets-sentiment", help="a registered data set, or a .csv/.jsonl file "
                   "with text and label columns (used whole)")
    p.add_argument("--split", default="test", help="train, validation or test (registered data sets)")
    p.add_argument("--limit", type=int, default=500, help="texts to test (the first N of the split)")
    p.add_argument("--perturbations", nargs="+", default=["typos"],
                   help="perturbation or suite names (typos, words, noise, tweet, all)")
    p.add_argument("--severities", nargs="+", type=float, default=[0.1, 0.25, 0.5],
                   help="fractions of words edited, in [0, 1]")
    p.add_argument("--attack", default="greedy", help="greedy, hotflip or none")
    p.add_argument("--attack-limit", type=int, default=100, help="texts to attack (the first N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="default: the model's training max_length, or 128")
    p.add_argument("--out", default=None, help="folder for report.md, report.json and robustness.png")
    p.add_argument("--no-progress", action="store_true")


def _run(a: argparse.Namespace) -> None:
    from .report import robustness_report

    result = robustness_report(a.model, data=a.data, split=a.split, limit=a.limit, perturbations=a.perturbations,
                               severities=a.severities, attack_method=a.attack, attack_limit=a.attack_limit,
                               out=a.out, seed=a.seed, batch_size=a.batch_size, max_length=a.max_length,
                               progress=not a.no_progress)
    print(result.markdown)
    for name, path in result.files.items():
        print(f"wrote {name}: {path}")


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "robustness": ("accuracy under typos and other perturbations, and adversarial attacks, of a classifier",
                   _setup, _run),
}

