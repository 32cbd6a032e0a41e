"""Time one Linear forward: float vs lmsmith's int8 / int4 / W8A8 modules (their fast kernels).

    python benchmarks/quant_kernels.py [--threads N] [--iters 200]

Shapes are SmolLM2-135M's MLP (576 -> 1536 and 1536 -> 576), batch 1 (decode) and 8. Also times
aten._dyn_quant_matmul_4bit (int4 weights + dynamic int8 activations), which lmsmith does not use
on x86: without KleidiAI (ARM) it runs a slow reference implementation.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from lmsmith.compress.quantize import (
    DynamicInt8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    pack_int4,
    quantize_int4_grouped,
)


def time_us(fn: Callable[[], object], iters: int) -> float:
    """Median of 5 runs of `iters` calls, in microseconds per call."""
    for _ in range(10):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - start) / iters * 1e6)
    return sorted(runs)[2]


def dyn_quant_int4(linear: nn.Linear, group_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """aten's W4A8 CPU op (symmetric int4 weights, bf16 scales), or None if this build lacks it."""
    if not hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit"):
        return None
    q, scales, _ = quantize_int4_grouped(linear.weight.detach(), group_size, symmetric=True)
    out_f, in_f = linear.weight.shape
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight(
        pack_int4(q), scales.to(torch.bfloat16), linear.bias.detach(), group_size, in_f, out_f
    )
    return lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, packed, group_size, in_f, out_f)


def candidates(linear: nn.Linear, group_size: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    bf16 = nn.Linear(linear.in_features, linear.out_features).to(torch.bfloat16)
    bf16.load_state_dict(linear.state_dict())
    found = {
        "fp32": linear,
        "bf16": lambda x: bf16(x.to(torch.bfloat16)),
        "int8": Int8WeightOnlyLinear.from_linear(linear),
        f"int4-g{group_size}": Int4WeightOnlyLinear.from_linear(linear, group_size, symmetric=False),
        "w8a8": DynamicInt8Linear.from_linear(linear),
    }
    dyn = dyn_quant_int4(linear, group_size)
    if dyn is not None:
        found[f"w4a8-aten-g{group_size}"] = dyn
    return found


def kernel_of(module: object) -> str:
    return module.kernel_name("cpu") if hasattr(module, "kernel_name") else "-"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, threads {args.threads}")
    print(f"{'layer (in->out)':>16} {'batch':>5} {'method':>16} {'kernel':>22} {'us':>9} {'vs fp32':>8}")
    for in_f, out_f in [(576, 1536), (1536, 576)]:
        linear = nn.Linear(in_f, out_f)
        methods = candidates(linear, args.group_size)
        for batch in (1, 8):
            x = torch.randn(batch, in_f)
            base = time_us(lambda x=x, linear=linear: linear(x), args.iters)
            for name, fn in methods.items():
                us = base if name == "fp32" else time_us(lambda fn=fn, x=x: fn(x), args.iters)
                print(
                    f"{f'{in_f}->{out_f}':>16} {batch:>5} {name:>16} {kernel_of(fn):>22} {us:>9.1f} {base / us:>7.2f}x"
                )


if __name__ == "__main__":
    main()
