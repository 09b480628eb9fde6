"""The cupy backend's kernels and launch code, run on the CPU: no GPU needed.

tests/cuda_emulation/ compiles kernels/*.cu with g++ against a small CUDA shim (cuda_cpu.h: each CUDA thread
a fiber, blocks one after another) and exposes a cuLaunchKernel-like entry that looks kernels up by their
NVRTC name expressions. Here CupyBackend itself runs, unchanged, on numpy arrays: its `cp` module is swapped
for a numpy stand-in and its `_kernel` lookup for the emulated launcher. So each op exercises the real Python
launch code (tile choice, split-K, grids, argument order and types) and the real CUDA C (tiling, edge
handling, epilogues, reductions), against the numpy reference.

Every emulated launch is checked more strictly than a GPU would check it (tests/cuda_emulation/emulator.py
and cuda_cpu.h say how; tests/test_emulator_checks.py shows each check firing on a planted bug):
  - argument types against the kernel's parameter list (CuPy checks none);
  - global memory: each array argument in an allocation of its own between guard zones of signaling NaN:
    a store outside it fails the launch (EmulationError naming the kernel and argument), a load outside it
    reads NaN, which the comparisons below see;
  - the schedule: threads and blocks run in a seeded random order, reshuffled at every barrier; the kernels
    must give the same bits under every schedule (test_results_are_the_same_bits_under_every_schedule);
  - shared memory starts every block as NaN, so a read of shared memory not written in this block shows;
  - launch limits (grid, 1024 threads, 48 KiB of static shared memory) and deadlocked barriers;
  - outputs start as NaN (poisoned), so an element no thread writes shows; vector (16-byte) accesses at
    misaligned addresses abort under -fsanitize=alignment; `offset` variants start arrays one element off
    16-byte alignment to exercise the scalar fallbacks.

test_project_cupy_tests_pass_on_the_emulated_backend runs the project's cupy-parametrised tests (the shared
op harness tests/test_backend_ops.py, the seed example; all network tests with GPUBP_EMULATE_NETWORK_TESTS=1)
on the emulated backend too. GPUBP_EMULATION_SEED picks the schedule's seed (default 0).

Not covered here: speed, bank conflicts, NVRTC-specific behaviour (test_kernels_compile.py compiles with
NVRTC), -ftz, races inside one stretch between two barriers (a fiber runs it without interruption), and real
CUDA graphs (GPU tests in test_cupy_backend.py).
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gpubp import activations as acts
from gpubp import losses
from gpubp.backends import cuda_sources
from gpubp.backends import cupy_backend as cb
from gpubp.backends.numpy_backend import NumpyBackend

from cuda_emulation import emulator as emulator_module

DTYPES = ["float32", "float64"]
ACTIVATIONS = list(acts.NAMES.values())
# sm_count steers the launch code: 1 makes every GEMM take the 128x128 tile and never split K; a huge count
# makes every GEMM take the 64x64 tile and split weight_grad's K wherever K >= 512.
SM_COUNTS = {"large-tile": 1, "small-tile-split-k": 10**6}
# (N, in, out): below one tile, across tiles, 16-byte-aligned rows (64, 68) and odd ones
SHAPES = [(1, 1, 1), (7, 33, 5), (33, 7, 129), (41, 64, 68), (130, 20, 70), (600, 12, 9)]


def tol(dtype, k=1):
    if dtype == "float32":
        return dict(rtol=2e-4, atol=2e-5 + 1e-6 * k)
    return dict(rtol=1e-10, atol=1e-12 + 1e-14 * k)


# ---- the emulated device ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    try:
        return emulator_module.build(tmp_path_factory.mktemp("cuda_emulation"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=list(SM_COUNTS), ids=list(SM_COUNTS))
def backend(request, emulator, monkeypatch):
    """A CupyBackend whose device is the emulator and whose arrays are numpy arrays."""
    for module, name, value in emulator_module.patches(emulator, SM_COUNTS[request.param]):
        monkeypatch.setattr(module, name, value)
    return cb.CupyBackend()


def put(values, dtype, offset=0):
    """values as a dtype array that starts `offset` elements past a 16-byte boundary (1: misaligned, so
    vector paths must fall back to scalar ones). Guard zones are the launcher's (emulator.GuardedCopy)."""
    values = np.asarray(values, dtype=np.float64).astype(dtype)
    raw = np.empty(values.size + offset + 16, dtype)
    skip = (-raw.ctypes.data % 16) // raw.itemsize + offset
    array = raw[skip:skip + values.size].reshape(values.shape)
    array[...] = values
    return array


