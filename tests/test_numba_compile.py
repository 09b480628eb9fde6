"""Every numba kernel compiles for real GPUs (sm_90 and sm_80, float32 and float64), without a GPU, and ptxas
reports no register spills: the numba counterpart of test_kernels_compile.py.

The kernels and the argument types they are launched with come from numba_kernels.launch_table(), which a
test here checks against every kernel found in the module and against the types numba_backend.py really
passes (its ops run on host arrays with recording stand-ins for the kernels). numba_kernels.compile_ptx
compiles with no CUDA driver (see its docstring for how device functions get the target compute capability).

Needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra), libNVVM and ptxas from a CUDA toolkit: CUDA_HOME
or CUDA_PATH, else the toolkit that the `nvcc` on PATH runs (a wrapper script is asked where it lives), else
/usr/local/cuda. Skips, saying which is missing, only when one of them cannot be found at all.

Runs in the main pytest process only: the simulator process (NUMBA_ENABLE_CUDASIM=1, tests/run.sh) runs the
`numba` marker, which these tests do not carry, and the real compiler is not there."""
import os
import re
import shutil
import subprocess
import types

import numpy as np
import pytest

from conftest import SIMULATOR

numba = pytest.importorskip("numba")
pytestmark = pytest.mark.skipif(SIMULATOR, reason="compiles with the real numba.cuda compiler: runs in the main "
                                                  "pytest process, not under NUMBA_ENABLE_CUDASIM=1")

from gpubp.backends import numba_kernels  # noqa: E402

CCS = ((9, 0), (8, 0))
TABLE = [] if SIMULATOR else numba_kernels.launch_table()


def is_toolkit(home):
    """A CUDA toolkit directory: ptxas and libdevice where numba and we look for them (a bin/ with wrapper
    scripts, such as /usr/local/bin/nvcc's, is not one)."""
    return (os.path.isfile(os.path.join(home, "bin", "ptxas"))
            and os.path.isfile(os.path.join(home, "nvvm", "libdevice", "libdevice.10.bc")))


def find_cuda_home():
    """(toolkit directory, how it was found), or (None, why not): the first candidate that is_toolkit."""
    candidates = [(os.environ[v], v) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append((os.path.dirname(os.path.dirname(real)), f"nvcc at {real}"))
        try:   # a wrapper script that execs the real nvcc: nvcc's dry run prints its TOP directory
            run = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                                 timeout=120)
            top = re.search(r"^#\$ TOP=(.+)$", run.stdout + run.stderr, re.MULTILINE)
            if top:
                candidates.append((os.path.normpath(top.group(1).strip()), f"`{nvcc} -dryrun` (TOP)"))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append(("/usr/local/cuda", "the default /usr/local/cuda"))
    for home, how in candidates:
        if is_toolkit(home):
            return home, how
    return None, "no CUDA toolkit with bin/ptxas and nvvm/libdevice (tried " + ", ".join(f"{h} from {w}" for h, w in candidates) + ")"


@pytest.fixture(scope="session")
def toolkit():
    """The toolkit (CUDA_HOME set to it for numba's NVVM/libdevice lookup while the session runs), with NVVM and
    NVRTC loaded; skips with the reason when one of the three cannot be found."""
    home, how = find_cuda_home()
    if home is None:
        pytest.skip(how)
    saved = os.environ.get("CUDA_HOME")
    os.environ["CUDA_HOME"] = saved or home
    try:
        from numba.cuda.cudadrv import nvrtc, nvvm
        try:
            nvvm.NVVM()
        except Exception as exc:   # NvvmSupportError and friends: the library is not there
            pytest.skip(f"libNVVM not found ({type(exc).__name__}: {exc}); toolkit {home} from {how}")
        try:
            nvrtc.get_supported_ccs()
        except Exception as exc:
            pytest.skip(f"NVRTC not found ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc")
        from numba.cuda.cuda_paths import get_cuda_paths
        libdevice = get_cuda_paths()["libdevice"].info   # numba caches its lookup: it may predate CUDA_HOME
        assert libdevice and os.path.isfile(libdevice), (
            f"numba found no libdevice (it looked before CUDA_HOME={home} was set?): {get_cuda_paths()}")
        yield types.SimpleNamespace(home=home, how=how, ptxas=os.path.join(home, "bin", "ptxas"))
    finally:
        if saved is None:
            os.environ.pop("CUDA_HOME", None)


_PTX, _PTXAS = {}, {}


