"""How much memory a model takes: parameter counts, tensor bytes, bytes on disk, KV-cache bytes per
token, and the peak memory growth while it runs (peak resident set on CPUs, peak allocated on CUDA).
"""
from __future__ import annotations

from pathlib import Path
from typing import Self

import torch
from torch import nn


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's saved tensors (state dict), counting tensors shared by tying once.
    Kernel-packed copies built at run time are not included."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(logical weights, nonzero weights); a quantized Linear (any module with `dequantize_weight`)
    counts in × out (+ bias) weights, however its buffers store them."""
    seen: set[int] = set()
    total = nonzero = 0
    for module in model.modules():
        if callable(getattr(module, "dequantize_weight", None)):
            weight, bias = module.dequantize_weight(), getattr(module, "bias", None)
            total += weight.numel() + (bias.numel() if bias is not None else 0)
            nonzero += int((weight != 0).sum()) + (int((bias != 0).sum()) if bias is not None else 0)
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                nonzero += int((p != 0).sum())
    return total, nonzero


def size_on_disk(model: nn.Module, path: str | Path | None = None) -> int:
    """Bytes of the saved weight files in `path` (a folder of .safetensors, or one file such as a
    GGUF), else of the model's tensors."""
    if path is None:
        return model_size_bytes(model)
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    return sum(f.stat().st_size for f in files)


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one more token adds to a causal LM's KV cache in one sequence: keys and values for every
    layer, kv_heads × head_dim each, in the cache's dtype (the model's)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.kv_heads * config.dim_per_head * element


def release_freed_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Freed weights of a few MB come
    from the heap, not from their own mappings, and glibc keeps such memory until trimmed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryTracker:
    """Largest growth of memory use inside the `with` block: peak allocated bytes on CUDA; on Linux
    CPUs the resident-set high-water mark, reset on entry through /proc/self/clear_refs.

    After the block, `growth_bytes` is peak minus the use on entry and `peak_bytes` the peak itself
    (CUDA: allocated by tensors; CPU: the process's resident set)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.growth_bytes = self.peak_bytes = self._before = 0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self._before = rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = rss_bytes("VmHWM")
        self.growth_bytes = max(0, self.peak_bytes - self._before)


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set to its current size (Linux); False where unsupported."""
    release_freed_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def rss_bytes(field_name: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in bytes (VmRSS: now, VmHWM: peak); 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
