"""The cupy backend: what can be checked anywhere (the probe, the compile path, the launch math), then, marked
`gpu`, what needs a GPU: GEMMs at large and awkward sizes against float64 numpy, split-K weight gradients,
arrays at misaligned offsets of a flat buffer, bit-identical repeats, CUDA-graph replay against eager runs.

The op-by-op comparison at small sizes lives in test_backend_ops.py (every backend) and, run on the CPU,
in test_cupy_kernels_emulated.py.
"""
import numpy as np
import pytest

from gpubp import activations as acts
from gpubp import guard as G
from gpubp import losses
from gpubp.backends import availability, cuda_sources
from gpubp.backends import cupy_backend as cb


def tol(dtype, k=1):
    if np.dtype(dtype) == np.float32:
        return dict(rtol=2e-4, atol=2e-5 + 1e-6 * k)
    return dict(rtol=1e-10, atol=1e-12 + 1e-14 * k)


# ---- anywhere ------------------------------------------------------------------------------------------------
def test_available_gives_a_reason():
    ok, reason = cb.available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert availability()["cupy"] == (ok, reason)
    if cb.cp is not None and not cb.cp.cuda.is_available():
        assert not ok and "is_available" in reason


def test_available_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setattr(cb, "cp", None)
    ok, reason = cb._probe()
    assert not ok and "pip install gpubp[cuda13]" in reason


def test_runtime_compiles_exactly_the_ci_sources(monkeypatch):
    """cupy.RawModule gets cuda_sources.module_source(file): what test_kernels_compile.py compiles."""
    if cb.cp is None:
        pytest.skip("cupy is not installed")
    made = []

    class RecordingRawModule:
        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(cb.cp, "RawModule", RecordingRawModule)
    monkeypatch.setattr(cb, "_modules", {})
    for filename in cuda_sources.KERNEL_FILES:
        module = cb._module(filename, 0)
        assert cb._module(filename, 0) is module   # built once per (file, device)
        source, options, names = cuda_sources.module_source(filename)
        assert made[-1] == dict(code=source, options=options, name_expressions=names)
    assert len(made) == len(cuda_sources.KERNEL_FILES)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_launched_name_is_compiled(dtype):
    names = {n for f in cuda_sources.KERNEL_FILES for n in cuda_sources.name_expressions(f)}
    for kernel in ("dense_forward_kernel", "input_grad_kernel", "weight_grad_kernel"):
        for tile in cuda_sources.GEMM_TILES:
            assert cuda_sources.kernel_name(kernel, dtype, tile) in names


