"""The native AVX2 int8 kernel: exact-enough results on any shape, its build cache, its fallbacks."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lmsmith.compress import native
from lmsmith.compress import quantize as qz
from lmsmith.compress.quantize import Int8WeightOnlyLinear, quantize_model


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Builds go to a temporary folder, not ~/.cache; the process-wide library is rebuilt there.
    LMSMITH_NATIVE_KERNELS=0 in the environment is honoured: the native-only tests then skip."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(native.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("kernels")))
        native.load_native_library.cache_clear()
        yield
    native.load_native_library.cache_clear()


@pytest.fixture
def fresh_library(monkeypatch):
    """For tests that change what loading sees (env, compiler): forget the loaded library around them."""
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    native.load_native_library.cache_clear()
    yield
    native.load_native_library.cache_clear()


@pytest.fixture
def needs_native():
    library = native.load_native_library()
    if library.function is None:
        pytest.skip(f"native int8 kernel unavailable here: {library.reason}")
    return library


def needs_compiler() -> str:
    reason = native.unsupported_reason()
    if reason:
        pytest.skip(f"native int8 kernel cannot be built here: {reason}")
    return native.find_compiler()


def random_int8_weight(out_features: int, in_features: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator) * 0.02 + 1e-3
    return qweight, scales


def reference(x, qweight, scales):
    return (x.double() @ (qweight.double() * scales.double()[:, None]).T).float()


# ---- the op ---------------------------------------------------------------------------------------
# (rows, in, out): K below 8 (all tail), K = 16k and 16k + 8 (both vector loops), odd K and N tails,
# N below 4 (only the tail block), odd row counts (the 1-row tile after the 2-row ones), up to 600 rows
SHAPES = [(1, 5, 3), (2, 8, 4), (1, 16, 1), (3, 24, 5), (4, 33, 7), (5, 100, 13), (1, 576, 192),
          (8, 577, 37), (33, 1536, 6), (129, 40, 130), (600, 72, 9)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,in_features,out_features", SHAPES)
def test_native_matches_reference(needs_native, rows, in_features, out_features, threads):
    qweight, scales = random_int8_weight(out_features, in_features, seed=rows + in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(out_features))
    y = native.int8_linear(x, qweight, scales, threads=threads)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference(x, qweight, scales), rtol=1e-4, atol=1e-4)


def test_native_uses_torch_thread_count_by_default_and_handles_zero_rows(needs_native):
    qweight, scales = random_int8_weight(11, 19)
    x = torch.randn(6, 19)
    torch.testing.assert_close(native.int8_linear(x, qweight, scales), reference(x, qweight, scales),
                               rtol=1e-4, atol=1e-4)
    assert native.int8_linear(torch.empty(0, 19), qweight, scales).shape == (0, 11)


def test_process_keeps_one_openmp_runtime(needs_native):
    # In a fresh interpreter: a test that imports scikit-learn maps its own libgomp into this one,
    # which says nothing about the kernel (the kernel linking that copy was a bug: see
    # test_links_torch_s_openmp_runtime_when_another_package_loaded_its_own).
    code = ("import json, torch\n"
            "from lmsmith.compress import native\n"
            "q = torch.randint(-127, 128, (64, 64), dtype=torch.int8)\n"
            "native.int8_linear(torch.randn(4, 64), q, torch.rand(64) + 0.01, threads=2)\n"
            "maps = open('/proc/self/maps').read().splitlines()\n"
            "print(json.dumps(sorted({line.split()[-1] for line in maps if 'libgomp' in line})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(loaded) == 1, loaded


def test_the_kernel_uses_torch_s_runtime_even_after_another_was_loaded(needs_native):
    sklearn = pytest.importorskip("sklearn.metrics")  # maps scikit-learn's own libgomp into this process
    assert sklearn is not None
    torch_dir = Path(torch.__file__).parent
    assert native.loaded_openmp_runtime().is_relative_to(torch_dir)


def test_links_against_the_openmp_runtime_already_loaded(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /venv/torch/lib/libgomp-a34b3233.so.1\n"
                    "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/libc.so.6\n")
    runtime = native.loaded_openmp_runtime(str(maps))
    assert runtime == Path("/venv/torch/lib/libgomp-a34b3233.so.1")
    assert native.link_flags(runtime) == ("-Wl,--as-needed", str(runtime), "-Wl,-rpath,/venv/torch/lib")
    assert native.loaded_openmp_runtime(str(tmp_path / "none")) is None and native.link_flags(None) == ()


def test_links_torch_s_openmp_runtime_when_another_package_loaded_its_own(tmp_path):
    # scikit-learn's bundled copy sorts first by name; linking it made the kernel run a second runtime
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /venv/scikit_learn.libs/libgomp-e985bcbb.so.1.0.0\n"
                    "7f02-7f03 r-xp 00000000 08:01 2 /venv/torch/lib/libgomp.so.1\n")
    assert native.loaded_openmp_runtime(str(maps), owner=Path("/venv/torch")) == Path("/venv/torch/lib/libgomp.so.1")
    # torch on the system runtime: nothing under torch's folder, the mapped one is used
    system = tmp_path / "system-maps"
    system.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1\n")
    assert native.loaded_openmp_runtime(str(system), owner=Path("/venv/torch")) == Path(
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1")


@pytest.mark.parametrize(
    "x,qweight,scales,error",
    [
        (torch.randn(2, 8), torch.zeros(4, 8), torch.ones(4), TypeError),  # float weight
        (torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4).double(), TypeError),
        (torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), TypeError),
        (torch.randn(2, 8).double(), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), TypeError),
        (torch.randn(8, 2).T, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), TypeError),
        (torch.randn(2, 7), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), ValueError),
        (torch.randn(2, 8), torch.zeros(8, 4, dtype=torch.int8).T, torch.ones(4), ValueError),
    ],
)
def test_int8_linear_rejects_bad_arguments(x, qweight, scales, error):
    with pytest.raises(error):
        native.int8_linear(x, qweight, scales)


# ---- availability and fallback --------------------------------------------------------------------
def test_env_var_turns_the_kernel_off(monkeypatch, fresh_library):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert not native.native_int8_available()
    assert native.DISABLE_ENV in native.load_native_library().reason
    with pytest.raises(RuntimeError, match="unavailable"):
        native.int8_linear(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))
    module = Int8WeightOnlyLinear.from_linear(nn.Linear(32, 16))
    assert module.kernel_name() != "int8_avx2"
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.forward_reference(x), rtol=0.02, atol=0.02)


def test_missing_compiler_falls_back(monkeypatch, fresh_library):
    monkeypatch.setattr(native, "is_x86_64_linux", lambda: True)  # so the compiler is what is missing
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert not native.native_int8_available()
    assert "compiler" in native.load_native_library().reason
    assert Int8WeightOnlyLinear.from_linear(nn.Linear(32, 16)).kernel_name() != "int8_avx2"


def test_cpu_without_avx2_falls_back(monkeypatch, fresh_library):
    monkeypatch.setattr(native, "is_x86_64_linux", lambda: True)
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "fma"}))
    assert not native.native_int8_available()
    assert "avx2" in native.load_native_library().reason


def test_failed_compile_falls_back_and_leaves_no_files(monkeypatch, fresh_library, tmp_path):
    needs_compiler()
    monkeypatch.setenv(native.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(native, "COMPILE_FLAGS", (*native.COMPILE_FLAGS, "-include", "lmsmith_missing.h"))
    assert not native.native_int8_available()
    assert "failed" in native.load_native_library().reason
    assert list(native.cache_dir().iterdir()) == []  # no half-written library, no temporary left behind


def test_other_platforms_fall_back(monkeypatch, fresh_library):
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert not native.native_int8_available()
    assert "x86-64" in native.load_native_library().reason


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nbugs\t: none\n")
    assert native.cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx2", "fma"}
    assert native.cpu_flags(str(tmp_path / "missing")) == frozenset()


# ---- build cache ----------------------------------------------------------------------------------
def test_second_load_reuses_the_cached_build(needs_native, monkeypatch):
    def no_compiling(*args):
        raise AssertionError("recompiled although a good build was cached")

    monkeypatch.setattr(native, "compile_library", no_compiling)
    again = native.build_and_load(native.cache_dir())
    assert again.path == needs_native.path and list(native.cache_dir().iterdir()) == [needs_native.path]
    assert _works(again)


def test_cache_name_follows_source_flags_and_compiler():
    name = native.library_name(b"source", ("-O3",), "gcc 12")
    assert name == native.library_name(b"source", ("-O3",), "gcc 12")
    others = {native.library_name(b"source2", ("-O3",), "gcc 12"),
              native.library_name(b"source", ("-O2",), "gcc 12"),
              native.library_name(b"source", ("-O3",), "gcc 13")}
    assert name not in others and len(others) == 3


def _cached_path(directory: Path, compiler: str) -> Path:
    source = native.source_path().read_bytes()
    flags = native.COMPILE_FLAGS + native.link_flags(native.loaded_openmp_runtime())
    return directory / native.library_name(source, flags, native.compiler_version(compiler))


def test_empty_cached_file_is_rebuilt(tmp_path):
    compiler = needs_compiler()
    target = _cached_path(tmp_path, compiler)
    target.touch()  # what a crashed, non-atomic writer could leave behind
    library = native.build_and_load(tmp_path)
    assert library.path == target and target.stat().st_size > 1000
    assert _works(library)


def test_truncated_cached_library_is_rebuilt(needs_native, tmp_path):
    target = _cached_path(tmp_path, native.find_compiler())
    target.write_bytes(needs_native.path.read_bytes()[:200])  # starts like an ELF file, then stops
    library = native.build_and_load(tmp_path)
    assert target.stat().st_size == needs_native.path.stat().st_size
    assert _works(library)


def _works(library: native.NativeLibrary) -> bool:
    qweight, scales = random_int8_weight(5, 9)
    x, y = torch.randn(2, 9), torch.empty(2, 5)
    library.function(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), 2, 9, 5, 1)
    return torch.allclose(y, reference(x, qweight, scales), rtol=1e-4, atol=1e-4)


def test_source_ships_next_to_the_module():
    assert native.source_path().is_file()
    assert native.source_path().parent == Path(native.__file__).resolve().parent / "csrc"


# ---- wired into quantization ----------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, qz._NATIVE_INT8_MAX_ROWS + 5])  # native kernel / sgemm path
def test_int8_weight_only_linear_picks_native_kernel(needs_native, rows):
    linear = nn.Linear(96, 50)
    module = Int8WeightOnlyLinear.from_linear(linear)
    assert module.kernel_name() == "int8_avx2"
    x = torch.randn(rows, 96)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.forward_reference(x), rtol=1e-4, atol=1e-4)
        assert (module(x) - linear(x)).norm() / linear(x).norm() < 0.02


def test_quantize_model_int8_uses_native_kernel(needs_native):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 130), nn.GELU(), nn.Linear(130, 33), nn.GELU(), nn.Linear(33, 8))
    quantize_model(model, "int8")
    modules = [m for m in model.modules() if isinstance(m, Int8WeightOnlyLinear)]
    assert len(modules) == 3 and {m.kernel_name() for m in modules} == {"int8_avx2"}
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        fast = model(x)
        for m in modules:
            m.use_kernels = False
        torch.testing.assert_close(fast, model(x), rtol=1e-4, atol=1e-4)


def test_self_check_rejects_a_wrong_native_result(needs_native, monkeypatch):
    monkeypatch.setattr(native, "int8_linear_unchecked", lambda x, q, s, threads=None: torch.zeros(
        x.shape[0], q.shape[0]))
    module = Int8WeightOnlyLinear.from_linear(nn.Linear(32, 16))
    assert module.kernel_name() != "int8_avx2"


def test_native_kernel_comes_first_for_cpu():
    cpu_kernels = [k.name for k in Int8WeightOnlyLinear.kernels if k.device_type == "cpu"]
    assert cpu_kernels[0] == "int8_avx2" and "int8pack_mm" in cpu_kernels


def test_library_links_libgomp_by_soname(needs_native):
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("no ldd")
    done = subprocess.run([ldd, str(needs_native.path)], check=True, capture_output=True, text=True)
    assert "libgomp.so.1" in done.stdout


@pytest.mark.parametrize("max_numel,expect_native", [(10**9, False), (100, True)])
def test_many_rows_dequantize_unless_the_weight_is_big(needs_native, monkeypatch, max_numel, expect_native):
    module = Int8WeightOnlyLinear.from_linear(nn.Linear(24, 12))
    assert module.kernel_name() == "int8_avx2"  # self-check done before counting calls
    calls = []
    real = native.int8_linear_unchecked
    monkeypatch.setattr(native, "int8_linear_unchecked", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(qz, "_DEQUANTIZE_MAX_NUMEL", max_numel)
    x = torch.randn(qz._NATIVE_INT8_MAX_ROWS + 1, 24)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.forward_reference(x), rtol=1e-4, atol=1e-4)
    assert bool(calls) == expect_native
    with torch.no_grad():
        module(x[:2])
    assert len(calls) == int(expect_native) + 1  # few rows always take the native kernel


def test_native_module_accepts_bfloat16_and_strided_inputs(needs_native):
    module = Int8WeightOnlyLinear.from_linear(nn.Linear(40, 20))
    assert module.kernel_name() == "int8_avx2"
    strided = torch.randn(40, 6).T  # (6, 40), not contiguous
    with torch.no_grad():
        torch.testing.assert_close(module(strided), module.forward_reference(strided), rtol=1e-4, atol=1e-4)
        low = strided.bfloat16()
        out = module(low)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), module.forward_reference(low.float()), rtol=0.02, atol=0.02)


def test_cache_folder_follows_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_DIR_ENV, str(tmp_path))
    assert native.cache_dir() == tmp_path / "kernels"
    monkeypatch.delenv(native.CACHE_DIR_ENV)
    assert native.cache_dir() == Path.home() / ".cache" / "lmsmith" / "kernels"
