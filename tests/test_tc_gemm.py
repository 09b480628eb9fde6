"""The tensor-core GEMM (kernels/gemm_tc.cu on gemm_tc.cuh) on the CPU emulation, against
gpubp.precision.reference_gemm; the emulated instructions one at a time (tests/cuda_emulation/tc_probes.cu);
planted fragment-index and pipeline bugs that must fail; and the compile checks (NVRTC sm_90 / sm_80 without
spills, nvcc).

What the emulation runs is the real CUDA C: gemm_tc.cu with tensor_core.cuh's wrappers replaced by
tests/cuda_emulation/tensor_core_cpu.h, which implements mma.sync, ldmatrix and cp.async by the PTX ISA's
fragment layouts, warp-wide, and performs each cp.async only at the cp.async.wait_group that retires it.

Tolerance (why it is tight, and why it holds on hardware too): the reference is the product of the rounded
operands in float64, rounded once to float32: nearly exact. The kernel accumulates in float32, at least one
rounding per mma step along K. The emulation rounds exactly once a step (round to nearest: at most u = 2^-24
relative to the step's partial sum). Hardware is not specified by the PTX ISA here; measurements published
for V100/A100 tensor cores show exact products, then alignment to the largest term with truncated bits and a
truncated (round-toward-zero) normalisation: up to 2u a pass, and an m16n8k16 may take two k8 passes: 4u a
step. Each step's partial sum is at most Σ|a·b| of the row and column, so |C - ref| <= (steps + 1) · 8u ·
(|A|·|B|ᵀ), elementwise, with steps = ceil(K / mma_k): twice that hardware bound, plus the reference's own
rounding. It stays tight (K = 1000, bf16: 3e-5 relative to Σ|a·b|) while a fragment-index error moves whole
products (relative error ~1) and fails it by orders of magnitude.
"""
import ctypes
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from gpubp import precision as prec
from gpubp.backends import cuda_sources

from cuda_emulation import emulator as emulator_module

ml_dtypes = pytest.importorskip("ml_dtypes")

PRECISIONS = ["bf16", "fp16", "tf32"]
MMA_K = {"bf16": 16, "fp16": 16, "tf32": 8}
VEC = {"bf16": 8, "fp16": 8, "tf32": 4}   # elements of a 16-byte cp.async chunk
BM = BN = 128
THREADS = 256
# A NaN in every storage format, for guard zones and row padding: a read of it that reaches a product shows
NAN_BITS = {"bf16": 0x7FFF, "fp16": 0x7FFF}
# (M, N, K): one element; below a tile and below a chunk; odd sizes; tails in every dimension; > 1000 in one
GEMM_SHAPES = [(1, 1, 1), (7, 33, 5), (33, 7, 129), (130, 70, 33), (17, 130, 64), (1000, 64, 64),
               (40, 1030, 48), (33, 17, 1000)]
MEMORY_LAYOUTS = ["contiguous", "padded", "misaligned"]
GUARD = 16


@pytest.fixture(scope="module")
def lib(emulator):
    library = emulator
    library.emu_tc_plant_bug.argtypes = [ctypes.c_int]
    library.emu_tc_plant_bug.restype = None
    return library


@pytest.fixture
def planted(lib):
    """planted(n) plants emulation bug n (tensor_core_cpu.h's EmuPlantedBug) for the rest of the test."""
    yield lib.emu_tc_plant_bug
    lib.emu_tc_plant_bug(0)


class Operand:
    """An operand in the kernel's storage: `stored` (rows, cols) with row length ld >= cols, placed `offset`
    elements past a 16-byte boundary inside a buffer whose guard zones and row padding are NaN."""

    def __init__(self, stored, precision, ld, offset=0):
        rows, cols = stored.shape
        values = prec.to_storage(stored, precision)
        raw = np.full(rows * ld + 2 * GUARD + offset + 16, NAN_BITS.get(precision, np.nan), dtype=values.dtype)
        skip = (-raw.ctypes.data % 16) // raw.itemsize
        self.array = raw[skip + GUARD + offset:skip + GUARD + offset + rows * ld].reshape(rows, ld)
        self.array[:, :cols] = values


def memory_layout(precision, cols, name):
    """(ld, offset) of an operand whose rows hold `cols` elements: contiguous rows (cp.async when cols is a
    multiple of a 16-byte chunk), rows padded to a 16-byte multiple plus a chunk (cp.async always, the last
    chunk of a row masked by src-size, the padding NaN), or a base one element off 16-byte alignment (the
    element-by-element path)."""
    vec = VEC[precision]
    if name == "contiguous":
        return cols, 0
    if name == "padded":
        return (cols + vec - 1) // vec * vec + vec, 0
    return cols, 1