@pytest.mark.parametrize("sm_count", [1, 16, 132])
def test_launch_math(sm_count):
    for M, N, K in [(1, 1, 1), (7, 5, 33), (64, 64, 65536), (1024, 784, 1024), (10, 1024, 1024), (3, 5, 1031),
                    (4096, 4096, 4096), (1, 1, 10**6)]:
        tile = cb.gemm_tile(M, N, sm_count)
        assert tile in cuda_sources.GEMM_TILES
        gx, gy, gz = cb.gemm_grid(tile, M, N)
        assert (gx - 1) * tile[0] < M <= gx * tile[0] and (gy - 1) * tile[1] < N <= gy * tile[1] and gz == 1
        slices, rows = cb.split_k(M, N, K, tile, sm_count)
        assert 1 <= slices <= cb._MAX_SLICES and (slices - 1) * rows < K <= slices * rows
        if slices > 1:
            assert rows % tile[2] == 0 and rows >= cb._MIN_SLICE_ROWS
    assert cb.elementwise_grid(1, sm_count) == (1,)
    assert cb.elementwise_grid(10**9, sm_count) == (32 * sm_count,)
    for n, F, itemsize in [(1, 1, 4), (7, 3, 8), (64, 4, 4), (1024, 784, 4), (33, 1031, 8), (10**6, 2, 4)]:
        group_log2, (blocks,) = cb.gather_launch(n, F, itemsize, sm_count)
        group, vectors = 1 << group_log2, -(-F // (16 // itemsize))
        assert group <= cb._THREADS and (group >= vectors or group == cb._THREADS) and (group < 2 * vectors or group == 1)
        assert 1 <= blocks <= 32 * sm_count and (blocks * (cb._THREADS // group) >= n or blocks == 32 * sm_count)
    for loss, N, C in [(losses.BCE, 1, 1), (losses.BCE, 65536, 10), (losses.SOFTMAX_CE, 7, 3),
                       (losses.SOFTMAX_CE, 10**6, 10)]:
        (blocks,) = cb.count_correct_grid(loss, N, C, sm_count)
        assert 1 <= blocks <= 32 * sm_count


# ---- on a GPU --------------------------------------------------------------------------------------------------
def require_cupy():
    """conftest skips `gpu` tests where no GPU backend runs; these need cupy's in particular."""
    ok, reason = cb.available()
    if not ok:
        pytest.skip(f"cupy: {reason}")


@pytest.fixture
def be():
    require_cupy()
    return cb.CupyBackend()


def put(x, dtype):
    return cb.cp.asarray(np.array(x, dtype=dtype))   # a copy also where cp is numpy (the emulator): ops work in place


def poisoned(shape, dtype):
    return cb.cp.full(shape, np.nan, dtype=dtype)


def rounded(rng, dtype, *shapes):
    return [rng.standard_normal(s).astype(dtype).astype(np.float64) for s in shapes]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4096, 1024, 1024), (1000, 777, 333), (65536, 64, 64), (3, 2049, 1001)], ids=str)
def test_large_gemms(be, dtype, shape, rng):
    """Forward, input_grad and weight_grad (split K where the batch is long) against float64 numpy."""
    N, n_in, n_out = shape
    A_prev, W, b, delta = rounded(rng, dtype, (N, n_in), (n_out, n_in), n_out, (N, n_out))
    Z, A = poisoned((N, n_out), dtype), poisoned((N, n_out), dtype)
    be.dense_forward(put(A_prev, dtype), put(W, dtype), put(b, dtype), acts.RELU, 0.01, Z, A)
    Z_ref = A_prev @ W.T + b
    np.testing.assert_allclose(be.to_numpy(Z), Z_ref, **tol(dtype, n_in))
    np.testing.assert_allclose(be.to_numpy(A), np.maximum(Z_ref, 0), **tol(dtype, n_in))
    dA_prev = poisoned((N, n_in), dtype)
    be.input_grad(put(delta, dtype), put(W, dtype), dA_prev)
    np.testing.assert_allclose(be.to_numpy(dA_prev), delta @ W, **tol(dtype, n_out))
    dW, db = poisoned((n_out, n_in), dtype), poisoned(n_out, dtype)
    be.weight_grad(put(delta, dtype), put(A_prev, dtype), dW, db)
    np.testing.assert_allclose(be.to_numpy(dW), delta.T @ A_prev, **tol(dtype, N))
    np.testing.assert_allclose(be.to_numpy(db), delta.sum(axis=0), **tol(dtype, N))


