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
    return cb.cp.asarray(np.asarray(x, dtype=dtype))


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
        be.guard_gradients(self.loss, self.grads, self.guard)
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
