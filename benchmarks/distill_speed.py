"""Encoder speed of a 3-layer MiniLM student against the 6-layer teacher, in alternating rounds.

One command:  python benchmarks/distill_speed.py [--rounds 5] [--repeats 20] [--threads 2]

A focused repeat of `benchmarks/compress.py`'s MiniLM speed columns (which time 3 forward passes) for
the issue-4 target "distilled 3-layer MiniLM at >= 1.8x the teacher's speed". The student keeps every
other layer of MiniLM-L6 (as `compress-minilm-distill` builds it); speed does not depend on the weights,
so no training runs here. Inputs are the first 64 test tweets of `tweets-sentiment`, padded per batch.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from lmsmith.api import load
from lmsmith.data import collate_padded
from lmsmith.data.registry import load_dataset


def student_of(teacher: nn.Module, keep: slice = slice(1, None, 2)) -> nn.Module:
    student = copy.deepcopy(teacher)
    student.layers = nn.ModuleList(list(student.layers)[keep])
    student.config = student.config.replace(num_layers=len(student.layers))
    return student


def seconds_per_batch(model: nn.Module, inputs: dict, repeats: int) -> float:
    with torch.no_grad():
        model(**inputs)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(**inputs)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    teacher, tok = load("minilm-l6", task="base")
    models = {"teacher (6 layers)": teacher.eval(), "student (3 layers)": student_of(teacher).eval()}
    texts = [r.text for r in load_dataset("tweets-sentiment").splits.test[:64]]
    ids = [tok.encode(t)[:128] for t in texts]
    print(f"MiniLM-L6 encoder, {a.threads} threads, median of {a.rounds} alternating rounds x {a.repeats} batches")
    for batch in (1, 8):
        inputs = collate_padded([{"input_ids": r} for r in ids[:batch]], tok.pad_id)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(a.rounds):
            for name, model in models.items():
                times[name].append(seconds_per_batch(model, inputs, a.repeats))
        teacher_s = statistics.median(times["teacher (6 layers)"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"batch {batch}  {name:20} {median * 1e3:8.2f} ms  {batch / median:8.1f} ex/s  "
                  f"{teacher_s / median:5.2f}x")


if __name__ == "__main__":
    main()