@pytest.mark.gpu
@pytest.mark.parametrize("sm_count", [1, 10**6], ids=["large-tile", "small-tile-split-k"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 33, 5), (33, 7, 129), (257, 64, 68), (1031, 130, 67)], ids=str)
def test_every_tile_and_split_at_awkward_sizes(be, monkeypatch, sm_count, dtype, shape, rng):
    """The launch code picks tiles and splits from the SM count: pretend 1 SM (the 128x128 tile, no split)
    and a million (the 64x64 tile, K split wherever the batch allows), so both run at every size."""
    monkeypatch.setattr(cb, "_sm_count", lambda: sm_count)
    N, n_in, n_out = shape
    A_prev, W, b, delta = rounded(rng, dtype, (N, n_in), (n_out, n_in), n_out, (N, n_out))
    Z, A = poisoned((N, n_out), dtype), poisoned((N, n_out), dtype)
    be.dense_forward(put(A_prev, dtype), put(W, dtype), put(b, dtype), acts.SIGMOID, 0.0, Z, A)
    Z_ref = A_prev @ W.T + b
    np.testing.assert_allclose(be.to_numpy(Z), Z_ref, **tol(dtype, n_in))
    np.testing.assert_allclose(be.to_numpy(A), acts.forward(acts.SIGMOID, Z_ref), **tol(dtype, n_in))
    dA_prev = poisoned((N, n_in), dtype)
    be.input_grad(put(delta, dtype), put(W, dtype), dA_prev)
    np.testing.assert_allclose(be.to_numpy(dA_prev), delta @ W, **tol(dtype, n_out))
    dW, db = poisoned((n_out, n_in), dtype), poisoned(n_out, dtype)
    be.weight_grad(put(delta, dtype), put(A_prev, dtype), dW, db)
    be.weight_grad(put(delta, dtype), put(A_prev, dtype), dW, db, accumulate=True)
    np.testing.assert_allclose(be.to_numpy(dW), 2 * (delta.T @ A_prev), **tol(dtype, 2 * N))
    np.testing.assert_allclose(be.to_numpy(db), 2 * delta.sum(axis=0), **tol(dtype, 2 * N))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_views_at_odd_offsets_of_a_flat_buffer(be, dtype, rng):
    """Per-layer views of one flat parameter buffer start anywhere: 16-byte loads must fall back."""
    N, n_in, n_out = 257, 64, 68
    A_prev, W, b, delta = rounded(rng, dtype, (N, n_in), (n_out, n_in), n_out, (N, n_out))
    flat = poisoned(1 + W.size + b.size, dtype)
    W_view, b_view = be.view(flat, 1, W.shape), be.view(flat, 1 + W.size, b.shape)
    be.copy_into(W_view, W)
    be.copy_into(b_view, b)
    Z = poisoned((N, n_out), dtype)
    be.dense_forward(put(A_prev, dtype), W_view, b_view, acts.IDENTITY, 0.0, Z, Z)
    np.testing.assert_allclose(be.to_numpy(Z), A_prev @ W.T + b, **tol(dtype, n_in))
    grads = poisoned(1 + W.size + b.size, dtype)
    dW, db = be.view(grads, 1, W.shape), be.view(grads, 1 + W.size, b.shape)
    be.weight_grad(put(delta, dtype), put(A_prev, dtype), dW, db)
    np.testing.assert_allclose(be.to_numpy(dW), delta.T @ A_prev, **tol(dtype, N))
    np.testing.assert_allclose(be.to_numpy(db), delta.sum(axis=0), **tol(dtype, N))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_input_grad_masked(be, dtype, rng):
    N, n_in, n_out = 1031, 130, 67
    delta, W, Z_prev = rounded(rng, dtype, (N, n_out), (n_out, n_in), (N, n_in))
    for act in acts.NAMES.values():
        A_prev = acts.forward(act, Z_prev, 0.1)
        out = poisoned((N, n_in), dtype)
        be.input_grad_masked(put(delta, dtype), put(W, dtype), put(Z_prev, dtype), put(A_prev, dtype), act, 0.1, out)
        expected = acts.derivative_mask(act, delta @ W, Z_prev, A_prev, 0.1)
        np.testing.assert_allclose(be.to_numpy(out), expected, **tol(dtype, n_out))


@pytest.mark.gpu
def test_repeats_are_bit_identical(rng):
    """No kernel uses atomics: forward, split-K weight_grad and the loss repeat bit for bit."""
    require_cupy()
    be = cb.CupyBackend(deterministic=True)
    N, n_in, n_out = 65536, 64, 10
    X, W, delta, y = (put(rng.standard_normal(s), "float32") for s in ((N, n_in), (n_out, n_in), (N, n_out),
                                                                         (N, n_out)))
    results = []
    for _ in range(3):
        Z, A = poisoned((N, n_out), "float32"), poisoned((N, n_out), "float32")
        dW, db = poisoned((n_out, n_in), "float32"), poisoned(n_out, "float32")
        loss_out, d_out = poisoned(1, "float32"), poisoned((N, n_out), "float32")
        be.dense_forward(X, W, None, acts.TANH, 0.0, Z, A)
        be.weight_grad(delta, X, dW, db)
        be.loss_grad(losses.MSE, acts.SIGMOID, 0.0, Z, y, A, d_out, loss_out)
        results.append([be.to_numpy(a) for a in (Z, A, dW, db, loss_out, d_out)])
    for later in results[1:]:
        for a, b in zip(results[0], later):
            assert np.array_equal(a, b)