def ptx_for(entry, cc):
    """The PTX of one table entry for one cc, compiled once per session (the tests below share it)."""
    key = (entry.name, entry.dtype, entry.variant, cc)
    if key not in _PTX:
        _PTX[key] = numba_kernels.compile_ptx(entry.kernel, entry.argtypes, cc)
    return _PTX[key]


def _label(entry):
    return f"{entry.name}-{entry.dtype}" + (f"-{entry.variant}" if entry.variant else "")


PTXAS_REPORT = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(toolkit, entry, cc, tmp_path_factory):
    """ptxas -v on the entry's PTX for sm_<cc>: {'registers', 'stack', 'spill_stores', 'spill_loads', 'log'}."""
    key = (entry.name, entry.dtype, entry.variant, cc)
    if key not in _PTXAS:
        name = _label(entry).replace(",", "_")
        path = tmp_path_factory.mktemp("ptx") / f"{name}_sm{cc[0]}{cc[1]}.ptx"
        path.write_text(ptx_for(entry, cc))
        run = subprocess.run([toolkit.ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(path), "-o", os.devnull],
                             capture_output=True, text=True, timeout=300)
        log = run.stdout + run.stderr
        assert run.returncode == 0, log
        frames = [tuple(map(int, r)) for r in PTXAS_REPORT.findall(log)]   # the kernel, and any device function
        registers = re.findall(r"Compiling entry function '[^']*' for 'sm_\d+'.*?Used (\d+) registers", log, re.S)
        assert len(registers) == 1 and frames, log   # one kernel per PTX
        _PTXAS[key] = dict(registers=int(registers[0]), stack=max(f[0] for f in frames),
                           spill_stores=sum(f[1] for f in frames), spill_loads=sum(f[2] for f in frames), log=log)
    return _PTXAS[key]


def _cases():
    return [pytest.param(e, cc, id=f"{_label(e)}-sm{cc[0]}{cc[1]}") for e in TABLE for cc in CCS]


# ---- the table covers every kernel ----------------------------------------------------------------------------
def test_every_kernel_is_in_the_launch_table():
    """A kernel added to numba_kernels.py (at module level, in a *_kernel_for factory, or a reduced-precision
    variant the factories built) without a table entry fails here."""
    found = numba_kernels.all_kernels()
    assert found, "no kernels found"
    assert any(variant for _, _, variant in found), "no reduced-precision variant found"
    for (name, dtype, variant), kernel in found.items():
        dtypes = numba_kernels.KERNEL_DTYPES if dtype is None else (dtype,)
        entries = [e for e in TABLE if e.name == name and e.variant == variant
                   and (e.dtype in dtypes or e.dtype == "int64")]
        assert entries, f"{name} ({dtype or 'every dtype'}, {variant or 'fp32'}) is not in numba_kernels.launch_table()"
        assert all(e.kernel is kernel for e in entries), f"{name} {variant}: the table holds another dispatcher"
        if dtype is None and not any(e.dtype == "int64" for e in entries):
            assert {e.dtype for e in entries} == set(numba_kernels.KERNEL_DTYPES), name
    assert {(e.name, e.variant) for e in TABLE} == {(name, variant) for name, _, variant in found}


@pytest.mark.parametrize("entry", TABLE, ids=[_label(e) for e in TABLE])
def test_table_signatures_fit_the_kernels(entry):
    """One type per parameter; arrays C-contiguous, of the entry's dtype where they hold floating-point data
    (a reduced-precision variant's also float16 or uint16: fp16 and bf16 storage; the loss scale float64)."""
    params = entry.kernel.py_func.__code__.co_varnames[:entry.kernel.py_func.__code__.co_argcount]
    assert len(entry.argtypes) == len(params), (params, entry.argtypes)
    for param, t in zip(params, entry.argtypes):
        if isinstance(t, numba.types.Array):
            assert t.layout == "C", param
            if not entry.variant and isinstance(t.dtype, numba.types.Float):
                assert str(t.dtype) == entry.dtype, param
            elif entry.variant and param != "scale":
                assert str(t.dtype) in ("float32", "float16", "uint16"), param


# ---- the table holds the types the backend passes -------------------------------------------------------------
class _HostArray(np.ndarray):
    """A host array with the few DeviceNDArray methods the backend calls."""

    def copy_to_device(self, src):
        self[...] = src

    def copy_to_host(self):
        return np.array(self)

    def is_c_contiguous(self):
        return self.flags.c_contiguous


