"""Batch-1 decode speed of quantized SmolLM2-135M against fp32, in alternating rounds.

One command:  python benchmarks/quant_decode.py [--rounds 4] [--new-tokens 32] [--threads 2]

A focused repeat of `benchmarks/compress.py`'s decode column for the issue-4 speed targets (int8 ≥ 1.5×,
int4 g64 ≥ 2× fp32): the same measurement (`iter_tokens`, prefill excluded, greedy), but the models
take turns for --rounds rounds so that a change in machine load hits them alike, and the median of the
rounds is reported. int4 here is round-to-nearest; clip search or GPTQ change the values, not the
kernels, so the speed is the same.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from lmsmith.api import load
from lmsmith.compress.quantize import quantize_model
from lmsmith.generation import GenerationConfig, iter_tokens

PROMPT = "The history of the printing press begins in"


def build_models() -> tuple[dict, object]:
    fp32, tok = load("smollm2")
    int8 = copy.deepcopy(fp32)
    quantize_model(int8, "int8")
    int4 = copy.deepcopy(fp32)
    quantize_model(int4, "int4", group_size=64, include_lm_head=True, lm_head_method="int8")
    return {"fp32": fp32, "int8": int8, "int4 g64 + int8 head": int4}, tok


def ms_per_token(model, prompt: list[list[int]], pad_id: int, new_tokens: int) -> float:
    for _ in iter_tokens(model, prompt, GenerationConfig(max_new_tokens=2), pad_id):
        pass  # warm-up
    stamps = [time.perf_counter() for _ in iter_tokens(model, prompt, GenerationConfig(max_new_tokens=new_tokens + 1),
                                                       pad_id)]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    models, tok = build_models()
    prompt = [tok.encode(PROMPT, add_special_tokens=False)]
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(a.rounds):
        for name, model in models.items():
            times[name].append(ms_per_token(model, prompt, pad_id, a.new_tokens))
    base = statistics.median(times["fp32"])
    print(f"SmolLM2-135M batch-1 decode, {a.threads} threads, {a.rounds} alternating rounds of {a.new_tokens} tokens")
    print(f"{'model':24} {'median ms/token':>16} {'rounds':>28} {'speed vs fp32':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        rounds = " ".join(f"{v:.1f}" for v in values)
        print(f"{name:24} {median:>16.1f} {rounds:>28} {base / median:>13.2f}x")


if __name__ == "__main__":
    main()