@pytest.mark.gpu
def test_loss_grad_many_rows(be, rng):
    """More rows than the loss grid has warps (1024 blocks x 8): the grid-stride path."""
    N, C = 20000, 10
    Z = rng.standard_normal((N, C))
    y = np.eye(C)[rng.integers(0, C, N)]
    A_ref, delta_ref = np.empty((N, C)), np.empty((N, C))
    L_ref = losses.loss_grad(losses.SOFTMAX_CE, acts.IDENTITY, 0.0, Z, y, A_ref, delta_ref)
    A, delta, loss_out = poisoned((N, C), "float64"), poisoned((N, C), "float64"), poisoned(1, "float64")
    be.loss_grad(losses.SOFTMAX_CE, acts.IDENTITY, 0.0, put(Z, "float64"), put(y, "float64"), A, delta, loss_out)
    np.testing.assert_allclose(be.to_numpy(loss_out)[0], L_ref, rtol=1e-12)
    np.testing.assert_allclose(be.to_numpy(delta), delta_ref, **tol("float64"))


@pytest.mark.gpu
def test_ops_launch_on_the_current_stream(be, rng):
    N, n_in, n_out = 513, 65, 33
    A_prev, W = rng.standard_normal((N, n_in)), rng.standard_normal((n_out, n_in))
    stream = cb.cp.cuda.Stream(non_blocking=True)
    with stream:
        Z, A = poisoned((N, n_out), "float64"), poisoned((N, n_out), "float64")
        be.dense_forward(put(A_prev, "float64"), put(W, "float64"), None, acts.IDENTITY, 0.0, Z, A)
        stream.synchronize()
        np.testing.assert_allclose(cb.cp.asnumpy(A), A_prev @ W.T, **tol("float64", n_in))


@pytest.mark.gpu
def test_asarray_keeps_device_arrays():
    require_cupy()
    be = cb.CupyBackend()
    x = cb.cp.arange(6, dtype=cb.cp.float32)
    assert be.asarray(x, np.float32).data.ptr == x.data.ptr