def run_gemm(lib, precision, A, B, memory="contiguous", layout="forward"):
    """C = A (M, K) · B (N, K)ᵀ by the emulated gemm_tc_kernel for `layout` (cuda_sources.TC_LAYOUTS): each
    operand is stored as given or transposed, as that layout reads it. C lives in an (M + 1, N + 1) array of
    NaN (ldc = N + 1): every element of C must be written, the extra row and column must stay NaN."""
    (M, K), N = A.shape, B.shape[0]
    a_kcontig, b_kcontig = cuda_sources.TC_LAYOUTS[layout]
    stored_a = A if a_kcontig else A.T
    stored_b = B if b_kcontig else B.T
    lda, a_offset = memory_layout(precision, stored_a.shape[1], memory)
    ldb, b_offset = memory_layout(precision, stored_b.shape[1], memory)
    a = Operand(stored_a, precision, lda, a_offset)
    b = Operand(stored_b, precision, ldb, b_offset)
    C = np.full((M + 1, N + 1), np.nan, np.float32)
    kernel = emulator_module.EmulatedKernel(lib, cuda_sources.tc_kernel_name("gemm_tc_kernel", precision, layout))
    kernel((max(1, math.ceil(M / BM)), max(1, math.ceil(N / BN))), (THREADS,),
           [a.array, np.int32(lda), b.array, np.int32(ldb), C, np.int32(N + 1), np.int32(M), np.int32(N),
            np.int32(K)])
    assert np.isnan(C[M, :]).all() and np.isnan(C[:, N]).all(), "the kernel wrote outside C"
    return C[:M, :N]


def tolerance(A, B, precision):
    """Elementwise bound on |C - reference_gemm| (module docstring)."""
    K = A.shape[1]
    scale = np.abs(prec.round_operand(A, precision)).astype(np.float64) @ \
        np.abs(prec.round_operand(B, precision)).astype(np.float64).T
    return (math.ceil(K / MMA_K[precision]) + 1) * 8 * 2.0**-24 * scale


def gemm_error(C, A, B, precision):
    """max |C - ref| / tolerance (inf where C is NaN): <= 1 passes."""
    excess = np.abs(C.astype(np.float64) - prec.reference_gemm(A, B, precision)) / np.maximum(
        tolerance(A, B, precision), 1e-300)
    return float(np.max(np.where(np.isnan(excess), np.inf, excess))) if excess.size else 0.0


# ---- the GEMM -----------------------------------------------------------------------------------------------------
# the big shapes run with contiguous rows only (emulation time)
GEMM_CASES = [(shape, memory) for shape in GEMM_SHAPES for memory in MEMORY_LAYOUTS
              if memory == "contiguous" or math.prod(shape) <= 10**6]


