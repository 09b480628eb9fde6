"""Every kernels/*.cu compiles, without a GPU, exactly as the cupy backend compiles it at run time.

NVRTC gets cuda_sources.module_source(file) (headers pasted in), the runtime's full option list for sm_90 and
for an older arch (sm_80), and every name expression; each name expression must lower to a symbol. NVRTC
comes from CuPy (cupy_backends.cuda.libs.nvrtc) or, failing that, cuda-python (cuda.bindings.nvrtc); with
neither, these tests skip and say so. Each .cu also goes through nvcc -ptx as a standalone file, where nvcc
is installed (the project's pre-stop hook runs the same command).
"""
import functools
import re
import shutil
import subprocess

import pytest

from gpubp.backends import cuda_sources

ARCHS = (90, 80)


class CupyNvrtc:
    """cupy_backends.cuda.libs.nvrtc: raises on error, returns str."""

    def __init__(self):
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()   # loads libnvrtc: fails here when the library is missing
        self.nvrtc = nvrtc

    def compile(self, source, filename, options, names):
        """({name expression: lowered name}, NVRTC's log); AssertionError with the log on a compile error."""
        nvrtc = self.nvrtc
        prog = nvrtc.createProgram(source, filename, [], [])
        try:
            for name in names:
                nvrtc.addNameExpression(prog, name)
            try:
                nvrtc.compileProgram(prog, list(options))
            except nvrtc.NVRTCError as exc:
                raise AssertionError(f"NVRTC failed on {filename}: {exc}\n{nvrtc.getProgramLog(prog)}") from None
            return {name: nvrtc.getLoweredName(prog, name) for name in names}, nvrtc.getProgramLog(prog)
        finally:
            nvrtc.destroyProgram(prog)


class CudaPythonNvrtc:
    """cuda.bindings.nvrtc (cuda-python): returns (status, value) tuples, takes bytes."""

    def __init__(self):
        from cuda.bindings import nvrtc
        status, *_ = nvrtc.nvrtcVersion()
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"nvrtcVersion: {status}")
        self.nvrtc = nvrtc

    def _check(self, result):
        status, *values = result
        if status != self.nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(str(status))
        return values[0] if values else None

    def _log(self, prog):
        size = self._check(self.nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        self._check(self.nvrtc.nvrtcGetProgramLog(prog, log))
        return log.decode(errors="replace")

    def compile(self, source, filename, options, names):
        nvrtc = self.nvrtc
        prog = self._check(nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], []))
        try:
            for name in names:
                self._check(nvrtc.nvrtcAddNameExpression(prog, name.encode()))
            status, *_ = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
            if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise AssertionError(f"NVRTC failed on {filename}: {status}\n{self._log(prog)}")
            lowered = {}
            for name in names:
                value = self._check(nvrtc.nvrtcGetLoweredName(prog, name.encode()))
                lowered[name] = value.decode() if isinstance(value, bytes) else value
            return lowered, self._log(prog)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)


def _find_nvrtc():
    reasons = []
    for cls in (CupyNvrtc, CudaPythonNvrtc):
        try:
            return cls(), None
        except Exception as exc:   # not installed, or the shared library cannot be loaded
            reasons.append(f"{cls.__doc__.split(':')[0]}: {type(exc).__name__}: {exc}")
    return None, "no usable NVRTC (" + "; ".join(reasons) + "); pip install gpubp[test]"


NVRTC, NVRTC_MISSING = _find_nvrtc()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason=str(NVRTC_MISSING))


_kernel_source = cuda_sources.read_kernel_file


def test_every_cu_file_is_listed():
    shipped = sorted(p.name for p in cuda_sources.kernels_dir().iterdir() if p.name.endswith(".cu"))
    assert shipped == sorted(cuda_sources.KERNEL_FILES)


def _kernel_name_after(source, i):
    """The name declared after `__global__ void` (at i), past an optional __launch_bounds__(...)."""
    rest = source[i:].lstrip()
    if rest.startswith("__launch_bounds__"):
        depth, j = 0, len("__launch_bounds__")
        while True:   # skip the balanced parentheses
            depth += {"(": 1, ")": -1}.get(rest[j], 0)
            j += 1
            if depth == 0:
                break
        rest = rest[j:].lstrip()
    return re.match(r"\w+", rest).group(0)