class TwoLayerStep:
    """A fixed train step on fixed buffers: 30-64-3 tanh/softmax, the guard's checks, SGD with momentum and
    Nesterov (settings in device memory), the step recorded in the guard: everything run_step needs to
    capture it (no host copies, no allocations after the first call)."""

    def __init__(self, be, rng, dtype="float32", N=256):
        self.be = be
        sizes = [(64, 30), (64,), (3, 64), (3,)]
        total = sum(int(np.prod(s)) for s in sizes)
        self.params, self.grads = be.zeros((total,), dtype), be.zeros((total,), dtype)
        self.momentum = be.zeros((total,), dtype)
        be.copy_into(self.params, 0.3 * rng.standard_normal(total))
        views, offset = [], 0
        for s in sizes:
            views.append((be.view(self.params, offset, s), be.view(self.grads, offset, s)))
            offset += int(np.prod(s))
        (self.W1, self.dW1), (self.b1, self.db1), (self.W2, self.dW2), (self.b2, self.db2) = views
        self.X = be.asarray(rng.standard_normal((N, 30)), dtype)
        self.y = be.zeros((N, 3), dtype)
        be.one_hot(rng.integers(0, 3, N), 3, self.y)
        self.Z1, self.A1, self.delta1 = (be.empty((N, 64), dtype) for _ in range(3))
        self.Z2, self.A2, self.delta2 = (be.empty((N, 3), dtype) for _ in range(3))
        self.loss = be.empty((1,), dtype)
        self.step = be.zeros((1,), np.int64)
        self.hyper = be.asarray(np.array([0.05, 0.9, 0.0, 1e-4, 1.0]), np.float64)   # lr, μ, dampening, wd, nesterov
        self.guard = be.zeros((G.SIZE,), np.float64)
        be.copy_into(self.guard, np.concatenate([G.fresh(0), np.zeros(G.RING_SIZE)]))

    def __call__(self):
        be = self.be
        be.dense_forward(self.X, self.W1, self.b1, acts.TANH, 0.0, self.Z1, self.A1)
        be.dense_forward(self.A1, self.W2, self.b2, acts.IDENTITY, 0.0, self.Z2, self.Z2)
        be.loss_grad(losses.SOFTMAX_CE, acts.IDENTITY, 0.0, self.Z2, self.y, self.A2, self.delta2, self.loss)
        be.weight_grad(self.delta2, self.A1, self.dW2, self.db2)
        be.input_grad_masked(self.delta2, self.W2, self.Z1, self.A1, acts.TANH, 0.0, self.delta1)
        be.weight_grad(self.delta1, self.X, self.dW1, self.db1)
        be.guard_loss(self.loss, self.guard)
        be.sgd_update(self.params, self.grads, self.momentum, self.step, self.hyper, self.guard)
        be.record_step(losses.SOFTMAX_CE, self.loss, self.A2, self.y, self.guard)


@pytest.mark.gpu
def test_graph_replay_equals_eager(rng):
    require_cupy()
    eager_be, graph_be = cb.CupyBackend(), cb.CupyBackend()
    eager_be.use_graphs, graph_be.use_graphs = False, True
    seed = int(rng.integers(2**31))
    eager = TwoLayerStep(eager_be, np.random.default_rng(seed))
    graphed = TwoLayerStep(graph_be, np.random.default_rng(seed))
    pool = cb.cp.get_default_memory_pool()
    for i in range(6):
        eager_be.run_step("step", eager)
        graph_be.run_step("step", graphed)
        if i == 3:
            used = pool.used_bytes()
        assert np.array_equal(eager_be.to_numpy(eager.loss), graph_be.to_numpy(graphed.loss)), i
    assert isinstance(graph_be._steps["step"], tuple) and not graph_be.graph_errors   # it was captured
    assert pool.used_bytes() == used   # replays allocate nothing
    assert np.array_equal(eager_be.to_numpy(eager.params), graph_be.to_numpy(graphed.params))
    assert np.array_equal(eager_be.to_numpy(eager.guard), graph_be.to_numpy(graphed.guard))
    assert int(graph_be.to_numpy(graphed.step)[0]) == 6
    assert graph_be.to_numpy(graphed.guard)[G.STEP] == 6 and graph_be.to_numpy(graphed.guard)[G.FAULT] == 0


@pytest.mark.gpu
def test_uncapturable_steps_run_eagerly(be, rng):
    """A host copy inside the step cannot be replayed: that key falls back to eager, with the reason kept."""
    step = TwoLayerStep(be, rng)
    fresh_X = [rng.standard_normal((256, 30)) for _ in range(4)]
    losses_seen = []

    def step_with_host_copy(i):
        be.copy_into(step.X, fresh_X[i])
        step()

    for i in range(4):
        be.run_step("host-copy", lambda: step_with_host_copy(i))
        losses_seen.append(float(be.to_numpy(step.loss)[0]))
    assert be._steps["host-copy"] == "eager" and "host-to-device" in be.graph_errors["host-copy"]
    assert int(be.to_numpy(step.step)[0]) == 4   # every call ran once, the failed capture included
    assert np.isfinite(losses_seen).all()