class _RecordingKernel:
    """Stands in for a dispatcher: `kernel[grid, block](*args)` records the numba type of each argument."""

    def __init__(self, name, dtype, variant, calls):
        self.name, self.dtype, self.variant, self.calls = name, dtype, variant, calls

    def __getitem__(self, config):
        from numba.cuda.dispatcher import typeof
        from numba.cuda.typing.typeof import Purpose

        def launch(*args):
            self.calls.append((self.name, self.dtype, self.variant, tuple(
                typeof(np.asarray(a) if isinstance(a, np.ndarray) else a, Purpose.argument) for a in args)))
        return launch


def _recording_backend(calls):
    """A NumbaBackend whose arrays are host arrays and whose kernels record their launches (no GPU needed): each
    records (kernel name, dtype or None, variant, argument types); a *_kernel_for factory builds the real kernel
    (so numba_kernels.all_kernels() sees the variant) and hands back its recorder."""
    from gpubp.backends import numba_backend

    k = types.SimpleNamespace(**vars(numba_kernels))
    for name, value in vars(numba_kernels).items():
        if name.endswith("_kernel"):
            setattr(k, name, _RecordingKernel(name, None, "", calls))
        elif name.endswith("_kernel_for"):
            setattr(k, name, _recording_factory(value, calls))

    class HostNumbaBackend(numba_backend.NumbaBackend):
        def __init__(self):
            super().__init__()
            self.k = k

        def is_device_array(self, x):
            return isinstance(x, np.ndarray)

        def _device(self, x):
            return x.view(_HostArray)

        def empty(self, shape, dtype):
            return np.empty(shape, dtype).view(_HostArray)

        def zeros(self, shape, dtype):
            return np.zeros(shape, dtype).view(_HostArray)

        def _scratch_buffer(self, key, shape, dtype):
            return self.zeros(shape, dtype)

    return HostNumbaBackend()


def _recording_factory(factory, calls):
    def build(*key):
        kernel = factory(*key)
        dtype, kinds = (key[0], key[1:]) if isinstance(key[0], str) else (None, key)
        variant = numba_kernels.variant_name(kinds) if any(kinds) else ""
        return _RecordingKernel(kernel.py_func.__name__, dtype if not variant else "float32", variant, calls)
    return build


def _check_launches(calls, dtype):
    """Every recorded launch's argument types are its table entry's; returns the entries launched."""
    table = {(e.name, e.dtype, e.variant): e.argtypes for e in TABLE}
    launched = set()
    for name, kernel_dtype, variant, argtypes in calls:
        key = (name, kernel_dtype or dtype, variant)
        key = key if key in table else (name, "int64", variant)
        assert key in table, f"{name} ({variant or 'fp32'}): launched, but not in the table"
        assert argtypes == table[key], f"{name} {variant}: launched with {argtypes}, the table says {table[key]}"
        launched.add(key)
    return launched


