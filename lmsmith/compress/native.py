"""Native CPU kernels, compiled from C on first use and loaded with ctypes.

One kernel today: weight-only int8 linear for x86-64 CPUs with AVX2 and FMA (`csrc/int8_linear.c`),
where PyTorch's ``aten._weight_int8pack_mm`` has no fast path. The source ships as package data;
the first call compiles it with the system C compiler into a cache folder
(``$LMSMITH_CACHE_DIR/kernels``, by default ``~/.cache/lmsmith/kernels``), under a name keyed by a
hash of source, flags and compiler version, so an edited source or another compiler never picks up
a stale build. The build is written to a temporary file and renamed into place, so a second process
compiling at the same time never loads a half-written library.

Nothing here raises at import time. When the kernel cannot be used (another OS or CPU, no compiler,
a failed build, ``LMSMITH_NATIVE_KERNELS=0``) `native_int8_available()` is False, the reason is
logged once, and callers keep their PyTorch path.

OpenMP: the library links against the very libgomp file this process already has loaded (torch's
bundled copy, found in /proc/self/maps), so its DT_NEEDED names that copy's soname and the dynamic
loader reuses the loaded runtime: the process keeps one OpenMP thread pool, also where torch's copy
is renamed (libgomp-<hash>.so.1, as in the CUDA wheels) and a plain -lgomp would load a second one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DISABLE_ENV = "LMSMITH_NATIVE_KERNELS"  # "0" turns the native kernels off
CACHE_DIR_ENV = "LMSMITH_CACHE_DIR"
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx2", "fma")
_SOURCE_NAME = "int8_linear.c"
_SYMBOL = "lmsmith_int8_linear"
_COMPILE_TIMEOUT_S = 120
_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class NativeLibrary:
    """A loaded kernel library, or why there is none (`function` is None then)."""

    function: Any  # the ctypes function, argtypes set; None when unavailable
    path: Path | None
    reason: str  # "" when loaded


# --------------------------------------------------------------------------------------------------
# Where things are
# --------------------------------------------------------------------------------------------------
def source_path() -> Path:
    return Path(__file__).resolve().parent / "csrc" / _SOURCE_NAME


def cache_dir() -> Path:
    """``$LMSMITH_CACHE_DIR/kernels``, by default ``~/.cache/lmsmith/kernels``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "lmsmith"
    return root / "kernels"


def find_compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], check=True, capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def library_name(source: bytes, flags: tuple[str, ...], version: str) -> str:
    """File name of the build: any change to source, flags or compiler gives another name."""
    digest = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode()]))
    return f"int8_linear-{digest.hexdigest()[:16]}.so"


# --------------------------------------------------------------------------------------------------
# Can this machine run it
# --------------------------------------------------------------------------------------------------
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def is_x86_64_linux() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def unsupported_reason() -> str:
    """Why the native int8 kernel cannot run here without building it ("" when it may)."""
    if os.environ.get(DISABLE_ENV, "").strip() == "0":
        return f"disabled by {DISABLE_ENV}=0"
    if not is_x86_64_linux():
        return f"needs x86-64 Linux, this is {sys.platform}/{platform.machine()}"
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"CPU lacks {', '.join(missing)}"
    if find_compiler() is None:
        return "no C compiler (cc or gcc) on PATH"
    return ""


# --------------------------------------------------------------------------------------------------
# Build and load
# --------------------------------------------------------------------------------------------------
def loaded_openmp_runtime(maps: str = "/proc/self/maps", owner: Path | None = None) -> Path | None:
    """The libgomp file torch uses among those this process has mapped, or None.

    Other wheels bundle their own copy (scikit-learn's libgomp-<hash>.so.1): torch's is the one inside
    torch's install folder (`owner`), else — torch linking the system runtime — any other one.
    """
    try:
        with open(maps) as f:
            paths = {Path(line.split()[-1]) for line in f if "/libgomp" in line}
    except OSError:
        return None
    owner = owner or Path(torch.__file__).parent
    torch_own = sorted(p for p in paths if p.is_relative_to(owner))
    return (torch_own or sorted(paths) or [None])[0]


