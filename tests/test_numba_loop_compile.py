"""The training loop's numba kernels (gpubp/backends/numba_loop_kernels.py) compile for real GPUs, sm_90 and
sm_80, float32 and float64, with no GPU here: numba.cuda.compile_ptx needs only NVRTC (the nvidia-cuda-nvrtc
wheel) and libNVVM/libdevice (a CUDA toolkit: CUDA_HOME or CUDA_PATH, else /usr/local/cuda). A real compile
rejects what the simulator lets through (Python objects, types that change, calls with no GPU lowering).

The argument types compiled are those of numba_loop_kernels.launch_table(), which a test here checks against
every kernel of the module and against the types numba_backend.py really passes (its loop ops run on host
arrays with recording stand-ins for the kernels).

Runs in the main pytest process only (the simulator process of tests/run.sh runs the `numba` marker, which these
tests do not carry, and has no real compiler); skips, saying what is missing, only when NVRTC or libNVVM cannot
be loaded."""
import re
import types

import numpy as np
import pytest

from conftest import SIMULATOR
from test_numba_compile import toolkit  # noqa: F401  (the fixture: one toolkit lookup for both compile tests)
from gpubp import guard as G
from gpubp import losses

numba = pytest.importorskip("numba")
pytestmark = pytest.mark.skipif(SIMULATOR, reason="compiles with the real numba.cuda compiler: runs in the main "
                                                  "pytest process, not under NUMBA_ENABLE_CUDASIM=1")

if not SIMULATOR:
    from gpubp.backends import numba_loop_kernels as loop
    TABLE = loop.launch_table()
else:
    loop, TABLE = None, []
CCS = ((9, 0), (8, 0))


@pytest.fixture(scope="session")
def compiler(toolkit):
    """numba.cuda with the toolkit test_numba_compile.py finds (CUDA_HOME, NVVM, NVRTC and libdevice checked
    there, skipping with the reason when one is missing)."""
    from numba import cuda
    return cuda


_PTX = {}


def ptx_for(cuda, entry, cc):
    key = (entry.name, entry.dtype, cc)
    if key not in _PTX:
        # the options of a launch: optimised, no fastmath, no debug
        _PTX[key], _ = cuda.compile_ptx(entry.kernel.py_func, entry.argtypes, cc=cc, opt=True, fastmath=False)
    return _PTX[key]


def test_every_kernel_is_in_the_launch_table():
    found = loop.all_kernels()
    assert found
    for (name, dtype), kernel in found.items():
        entries = [e for e in TABLE if e.name == name and (dtype is None or e.dtype == dtype)]
        assert entries, f"{name} ({dtype or 'any dtype'}) is not in numba_loop_kernels.launch_table()"
        assert all(e.kernel is kernel for e in entries), f"{name}: the table holds another dispatcher"
    assert {e.name for e in TABLE} == {name for name, _ in found}


@pytest.mark.parametrize("entry", TABLE, ids=[f"{e.name}-{e.dtype}" for e in TABLE])
def test_table_signatures_fit_the_kernels(entry):
    code = entry.kernel.py_func.__code__
    assert len(entry.argtypes) == code.co_argcount, (code.co_varnames[:code.co_argcount], entry.argtypes)
    for t in entry.argtypes:
        if isinstance(t, numba.types.Array):
            assert t.layout == "C"


# ---- the table holds the types the backend passes ---------------------------------------------------------------
class _RecordingKernel:
    """Stands in for a dispatcher: `kernel[grid, block](*args)` records the numba type of each argument."""

    def __init__(self, name, dtype, calls):
        self.name, self.dtype, self.calls = name, dtype, calls

    def __getitem__(self, config):
        from numba.cuda.dispatcher import typeof
        from numba.cuda.typing.typeof import Purpose

        def launch(*args):
            self.calls.append((self.name, self.dtype, tuple(typeof(a, Purpose.argument) for a in args)))
        return launch


def _recording_backend(calls):
    """A NumbaBackend whose arrays are host arrays and whose loop kernels record their launches (no GPU)."""
    from gpubp.backends import numba_backend

    namespace = {name: getattr(loop, name) for name in dir(loop) if name.isupper() or name == "loop_blocks"}
    for name, value in vars(loop).items():
        if name.endswith("_kernel"):
            namespace[name] = _RecordingKernel(name, None, calls)
    namespace["update_kernel_for"] = lambda dtype: _RecordingKernel("update_kernel", dtype, calls)

    class HostNumbaBackend(numba_backend.NumbaBackend):
        def __init__(self):
            super().__init__()
            self.loop = types.SimpleNamespace(**namespace)

        def is_device_array(self, x):
            return isinstance(x, np.ndarray)

        def _device(self, x):
            return x

        def empty(self, shape, dtype):
            return np.empty(shape, dtype)

        def _scratch_buffer(self, key, shape, dtype):
            return np.zeros(shape, dtype)

        def _to_host(self, x):
            return np.array(x)

    return HostNumbaBackend()