@pytest.mark.parametrize("dtype", numba_kernels.KERNEL_DTYPES)
def test_the_backend_launches_with_the_table_types(dtype):
    """Every op of numba_backend.py, run with recording kernels: each launch's argument types (a Python int is
    int64, a float float64, ...) are its kernel's types in launch_table(), so the compile tests compile what a
    GPU launch compiles."""
    calls = []
    be = _recording_backend(calls)
    N, n_in, n_out, P = 5, 3, 4, 7
    mat = lambda *shape: be.zeros(shape, dtype)   # noqa: E731
    X, W, b, Z, A, G = mat(N, n_in), mat(n_out, n_in), mat(n_out), mat(N, n_out), mat(N, n_out), mat(N, n_out)
    be.dense_forward(X, W, b, 1, 0.01, Z, A)
    be.dense_forward(X, W, None, 0, 0.0, Z, A)
    be.activation_mask(G, Z, A, 1, 0.01, G)
    be.weight_grad(G, X, mat(n_out, n_in), mat(n_out), accumulate=True)
    be.input_grad(G, W, mat(N, n_in))
    be.input_grad_masked(G, W, mat(N, n_in), mat(N, n_in), 2, 0.0, mat(N, n_in))
    be.loss_grad(2, 0, 0.0, Z, mat(N, n_out), A, G, mat(1))
    be.one_hot(np.array([0, 1, 2, 3, 0]), n_out, mat(N, n_out))
    step = be.zeros((1,), np.int64)
    # the updates and the other training-loop ops launch numba_loop_kernels: tests/test_numba_loop_compile.py
    be.all_finite_many([mat(P), step])
    launched = _check_launches(calls, dtype)
    assert {name for name, _, _ in launched} == {e.name for e in TABLE if not e.variant}, "an op was not exercised"


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_a_reduced_precision_network_launches_with_the_table_types(precision):
    """The ops of a float32 network of `precision`, as the layers launch them (X float32 -> hidden A in
    storage_dtype -> output A float32; every δ in storage_dtype; the fp16 loss gradient scaled), plus the
    unfused input_grad and activation_mask, and for bf16/fp16 the 16-bit copy of the weights (round_to_storage)
    read by the GEMMs: each launch is a table entry, with its argument types; and every
    reduced-precision entry of the precision is launched (the table lists no kernel a network never runs)."""
    calls = []
    be = _recording_backend(calls)
    sd = be.storage_dtype(precision)
    N, n_in, n_hid, n_out = 5, 3, 4, 2
    f32 = lambda *shape: be.zeros(shape, np.float32)   # noqa: E731
    st = lambda *shape: be.zeros(shape, sd)            # noqa: E731
    X, W1, b1, W2, b2 = f32(N, n_in), f32(n_hid, n_in), f32(n_hid), f32(n_out, n_hid), f32(n_out)
    Z1, A1, Z2, A2, G1, G2 = f32(N, n_hid), st(N, n_hid), f32(N, n_out), f32(N, n_out), st(N, n_hid), st(N, n_out)
    scale = be.zeros((1,), np.float64) if precision == "fp16" else None
    for W, b, Z, A, A_prev in ((W1, b1, Z1, A1, X), (W2, b2, Z2, A2, A1), (W2, b2, Z2, st(N, n_out), A1),
                               (W1, b1, Z1, f32(N, n_hid), X)):
        be.dense_forward(A_prev, W, b, 1, 0.0, Z, A, precision=precision)
    be.loss_grad(2, 3, 0.0, Z2, f32(N, n_out), A2, G2, f32(1), scale=scale)
    be.weight_grad(G2, A1, f32(n_out, n_hid), f32(n_out), precision=precision)
    be.input_grad_masked(G2, W2, Z1, A1, 3, 0.0, G1, precision=precision)
    be.weight_grad(G1, X, f32(n_hid, n_in), f32(n_hid), precision=precision)
    be.input_grad(G2, W2, st(N, n_hid), precision=precision)
    be.activation_mask(G1, Z1, A1, 1, 0.0, G1)
    if sd.itemsize == 2:   # bf16/fp16: the network's 16-bit copy of the parameters, and its W read as stored
        be.round_to_storage(f32(11), st(11), precision)
        W1s, W2s = st(n_hid, n_in), st(n_out, n_hid)
        for W, b, Z, A, A_prev in ((W1s, b1, Z1, A1, X), (W2s, b2, Z2, A2, A1), (W2s, b2, Z2, st(N, n_out), A1),
                                   (W1s, b1, Z1, f32(N, n_hid), X)):
            be.dense_forward(A_prev, W, b, 1, 0.0, Z, A, precision=precision)
        be.input_grad_masked(G2, W2s, Z1, A1, 3, 0.0, G1, precision=precision)
    launched = _check_launches(calls, "float32")
    wanted = {(e.name, e.dtype, e.variant) for e in TABLE if e.variant} & {
        (k.py_func.__name__, "float32", numba_kernels.variant_name(key[1:] if isinstance(key[0], str) else key))
        for factory, key, _ in numba_kernels.precision_launches(precision) for k in [factory(*key)]}
    assert wanted <= launched, f"in the table, never launched: {sorted(wanted - launched)}"


