"""Compression benchmark: quality, size and speed of compressed SmolLM2-135M and MiniLM-L6 variants.

One command:  python benchmarks/compress.py [--quick] [--threads N] [--only smollm2|minilm] [--out DIR]

SmolLM2-135M-Instruct (the embedded GGUF, dequantized to fp32, is the start model): fp32, int8
(per-channel RTN), int4 group 64 (RTN and GPTQ), 50% Wanda, 50% magnitude and 2:4 (Wanda scores)
pruning of the transformer blocks, and Q4_0 written as GGUF by lmsmith's exporter and read back
(quality and file size only). Perplexity is on the package's held-out paragraphs; calibration
(GPTQ, Wanda) uses tweets. Decode tokens/s after the prompt, at batch 1 and 8, greedy.
If llama-cpp-python is installed, the Q4_0 file's perplexity under llama.cpp is added.

MiniLM-L6 on tweet sentiment: the shipped recipe compress-minilm-distill (fine-tuned 6-layer
teacher → distilled 3-layer student → int8), with smaller data under --quick.

Everything runs in this process, one model at a time; each table is relative to its first row.
The tables and PNG plots are written to --out (default runs/bench-compress).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmsmith.compress.prune import prune_model, remove_masks
from lmsmith.compress.quantize import quantize_model
from lmsmith.compress.recipe import DataSpec, StepData, run_recipe
from lmsmith.compress.report import (
    Measurement,
    MeasureSettings,
    count_parameters,
    lm_eval_set,
    markdown_table,
    measure,
    plot_tradeoffs,
    quality_metrics,
)
from lmsmith.io.artifact import new_manifest, save_artifact

BLOCKS = ("layers.*",)  # pruning targets: the transformer blocks (embeddings and head stay dense)


def smollm2_variants() -> list[tuple[str, callable]]:
    def quant(method, **kw):
        return lambda model, cal: quantize_model(model, method, calibration=cal if "gptq" in method else None, **kw)

    def prune(method, sparsity=None):
        def apply(model, cal):
            prune_model(model, method, sparsity, targets=BLOCKS, calibration=cal if "wanda" in method else None)
            remove_masks(model)
        return apply

    return [
        ("int8", quant("int8")),
        ("int4 g64 RTN", quant("int4", group_size=64)),
        ("int4 g64 GPTQ", quant("gptq-int4", group_size=64)),
        ("50% Wanda", prune("wanda", 0.5)),
        ("50% magnitude", prune("magnitude", 0.5)),
        ("2:4 Wanda", prune("nm-wanda")),
    ]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_saved(model, evalset, name: str, settings: MeasureSettings, scratch: Path) -> Measurement:
    """Save as an artifact (for the size on disk), measure, delete the files."""
    path = save_artifact(model, scratch / "artifact", manifest=new_manifest(model.config, "benchmark"))
    try:
        return measure(model, evalset, name, path=path, settings=settings)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def gguf_q4_0_rows(base, tok, evalset, scratch: Path) -> list[Measurement]:
    """Q4_0 as llama.cpp stores it: exported by lmsmith, read back (dequantized) and evaluated by lmsmith,
    and by llama.cpp when llama-cpp-python is installed. Quality and file size only (no speed)."""
    try:
        from lmsmith.io.gguf_export import export_gguf
    except ImportError:
        log("lmsmith.io.gguf_export is not available: skipping the Q4_0 GGUF row")
        return []
    from lmsmith.api import load

    path = export_gguf(base, tok, scratch / "smollm2-q4_0.gguf", quant="q4_0")
    model, _ = load(path)
    total, nonzero = count_parameters(model)
    quality = quality_metrics(model.eval(), evalset)
    rows = [Measurement("Q4_0 GGUF (lmsmith)", "lm", quality, total, nonzero, path.stat().st_size, float("nan"))]
    if importlib.util.find_spec("llama_cpp") is not None:
        rows.append(Measurement("Q4_0 GGUF (llama.cpp)", "lm", {"perplexity": llama_cpp_perplexity(path, evalset)},
                                total, nonzero, path.stat().st_size, float("nan")))
    else:
        log("llama-cpp-python is not installed (no prebuilt wheel for this platform): no llama.cpp row")
    return rows


def llama_cpp_perplexity(path: Path, evalset) -> float:
    """Perplexity of the same token windows under llama.cpp (each window evaluated from scratch)."""
    import numpy as np
    from llama_cpp import Llama

    windows = [row for batch in evalset.batches for row in batch["input_ids"].tolist()]
    llm = Llama(model_path=str(path), n_ctx=len(windows[0]), logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return math.exp(nll / count)


def run_smollm2(args, out: Path) -> str:
    from lmsmith.api import load

    settings = MeasureSettings(batch_sizes=(1, 8), new_tokens=16 if args.quick else 32)
    base, tok = load("smollm2")
    evalset = lm_eval_set(tok, seq_len=256)
    spec = DataSpec(dataset="tweets-sentiment", sizes={"train": 1000, "validation": 0, "test": 0}, seq_len=128,
                    calibration_batches=4 if args.quick else 8, calibration_batch_size=8)
    calibration = StepData(spec, tok, "lm").calibration
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        scratch = Path(tmp)
        log("SmolLM2: measuring fp32")
        rows.append(measure_saved(base, evalset, "fp32", settings, scratch))
        for name, apply in smollm2_variants():
            started = time.perf_counter()
            model = copy.deepcopy(base)
            apply(model, calibration)
            log(f"SmolLM2: {name} applied in {time.perf_counter() - started:.0f}s, measuring")
            rows.append(measure_saved(model, evalset, name, settings, scratch))
            log(f"SmolLM2: {name}: perplexity {rows[-1].quality['perplexity']:.2f}")
            del model
        if not args.quick:
            rows += gguf_q4_0_rows(base, tok, evalset, scratch)
    plot_tradeoffs(rows, out / "smollm2", "SmolLM2-135M")
    title = (f"SmolLM2-135M-Instruct, perplexity on {int(rows[0].quality['tokens'])} held-out tokens, "
             f"greedy decode of {settings.new_tokens} tokens; ratios against fp32")
    return f"{title}\n\n{markdown_table(rows)}"


def run_minilm(args, out: Path) -> str:
    overrides = [f"output={out / 'minilm'}", "keep_intermediate=true"]
    if args.quick:
        overrides += ["data.sizes={train: 1000, validation: 100, test: 500}", "steps.1.distill.train.epochs=1"]
    result = run_recipe("compress-minilm-distill", overrides, log=log)
    rows = list(result.measurements[1:])  # the source row has an untrained head; the teacher is 01-finetune
    names = {"01-finetune": "teacher (6 layers)", "02-distill": "distilled (3 layers)", "03-quantize": "distilled + int8"}
    rows = [Measurement(**{**r.to_dict(), "name": names.get(r.name, r.name)}) for r in rows]
    test_size = 500 if args.quick else 1000
    title = f"MiniLM-L6 tweet sentiment ({test_size} test tweets); ratios against the fine-tuned teacher"
    return f"{title}\n\n{markdown_table(rows)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="less data, fewer decode tokens, no GGUF row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--only", choices=["smollm2", "minilm"], default=None)
    p.add_argument("--out", type=Path, default=Path("runs/bench-compress"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections = []
    if args.only in (None, "smollm2"):
        sections.append(run_smollm2(args, args.out))
    if args.only in (None, "minilm"):
        sections.append(run_minilm(args, args.out))
    text = "\n\n".join(sections)
    (args.out / "tables.md").write_text(text + "\n")
    print(f"\n{text}\n\n(torch threads: {torch.get_num_threads()}, total {time.perf_counter() - started:.0f}s; "
          f"tables and plots in {args.out})")


if __name__ == "__main__":
    main()