@pytest.mark.parametrize("shape,memory", GEMM_CASES, ids=str)
@pytest.mark.parametrize("layout", list(cuda_sources.TC_LAYOUTS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gemm_matches_reference(lib, precision, layout, shape, memory, rng):
    M, N, K = shape
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((N, K)).astype(np.float32)
    C = run_gemm(lib, precision, A, B, memory, layout)
    assert gemm_error(C, A, B, precision) <= 1


@pytest.mark.parametrize("layout", list(cuda_sources.TC_LAYOUTS))
def test_same_bits_under_other_schedules(lib, layout, rng):
    """Each C element is one lane's chain of mma in a fixed order: the thread and block order (the emulation's
    seeded schedule) must not change a bit."""
    A = rng.standard_normal((150, 72)).astype(np.float32)
    B = rng.standard_normal((140, 72)).astype(np.float32)
    results = []
    try:
        for seed in (1, 2, 3):
            emulator_module.set_seed(lib, seed)
            results.append(run_gemm(lib, "bf16", A, B, layout=layout))
    finally:
        emulator_module.set_seed(lib, int(os.environ.get("GPUBP_EMULATION_SEED", "0")))   # as build() left it
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


@pytest.mark.parametrize("layout", list(cuda_sources.TC_LAYOUTS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gemm_is_exact_on_small_integers(lib, precision, layout, rng):
    """Small integers: every product and partial sum is exact in float32, in any order, on any hardware."""
    M, N, K = 70, 45, 200
    A = rng.integers(-8, 9, (M, K)).astype(np.float32)
    B = rng.integers(-8, 9, (N, K)).astype(np.float32)
    np.testing.assert_array_equal(run_gemm(lib, precision, A, B, layout=layout),
                                  A.astype(np.float64) @ B.astype(np.float64).T)


def test_tf32_operands_are_rounded_to_nearest_even_in_the_kernel(lib):
    """Operands exactly halfway between two tf32 values: RNE (the reference) and the hardware's truncation
    of unrounded registers, or ties-away (cvt.rna), give different products; only RNE passes bit for bit."""
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 5 * 2**-11], dtype=np.float32)
    A = np.tile(ties, (3, 2))                      # (3, 8)
    B = np.zeros((2, 8), np.float32)
    B[0, 0] = B[1, 1] = 1                          # C[:, 0] = A[:, 0], C[:, 1] = A[:, 1]: the rounded values
    C = run_gemm(lib, "tf32", A, B)
    np.testing.assert_array_equal(C, prec.reference_gemm(A, B, "tf32"))
    np.testing.assert_array_equal(C[0], [1.0, 1 + 4 * 2**-11])


def test_k_zero_gives_zeros(lib):
    C = run_gemm(lib, "bf16", np.zeros((5, 0), np.float32), np.zeros((3, 0), np.float32))
    np.testing.assert_array_equal(C, np.zeros((5, 3)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_nan_and_inf_operands_propagate(lib, precision, rng):
    A = rng.standard_normal((20, 40)).astype(np.float32)
    B = rng.standard_normal((9, 40)).astype(np.float32)
    A[3, 7] = np.nan   # row 3 of C: NaN
    A[5, 0] = np.inf   # row 5: ±inf
    C = run_gemm(lib, precision, A, B)
    ref = prec.reference_gemm(A, B, precision)
    assert np.isnan(ref[3]).all() and np.isinf(ref[5]).all()
    np.testing.assert_array_equal(C[[3, 5]], ref[[3, 5]])
    rows = [r for r in range(20) if r not in (3, 5)]
    assert gemm_error(C[rows], A[rows], B, precision) <= 1


# ---- planted bugs: each must make the GEMM comparison fail ------------------------------------------------------------
PLANTED = {   # tensor_core_cpu.h's EmuPlantedBug: a fragment index off by one, or the pipeline one group short
    1: ("mma m16n8k16 A column + 1", [("bf16", "forward"), ("fp16", "weight_grad")]),
    2: ("mma m16n8k16 B k-row + 1", [("bf16", "forward"), ("fp16", "input_grad")]),
    3: ("mma C/D column + 1", [("bf16", "forward"), ("tf32", "forward"), ("tf32", "weight_grad")]),
    4: ("mma m16n8k8 tf32 A column + 1", [("tf32", "forward"), ("tf32", "weight_grad")]),
    5: ("ldmatrix row + 1", [("bf16", "forward"), ("fp16", "forward"), ("tf32", "forward")]),
    6: ("ldmatrix.trans column + 1", [("bf16", "input_grad"), ("bf16", "weight_grad")]),
    7: ("cp.async.wait_group retires one group too few", [("bf16", "forward"), ("tf32", "weight_grad")]),
}


@pytest.mark.parametrize("bug,precision,layout", [(bug, p, layout) for bug, (_, cases) in PLANTED.items()
                                                  for p, layout in cases], ids=lambda v: str(v))
def test_planted_bug_fails_the_comparison(lib, planted, bug, precision, layout, rng):
    M, N, K = 72, 48, 96   # multiples of a chunk in every layout: cp.async (not the element path) everywhere
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((N, K)).astype(np.float32)
    assert gemm_error(run_gemm(lib, precision, -A, B, layout=layout), -A, B, precision) <= 1   # passes as built
    # NOTE: other data than the run above: the emulation poisons shared memory at each block's start, but
    # should it not, a pipeline bug that reads a stage before its copy lands would read the run above's tiles.
    planted(bug)
    error = gemm_error(run_gemm(lib, precision, A, B, layout=layout), A, B, precision)
    assert error > 100, f"planted bug {bug} ({PLANTED[bug][0]}) went unnoticed: error {error} x tolerance"


# The same, with the bug in the kernel's own source: gemm_tc.cuh copied, one fragment index in it moved by one,
# the emulation built from the copy (a build of its own, ~10 s each).
MUTATIONS = {
    "store-row": ("const int row0 = m0 + (warp / S::WARPS_N) * S::WM + lane / 4;",
                  "const int row0 = m0 + (warp / S::WARPS_N) * S::WM + (lane / 4 + 1) % 8;"),
    "ldmatrix-a-row": ("ldmatrix_x4(a, tile + offset(m + (lane & 7) + ",
                       "ldmatrix_x4(a, tile + offset(m + ((lane + 1) & 7) + "),
    "trans-b-k": ("ldmatrix_x4_trans(d, tile + offset(ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7),",
                  "ldmatrix_x4_trans(d, tile + offset(ks * 16 + ((lane >> 3) & 1) * 8 + ((lane + 1) & 7),"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_kernel_source_with_an_index_off_by_one_fails(mutation, tmp_path, monkeypatch, rng):
    original, mutated = MUTATIONS[mutation]
    kernels = tmp_path / "kernels"
    shutil.copytree(cuda_sources.kernels_dir(), kernels)
    header = kernels / "gemm_tc.cuh"
    text = header.read_text(encoding="utf-8")
    assert text.count(original) == 1, f"the mutation {mutation!r} no longer matches gemm_tc.cuh: update it"
    header.write_text(text.replace(original, mutated), encoding="utf-8")
    monkeypatch.setattr(cuda_sources, "kernels_dir", lambda: kernels)
    (tmp_path / "build").mkdir()
    lib = emulator_module.build(tmp_path / "build")
    A = rng.standard_normal((72, 96)).astype(np.float32)
    B = rng.standard_normal((48, 96)).astype(np.float32)
    layout = "input_grad" if mutation == "trans-b-k" else "forward"
    assert gemm_error(run_gemm(lib, "bf16", A, B, layout=layout), A, B, "bf16") > 100


ASAN_SELECTION = "(matches_reference and not contiguous and not fp16) or integers or nan_and_inf or k_zero"


@pytest.mark.slow
def test_edge_paths_under_address_sanitizer():
    """The padded (src-size masked) and misaligned (element by element) paths with AddressSanitizer: every
    array argument sits between poisoned guard zones, so a cp.async or a load that reads one byte outside A
    or B fails its launch (tests/cuda_emulation/emulator.py, GPUBP_EMULATION_ASAN=1)."""
    ok, output = emulator_module.rerun_under_asan(__file__, ASAN_SELECTION)
    if ok is None:
        pytest.skip(output)
    assert ok, output


# ---- the emulated instructions, one at a time ---------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
def test_emulated_mma_matches_the_ptx_layouts(lib, precision, rng):
    """tc_mma_probe_kernel builds fragments from global memory by the PTX ISA tables (no ldmatrix)."""
    K = MMA_K[precision]
    A = rng.standard_normal((16, K)).astype(np.float32)
    B = rng.standard_normal((8, K)).astype(np.float32)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    D = np.full((16, 8), np.nan, np.float32)
    kernel = emulator_module.EmulatedKernel(lib, cuda_sources.tc_kernel_name("tc_mma_probe_kernel", precision))
    kernel((1,), (32,), [prec.to_storage(A, precision), prec.to_storage(B, precision), C, D])
    expected = prec.reference_gemm(A, B, precision).astype(np.float64) + C
    bound = tolerance(A, B, precision) + 8 * 2.0**-24 * np.abs(C)
    assert (np.abs(D - expected) <= bound).all()


@pytest.mark.parametrize("bug", [1, 2, 3, 4])
def test_probe_sees_planted_mma_bugs(lib, planted, bug, rng):
    precision = "tf32" if bug == 4 else "bf16"
    K = MMA_K[precision]
    A = rng.standard_normal((16, K)).astype(np.float32)
    B = rng.standard_normal((8, K)).astype(np.float32)
    C = np.zeros((16, 8), np.float32)
    D = np.full((16, 8), np.nan, np.float32)
    planted(bug)
    kernel = emulator_module.EmulatedKernel(lib, cuda_sources.tc_kernel_name("tc_mma_probe_kernel", precision))
    kernel((1,), (32,), [prec.to_storage(A, precision), prec.to_storage(B, precision), C, D])
    assert not np.allclose(D, prec.reference_gemm(A, B, precision), rtol=1e-3, atol=1e-3)


def ldmatrix(lib, X, trans):
    out = np.full(32 * 4 * 2, 0xFFFF, np.uint16)
    emulator_module.EmulatedKernel(lib, "tc_ldmatrix_probe_kernel")((1,), (32,), [X.ravel(), out, np.int32(trans)])
    return out.reshape(32, 4, 2)


def ldmatrix_expected(X, trans):
    """PTX ISA, ldmatrix: register i of lane l holds matrix i's (row l/4, cols 2(l%4) + j), or with .trans
    (rows 2(l%4) + j, col l/4); matrix i is rows 8i..8i+7 of X here."""
    expected = np.empty((32, 4, 2), np.uint16)
    for lane in range(32):
        for i in range(4):
            for j in range(2):
                r, c = (2 * (lane % 4) + j, lane // 4) if trans else (lane // 4, 2 * (lane % 4) + j)
                expected[lane, i, j] = X[8 * i + r, c]
    return expected


@pytest.mark.parametrize("trans", [0, 1])
def test_emulated_ldmatrix_matches_the_ptx_layout(lib, trans):
    X = np.arange(32 * 8, dtype=np.uint16).reshape(32, 8)   # each element names its own (row, col)
    np.testing.assert_array_equal(ldmatrix(lib, X, trans), ldmatrix_expected(X, trans))


@pytest.mark.parametrize("bug,trans", [(5, 0), (6, 1)])
def test_probe_sees_planted_ldmatrix_bugs(lib, planted, bug, trans):
    X = np.arange(32 * 8, dtype=np.uint16).reshape(32, 8)
    planted(bug)
    assert (ldmatrix(lib, X, trans) != ldmatrix_expected(X, trans)).any()


# ---- compiling for the GPU ----------------------------------------------------------------------------------------------
def ptxas_report(arch):
    """{name expression: (registers, (stack frame, spill store, spill load bytes), shared bytes)} of gemm_tc.cu
    compiled by NVRTC with the runtime's options for sm_<arch>."""
    from test_kernels_compile import NVRTC, NVRTC_MISSING, nvrtc_compile
    if NVRTC is None:
        pytest.skip(str(NVRTC_MISSING))
    names = cuda_sources.name_expressions("gemm_tc.cu")
    lowered, log = nvrtc_compile("gemm_tc.cu", arch)   # test_kernels_compile.py's compile, once a process
    by_symbol = {symbol: name for name, symbol in lowered.items()}
    report = {}
    for block in log.split("Compiling entry function '")[1:]:
        name = by_symbol[block.split("'")[0]]
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        report[name] = (int(re.search(r"Used (\d+) registers", block).group(1)),
                        tuple(int(x) for x in spill.groups()), int(re.search(r"(\d+) bytes smem", block).group(1)))
    assert sorted(report) == sorted(names), log
    return report


@pytest.mark.parametrize("arch", [90, 80])
def test_nvrtc_compiles_without_spills(arch):
    """Through the runtime's NVRTC options, every precision and layout: no local memory, 48 KiB of static
    shared memory, and at most 128 registers (2 blocks an SM) where TC_GEMM_MIN_BLOCKS asks for 2."""
    for name, (registers, spill, shared) in ptxas_report(arch).items():
        assert spill == (0, 0, 0), (name, spill)
        assert shared == 48 * 1024, (name, shared)
        one_block = "TcTf32" in name and "true, true" not in name
        assert registers <= (255 if one_block else 128), (name, registers)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
@pytest.mark.parametrize("arch", [90, 80])
def test_nvcc_compiles_to_cubin(arch, tmp_path):
    """nvcc down to SASS (ptxas) for each arch, every precision instantiated: the inline PTX is assembled,
    not only passed through (a .cu of templates alone would compile to nothing)."""
    kernels_dir = cuda_sources.kernels_dir()
    unit = tmp_path / "gemm_tc_instances.cu"
    unit.write_text('#include "gemm_tc.cu"\n' + "".join(
        f"template __global__ void gemm_tc_kernel<{tag}, {str(a).lower()}, {str(b).lower()}>(const {tag}::Storage*, "
        f"int, const {tag}::Storage*, int, float*, int, int, int, int);\n"
        for tag in cuda_sources.TC_PRECISIONS.values() for a, b in cuda_sources.TC_LAYOUTS.values()))
    result = subprocess.run(["nvcc", "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-I", str(kernels_dir),
                             "-Xptxas", "-v", str(unit), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Compiling entry function") == 9, result.stderr
    assert "spill stores" in result.stderr and not re.search(r"[1-9]\d* bytes spill", result.stderr), result.stderr


def probe_source():
    """tc_probes.cu as NVRTC would take it on a GPU: gemm_tc.cuh pasted in front (the file has no #include)."""
    text = (emulator_module.HERE / "tc_probes.cu").read_text(encoding="utf-8")
    return cuda_sources.inline_includes('#include "gemm_tc.cuh"\n' + text)


PROBE_NAMES = [cuda_sources.tc_kernel_name("tc_mma_probe_kernel", p) for p in PRECISIONS] + ["tc_ldmatrix_probe_kernel"]


@pytest.mark.parametrize("arch", [90, 80])
def test_probes_compile_for_the_gpu(arch):
    """The probes are meant to hold the emulation up against real hardware (test_probes_agree_on_gpu)."""
    from test_kernels_compile import NVRTC, NVRTC_MISSING
    if NVRTC is None:
        pytest.skip(str(NVRTC_MISSING))
    lowered, _ = NVRTC.compile(probe_source(), "tc_probes.cu", cuda_sources.runtime_nvrtc_options(arch), PROBE_NAMES)
    assert all(lowered[name] for name in PROBE_NAMES)


# ---- on a GPU (marked gpu: skipped here, with the probe's reason, where none is present) ------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(cuda_sources.TC_LAYOUTS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gemm_on_gpu(precision, layout, rng):
    """The same kernel through CuPy at realistic and awkward sizes, the same tolerance."""
    import cupy as cp
    source, options, names = cuda_sources.module_source("gemm_tc.cu")
    module = cp.RawModule(code=source, options=options, name_expressions=names)
    kernel = module.get_function(cuda_sources.tc_kernel_name("gemm_tc_kernel", precision, layout))
    a_kcontig, b_kcontig = cuda_sources.TC_LAYOUTS[layout]
    for M, N, K in [(1, 1, 1), (7, 33, 5), (1000, 1030, 130), (4096, 512, 1024), (300, 257, 4099)]:
        A = rng.standard_normal((M, K)).astype(np.float32)
        B = rng.standard_normal((N, K)).astype(np.float32)
        stored_a = prec.to_storage(A if a_kcontig else A.T, precision)
        stored_b = prec.to_storage(B if b_kcontig else B.T, precision)
        C = cp.full((M, N), cp.nan, cp.float32)
        kernel((math.ceil(M / BM), math.ceil(N / BN)), (THREADS,),
               (cp.asarray(stored_a), np.int32(stored_a.shape[1]), cp.asarray(stored_b), np.int32(stored_b.shape[1]),
                C, np.int32(N), np.int32(M), np.int32(N), np.int32(K)))
        assert gemm_error(cp.asnumpy(C), A, B, precision) <= 1, (M, N, K)


@pytest.mark.gpu
def test_probes_agree_on_gpu(lib, rng):
    """Hardware against the emulation, instruction by instruction: ldmatrix bit for bit, mma within one
    step's tolerance (the hardware's accumulation inside an mma is its own)."""
    import cupy as cp
    module = cp.RawModule(code=probe_source(), options=cuda_sources.OPTIONS, name_expressions=PROBE_NAMES)
    X = np.arange(32 * 8, dtype=np.uint16).reshape(32, 8)
    for trans in (0, 1):
        out = cp.full(32 * 4 * 2, 0xFFFF, cp.uint16)
        module.get_function("tc_ldmatrix_probe_kernel")((1,), (32,), (cp.asarray(X.ravel()), out, np.int32(trans)))
        np.testing.assert_array_equal(cp.asnumpy(out).reshape(32, 4, 2), ldmatrix(lib, X, trans))
    for precision in PRECISIONS:
        K = MMA_K[precision]
        A = rng.standard_normal((16, K)).astype(np.float32)
        B = rng.standard_normal((8, K)).astype(np.float32)
        C = rng.standard_normal((16, 8)).astype(np.float32)
        D = cp.full((16, 8), cp.nan, cp.float32)
        name = cuda_sources.tc_kernel_name("tc_mma_probe_kernel", precision)
        module.get_function(name)((1,), (32,), (cp.asarray(prec.to_storage(A, precision)),
                                                cp.asarray(prec.to_storage(B, precision)), cp.asarray(C), D))
        expected = prec.reference_gemm(A, B, precision).astype(np.float64) + C
        assert (np.abs(cp.asnumpy(D) - expected) <= tolerance(A, B, precision) + 8 * 2.0**-24 * np.abs(C)).all()
