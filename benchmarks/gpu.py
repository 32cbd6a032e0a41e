"""Decode throughput on a CUDA GPU: lmsmith's engine and `generate` vs `transformers` generate, same
weights, same requests, at 1 / 8 / 32 concurrent streams.

One command:  python benchmarks/gpu.py [--new-tokens 128] [--json runs/bench/gpu.json]

The model is SmolLM2-135M: the embedded GGUF when its package is installed, else the same config
with random weights (speed does not depend on the values; every run generates exactly
--new-tokens tokens, ignoring end-of-sequence). Each stream has a 29-token prompt, as in the
serving benchmark. Engine rows submit all streams at once and step until every one finishes
(continuous batching over the paged KV cache); TTFT there is submit → first token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
                "intermediate_size": 1536, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                "norm_eps": 1e-5, "tie_word_embeddings": True, "family": "llama", "name": "smollm2-135m-random"}
PROMPT_TOKENS = 29


def build_model(dtype: torch.dtype, random_weights: bool = False):
    """(model on the device, where the weights came from)."""
    from lmsmith.api import load
    from lmsmith.model.config import ModelConfig
    from lmsmith.model.transformer import Transformer

    try:
        if random_weights:
            raise FileNotFoundError("random weights asked for")
        model, _ = load("smollm2", dtype=dtype, device=DEVICE)
        return model, "embedded GGUF"
    except (FileNotFoundError, KeyError, ModuleNotFoundError):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**SMOLLM2_135M)).to(DEVICE, dtype).eval()
        return model, "random weights, SmolLM2-135M config"


def prompts(streams: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(streams)
    return torch.randint(100, vocab - 1, (streams, PROMPT_TOKENS), generator=g).tolist()


DEVICE = "cuda"  # --device cpu: a quick smoke test of this script on a machine without a GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_engine(model, streams: int, new_tokens: int) -> dict:
    from lmsmith.serve.engine import Engine, EngineConfig
    from lmsmith.serve.request import SamplingParams

    engine = Engine(model, _NoTextTokenizer(), EngineConfig(max_num_seqs=max(streams, 1), kv_cache_memory_mb=2048,
                                                            max_num_batched_tokens=4096))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    sync()
    start = time.perf_counter()
    for i, ids in enumerate(prompts(streams, model.config.vocab_size)):
        engine.add_request(f"r{i}", ids, params)
    first: dict[str, float] = {}
    tokens = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            tokens += len(out.new_token_ids)
            first.setdefault(out.request_id, now - start)
    sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "ttft_p50_s": statistics.median(first.values()),
            "ttft_max_s": max(first.values())}


def run_lmsmith_generate(model, streams: int, new_tokens: int) -> dict:
    from lmsmith.generation import generate

    batch = prompts(streams, model.config.vocab_size)
    sync()
    start = time.perf_counter()
    out = generate(model, _NoTextTokenizer(), batch, max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    sync()
    return {"seconds": time.perf_counter() - start, "tokens": sum(len(c.token_ids) for c in out)}


def run_transformers(hf_model, streams: int, new_tokens: int, vocab: int) -> dict:
    ids = torch.tensor(prompts(streams, vocab), device=DEVICE)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync()
    return {"seconds": time.perf_counter() - start, "tokens": int((out.shape[1] - ids.shape[1]) * streams)}


class _NoTextTokenizer:
    """Token ids only: the benchmark never looks at text (decoding it would time the tokenizer)."""

    eos_ids, eos_id, pad_id = frozenset(), None, 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


def to_transformers(model, folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from lmsmith.io.checkpoint import save_hf_folder

    save_hf_folder(model.float().cpu(), folder)
    model.to(DEVICE, dtype)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(DEVICE).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: smoke-test the script (tiny numbers)")
    parser.add_argument("--random-weights", action="store_true", help="skip the embedded GGUF")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/lmsmith-gpu-bench"))
    a = parser.parse_args()
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (or --device cpu for a smoke test)")
    rows = [row for dtype_name in a.dtypes for row in bench_dtype(a, dtype_name)]
    print_table(rows)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": device_name(), "torch": torch.__version__,
                                      "new_tokens": a.new_tokens, "rows": rows}, indent=2))


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"


def bench_dtype(a: argparse.Namespace, dtype_name: str) -> list[dict]:
    dtype = getattr(torch, dtype_name)
    model, source = build_model(dtype, a.random_weights)
    hf = to_transformers(model, a.scratch / dtype_name, dtype)
    runners = {"lmsmith engine": lambda n: run_engine(model, n, a.new_tokens),
               "lmsmith generate": lambda n: run_lmsmith_generate(model, n, a.new_tokens),
               "transformers generate": lambda n: run_transformers(hf, n, a.new_tokens, model.config.vocab_size)}
    if dtype == torch.bfloat16:  # weight-only int4 (tinygemm on CUDA), bf16 activations
        import copy

        from lmsmith.compress.quantize import quantize_model

        int4 = copy.deepcopy(model)
        quantize_model(int4, "int4", group_size=64)
        runners["lmsmith engine int4 g64"] = lambda n: run_engine(int4, n, a.new_tokens)
    rows = []
    for name, runner in runners.items():
        runner(2)  # warm-up: CUDA context, kernels, allocator
        for streams in a.streams:
            result = runner(streams)
            rows.append({"dtype": dtype_name, "runner": name, "streams": streams, "source": source,
                         "tokens_per_s": result["tokens"] / result["seconds"], **result})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{device_name()}, torch {torch.__version__}: decode tokens/s "
          f"({PROMPT_TOKENS}-token prompts, exactly N new tokens per stream)")
    print(f"{'dtype':9} {'runner':22} {'streams':>7} {'tokens/s':>9} {'vs transformers':>16} {'TTFT p50':>9}")
    peer = {(r["dtype"], r["streams"]): r["tokens_per_s"] for r in rows if r["runner"] == "transformers generate"}
    for r in rows:
        ratio = r["tokens_per_s"] / peer[(r["dtype"], r["streams"])] if (r["dtype"], r["streams"]) in peer else 0
        ttft = f"{r['ttft_p50_s'] * 1000:.0f} ms" if "ttft_p50_s" in r else ""
        print(f"{r['dtype']:9} {r['runner']:22} {r['streams']:>7} {r['tokens_per_s']:>9.1f} {ratio:>15.2f}x {ttft:>9}")


if __name__ == "__main__":
    main()