@pytest.mark.parametrize("filename", cuda_sources.KERNEL_FILES)
def test_every_kernel_has_name_expressions(filename):
    """Each __global__ function of a file is instantiated for float and double (or is untemplated), so the
    compile test below builds all of them."""
    source, _, names = cuda_sources.module_source(filename)
    kernels = {_kernel_name_after(source, m.end()) for m in re.finditer(r"__global__\s+void\b", source)}
    assert kernels, "no kernels found"
    for kernel in kernels:
        instances = [n for n in names if n == kernel or n.startswith(kernel + "<")]
        assert instances, f"{kernel} has no name expression"
        first_args = {n[len(kernel) + 1:].split(",")[0].rstrip(">") for n in instances if n != kernel}
        if instances == [kernel]:
            continue
        if all(n.startswith(kernel + "<Tc") for n in instances):   # tensor-core: every operand precision
            fused = kernel.startswith("fused_mlp_")   # 16-bit only (gpubp/fused.py)
            precisions = cuda_sources.FUSED_PRECISIONS if fused else cuda_sources.TC_PRECISIONS
            assert first_args == {cuda_sources.TC_PRECISIONS[p] for p in precisions}
        elif all(n.startswith(kernel + "<Store") for n in instances):   # a storage format's (storage.cuh)
            assert first_args <= set(cuda_sources.STORE_FORMATS.values()) and \
                {"StoreBf16", "StoreFp16"} <= first_args
        else:
            assert any("<float" in n for n in instances) and any("<double" in n for n in instances)


@pytest.mark.parametrize("filename", cuda_sources.KERNEL_FILES)
def test_headers_are_pasted_into_the_source(filename):
    """CuPy's cache keys on the source string: no header may be left to -I."""
    source, options, _ = cuda_sources.module_source(filename)
    assert not re.search(r"^\s*#\s*include", source, re.MULTILINE)
    assert not any(o.startswith("-I") for o in options)
    if '#include "gemm.cuh"' in _kernel_source(filename):
        assert "gemm_block_tile" in source and "activation_forward" in source


@functools.cache
def nvrtc_compile(filename, arch):
    """({name expression: lowered name}, NVRTC's log with ptxas's report) of one file for sm_<arch>, with the
    runtime's options plus --ptxas-options=-v: compiled once per process (the tensor-core files take ~1 min an
    arch on 2 cores), shared by the tests here and test_tc_gemm.py's register checks."""
    source, _, names = cuda_sources.module_source(filename)
    return NVRTC.compile(source, filename, cuda_sources.runtime_nvrtc_options(arch) + ["--ptxas-options=-v"], names)


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", cuda_sources.KERNEL_FILES)
def test_nvrtc_compiles_every_kernel(filename, arch):
    names = cuda_sources.name_expressions(filename)
    lowered, _ = nvrtc_compile(filename, arch)
    for name in names:
        assert lowered[name], f"{name} did not lower"
        assert lowered[name] == name or lowered[name].startswith("_Z"), lowered[name]


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", cuda_sources.KERNEL_FILES)
def test_no_kernel_spills_registers(filename, arch):
    """A spill puts the GEMM accumulators in local memory and costs most of the speed: the register budgets
    of gemm.cuh's GEMM_MIN_BLOCKS and gemm_tc.cuh's TC_GEMM_MIN_BLOCKS must hold for every instance, on sm_90
    and sm_80 (ptxas's report, through NVRTC: the compile of the test above, not a second one)."""
    names = cuda_sources.name_expressions(filename)
    _, log = nvrtc_compile(filename, arch)
    reports = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(reports) >= len(names), log   # kernels, and device functions ptxas kept apart
    assert all(r == ("0", "0", "0") for r in reports), log


# The mixed-precision kernels (issue 12) outside gemm_tc.cu (test_tc_gemm.py compiles that one): every instance,
# by taking its address in host code (which instantiates a __global__ template for the device too)
MIXED_PRECISION_UNIT = "\n".join(
    ['#include "dense_tc.cu"', '#include "loss.cu"', '#include "loss_scale.cu"', "void* const gpubp_instances[] = {"]
    + [f"    (void*)&{name}," for f in ("dense_tc.cu", "loss.cu", "loss_scale.cu")
       for name in cuda_sources.name_expressions(f) if "Tc" in name or "Store" in name or f == "loss_scale.cu"]
    + ["};", ""])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
def test_nvcc_compiles_the_mixed_precision_kernels_to_cubin(tmp_path):
    """nvcc down to SASS for sm_90 and sm_80 in one run (each arch's ptxas report): every instance assembled,
    the inline PTX of storage.cuh and tensor_core.cuh included, no spills."""
    unit = tmp_path / "mixed_precision_instances.cu"
    unit.write_text(MIXED_PRECISION_UNIT)
    instances = MIXED_PRECISION_UNIT.count("(void*)&")
    result = subprocess.run(["nvcc", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", "-gencode",
                             "arch=compute_80,code=sm_80", "-c", "-I", str(cuda_sources.kernels_dir()), "-Xptxas",
                             "-v", str(unit), "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Compiling entry function") >= 2 * instances, result.stderr   # both archs
    assert "for 'sm_90'" in result.stderr and "for 'sm_80'" in result.stderr, result.stderr
    assert "spill stores" in result.stderr and not re.search(r"[1-9]\d* bytes spill", result.stderr), result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
@pytest.mark.parametrize("filename", cuda_sources.KERNEL_FILES)
def test_nvcc_compiles_each_file(filename):
    kernels_dir = cuda_sources.kernels_dir()
    path = kernels_dir.joinpath(filename)
    result = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-ptx", "-I", str(kernels_dir), str(path),
                             "-o", "/dev/null"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