# ---- the training loop's device-side ops at GPU sizes (the op harness and the emulator cover awkward ones) ------
def _fresh_guard(steps=0):
    guard = np.full(G.SIZE, np.nan)
    guard[:G.RING] = G.fresh(steps)
    return guard


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_guard_checks_at_gpu_sizes(be, dtype, rng):
    """The guarded update's checks over 3M elements, a non-finite gradient and an overflowing update: the
    smallest bad index out of thousands of blocks (bad values in one warp, in one thread's walk, at the end);
    nothing written."""
    from gpubp.backends.numpy_backend import NumpyBackend
    size = 3_000_017
    grads = rng.standard_normal(size).astype(dtype)
    bad = [size - 1, 2_000_001, 1_500_001, 1_500_000]
    broken = grads.copy()
    broken[bad] = np.inf
    theta = rng.standard_normal(size).astype(dtype)
    params, buf = put(theta, dtype), put(np.zeros(size), dtype)
    guard, step = put(_fresh_guard(steps=11), np.float64), put([3], np.int64)
    be.sgd_update(params, put(broken, dtype), buf, step, put([0.1, 0.9, 0.0, 1e-4, 1.0], np.float64), guard)
    got = be.to_numpy(guard)
    assert (got[G.FAULT], got[G.FAULT_STEP], got[G.FAULT_INDEX], got[G.STEP]) == (G.GRADIENT, 11, 1_500_000, 11)
    assert np.array_equal(be.to_numpy(params), theta) and int(be.to_numpy(step)[0]) == 3
    g = grads.copy()
    g[bad] = np.finfo(dtype).max / 4
    params, buf = put(theta, dtype), put(np.zeros(size), dtype)
    guard, step = put(_fresh_guard(steps=11), np.float64), put([3], np.int64)
    be.sgd_update(params, put(g, dtype), buf, step, put([1e3, 0.0, 0.0, 0.0, 0.0], np.float64), guard)
    got = be.to_numpy(guard)
    assert (got[G.FAULT], got[G.FAULT_INDEX], got[G.STEP]) == (G.PARAMS, 1_500_000, 11)
    assert np.array_equal(be.to_numpy(params), theta) and int(be.to_numpy(step)[0]) == 3
    # a good update after a reset: as the numpy backend, and counted
    guard = put(_fresh_guard(steps=11), np.float64)
    hyper = [0.1, 0.9, 0.0, 1e-4, 1.0]
    be.sgd_update(params, put(grads, dtype), buf, step, put(hyper, np.float64), guard)
    ref_params, ref_buf, ref_step, ref_guard = theta.copy(), np.zeros(size, dtype), np.array([3]), _fresh_guard(11)
    NumpyBackend().sgd_update(ref_params, grads, ref_buf, ref_step, np.array(hyper), ref_guard)
    np.testing.assert_allclose(be.to_numpy(params), ref_params, **tol(dtype))
    assert np.array_equal(be.to_numpy(guard), ref_guard, equal_nan=True) and int(be.to_numpy(step)[0]) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", [losses.BCE, losses.SOFTMAX_CE], ids=losses.name_of)
def test_gather_and_record_at_gpu_sizes(be, dtype, loss, rng):
    """A 784-wide batch of 4096 rows gathered from 60000; record_step over 65536 rows, bit for bit as numpy."""
    from gpubp.backends.numpy_backend import NumpyBackend
    M, F, n, start = 60000, 784, 4096, 50000
    src = rng.standard_normal((M, F)).astype(dtype)
    order = rng.permutation(M)
    order_dev = put(np.append(order, start), np.int64)
    out = poisoned((n, F), dtype)
    be.gather_rows(put(src, dtype), order_dev, order_dev[M:], out)
    assert np.array_equal(be.to_numpy(out), src[order[start:start + n]])
    N, C = 65536, 10
    A = rng.random((N, C)).astype(dtype)
    A[::3, 9] = A[::3, 0]                                   # ties: the first index wins
    Y = np.eye(C, dtype=dtype)[rng.integers(0, C, N)] if loss == losses.SOFTMAX_CE else \
        (rng.random((N, C)) > 0.5).astype(dtype)
    guard, ref_guard = put(_fresh_guard(steps=5), np.float64), _fresh_guard(steps=5)
    be.record_step(loss, put([0.25], dtype), put(A, dtype), put(Y, dtype), guard)
    NumpyBackend().record_step(loss, np.array([0.25], dtype), A, Y, ref_guard)
    assert np.array_equal(be.to_numpy(guard), ref_guard, equal_nan=True)