# ---- compile for sm_90 and sm_80 and read ptxas's report ------------------------------------------------------
@pytest.mark.parametrize("entry,cc", _cases())
def test_kernel_compiles_for_a_real_gpu(toolkit, entry, cc):
    ptx = ptx_for(entry, cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert re.search(r"^\.visible \.entry ", ptx, re.MULTILINE), "no kernel entry in the PTX"


@pytest.mark.parametrize("entry,cc", _cases())
def test_kernel_does_not_spill(toolkit, entry, cc, tmp_path_factory, record_property):
    """ptxas -v for sm_<cc>: no spill stores or loads (a spill moves the GEMM accumulators to local memory), and
    the GEMM kernels keep their TM x TN accumulator tile in registers (no stack frame)."""
    report = ptxas_report(toolkit, entry, cc, tmp_path_factory)
    record_property("registers", report["registers"])
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["log"]
    if entry.name in ("dense_forward_kernel", "input_grad_kernel", "weight_grad_kernel"):
        assert report["stack"] == 0, report["log"]


def _writes_or_rounds_fp16(entry):
    """The variant stores float16 (an f16 output kind) or rounds a float32 operand to fp16."""
    kinds = entry.variant.split(",")
    outputs = {"dense_forward_kernel": kinds[-1:], "input_grad_kernel": kinds[-1:],
               "activation_mask_kernel": kinds[-1:], "loss_rows_kernel": kinds[:1],
               "round_to_storage_kernel": kinds[-1:]}.get(entry.name, [])
    return "f16" in outputs or "fp16" in kinds


@pytest.mark.parametrize("entry,cc", [c for c in _cases() if c.values[0].variant])
def test_fp16_is_rounded_once_to_nearest_even(toolkit, entry, cc):
    """Every float16 conversion in a reduced-precision kernel is cvt.rn.f16.f32: round to nearest even, once,
    from float32 (never .rz/.rm/.rp, never cvt.rn.f16.f64: a float64 intermediate stored straight into float16
    is rounded once from float64, not as the reference, float32 then float16); a kernel that stores float16 or
    rounds an operand to fp16 has one, and the tf32/bf16 kernels have none (their rounding is integer RNE)."""
    ptx = ptx_for(entry, cc)
    conversions = re.findall(r"\bcvt(?:\.\w+)*?\.f16\.f(?:32|64)\b", ptx)
    assert set(conversions) <= {"cvt.rn.f16.f32"}, sorted(set(conversions))
    assert bool(conversions) == _writes_or_rounds_fp16(entry), (entry.variant, conversions)


def test_register_report(toolkit, tmp_path_factory, capsys):
    """The table of registers and spills, printed into the test log (also with output captured)."""
    lines = [f"{'kernel':<24}{'dtype':<9}{'variant':<28}{'cc':<6}{'registers':>10}{'stack':>7}{'spills (st/ld)':>16}"]
    for entry in TABLE:
        for cc in CCS:
            r = ptxas_report(toolkit, entry, cc, tmp_path_factory)
            lines.append(f"{entry.name:<24}{entry.dtype:<9}{entry.variant or 'fp32':<28}{cc[0]}.{cc[1]:<4}"
                         f"{r['registers']:>10}{r['stack']:>7}{r['spill_stores']:>9}/{r['spill_loads']}")
    with capsys.disabled():
        print("\nnumba kernels, ptxas -v (toolkit %s, from %s):\n%s" % (toolkit.home, toolkit.how, "\n".join(lines)))
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in _PTXAS.values())


def test_compile_ptx_puts_numba_back(toolkit):
    """compile_ptx's stand-in device lookup and per-cc device-function overloads last only while it compiles: after
    it, numba asks the driver again and each device function has its own overloads back; the device functions
    were compiled once per cc, apart."""
    from numba.cuda import dispatcher as cuda_dispatcher
    lookup = cuda_dispatcher.get_current_device
    device_functions = numba_kernels._dispatchers(numba_kernels._module_namespace(), device=True)
    own = {name: fn.overloads for name, fn in device_functions.items()}
    entry = next(e for e in TABLE if e.name == "dense_forward_kernel")
    for cc in CCS:
        ptx_for(entry, cc)
    assert cuda_dispatcher.get_current_device is lookup
    assert all(fn.overloads is own[name] for name, fn in device_functions.items())
    for name in ("gemm_tile", "output_position", "activation_forward"):
        per_cc = [numba_kernels._DEVICE_OVERLOADS[(name, cc)] for cc in CCS]
        assert all(per_cc) and per_cc[0] is not per_cc[1], name


@pytest.mark.gpu
def test_kernels_as_launched_on_this_gpu_use_no_local_memory(capsys):
    """On a GPU machine (skipped elsewhere; --require-gpu makes it run): each kernel compiled as a launch compiles
    it, for the GPU's own compute capability and through numba's default linking (LTO with nvJitLink, not the
    PTX + ptxas path above): no local memory per thread (no spills, accumulators in registers). Registers are
    printed beside the ptxas table's."""
    lines = []
    for entry in TABLE:
        launched = entry.kernel.compile(entry.argtypes)
        lines.append(f"{entry.name:<24}{entry.dtype:<9}{entry.variant or 'fp32':<28}"
                     f"{launched.regs_per_thread:>10} registers"
                     f"{launched.local_mem_per_thread:>8} bytes local")
        assert launched.local_mem_per_thread == 0, lines[-1]
    with capsys.disabled():
        print("\nnumba kernels as launched on this GPU:\n" + "\n".join(lines))