def link_flags(runtime: Path | None) -> tuple[str, ...]:
    """Link against `runtime` itself; --as-needed then drops the -lgomp that -fopenmp appends."""
    if runtime is None:
        return ()
    return ("-Wl,--as-needed", str(runtime), f"-Wl,-rpath,{runtime.parent}")


def compile_library(compiler: str, source: Path, target: Path, extra: tuple[str, ...] = ()) -> None:
    """Compile `source` to `target` atomically: readers see either no file or a complete one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, *COMPILE_FLAGS, "-o", temporary, str(source), *extra]
        done = subprocess.run(command, check=False, capture_output=True, text=True,
                              timeout=_COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _looks_complete(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _ELF_MAGIC
    except OSError:
        return False


def _open(path: Path) -> Any:
    function = getattr(ctypes.CDLL(str(path)), _SYMBOL)
    pointer = ctypes.c_void_p
    function.argtypes = [pointer, pointer, pointer, pointer, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int32]
    function.restype = None
    return function


def build_and_load(directory: Path | None = None) -> NativeLibrary:
    """Reuse a cached build when it loads; otherwise (also over a broken cached file) compile anew."""
    compiler = find_compiler()
    if compiler is None:
        return NativeLibrary(None, None, "no C compiler (cc or gcc) on PATH")
    source = source_path()
    extra = link_flags(loaded_openmp_runtime())
    target = (directory or cache_dir()) / library_name(source.read_bytes(), COMPILE_FLAGS + extra,
                                                       compiler_version(compiler))
    if _looks_complete(target):
        try:
            return NativeLibrary(_open(target), target, "")
        except OSError as err:  # truncated or foreign file at our name: rebuild over it
            log.warning("cached native kernel %s does not load (%s); rebuilding", target, err)
    compile_library(compiler, source, target, extra)
    return NativeLibrary(_open(target), target, "")


@functools.cache
def load_native_library() -> NativeLibrary:
    """The process-wide library, built once; never raises (the reason is logged once instead)."""
    reason = unsupported_reason()
    if reason:
        log.info("native int8 kernel off: %s; using PyTorch ops", reason)
        return NativeLibrary(None, None, reason)
    try:
        library = build_and_load()
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        log.warning("native int8 kernel unavailable, using PyTorch ops: %s", err)
        return NativeLibrary(None, None, str(err))
    log.info("native int8 kernel loaded from %s", library.path)
    return library


def native_int8_available() -> bool:
    return load_native_library().function is not None


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------
def check_int8_weight(qweight: torch.Tensor, scales: torch.Tensor) -> None:
    """The weight layout the kernel reads: int8 (out, in) and float32 (out,), contiguous, on CPU."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if scales.dtype != torch.float32 or scales.shape != (qweight.shape[0],):
        raise TypeError(
            f"scales must be float32 of shape ({qweight.shape[0]},), got {scales.dtype} {tuple(scales.shape)}"
        )
    for name, tensor in (("qweight", qweight), ("scales", scales)):
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor, got device {tensor.device}")


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T`` in float32 without materialising the float weight.

    x: (rows, in) float32 contiguous CPU; qweight: (out, in) int8; scales: (out,) float32.
    `threads` defaults to ``torch.get_num_threads()``. Raises RuntimeError when the kernel is not
    available (check `native_int8_available()` first)."""
    check_int8_weight(qweight, scales)
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu":
        raise TypeError(f"x must be a contiguous 2-D float32 CPU tensor, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != qweight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} input features, the weight {qweight.shape[1]}")
    return int8_linear_unchecked(x, qweight, scales, threads)


def int8_linear_unchecked(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """`int8_linear` without argument checks, for callers that validated the weight once (decode
    calls this ~200 times per token, so per-call checks would show)."""
    function = load_native_library().function
    if function is None:
        raise RuntimeError(f"native int8 kernel unavailable: {load_native_library().reason}")
    rows, out_features = x.shape[0], qweight.shape[0]
    y = torch.empty(rows, out_features, dtype=torch.float32)
    if rows:
        function(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), rows, x.shape[1],
                 out_features, threads or torch.get_num_threads())
    return y