@pytest.mark.gpu
def test_fit_moves_data_once_per_epoch_not_per_step(rng):
    """Per epoch fit uploads the epoch's order and resets the guard's head (2 host-to-device copies) and reads
    the guard once (1 device-to-host copy, 1 wait): nothing per step, with graphs on."""
    require_cupy()
    import gpubp

    def counters_after(epochs):
        net = gpubp.Sequential(gpubp.Dense(20, 32, "relu"), gpubp.Dense(32, 3), backend="cupy", seed=0)
        opt = gpubp.Adam(net, lr=1e-3)
        X, y = rng.standard_normal((1000, 20)), rng.integers(0, 3, 1000)
        net.fit(X, y, "softmax_ce", opt, epochs=epochs, batch_size=64)
        assert not net.backend.graph_errors
        return dict(net.backend.counters)

    one, three = counters_after(1), counters_after(3)
    assert (three["h2d"] - one["h2d"], three["d2h"] - one["d2h"], three["sync"] - one["sync"]) == (4, 2, 2)


# ---- mixed precision (issue 12): kernels/dense_tc.cu and storage.cuh's cvt paths, on the GPU --------------------
def _stored_on_device(x, precision):
    """x in the cupy backend's storage for precision (uint16 bf16 bits, float16, float32), on the device."""
    from gpubp import precision as prec
    values = prec.to_storage(x, precision)
    return cb.cp.asarray(values.view(np.float16) if precision == "fp16" else values)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(4096, 1024, 1024), (1000, 777, 333), (65536, 64, 64), (3, 2049, 1001)], ids=str)
