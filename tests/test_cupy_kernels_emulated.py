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
op harness tests/test_backend_ops.py, the seed example, faults and fit; all network tests with
GPUBP_EMULATE_NETWORK_TESTS=1) on the emulated backend too. GPUBP_EMULATION_SEED picks the schedule's seed
(default 0).

The training loop's ops (kernels/loop.cu, the guarded updates of kernels/optim.cu) are checked against the
numpy backend guard for guard, bit for bit where the reference adds in float64 (record_step), with bad values
placed where each level of the index minimum (a thread's walk, a warp, the grid's atomicMin) decides; a whole
fit with CUDA graphs (capture modelled: launches recorded, then replayed) against the same fit run eagerly.

Not covered here: speed, bank conflicts, NVRTC-specific behaviour (test_kernels_compile.py compiles with
NVRTC), -ftz, races inside one stretch between two barriers (a fiber runs it without interruption), and what
a real driver adds to CUDA graphs (memory pools, capture errors: GPU tests in test_cupy_backend.py).
"""
import os
import warnings
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gpubp import activations as acts
from gpubp import guard as G
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


# ---- guarded updates (kernels/optim.cu): CHECK, APPLY, finish ----------------------------------------------------
def fresh_guard(steps=0, fault=G.NONE):
    """A guard as the host resets it (STEP = steps), the loss ring NaN so a stray write shows; with `fault`, one
    that already holds a fault."""
    guard = np.full(G.SIZE, np.nan)
    guard[:G.RING] = G.fresh(steps)
    if fault:
        guard[G.FAULT], guard[G.FAULT_STEP], guard[G.FAULT_INDEX] = fault, steps, 5
    return guard


def device_int64(values):
    return put(values, np.int64)


def device_float64(values):
    return put(values, np.float64)


SGD_SETTINGS = [(0.0, 0.0, 0.0, False), (0.9, 0.0, 0.0, False), (0.9, 0.0, 1e-2, True), (0.5, 0.3, 1e-3, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 33, 1031])
@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov", SGD_SETTINGS, ids=str)
def test_sgd_update(backend, dtype, size, momentum, dampening, weight_decay, nesterov, rng):
    """Three steps against the numpy backend given the same hyper and guard; the momentum buffer starts
    poisoned (the first step must overwrite it, or leave it alone when μ = 0)."""
    theta0, *grads = inputs(rng, dtype, size, size, size, size)
    hyper = [0.1, momentum, dampening, weight_decay, float(nesterov)]
    reference, ref_params, ref_buf = NumpyBackend(), theta0.astype(dtype), np.full(size, np.nan, dtype)
    ref_step, ref_guard = np.zeros(1, np.int64), fresh_guard(steps=7)
    params, buf = put(theta0, dtype), poisoned(size, dtype)
    step, guard = device_int64([0]), device_float64(fresh_guard(steps=7))
    for g in grads:
        backend.sgd_update(params, put(g, dtype), buf, step, device_float64(hyper), guard)
        reference.sgd_update(ref_params, g.astype(dtype), ref_buf, ref_step, np.array(hyper), ref_guard)
    np.testing.assert_allclose(params, ref_params, **tol(dtype))
    np.testing.assert_allclose(buf, ref_buf, **tol(dtype))   # NaN where μ = 0 in both: untouched
    assert step[0] == ref_step[0] == 3
    np.testing.assert_array_equal(guard, ref_guard)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 33, 1031])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_update(backend, dtype, size, weight_decay, rng):
    theta0, *grads = inputs(rng, dtype, size, size, size, size, size)
    hyper = [1e-2, 0.9, 0.999, 1e-8, weight_decay]
    reference, ref_params = NumpyBackend(), theta0.astype(dtype)
    ref_m, ref_v = np.zeros(size, dtype), np.zeros(size, dtype)
    ref_step, ref_guard = np.zeros(1, np.int64), fresh_guard()
    params, m, v = put(theta0, dtype), put(np.zeros(size), dtype), put(np.zeros(size), dtype)
    step, guard = device_int64([0]), device_float64(fresh_guard())
    for g in grads:
        backend.adam_update(params, put(g, dtype), m, v, step, device_float64(hyper), guard)
        reference.adam_update(ref_params, g.astype(dtype), ref_m, ref_v, ref_step, np.array(hyper), ref_guard)
    np.testing.assert_allclose(params, ref_params, **tol(dtype))
    np.testing.assert_allclose(m, ref_m, **tol(dtype))
    np.testing.assert_allclose(v, ref_v, **tol(dtype))
    assert step[0] == ref_step[0] == 4
    np.testing.assert_array_equal(guard, ref_guard)


# Bad elements placed for the grid-stride walks: with 1 SM the grid is 32 blocks of 256 threads (8192 threads),
# so index 8197 is thread 5's second element (after 5: a thread keeps its first), 300 and 301 two lanes of one
# warp (the warp keeps the smaller); with 10^6 SMs every thread has one element.
BAD_INDEX_CASES = [(1, [0]), (7, [6, 3]), (33, [32, 17]), (1031, [1030, 515, 343]),
                   (20011, [20010, 8197, 301, 300]), (20011, [20010, 8197, 5]), (20011, [20010, 8197])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["sgd", "sgd-momentum", "adam-v"])
@pytest.mark.parametrize("size, bad", BAD_INDEX_CASES, ids=str)
def test_update_that_would_overflow_writes_nothing(backend, dtype, which, size, bad, rng):
    """CHECK finds the smallest bad index of the buffer the reference names (θ before the state), APPLY writes
    nothing, the finish kernel sets the fault and leaves the step count alone, and the flags are reset: the
    next update, with good gradients but the fault still set, does nothing either."""
    big = float(np.finfo(dtype).max)
    theta0, g = inputs(rng, dtype, size, size)
    if which == "sgd":                 # lr·g overflows θ
        g[bad], hyper, s0 = big / 4, [1e3, 0.0, 0.0, 0.0, 0.0], [np.full(size, np.nan)]
    elif which == "sgd-momentum":      # μ·b + g overflows b, and so θ: θ is named
        g[bad], hyper, s0 = big * 0.75, [1e-30, 0.9, 0.0, 0.0, 0.0], [np.full(size, big * 0.75)]
    else:                              # (1 − β2)·g² overflows v (state 1) alone
        g[bad], hyper, s0 = np.sqrt(big) * 100, [1e-3, 0.9, 0.999, 1e-8, 0.0], [np.zeros(size), np.zeros(size)]
    culprit = G.STATE + 1 if which == "adam-v" else G.PARAMS
    params, state = put(theta0, dtype), [put(s, dtype) for s in s0]
    step, guard = device_int64([1]), device_float64(fresh_guard(steps=9))
    update = backend.adam_update if which == "adam-v" else backend.sgd_update
    update(params, put(g, dtype), *state, step, device_float64(hyper), guard)
    expected = fresh_guard(steps=9)
    expected[G.FAULT], expected[G.FAULT_STEP], expected[G.FAULT_INDEX] = culprit, 9, min(bad)
    np.testing.assert_array_equal(guard, expected)
    np.testing.assert_array_equal(params, theta0.astype(dtype))
    for buffer, s in zip(state, s0):
        np.testing.assert_array_equal(buffer, s.astype(dtype))
    assert step[0] == 1
    assert (backend._bad_index() == cb._NO_INDEX).all()
    update(params, put(np.zeros(size), dtype), *state, step, device_float64(hyper), guard)
    np.testing.assert_array_equal(guard, expected)
    np.testing.assert_array_equal(params, theta0.astype(dtype))
    assert step[0] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["sgd", "adam"])
@pytest.mark.parametrize("size, bad", BAD_INDEX_CASES, ids=str)
def test_update_names_a_non_finite_gradient_first(backend, dtype, which, size, bad, rng):
    """Against the numpy backend, guard for guard: non-finite gradients placed for the index minimum's levels
    (a thread's walk, a warp, the grid), weight decay on, and at index 0 (unless it is bad) a finite gradient
    whose update overflows (SGD: θ, Adam: v), which a smaller index does not help: CHECK names the gradient
    slot first, APPLY writes nothing, every slot is reset. Then a clean update, the guard reset, is applied."""
    reference = NumpyBackend()
    big = float(np.finfo(dtype).max)
    theta0, g, s0 = inputs(rng, dtype, size, size, size)
    if which == "sgd":
        hyper, state0 = [1e3, 0.9, 0.0, 1e-2, 0.0], [np.abs(s0)]
        g[0] = big / 4
    else:
        hyper, state0 = [1e-3, 0.9, 0.999, 1e-8, 1e-2], [np.abs(s0), np.abs(s0)]
        g[0] = np.sqrt(big) * 100
    g[bad] = np.resize([np.inf, np.nan, -np.inf], len(bad))
    update = backend.adam_update if which == "adam" else backend.sgd_update
    ref_update = reference.adam_update if which == "adam" else reference.sgd_update
    for grads in (g, inputs(rng, dtype, size)[0]):
        params, state, step = put(theta0, dtype), [put(s, dtype) for s in state0], device_int64([2])
        ref_params, ref_state, ref_step = theta0.astype(dtype), [s.astype(dtype) for s in state0], np.array([2])
        guard, ref_guard = device_float64(fresh_guard(steps=9)), fresh_guard(steps=9)
        update(params, put(grads, dtype), *state, step, device_float64(hyper), guard)
        ref_update(ref_params, grads.astype(dtype), *ref_state, ref_step, np.array(hyper), ref_guard)
        np.testing.assert_array_equal(guard, ref_guard)
        np.testing.assert_allclose(params, ref_params, **tol(dtype))
        for buffer, ref_buffer in zip(state, ref_state):
            np.testing.assert_allclose(buffer, ref_buffer, **tol(dtype))
        assert step[0] == ref_step[0]
        assert (backend._bad_index() == cb._NO_INDEX).all()
        if grads is g:
            assert guard[G.FAULT] == G.GRADIENT and guard[G.FAULT_INDEX] == min(bad) and step[0] == 2
            np.testing.assert_array_equal(params, theta0.astype(dtype))
    assert guard[G.FAULT] == G.NONE and guard[G.STEP] == 10 and step[0] == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["sgd", "adam"])
def test_updates_do_nothing_once_a_fault_is_set(backend, dtype, which, rng):
    size = 1031
    theta0, g, s0 = inputs(rng, dtype, size, size, size)
    g[300] = np.nan                                  # the gradient check leaves a fault already set alone
    params, state = put(theta0, dtype), [put(np.abs(s0), dtype), put(np.abs(s0), dtype)][:1 if which == "sgd" else 2]
    step, guard = device_int64([5]), device_float64(fresh_guard(steps=5, fault=G.PARAMS))
    hyper = device_float64([0.1, 0.9, 0.0, 0.0, 0.0] if which == "sgd" else [0.1, 0.9, 0.999, 1e-8, 0.0])
    before = guard.copy()
    (backend.sgd_update if which == "sgd" else backend.adam_update)(params, put(g, dtype), *state, step, hyper, guard)
    np.testing.assert_array_equal(params, theta0.astype(dtype))
    for buffer in state:
        np.testing.assert_array_equal(buffer, np.abs(s0).astype(dtype))
    assert step[0] == 5
    np.testing.assert_array_equal(guard, before)


def test_learning_rate_is_read_from_device_memory(backend, rng):
    """A captured step keeps its arguments: a new lr must reach the kernel through `hyper`, not a host scalar."""
    size = 40
    theta0, g = inputs(rng, "float64", size, size)
    params, hyper = put(theta0, "float64"), device_float64([0.1, 0.0, 0.0, 0.0, 0.0])
    step, guard, buf = device_int64([0]), device_float64(fresh_guard()), poisoned(size, "float64")
    grads = put(g, "float64")
    backend.use_graphs = True
    for lr in (0.1, 0.1, 0.5, 0.25):   # eager, captured, replayed with a new lr twice
        hyper[0] = lr
        backend.run_step("update", lambda: backend.sgd_update(params, grads, buf, step, hyper, guard))
        theta0 = theta0 - lr * g
    assert isinstance(backend._steps["update"], tuple)
    np.testing.assert_allclose(params, theta0, rtol=1e-14)
    assert step[0] == 4 and guard[G.STEP] == 4


# ---- the training loop's device-side ops (kernels/loop.cu) -----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, F, n, start", [(1, 1, 1, 0), (7, 3, 3, 4), (33, 4, 32, 1), (40, 7, 33, 2),
                                            (300, 33, 260, 17), (1100, 1031, 5, 1090), (1100, 8, 1031, 60)],
                         ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_gather_rows_and_advance_cursor(backend, dtype, M, F, n, start, offset, rng):
    """Rows of every width (one vector, several, more than a block's threads) gathered by a permutation, with
    16-byte vectors where src and out allow and element by element where not; the cursor moves by n."""
    src = rng.standard_normal((M, F))
    order = rng.permutation(M)
    order_dev = device_int64(np.append(order, start))
    cursor = order_dev[M:]
    out = poisoned((n, F), dtype, offset)
    backend.gather_rows(put(src, dtype, offset), order_dev, cursor, out)
    np.testing.assert_array_equal(out, src[order[start:start + n]].astype(dtype))
    backend.advance_cursor(cursor, n)
    assert order_dev[M] == start + n
    np.testing.assert_array_equal(order_dev[:M], order)


def test_gather_rows_past_the_permutation_gives_nan_rows(backend, rng):
    """A cursor that runs past the M rows (a caller's bug) reads nothing out of bounds: those rows are NaN,
    which the step's loss turns into a fault the guard names."""
    M, F = 9, 5
    src = rng.standard_normal((M, F))
    order = rng.permutation(M)
    order_dev = device_int64(np.append(order, 6))
    out = poisoned((5, F), "float32")
    backend.gather_rows(put(src, "float32"), order_dev, order_dev[M:], out)
    np.testing.assert_array_equal(out[:3], src[order[6:]].astype(np.float32))
    assert np.isnan(out[3:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_guard_loss(backend, dtype):
    """Against the numpy backend, guard for guard: a finite loss, non-finite ones (named, index -1), later steps
    counted as skipped; the guard's other entries (the ring is NaN) untouched."""
    reference = NumpyBackend()
    guard, ref_guard = device_float64(fresh_guard(steps=3)), fresh_guard(steps=3)
    for loss in (0.5, -np.inf, np.nan, 0.5, np.inf):
        backend.guard_loss(put([loss], dtype), guard)
        reference.guard_loss(np.array([loss], dtype), ref_guard)
        np.testing.assert_array_equal(guard, ref_guard)
    assert guard[G.FAULT] == G.LOSS and guard[G.FAULT_INDEX] == -1 and guard[G.FAULT_STEP] == 3
    assert guard[G.SKIPPED] == 3


def record_inputs(rng, loss, N, C, dtype):
    """Predictions with the awkward cases of gpubp.losses.accuracy: exact 0.5 (not > 0.5), tied maxima (the
    first wins), a NaN in a row (numpy's argmax picks it), soft targets."""
    A = rng.random((N, C))
    if loss == losses.SOFTMAX_CE:
        A[::3, C - 1] = A[::3, 0]                     # ties between the first and the last column
        if N > 4 and C > 2:
            A[4, 1] = np.nan                          # numpy's argmax: the first NaN
        Y = np.eye(C)[rng.integers(0, C, N)]
        Y[1::5] = rng.random((len(Y[1::5]), C))       # soft targets: their arg-max
    else:
        Y = (rng.random((N, C)) > 0.5).astype(float)
        A.flat[::7] = 0.5
        Y.flat[1::11] = 0.5
    return A.astype(dtype), Y.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", [losses.MSE, losses.BCE, losses.SOFTMAX_CE], ids=losses.name_of)
@pytest.mark.parametrize("N, C", [(1, 1), (7, 3), (33, 40), (1031, 10), (40, 1031)], ids=str)
def test_record_step(backend, dtype, loss, N, C, rng):
    """Against the numpy backend, bit for bit: the loss sum, rows, correct predictions (accuracy · n, as numpy
    forms it), the ring slot of the step (wrapping, and STEP = 0's slot RING_SIZE − 1); nothing once faulted."""
    if loss == losses.SOFTMAX_CE and C == 1:
        C = 2
    reference = NumpyBackend()
    A, Y = record_inputs(rng, loss, N, C, dtype)
    for steps in (G.RING_SIZE + 2, 0, 5):
        guard, ref_guard = device_float64(fresh_guard(steps=steps)), fresh_guard(steps=steps)
        for loss_value in (0.1, 1 / 3):
            loss_out = np.array([loss_value], dtype)
            backend.record_step(loss, put(loss_out, dtype), put(A, dtype), put(Y, dtype), guard)
            reference.record_step(loss, loss_out, A, Y, ref_guard)
            np.testing.assert_array_equal(guard, ref_guard)
    assert guard[G.ROWS] == 2 * N and guard[G.RING + 4] == np.float64(np.array(1 / 3, dtype))
    assert (backend._correct_count() == 0).all()
    faulted = device_float64(fresh_guard(steps=3, fault=G.PARAMS))
    before = faulted.copy()
    backend.record_step(loss, put([0.5], dtype), put(A, dtype), put(Y, dtype), faulted)
    np.testing.assert_array_equal(faulted, before)
    assert (backend._correct_count() == 0).all()


def test_guard_layout_matches_gpubp_guard():
    """kernels/guard.cuh mirrors gpubp/guard.py: the same slots, ring and fault codes."""
    import re
    text = cuda_sources.read_kernel_file("guard.cuh")
    values = {name: int(value) for name, value in re.findall(r"\b((?:GUARD|FAULT)_[A-Z_]+) = (\d+)", text)}
    for name in ("FAULT", "FAULT_STEP", "FAULT_INDEX", "SKIPPED", "STEP", "LOSS_SUM", "CORRECT", "ROWS", "RING",
                 "RING_SIZE"):
        assert values["GUARD_" + name] == getattr(G, name), name
    for name in ("NONE", "LOSS", "GRADIENT", "PARAMS", "STATE"):
        assert values["FAULT_" + name] == getattr(G, name), name
    assert re.search(r"#define GUARD_NO_INDEX \(1LL << 62\)", text) and cb._NO_INDEX == 2**62


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot(backend, dtype):
    out = poisoned((5, 3), dtype)
    backend.one_hot(np.array([2, 0, 1, 2, 0]), 3, out)
    np.testing.assert_array_equal(out, np.eye(3)[[2, 0, 1, 2, 0]])
    backend.one_hot(np.array([2, -1, 3, 0, 1 << 40]), 3, out)     # out of range: a row of NaN
    assert np.isnan(out[[1, 2, 4]]).all()
    np.testing.assert_array_equal(out[[0, 3]], np.eye(3)[[2, 0]])


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
    # the backend contract (every op, awkward sizes, poisoned outputs), the seed's worked example, and the
    # guard end to end (faults named and rolled back, fit's device-side loop): ~1 min
    # the README's Keras script and the precisions the backend has (seed example in each): ~1 min in all
    "contract": (["test_backend_ops.py", "test_seed_example.py", "test_faults.py", "test_fit.py",
                  "test_sync_free.py", "test_readme.py", "test_mixed_precision.py"], None),
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
    """The same key over a rebuilt workspace or another model (new buffers): replaying the old graph would run
    on the old buffers, so the step starts over, eagerly first (a first call may do what a capture cannot, such
    as uploading the fused path's alphas), then captured. key None always runs eagerly."""
    from test_cupy_backend import TwoLayerStep
    seed = int(rng.integers(2**31))
    first = TwoLayerStep(backend, np.random.default_rng(seed), N=24)
    for _ in range(3):
        backend.run_step("step", lambda: first())
    graph = backend._steps["step"][0]
    second = TwoLayerStep(backend, np.random.default_rng(seed), N=24)   # same shapes, other buffers
    backend.run_step("step", lambda: second())
    assert backend._steps["step"][0] == "warm"   # the old graph is gone; second's first call ran eagerly
    assert first.step[0] == 3 and second.step[0] == 1   # the step ran on second's buffers only
    backend.run_step("step", lambda: second())
    assert backend._steps["step"][0] not in ("warm", graph) and not backend.graph_errors   # captured anew
    assert first.step[0] == 3 and second.step[0] == 2
    eager_be = cb.CupyBackend()
    eager_be.use_graphs = False
    fresh = TwoLayerStep(eager_be, np.random.default_rng(seed), N=24)
    fresh()
    fresh()
    np.testing.assert_array_equal(second.params, fresh.params)
    backend.run_step(None, lambda: second())
    backend.run_step(None, lambda: second())
    assert None not in backend._steps and second.step[0] == 4


# ---- a whole fit, eager against captured (the emulator records launches at capture, replays them at launch) ----
def _fit(backend_obj, loss, optimizer, X, y, hidden="tanh", **fit_kw):
    import gpubp
    net = gpubp.Sequential(gpubp.Dense(X.shape[1], 8, hidden),
                           gpubp.Dense(8, 3, "sigmoid" if loss == "bce" else "identity"),
                           backend=backend_obj, dtype="float32", seed=1)
    opt = gpubp.SGD(net, lr=0.1, momentum=0.9, nesterov=True) if optimizer == "sgd" else gpubp.Adam(net, lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a fault stops fit with a warning: compared below
        history = net.fit(X, y, loss, opt, epochs=3, batch_size=16, **fit_kw)
    state = {"params": backend_obj.to_numpy(net.params), "steps": net.steps,
             **{"opt." + k: v for k, v in opt.state_arrays().items()}}
    return history, state


@pytest.mark.parametrize("case", ["bce-sgd", "softmax_ce-adam", "mse-sgd-fault"])
def test_fit_with_cuda_graphs_equals_eager_and_reads_as_numpy(backend, case, rng):
    """fit on the emulated backend with graphs (each batch size's step captured on its second call: the full
    batch in epoch 0, the last, short batch in epoch 1) gives the History and the parameters of the eager run
    bit for bit, and reads the device as often as the numpy backend does (once per epoch, plus validation).
    The fault case: rows 40-47 overflow float32 (identity hidden layer: nothing saturates), so batch 2 of epoch 0
    (a replayed graph) faults; fit stops there with the parameters of batch 1, in every run."""
    loss, optimizer = case.split("-")[:2]
    X = rng.standard_normal((50, 5))
    y = (rng.random((50, 3)) > 0.5).astype(float) if loss == "bce" else \
        rng.integers(0, 3, 50) if loss == "softmax_ce" else rng.standard_normal((50, 3))
    fit_kw = dict(validation_data=(X[:9], y[:9]))
    if case.endswith("fault"):
        X[40:48] = 1e30
        fit_kw = dict(shuffle=False, hidden="identity")
    eager_be, graph_be = cb.CupyBackend(), cb.CupyBackend()
    eager_be.use_graphs, graph_be.use_graphs = False, True
    eager_history, eager_state = _fit(eager_be, loss, optimizer, X, y, **fit_kw)
    graph_history, graph_state = _fit(graph_be, loss, optimizer, X, y, **fit_kw)
    numpy_be = NumpyBackend()
    numpy_history, numpy_state = _fit(numpy_be, loss, optimizer, X, y, **fit_kw)
    assert dict(graph_history) == dict(eager_history) and graph_history.stop_reason == eager_history.stop_reason
    for key in eager_state:
        np.testing.assert_array_equal(graph_state[key], eager_state[key], err_msg=key)
    assert not graph_be.graph_errors and isinstance(graph_be._steps[("fit", 16, None, 0, losses.NAMES[loss],
                                                                    optimizer.upper() if optimizer == "sgd" else "Adam")], tuple)
    # the same run as the numpy reference, within float32 rounding, and the same device reads
    assert numpy_history.keys() == graph_history.keys() and numpy_history.stop_reason == graph_history.stop_reason
    for key in numpy_history:
        np.testing.assert_allclose(graph_history[key], numpy_history[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(graph_state["params"], numpy_state["params"], rtol=1e-4, atol=1e-5)
    assert graph_state["steps"] == numpy_state["steps"]
    assert graph_be.counters["d2h"] == eager_be.counters["d2h"] == numpy_be.counters["d2h"]
    assert graph_be.counters["sync"] == graph_be.counters["d2h"]
    if case.endswith("fault"):
        assert "epoch 1, batch 3 of " in graph_history.stop_reason and graph_state["steps"] == 2


@pytest.mark.parametrize("backend", ["large-tile"], indirect=True)     # one tiling is enough here
def test_a_per_step_schedule_replays_one_graph_with_each_new_rate(backend, rng):
    """The learning rate lives in the optimizer's `hyper` array on the device (gpubp/schedules.py): a schedule
    that changes it before every step still replays the one graph captured for the full batch (no recapture),
    and gives the eager run's parameters bit for bit (a graph that had kept the captured rate would not)."""
    import gpubp
    X, y = rng.standard_normal((48, 5)), rng.integers(0, 3, 48)
    key = ("fit", 16, None, 0, losses.SOFTMAX_CE, "SGD")   # (rows, global rows: single process, buffers, ...)
    params, graphs = [], []

    class GraphSeen(gpubp.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            graphs.append(self.model.backend._steps[key][0])

    for use_graphs in (False, True):
        be = cb.CupyBackend()
        be.use_graphs = use_graphs
        net = gpubp.Sequential(gpubp.Dense(5, 8, "tanh"), gpubp.Dense(8, 3, "identity"), backend=be,
                               dtype="float32", seed=1)
        opt = gpubp.SGD(net, lr=gpubp.schedules.Cosine(0.1, total=9, warmup=2, per="step"), momentum=0.9)
        net.fit(X, y, "softmax_ce", opt, epochs=3, batch_size=16, callbacks=[GraphSeen()] if use_graphs else None)
        params.append(be.to_numpy(net.params))
    assert not be.graph_errors and len(graphs) == 3 and graphs[0] is graphs[1] is graphs[2]
    np.testing.assert_array_equal(params[1], params[0])


@pytest.mark.parametrize("backend", ["large-tile"], indirect=True)     # one tiling is enough here
def test_steps_per_graph_replays_groups_of_steps_as_one_graph(backend, rng):
    """fit(steps_per_graph=4) with graphs: 4 full batches are one captured graph, replayed (the key of a group
    carries its length), and the run is the eager single-step run bit for bit: History and parameters."""
    X, y = rng.standard_normal((90, 5)), rng.integers(0, 3, 90)   # 5 full batches of 16 and one of 10 an epoch
    results = []
    for use_graphs, steps_per_graph in ((False, 1), (True, 4)):
        be = cb.CupyBackend()
        be.use_graphs = use_graphs
        history, state = _fit(be, "softmax_ce", "adam", X, y, validation_data=(X[:9], y[:9]),
                              steps_per_graph=steps_per_graph)
        results.append((dict(history), state))
    assert results[1][0] == results[0][0]
    for key in results[0][1]:
        np.testing.assert_array_equal(results[1][1][key], results[0][1][key], err_msg=key)
    group_key = ("fit", 16, None, 0, losses.SOFTMAX_CE, "Adam", 4)
    assert not be.graph_errors and isinstance(be._steps[group_key], tuple)
    assert len(be._steps[group_key][0].launches) == 4 * len(be._steps[group_key[:-1]][0].launches)


# ---- streamed chunks: upload_chunk's streams and events, checked from the order they were issued in ------------
def _happens_before(log):
    """From the emulator's stream_log in issue order: a function telling whether op a is ordered before op b on
    the device (same stream, or b's stream waited for an event recorded after a), and which ops the host knows
    done (an event it synchronised on). Ops are (stream, position in it)."""
    position, events, waits, host_done, ops = {}, {}, {}, {}, []
    for entry in log:
        kind, stream = entry[0], entry[1]
        if kind in ("launch", "copy"):
            position[stream] = position.get(stream, 0) + 1
            ops.append((entry, (stream, position[stream])))
        elif kind == "record":
            events[entry[2]] = (stream, position.get(stream, 0))
        elif kind == "wait":
            waits.setdefault(stream, []).append((position.get(stream, 0), events[entry[2]]))
        elif kind == "synchronize":
            done_stream, done_upto = events[stream]
            host_done[done_stream] = max(host_done.get(done_stream, 0), done_upto)
            ops.append((entry, None))
        else:                                   # a host write
            ops.append((entry, dict(host_done)))

    def before(a, b):
        (sa, ia), (sb, ib) = a, b
        return ia < ib if sa is sb else any(at < ib and s is sa and upto >= ia for at, (s, upto) in waits.get(sb, ()))
    return ops, before


@pytest.mark.parametrize("backend", ["large-tile"], indirect=True)
def test_streamed_chunks_are_copied_on_a_second_stream_in_a_safe_order(backend, rng, monkeypatch):
    """The emulator runs every op at once, so what this checks is upload_chunk's ordering logic, from the
    streams, events and copies it issues (a stand-in for a GPU's asynchrony; the gpu-marked streamed fit in
    test_sync_free.py runs it for real): each step's gathers are ordered after the copy of their chunk (the
    compute stream waits for the copy's event); each copy into a slot after every gather that read the slot
    before (the copy stream waits for release_chunk's event), yet not after the steps on the other slot's chunk
    (so copy and compute can overlap); the host writes a pinned buffer only once its last copy is done."""
    import gpubp
    from gpubp.network import DeviceData
    log = []
    monkeypatch.setattr(emulator_module, "stream_log", log)
    compute = cb.cp.cuda.get_current_stream()
    kernel_of = cb._kernel

    def logged_kernel(filename, name):
        kernel = kernel_of(filename, name)

        def launch(grid, block, args):
            log.append(("launch", compute, name, args))
            kernel(grid, block, args)
        return launch
    monkeypatch.setattr(cb, "_kernel", logged_kernel)
    host_gather = cb._host_gather
    monkeypatch.setattr(cb, "_host_gather", lambda out, src, rows: (log.append(("host write", None, out)),
                                                                   host_gather(out, src, rows)))
    made = []
    monkeypatch.setattr(DeviceData, "__init__", lambda self, *a, _init=DeviceData.__init__: (_init(self, *a),
                                                                                            made.append(self))[0])
    backend.use_graphs = False
    monkeypatch.setattr(backend, "free_memory", lambda: 1100)          # chunks of 8 rows: 2 batches of 4
    monkeypatch.setattr(backend, "is_device_array", lambda x: False)   # (numpy arrays are the emulator's device's)
    X, y = rng.standard_normal((37, 5)), rng.integers(0, 3, 37)
    net = gpubp.Sequential(gpubp.Dense(5, 8, "tanh"), gpubp.Dense(8, 3, "identity"), backend=backend, seed=1)
    net.fit(X, y, "softmax_ce", gpubp.SGD(net, lr=0.1), epochs=2, batch_size=4)
    buffers = made[0].buffers
    assert made[0].streamed and len(buffers) == 2

    def slot_of(array):
        return next(k for k, b in enumerate(buffers) if any(np.shares_memory(array, a) for a in (b.X, b.Y, b.order)))

    ops, before = _happens_before(log)
    copies = [(slot_of(e[2]), e[3], op) for e, op in ops if e[0] == "copy"]
    assert len(copies) == 3 * 2 * 5 and all(op[0] is not compute for _, _, op in copies)   # 5 chunks an epoch
    last_copy, reads_since_copy, checked, previous_slot = {}, {0: [], 1: []}, 0, None
    for entry, op in ops:
        if entry[0] == "copy":
            slot = slot_of(entry[2])
            assert all(before(read, op) for read in reads_since_copy[slot]), "a copy may overwrite unread data"
            if previous_slot != slot:   # (an epoch of an odd number of chunks starts the next in the same slot)
                assert not any(before(read, op) for read in reads_since_copy[1 - slot]), "copy waits for all steps"
            previous_slot = slot
            last_copy.setdefault(slot, []).append(op)
            reads_since_copy[slot] = [] if len(last_copy[slot]) % 3 == 0 else reads_since_copy[slot]
        elif entry[0] == "launch" and entry[2].startswith("gather_rows"):
            slot = slot_of(entry[3][0])
            assert all(before(copy, op) for copy in last_copy[slot][-3:]), "a step may read a chunk not yet copied"
            reads_since_copy[slot].append(op)
            checked += 1
        elif entry[0] == "host write":
            done = op
            for _, host, copy_op in copies:
                if copy_op in [c for cs in last_copy.values() for c in cs] and np.shares_memory(host, entry[2]):
                    assert done.get(copy_op[0], 0) >= copy_op[1], "the host overwrites a pinned buffer in flight"
    assert checked == 2 * 10 * 2   # X and Y gathered for each of the 10 batches of each epoch
