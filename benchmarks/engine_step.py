"""Decode-step time of the serving engine on the embedded SmolLM2-135M (fp32), at 1 / 8 / 32 sequences.

One command:  python benchmarks/engine_step.py [--batch 1 8 32] [--prompt-tokens 64] [--steps 16]
                                               [--threads N]

For each batch size B: B requests with different prompts of --prompt-tokens tokens are prefilled, then
--steps decode steps are timed (median), alternating with steps of the peer so that a busy machine
slows both alike. Printed per B:
  engine   `Engine.step()`: schedule + runner (paged gather/scatter, forward, sampling) + detokenize
  runner   `ModelRunner.execute` alone (the model forward over the paged cache, plus sampling)
  static   the peer: one decode step of the same model over lmsmith's StaticKVCache (what
           `lmsmith.generation` does), B rows of the same length: no paging, no scheduling
  ratio    engine / static: the price of paging + continuous batching bookkeeping
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden press adapted from those used for wine. ")


def prompts(tok, batch: int, length: int) -> list[list[int]]:
    """B different prompts of exactly `length` tokens (a rotating window over a long text)."""
    ids = tok.encode(TEXT * (2 + (length * batch) // 40), add_special_tokens=False)
    return [ids[i * 7:i * 7 + length] for i in range(batch)]


def start_engine(model, tok, batch: int, prompt_len: int, steps: int):
    """An engine with B requests, prefilled and one decode in; its runner records execute() times."""
    from lmsmith.serve.engine import Engine, EngineConfig
    from lmsmith.serve.request import SamplingParams

    config = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * prompt_len),
                          num_blocks=batch * (-(-(prompt_len + steps + 8) // 16)),
                          enable_prefix_caching=False)
    engine = Engine(model, tok, config)
    engine.runner_times = []
    execute = engine.runner.execute

    def timed_execute(*args):
        start = time.perf_counter()
        out = execute(*args)
        engine.runner_times.append(time.perf_counter() - start)
        return out

    engine.runner.execute = timed_execute
    for i, p in enumerate(prompts(tok, batch, prompt_len)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True))
    engine.step()  # prefill everything
    engine.step()  # warm-up decode
    return engine


class StaticDecoder:
    """The peer: lmsmith's StaticKVCache decode loop (what lmsmith.generation runs), greedy."""

    @torch.inference_mode()
    def __init__(self, model, tok, batch: int, prompt_len: int, steps: int):
        from lmsmith.model.cache import StaticKVCache

        self.model, self.batch = model, batch
        ids = torch.tensor(prompts(tok, batch, prompt_len))
        self.cache = StaticKVCache(model.config, batch, prompt_len + steps + 4, dtype=model.dtype)
        self.token = model(ids, cache=self.cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        self.step()  # warm-up decode

    @torch.inference_mode()
    def step(self) -> None:
        self.token = self.model(self.token.view(self.batch, 1), cache=self.cache).logits[:, -1].argmax(-1)


def measure(model, tok, batch: int, prompt_len: int, steps: int) -> dict[str, float]:
    """Median step times; engine and peer steps alternate, so machine load hits both alike."""
    engine = start_engine(model, tok, batch, prompt_len, steps)
    static = StaticDecoder(model, tok, batch, prompt_len, steps)
    engine_times, static_times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        outputs = engine.step()
        engine_times.append(time.perf_counter() - start)
        assert len(outputs) == batch, "every sequence should decode in every timed step"
        start = time.perf_counter()
        static.step()
        static_times.append(time.perf_counter() - start)
    return {"engine": statistics.median(engine_times), "runner": statistics.median(engine.runner_times[2:]),
            "static": statistics.median(static_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmsmith.api import load

    model, tok = load("smollm2")
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, prompts of {args.prompt_tokens} tokens, "
          f"median of {args.steps} decode steps")
    print(f"{'B':>3} {'engine ms':>10} {'runner ms':>10} {'static ms':>10} {'ratio':>6} {'tok/s':>8}")
    for batch in args.batch:
        t = measure(model, tok, batch, args.prompt_tokens, args.steps)
        engine_s, runner_s, static_s = t["engine"], t["runner"], t["static"]
        print(f"{batch:>3} {engine_s * 1e3:>10.1f} {runner_s * 1e3:>10.1f} {static_s * 1e3:>10.1f} "
              f"{engine_s / static_s:>6.2f} {batch / engine_s:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