def poisoned(shape, dtype, offset=0):
    return put(np.full(shape, np.nan), dtype, offset)


def inputs(rng, dtype, *shapes):
    """Random inputs rounded to dtype, as float64 references."""
    return [rng.standard_normal(shape).astype(dtype).astype(np.float64) for shape in shapes]


# ---- the kernel set -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_forward(backend, dtype, shape, rng):
    N, n_in, n_out = shape
    A_prev, W, b = inputs(rng, dtype, (N, n_in), (n_out, n_in), n_out)
    for act in ACTIVATIONS:
        bias = act % 2 == 0
        Z, A = poisoned((N, n_out), dtype), poisoned((N, n_out), dtype)
        backend.dense_forward(put(A_prev, dtype), put(W, dtype), put(b, dtype) if bias else None, act, 0.1, Z, A)
        Z_ref = A_prev @ W.T + (b if bias else 0)
        np.testing.assert_allclose(Z, Z_ref, **tol(dtype, n_in))
        np.testing.assert_allclose(A, acts.forward(act, Z_ref, 0.1), **tol(dtype, n_in))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_forward_misaligned_and_in_place(backend, dtype, rng):
    """Arrays one element off 16-byte alignment (scalar loads and stores), and A = Z for the identity."""
    N, n_in, n_out = 37, 64, 68
    A_prev, W, b = inputs(rng, dtype, (N, n_in), (n_out, n_in), n_out)
    Z_ref = A_prev @ W.T + b
    for offsets in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        Z = poisoned((N, n_out), dtype, offsets[2])
        A = poisoned((N, n_out), dtype)
        backend.dense_forward(put(A_prev, dtype, offsets[0]), put(W, dtype, offsets[1]), put(b, dtype, 1),
                              acts.TANH, 0.1, Z, A)
        np.testing.assert_allclose(Z, Z_ref, **tol(dtype, n_in))
        np.testing.assert_allclose(A, np.tanh(Z_ref), **tol(dtype, n_in))
    Z = poisoned((N, n_out), dtype)
    backend.dense_forward(put(A_prev, dtype), put(W, dtype), put(b, dtype), acts.IDENTITY, 0.1, Z, Z)
    np.testing.assert_allclose(Z, Z_ref, **tol(dtype, n_in))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_mask(backend, dtype, rng):
    N, n_out = 33, 7
    Z, dA = inputs(rng, dtype, (N, n_out), (N, n_out))
    Z[0, 0] = 0.0   # relu'(0) = 0, as in the seed
    for act in ACTIVATIONS:
        A = acts.forward(act, Z, 0.1)
        delta = poisoned((N, n_out), dtype)
        backend.activation_mask(put(dA, dtype), put(Z, dtype), put(A, dtype), act, 0.1, delta)
        np.testing.assert_allclose(delta, acts.derivative_mask(act, dA, Z, A, 0.1), **tol(dtype))
        in_place = put(dA, dtype)
        backend.activation_mask(in_place, put(Z, dtype), put(A, dtype), act, 0.1, in_place)
        np.testing.assert_array_equal(in_place, delta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(1031, 5, 3)], ids=str)