def test_tensor_core_ops_at_gpu_sizes(be, precision, shape, rng):
    """Forward (16-bit hidden A), the masked input_grad (tanh, from the stored A_prev) and weight_grad (split K
    for the long batch) against gpubp.precision's reference, with test_cupy_tc_emulated.py's bounds."""
    import test_cupy_tc_emulated as T
    from gpubp import precision as prec
    N, n_in, n_out = shape
    X = rng.standard_normal((N, n_in)).astype(np.float32)
    W = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    fmt = T.stored_format(precision)
    sdtype = be.storage_dtype(precision)
    Z, A = poisoned((N, n_out), np.float32), cb.cp.full((N, n_out), 0x7FFF, np.uint16).view(sdtype) \
        if sdtype != np.float32 else poisoned((N, n_out), np.float32)
    be.dense_forward(put(X, np.float32), put(W, np.float32), put(b, np.float32), acts.TANH, 0.0, Z, A, precision)
    Z_host = be.to_numpy(Z)
    Z_ref = prec.reference_gemm(X, W, precision).astype(np.float64) + b
    T.assert_within(Z_host, Z_ref, T.tc_tol(X, W, precision) + 2 * T.U32 * np.abs(Z_ref), "Z")
    A_ref = np.tanh(Z_host)
    A_host = T.decode(be.to_numpy(A), fmt)
    T.assert_within(A_host, prec.round_operand(A_ref, fmt), T.format_ulp(A_ref, fmt) + 4 * T.U32 * np.abs(A_ref), "A")
    delta = (rng.standard_normal((N, n_in)) * 1e-2).astype(np.float32)   # the δ of a layer (in -> n_in) after
    W2 = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_out)).astype(np.float32)   # ... this one: (n_in, n_out)
    d_dev = _stored_on_device(delta, precision)
    out = cb.cp.empty((N, n_out), sdtype)
    be.input_grad_masked(d_dev, put(W2, np.float32), Z, A, acts.TANH, 0.0, out, precision)
    d_host = T.decode(be.to_numpy(d_dev), fmt)
    product = prec.reference_gemm(d_host, W2.T, precision).astype(np.float64)
    mask = 1 - A_host.astype(np.float64) ** 2
    expected = (product * mask).astype(np.float32)
    T.assert_within(T.decode(be.to_numpy(out), fmt), prec.round_operand(expected, fmt),
                    mask * T.tc_tol(d_host, W2.T, precision) + T.format_ulp(expected, fmt) + 2 * T.U32 * np.abs(expected),
                    "δ_prev")
    dW, db = poisoned((n_in, n_out), np.float32), poisoned(n_in, np.float32)
    be.weight_grad(d_dev, A, dW, db, precision=precision)
    dW_ref = prec.reference_gemm(d_host.T, A_host.T, precision).astype(np.float64)
    T.assert_within(be.to_numpy(dW), dW_ref, T.tc_tol(d_host.T, A_host.T, precision) + T.U32 * np.abs(dW_ref), "dW")
    T.assert_within(be.to_numpy(db), d_host.astype(np.float64).sum(axis=0),
                    (N + 1) * T.U32 * np.abs(d_host).astype(np.float64).sum(axis=0), "db")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_storage_conversions_on_gpu(be, precision, rng):
    """The cvt instructions storage.cuh uses on a GPU (the emulation runs its integer versions): float32 ->
    bf16/fp16 bit for bit as numpy rounds, and every 16-bit pattern decoded as numpy decodes it."""
    import test_cupy_tc_emulated as T
    from test_tc_gemm import probe_source
    from gpubp import precision as prec
    x = T.special_floats(rng)
    got = be.to_numpy(be._operand(put(x, np.float32), precision, "X"))[:x.size]
    with np.errstate(over="ignore"):
        expected = prec.to_storage(x, precision)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[finite], expected[finite])
    assert np.isnan(T.decode(got[~finite], precision)).all()
    name = f"storage_decode_probe_kernel<{cuda_sources.STORE_FORMATS[precision]}>"
    module = cb.cp.RawModule(code=probe_source(), options=cuda_sources.OPTIONS, name_expressions=[name])
    bits = np.arange(2**16, dtype=np.uint16)
    out = poisoned(bits.shape, np.float32)
    module.get_function(name)((256,), (256,), (cb.cp.asarray(bits), out, np.int64(bits.size)))
    decoded, want = be.to_numpy(out), T.decode(bits, precision)
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(want))
    np.testing.assert_array_equal(decoded[~np.isnan(want)], want[~np.isnan(want)])


@pytest.mark.gpu
def test_streamed_fit_equals_the_resident_fit_bit_for_bit(be, rng, monkeypatch):
    """Data streamed in chunks (pinned host buffers, the copy stream, events: upload_chunk) trains exactly as data
    kept on the device: the same kernels on the same rows, so any race between a copy and the steps (a step
    reading a chunk not yet copied, a copy over rows not yet read) shows as a difference. Chunks of 512 rows
    (8 batches of 64) of 1,000-wide rows, so each copy takes long enough to overlap the steps."""
    import gpubp
    X = rng.standard_normal((6000, 1000)).astype(np.float32)
    y = rng.integers(0, 10, 6000)
    results = []
    for free in (None, 2 * 2 * 512 * 1010 * 4):    # resident; then a budget of two chunks of 512 rows
        backend = cb.CupyBackend()
        monkeypatch.setattr(backend, "free_memory", lambda free=free: free)
        net = gpubp.Sequential(gpubp.Dense(1000, 256, "relu"), gpubp.Dense(256, 10, "identity"), backend=backend,
                               seed=3)
        history = net.fit(X, y, "softmax_ce", gpubp.SGD(net, lr=0.05, momentum=0.9), epochs=3, batch_size=64)
        results.append((dict(history), backend.to_numpy(net.params), backend.counters["d2h"]))
    assert results[1][0] == results[0][0] and results[1][2] == results[0][2]
    np.testing.assert_array_equal(results[1][1], results[0][1])
