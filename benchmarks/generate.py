"""Decode speed and memory: lmsmith vs transformers on the embedded SmolLM2-135M (fp32, CPU).

One command:  python benchmarks/generate.py [--new-tokens 64] [--threads N]
Each engine runs in its own subprocess so peak RSS is its own. Both load the same GGUF file
(dequantized to fp32), use the same prompts and greedy decoding for exactly --new-tokens tokens.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "Explain how a refrigerator works:",
    "def fibonacci(n):",
    "The three most important ideas in economics are",
    "Once upon a time, in a village at the edge of a forest,",
    "Translate to French: The weather is nice today.",
    "A list of healthy breakfast ideas:",
]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_lmsmith(batch: list[str], new_tokens: int) -> tuple[float, int]:
    from lmsmith.generation import generate
    from lmsmith.interactive import load_for_inference

    model, tok = load_for_inference("smollm2")  # what `lmsmith generate` runs: packed oneDNN linears
    generate(model, tok, batch[:1], max_new_tokens=4, stop_token_ids=())  # warm-up
    start = time.perf_counter()
    out = generate(model, tok, batch, max_new_tokens=new_tokens, stop_token_ids=())
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for c in out)


def run_transformers(batch: list[str], new_tokens: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmsmith.api import resolve

    path = resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    enc = tok(batch, return_tensors="pt", padding=True)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        seconds = time.perf_counter() - start
    return seconds, (out.shape[1] - enc["input_ids"].shape[1]) * len(batch)


def worker(engine: str, batch_size: int, new_tokens: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    run = run_lmsmith if engine == "lmsmith" else run_transformers
    seconds, tokens = run(PROMPTS[:batch_size], new_tokens)
    print(json.dumps({"engine": engine, "batch": batch_size, "tokens": tokens, "seconds": seconds,
                      "tokens_per_s": tokens / seconds, "peak_rss_mb": rss_mb()}))


def measure(engine: str, batch: int, new_tokens: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--batch", str(batch), "--new-tokens", str(new_tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--worker", choices=["lmsmith", "transformers"])
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.batch, a.new_tokens, a.threads)
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        ours = measure("lmsmith", batch, a.new_tokens, a.threads)
        peer = measure("transformers", batch, a.new_tokens, a.threads)
        rows.append((batch, ours, peer))
    print(f"\nSmolLM2-135M fp32, greedy, {a.new_tokens} new tokens per prompt\n")
    print("| batch | lmsmith tok/s | transformers tok/s | speed ratio | lmsmith peak RSS MB | transformers peak RSS MB"
          " | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for batch, o, t in rows:
        print(f"| {batch} | {o['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | "
              f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x | {o['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | "
              f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