def test_weight_grad(backend, dtype, shape, rng):
    N, n_in, n_out = shape
    delta, A_prev = inputs(rng, dtype, (N, n_out), (N, n_in))
    dW, db = poisoned((n_out, n_in), dtype), poisoned(n_out, dtype)
    backend.weight_grad(put(delta, dtype), put(A_prev, dtype), dW, db)
    np.testing.assert_allclose(dW, delta.T @ A_prev, **tol(dtype, N))
    np.testing.assert_allclose(db, delta.sum(axis=0), **tol(dtype, N))
    # accumulate: the same gradient again; the no-bias form leaves db alone
    backend.weight_grad(put(delta, dtype), put(A_prev, dtype), dW, None, accumulate=True)
    np.testing.assert_allclose(dW, 2 * (delta.T @ A_prev), **tol(dtype, 2 * N))
    np.testing.assert_allclose(db, delta.sum(axis=0), **tol(dtype, N))
    db_before = db.copy()
    backend.weight_grad(put(delta, dtype), put(A_prev, dtype), dW, db, accumulate=True)
    np.testing.assert_allclose(dW, 3 * (delta.T @ A_prev), **tol(dtype, 3 * N))
    np.testing.assert_allclose(db, db_before + delta.sum(axis=0), **tol(dtype, 2 * N))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_grad(backend, dtype, shape, rng):
    N, n_in, n_out = shape
    delta, W = inputs(rng, dtype, (N, n_out), (n_out, n_in))
    dA_prev = poisoned((N, n_in), dtype)
    backend.input_grad(put(delta, dtype), put(W, dtype), dA_prev)
    np.testing.assert_allclose(dA_prev, delta @ W, **tol(dtype, n_out))


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_grad_masked(backend, dtype, rng):
    """δ_prev = (δ · W) ⊙ g'(Z_prev) in one launch, aligned (in = 64) and not (in = 9), and in place."""
    for N, n_in, n_out in ((41, 64, 68), (7, 9, 5)):
        delta, W, Z_prev = inputs(rng, dtype, (N, n_out), (n_out, n_in), (N, n_in))
        Z_prev[0, 0] = 0.0
        for act in ACTIVATIONS:
            A_prev = acts.forward(act, Z_prev, 0.1)
            expected = acts.derivative_mask(act, delta @ W, Z_prev, A_prev, 0.1)
            out = poisoned((N, n_in), dtype)
            backend.input_grad_masked(put(delta, dtype), put(W, dtype), put(Z_prev, dtype), put(A_prev, dtype),
                                      act, 0.1, out)
            np.testing.assert_allclose(out, expected, **tol(dtype, n_out))
            Z_dev, A_dev = put(Z_prev, dtype), put(A_prev, dtype)
            in_place = A_dev if act in (acts.SIGMOID, acts.TANH) else Z_dev   # overwrite what the mask reads
            backend.input_grad_masked(put(delta, dtype), put(W, dtype), Z_dev, A_dev, act, 0.1, in_place)
            np.testing.assert_allclose(in_place, expected, **tol(dtype, n_out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", list(losses.NAMES.values()), ids=list(losses.NAMES))
def test_loss_grad(backend, dtype, loss, rng):
    for N, C in ((1, 1), (37, 5), (9, 40), (70, 3)):   # C = 40: lanes stride past 32 columns
        Z = (3 * rng.standard_normal((N, C))).astype(dtype).astype(np.float64)
        y = np.eye(C)[rng.integers(0, C, N)] if loss == losses.SOFTMAX_CE else rng.random((N, C))
        y = y.astype(dtype).astype(np.float64)
        required = losses.REQUIRED_ACTIVATION[loss]
        for act in ACTIVATIONS if required is None else [required]:
            A_ref, delta_ref = np.empty((N, C)), np.empty((N, C))
            L_ref = losses.loss_grad(loss, act, 0.1, Z, y, A_ref, delta_ref)
            A, delta, loss_out = poisoned((N, C), dtype), poisoned((N, C), dtype), poisoned(1, dtype)
            backend.loss_grad(loss, act, 0.1, put(Z, dtype), put(y, dtype), A, delta, loss_out)
            np.testing.assert_allclose(loss_out[0], L_ref, **tol(dtype, N * C))
            np.testing.assert_allclose(A, A_ref, **tol(dtype))
            np.testing.assert_allclose(delta, delta_ref, **tol(dtype))


def test_loss_grad_is_stable_for_huge_logits(backend):
    Z = np.array([[1e4, -1e4], [-1e4, 1e4]])
    for loss, act, y in ((losses.BCE, acts.SIGMOID, np.array([[0.0, 1.0], [1.0, 0.0]])),
                         (losses.SOFTMAX_CE, acts.IDENTITY, np.eye(2)[[1, 0]])):
        A, delta, loss_out = poisoned((2, 2), "float32"), poisoned((2, 2), "float32"), poisoned(1, "float32")
        backend.loss_grad(loss, act, 0.1, put(Z, "float32"), put(y, "float32"), A, delta, loss_out)
        assert np.isfinite(loss_out).all() and np.isfinite(delta).all() and loss_out[0] > 1e3


def test_loss_grad_grid_stride_over_rows(backend, rng, monkeypatch):
    """More rows than the grid has warps: each warp takes several rows."""
    monkeypatch.setattr(cb, "_LOSS_MAX_BLOCKS", 3)
    N, C = 100, 4
    Z, y = rng.standard_normal((N, C)), rng.random((N, C))
    A_ref, delta_ref = np.empty((N, C)), np.empty((N, C))
    L_ref = losses.loss_grad(losses.MSE, acts.TANH, 0.1, Z, y, A_ref, delta_ref)
    A, delta, loss_out = poisoned((N, C), "float64"), poisoned((N, C), "float64"), poisoned(1, "float64")
    backend.loss_grad(losses.MSE, acts.TANH, 0.1, put(Z, "float64"), put(y, "float64"), A, delta, loss_out)
    np.testing.assert_allclose(loss_out[0], L_ref, **tol("float64", N * C))
    np.testing.assert_allclose(delta, delta_ref, **tol("float64"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov",
                         [(0.0, 0.0, 0.0, False), (0.9, 0.0, 0.0, False), (0.9, 0.0, 1e-2, True),
                          (0.5, 0.3, 1e-3, False)])
def test_sgd_update(backend, dtype, momentum, dampening, weight_decay, nesterov, rng):
    size = 1031
    theta0, *grads = inputs(rng, dtype, size, size, size, size)
    reference, ref_params, ref_buf = NumpyBackend(), theta0.copy(), np.zeros(size)
    ref_step = np.zeros(1, np.int64)
    params, buf = put(theta0, dtype), poisoned(size, dtype)
    step = put(np.zeros(1), np.int64)
    for g in grads:
        backend.sgd_update(params, put(g, dtype), buf, step, 0.1, momentum, dampening, weight_decay, nesterov)
        reference.sgd_update(ref_params, g, ref_buf, ref_step, 0.1, momentum, dampening, weight_decay, nesterov)
    np.testing.assert_allclose(params, ref_params, **tol(dtype))
    assert step[0] == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_update(backend, dtype, weight_decay, rng):
    size = 1031
    theta0, *grads = inputs(rng, dtype, size, size, size, size, size)
    reference, ref_params, ref_m, ref_v = NumpyBackend(), theta0.copy(), np.zeros(size), np.zeros(size)
    ref_step = np.zeros(1, np.int64)
    params, m, v = put(theta0, dtype), put(np.zeros(size), dtype), put(np.zeros(size), dtype)
    step = put(np.zeros(1), np.int64)
    for g in grads:
        backend.adam_update(params, put(g, dtype), m, v, step, 1e-2, 0.9, 0.999, 1e-8, weight_decay)
        reference.adam_update(ref_params, g, ref_m, ref_v, ref_step, 1e-2, 0.9, 0.999, 1e-8, weight_decay)
    np.testing.assert_allclose(params, ref_params, **tol(dtype))
    assert step[0] == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot(backend, dtype):
    out = poisoned((5, 3), dtype)
    backend.one_hot(np.array([2, 0, 1, 2, 0]), 3, out)
    np.testing.assert_array_equal(out, np.eye(3)[[2, 0, 1, 2, 0]])


SCHEDULE_SEEDS = [1, 2, 3]


def test_results_are_the_same_bits_under_every_schedule(backend, emulator, rng):
    """No kernel uses atomics, and threads exchange data only across barriers, so the order the emulator runs
    threads and blocks in (a seeded shuffle, reshuffled at every barrier) must not change a single bit.
    One pass of the kernel set per seed: GEMMs over several tiles (split K in small-tile-split-k), the
    fused mask epilogue, warp shuffles and shared-memory reductions of the loss."""
    N, n_in, n_out = 1031, 20, 70
    A_prev, W, b, delta, Z_prev = inputs(rng, "float32", (N, n_in), (n_out, n_in), n_out, (N, n_out), (N, n_in))
    y = np.eye(n_out)[rng.integers(0, n_out, N)]
    results = []
    for seed in SCHEDULE_SEEDS:
        emulator_module.set_seed(emulator, seed)
        Z, A = poisoned((N, n_out), "float32"), poisoned((N, n_out), "float32")
        backend.dense_forward(put(A_prev, "float32"), put(W, "float32"), put(b, "float32"), acts.RELU, 0.1, Z, A)
        dW, db = poisoned((n_out, n_in), "float32"), poisoned(n_out, "float32")
        backend.weight_grad(put(delta, "float32"), put(A_prev, "float32"), dW, db)
        delta_prev = poisoned((N, n_in), "float32")
        backend.input_grad_masked(put(delta, "float32"), put(W, "float32"), put(Z_prev, "float32"),
                                  put(np.tanh(Z_prev), "float32"), acts.TANH, 0.1, delta_prev)
        P, d, loss = poisoned((N, n_out), "float32"), poisoned((N, n_out), "float32"), poisoned(1, "float32")
        backend.loss_grad(losses.SOFTMAX_CE, acts.IDENTITY, 0.1, Z, put(y, "float32"), P, d, loss)
        results.append([Z, A, dW, db, delta_prev, P, d, loss])
    np.testing.assert_allclose(results[0][2], delta.T @ A_prev, **tol("float32", N))
    np.testing.assert_allclose(results[0][0], A_prev @ W.T + b, **tol("float32", n_in))
    for seed, result in zip(SCHEDULE_SEEDS[1:], results[1:]):
        for name, first, other in zip(["Z", "A", "dW", "db", "delta_prev", "P", "d", "loss"], results[0], result):
            np.testing.assert_array_equal(other, first, err_msg=f"{name} differs between seeds 1 and {seed}")


def test_harness_knows_every_name_expression(emulator):
    for filename in cuda_sources.KERNEL_FILES:
        for name in cuda_sources.name_expressions(filename):
            assert emulator.emu_signature(name.encode()) is not None, name


# ---- the project's own cupy tests, on the emulated backend --------------------------------------------------------
# Run in a process of their own with cuda_emulation/emulated_cupy_plugin.py ("cupy" = the emulated backend).
# Left out there: what needs real CuPy arrays or memory pools (test_cupy_backend.py's GPU tests, the device
# memory test) and test_array_utilities (on the emulator numpy arrays are the device arrays, so its
# is_device_array(np.zeros(2)) check cannot hold).
EMULATED_RUNS = {
    # the backend contract (every op, awkward sizes, poisoned outputs) and the seed's worked example: ~30 s
    "contract": (["test_backend_ops.py", "test_seed_example.py"], None),
    # every cupy-parametrised network test (training against numpy, deterministic mode, fuzzing): ~2 min,
    # so only with GPUBP_EMULATE_NETWORK_TESTS=1
    "network": (["."], "GPUBP_EMULATE_NETWORK_TESTS"),
}
EMULATED_DESELECT = ("cupy and not array_utilities and not test_cupy_backend and not device_memory"
                     " and not emulated and not kernels_compile")


@pytest.mark.slow
@pytest.mark.parametrize("run", list(EMULATED_RUNS))
def test_project_cupy_tests_pass_on_the_emulated_backend(emulator, run):
    files, opt_in = EMULATED_RUNS[run]
    if opt_in and os.environ.get(opt_in) != "1":
        pytest.skip(f"set {opt_in}=1 to run the {run} tests on the emulated cupy backend")
    tests_dir = pathlib.Path(__file__).parent
    paths = [str(tests_dir / f) for f in files if (tests_dir / f).exists()]
    if not paths:
        pytest.skip(f"none of {files} is here")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "cuda_emulation.emulated_cupy_plugin", "-q", "-p", "no:cacheprovider",
         *paths, "-k", EMULATED_DESELECT],
        capture_output=True, text=True, env=env, cwd=tests_dir.parent, timeout=3600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


# ---- CUDA graphs, with capture modelled by the emulator ---------------------------------------------------------
def test_graph_replay_equals_eager(backend, rng):
    """run_step: eager warm-up, capture (launches recorded, not run) and launch, then replays; the same
    results, bit for bit, as running every step eagerly, with the step counter read from device memory."""
    from test_cupy_backend import TwoLayerStep
    eager_be, graph_be = cb.CupyBackend(), cb.CupyBackend()
    eager_be.use_graphs, graph_be.use_graphs = False, True
    seed = int(rng.integers(2**31))
    eager, graphed = TwoLayerStep(eager_be, np.random.default_rng(seed), N=40), \
        TwoLayerStep(graph_be, np.random.default_rng(seed), N=40)
    for i in range(4):
        eager_be.run_step("step", eager)
        graph_be.run_step("step", graphed)
        np.testing.assert_array_equal(eager.loss, graphed.loss)
    assert isinstance(graph_be._steps["step"], tuple) and not graph_be.graph_errors   # it was captured
    np.testing.assert_array_equal(eager.params, graphed.params)
    assert eager.step[0] == graphed.step[0] == 4


def test_uncapturable_step_runs_eagerly(backend, rng):
    """A synchronising read inside the step cannot be captured: that key runs eagerly, every call once."""
    from test_cupy_backend import TwoLayerStep
    step = TwoLayerStep(backend, rng, N=24)
    seen = []

    def step_and_read():
        step()
        seen.append(float(backend.to_numpy(step.loss)[0]))

    for _ in range(3):
        backend.run_step("reads", step_and_read)
    assert backend._steps["reads"] == "eager" and "device-to-host" in backend.graph_errors["reads"]
    assert step.step[0] == 3 and len(seen) == 3 and np.isfinite(seen).all()


def test_graph_is_recaptured_when_the_step_reads_other_buffers(backend, rng):
    """The same key over a rebuilt workspace (new buffers): replaying the old graph would run on the old
    buffers, so the step is captured again. key None always runs eagerly."""
    from test_cupy_backend import TwoLayerStep
    seed = int(rng.integers(2**31))
    first = TwoLayerStep(backend, np.random.default_rng(seed), N=24)
    for _ in range(3):
        backend.run_step("step", lambda: first())
    graph = backend._steps["step"][0]
    second = TwoLayerStep(backend, np.random.default_rng(seed), N=24)   # same shapes, other buffers
    backend.run_step("step", lambda: second())
    assert backend._steps["step"][0] is not graph
    assert first.step[0] == 3 and second.step[0] == 1   # the step ran on second's buffers only
    eager_be = cb.CupyBackend()
    eager_be.use_graphs = False
    fresh = TwoLayerStep(eager_be, np.random.default_rng(seed), N=24)
    fresh()
    np.testing.assert_array_equal(second.params, fresh.params)
    backend.run_step(None, lambda: second())
    backend.run_step(None, lambda: second())
    assert None not in backend._steps and second.step[0] == 3