@pytest.mark.parametrize("dtype", loop.KERNEL_DTYPES if loop else ["float32"])
def test_the_backend_launches_with_the_table_types(dtype, monkeypatch):
    """Every loop op of numba_backend.py, run with recording kernels: each launch's argument types (a Python
    int is int64, a float float64, ...) are its kernel's types in launch_table(), so the compile tests below
    compile what a GPU launch compiles."""
    from gpubp.backends import numba_backend
    # zeros() and the flags scratch allocate with cuda.device_array: host arrays here
    monkeypatch.setattr(numba_backend.cuda, "device_array", lambda shape, dtype: np.empty(shape, dtype))
    calls = []
    be = _recording_backend(calls)
    P, N, C, M, F = 11, 5, 3, 9, 4
    vec = lambda n: np.zeros(n, dtype)   # noqa: E731
    guard, step = np.zeros(G.SIZE), be.zeros((1,), np.int64)
    be.zeros((P,), dtype)
    be.sgd_update(vec(P), vec(P), vec(P), step, np.zeros(5), guard)
    be.adam_update(vec(P), vec(P), vec(P), vec(P), step, np.zeros(5), guard)
    be.guard_loss(vec(1), guard)
    for loss in (losses.MSE, losses.BCE, losses.SOFTMAX_CE):
        be.record_step(loss, vec(1), np.zeros((N, C), dtype), np.zeros((N, C), dtype), guard)
    order = np.zeros(M + 1, np.int64)
    cursor = order[M:].reshape(1)
    be.gather_rows(np.zeros((M, F), dtype), order, cursor, np.zeros((N, F), dtype))
    be.advance_cursor(cursor, N)
    labels = {dtype, "int64"}
    if dtype == "float32":   # a float32 model of a reduced precision: 16-bit zeros(), the fp16 loss scaler
        for storage in ("bf16", "fp16"):
            be.zeros((P,), be.storage_dtype(storage))
            labels.add(str(be.storage_dtype(storage)))
        scaler = np.zeros(6)
        be.unscale_gradients(vec(1), vec(P), scaler, guard)
        be.update_scale(scaler, guard)
    table = {(e.name, e.dtype): e.argtypes for e in TABLE}
    launched = set()
    for name, kernel_dtype, argtypes in calls:
        candidates = [kernel_dtype or dtype, "int64", "float16", "uint16"]
        key = next(((name, d) for d in candidates if table.get((name, d)) == argtypes), None)
        assert key is not None, f"{name}: launched with {argtypes}, not in the table: " + repr(
            [(k, v) for k, v in table.items() if k[0] == name])
        launched.add(key)
    expected = {(e.name, e.dtype) for e in TABLE if e.dtype in labels}
    assert launched == expected, f"not exercised: {sorted(expected - launched)}"


# ---- compile for sm_90 and sm_80 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry,cc", [pytest.param(e, cc, id=f"{e.name}-{e.dtype}-sm{cc[0]}{cc[1]}")
                                      for e in TABLE for cc in CCS])
def test_kernel_compiles_for_a_real_gpu(compiler, entry, cc):
    ptx = ptx_for(compiler, entry, cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert re.search(r"^\.visible \.entry ", ptx, re.MULTILINE), "no kernel entry in the PTX"


@pytest.mark.parametrize("dtype", loop.KERNEL_DTYPES if loop else ["float32"])
def test_guard_sums_are_not_contracted_into_fma(compiler, dtype):
    """record_step's `sum += a·b` must round the product first, as numpy does (the guard's sums are numpy's bit
    for bit); NVVM contracts a multiply and an add into an FMA by default, so the products are dmul_rn."""
    entry = next(e for e in TABLE if e.name == "record_step_kernel" and e.dtype == dtype)
    ptx = ptx_for(compiler, entry, CCS[0])
    assert len(re.findall(r"\bmul\.rn\.f64\b", ptx)) == 2, ptx
    assert not re.search(r"\bfma\.rn\.f64\b", ptx), "a float64 FMA in record_step: the guard's sums would differ"
