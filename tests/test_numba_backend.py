"""What is particular to the numba backend: how it reports itself, that "auto" never picks the simulator, that
CuPy arrays are used in place (on a GPU), that its kernels launch at any size, and that its training loop does
not wait for the host (issue 11: counted host<->device traffic, the loop kernels' scratch). The kernels themselves
are checked against the numpy reference by test_backend_ops.py, test_network_backends.py and test_seed_example.py,
which run the numba backend under the simulator in CI (tests/run.sh) and on a GPU with the gpu marker. The
launch arithmetic (gemm_grid, grid_stride_blocks) is plain integers, checked here at batch sizes no test could
launch; tests/test_numba_compile.py compiles every kernel for real GPUs."""
import numpy as np
import pytest

import gpubp
from gpubp import guard as G
from gpubp import losses
from conftest import SIMULATOR

numba_backend = pytest.importorskip("gpubp.backends.numba_backend")
from gpubp.backends import numba_kernels  # noqa: E402

pytestmark = pytest.mark.numba

needs_numba = pytest.mark.skipif(not numba_backend.available()[0], reason=numba_backend.available()[1])


def test_availability_says_why():
    ok, reason = numba_backend.available()
    assert reason
    if SIMULATOR:
        assert ok and "simulator" in reason and not numba_backend.NumbaBackend.real_gpu


@needs_numba
def test_auto_never_picks_the_simulator():
    net = gpubp.Sequential(gpubp.Dense(2, 1), backend="auto")
    if SIMULATOR:
        assert net.backend.name != "numba"


@needs_numba
def test_one_hot_from_device_labels_and_step_counter(rng):
    be = gpubp.get_backend("numba")
    out = be.empty((5, 3), np.float32)
    be.one_hot(be.asarray(np.array([2, 0, 1, 1, 0]), np.int64), 3, out)
    assert np.array_equal(be.to_numpy(out), np.eye(3)[[2, 0, 1, 1, 0]])
    params, grads = be.asarray(rng.standard_normal(9), np.float64), be.zeros((9,), np.float64)
    buf, step = be.zeros((9,), np.float64), be.zeros((1,), np.int64)
    hyper = be.asarray(np.array([0.1, 0.9, 0.0, 0.0, 0.0]), np.float64)      # lr, μ, dampening, wd, nesterov
    guard = be.asarray(np.concatenate([G.fresh(0), np.zeros(G.RING_SIZE)]), np.float64)
    for _ in range(3):
        be.sgd_update(params, grads, buf, step, hyper, guard)
    assert int(be.to_numpy(step)[0]) == 3 and be.to_numpy(guard)[G.STEP] == 3


@needs_numba
@pytest.mark.gpu
def test_cupy_arrays_are_used_in_place(rng):
    """__cuda_array_interface__: a CuPy batch trains the numba backend without a copy through the host.
    (The simulator's arrays have no such interface, so this runs on a GPU only.)"""
    cp = pytest.importorskip("cupy")
    if SIMULATOR:
        pytest.skip("the CUDA simulator's arrays have no __cuda_array_interface__")
    X, y = rng.standard_normal((64, 5)), rng.standard_normal((64, 2))
    a = gpubp.Sequential(gpubp.Dense(5, 4, "relu"), gpubp.Dense(4, 2), backend="numba", seed=1)
    b = gpubp.Sequential(gpubp.Dense(5, 4, "relu"), gpubp.Dense(4, 2), backend="numba", seed=1)
    loss_cupy = a.train_step(cp.asarray(X, cp.float32), cp.asarray(y, cp.float32), "mse", gpubp.SGD(a, lr=0.1))
    loss_host = b.train_step(X, y, "mse", gpubp.SGD(b, lr=0.1))
    assert loss_cupy == pytest.approx(loss_host, rel=1e-6)
    np.testing.assert_array_equal(a.get_params()[0]["W"], b.get_params()[0]["W"])


# ---- launch shapes ---------------------------------------------------------------------------------------------
def _assert_gemm_grid_covers(grid, tile, M, N):
    """Within CUDA's limits (x < 2³¹, y and z ≤ 65535), every row and column of C (M, N) in some block, and no
    block wholly outside it."""
    assert len(grid) <= 3 and all(isinstance(g, int) and g >= 1 for g in grid), grid
    assert grid[0] <= numba_backend.MAX_GRID_X, grid
    assert all(g <= numba_backend.MAX_GRID_YZ for g in grid[1:]), f"grid {grid}: y or z past 65535"
    assert (grid[0] - 1) * tile[0] < M <= grid[0] * tile[0], (grid, M)
    assert (grid[1] - 1) * tile[1] < N <= grid[1] * tile[1], (grid, N)


@pytest.mark.parametrize("tile", [numba_kernels.GPU_TILE[:2], numba_kernels.SIMULATOR_TILE[:2]],
                         ids=["gpu_tile", "simulator_tile"])
@pytest.mark.parametrize("N", [1, 17, 65535 * 32 + 1, 2 ** 21 + 3, 3_000_000, 2 ** 31 - 1])
def test_launch_grids_fit_cuda_limits_at_any_batch(N, tile):
    """predict on 3M rows is one launch per layer: the batch is on grid.x, so no grid dimension passes its limit
    (with the batch on grid.y, 65535 · 32 rows was the most a launch could hold)."""
    n_in, n_out = 784, 10
    for M, cols in ((N, n_out), (N, n_in), (n_out, n_in)):   # dense_forward, input_grad, weight_grad
        _assert_gemm_grid_covers(numba_backend.gemm_grid(tile, M, cols), tile, M, cols)
    for size in (N * n_out, N, n_out):   # activation_mask, loss rows and one_hot, bias_grad: 1-D grid-stride
        for threads, max_blocks in ((256, 4096), (32, 1)):
            blocks = numba_backend.grid_stride_blocks(size, threads, max_blocks)
            assert 1 <= blocks <= min(max_blocks, numba_backend.MAX_GRID_X)
            assert blocks == max_blocks or blocks * threads >= size   # fewer blocks: each thread strides on


@needs_numba
def test_gemm_launches_walk_the_batch_on_grid_x(rng, monkeypatch):
    """The kernels' index math matches gemm_grid: a batch of 3·BM + 1 rows is 4 blocks along x and one along y, and
    every row comes out right (a kernel still reading rows from blockIdx.y would leave rows past BM unwritten)."""
    grids = []
    real = numba_backend._gemm_grid
    monkeypatch.setattr(numba_backend, "_gemm_grid", lambda M, N: grids.append((M, N, real(M, N))) or real(M, N))
    be = gpubp.get_backend("numba")
    N, n_in, n_out = 3 * numba_kernels.BM + 1, 3, 2
    X, W, b = rng.standard_normal((N, n_in)), rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out)
    delta = rng.standard_normal((N, n_out))
    Z, A = be.empty((N, n_out), np.float64), be.empty((N, n_out), np.float64)
    be.dense_forward(be.asarray(X, np.float64), be.asarray(W, np.float64), be.asarray(b, np.float64), 0, 0.0, Z, A)
    dX, dW = be.empty((N, n_in), np.float64), be.empty((n_out, n_in), np.float64)
    be.input_grad(be.asarray(delta, np.float64), be.asarray(W, np.float64), dX)
    be.weight_grad(be.asarray(delta, np.float64), be.asarray(X, np.float64), dW, None)
    np.testing.assert_allclose(be.to_numpy(Z), X @ W.T + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(be.to_numpy(dX), delta @ W, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(be.to_numpy(dW), delta.T @ X, rtol=1e-12, atol=1e-12)
    assert grids == [(N, n_out, (4, 1)), (N, n_in, (4, 1)), (n_out, n_in, (1, 1))]


# ---- the sync-free training loop (issue 11) ------------------------------------------------------------------
@needs_numba
def test_train_steps_without_sync_neither_copy_back_nor_wait(rng):
    """train_step(sync=False) on host batches: each step uploads X and y (2 host-to-device copies) and nothing
    else crosses; reading the loss is one device-to-host copy, one wait."""
    from helpers import make_net
    net = make_net([3, 4, 2], backend="numba", dtype="float32", seed=2)
    opt = gpubp.Adam(net, lr=1e-2)
    X, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    net.train_step(X, y, "mse", opt)               # first step: compilation, workspace, scratch
    before = dict(net.backend.counters)
    lazies = [net.train_step(X, y, "mse", opt, sync=False) for _ in range(4)]
    moved = {k: net.backend.counters[k] - before[k] for k in before}
    assert moved == {"sync": 0, "d2h": 0, "h2d": 8}
    assert np.isfinite(float(lazies[-1]))
    moved = {k: net.backend.counters[k] - before[k] for k in before}
    assert moved == {"sync": 1, "d2h": 1, "h2d": 8}
    assert net.steps == 5 and opt.steps_taken == 5


@needs_numba
def test_fit_crosses_to_the_host_a_fixed_number_of_times_per_epoch(rng):
    """fit with the data on the device: per epoch the order and the guard's head go up (2 copies) and the guard
    comes back once (1 copy, 1 wait), however many batches the epoch has."""
    from helpers import make_net
    net = make_net([3, 5, 3], loss="softmax_ce", backend="numba", dtype="float32", seed=4)
    opt = gpubp.SGD(net, lr=0.1, momentum=0.9)
    X, y = rng.standard_normal((40, 3)), rng.integers(0, 3, 40)
    seen = []
    net.fit(X, y, "softmax_ce", opt, epochs=3, batch_size=7,
            on_epoch_end=lambda epoch, logs: seen.append(dict(net.backend.counters)))
    per_epoch = [{k: b[k] - a[k] for k in a} for a, b in zip(seen, seen[1:])]
    assert per_epoch == [{"sync": 1, "d2h": 1, "h2d": 2}] * 2     # 6 batches an epoch, not 6 reads
    assert net.steps == 18


def _flags(be):
    from gpubp.backends import numba_loop_kernels as L
    flags = be.to_numpy(be._loop_flags())
    return {slot: int(flags[slot]) for slot in L.INDEX_SLOTS}, int(flags[L.TICKETS]), int(flags[L.CORRECT_COUNT])


@needs_numba
def test_every_loop_op_leaves_its_scratch_clean(rng):
    """The loop kernels' scratch (numba_loop_kernels.flags) holds 'nothing found' and no tickets between ops,
    after faults too, and the multi-block launches name the smallest bad index whichever block finds it."""
    from gpubp.backends import numba_loop_kernels as L
    be = gpubp.get_backend("numba")
    clean = ({slot: L.NO_INDEX for slot in L.INDEX_SLOTS}, 0, 0)
    size = 3 * L.LOOP_THREADS * L.LOOP_MAX_BLOCKS + 5     # several grid-stride rounds over several blocks
    assert L.loop_blocks(size) > 1
    guard = be.asarray(np.concatenate([G.fresh(0), np.zeros(G.RING_SIZE)]), np.float64)
    assert _flags(be) == clean
    params, step = be.asarray(rng.standard_normal(size), np.float64), be.zeros((1,), np.int64)
    buf = be.zeros((size,), np.float64)
    # non-finite gradients found by the update's check in several blocks, in several grid-stride rounds: the
    # smallest is named, found by the first block (which reports first: the simulator runs blocks in order) or
    # by the last (which commits)
    last_block = L.LOOP_THREADS * (L.loop_blocks(size) - 1)       # first index of the last block's first round
    later_round = 2 * L.LOOP_THREADS * L.LOOP_MAX_BLOCKS
    for bad, smallest in (([size - 1, later_round, last_block + 1, 3], 3),
                          ([size - 1, later_round + 1, last_block + 2], last_block + 2)):
        guard = be.asarray(np.concatenate([G.fresh(0), np.zeros(G.RING_SIZE)]), np.float64)
        grads = rng.standard_normal(size)
        grads[bad] = np.nan
        be.sgd_update(params, be.asarray(grads, np.float64), buf, step,
                      be.asarray(np.array([0.1, 0.9, 0, 0, 0.0]), np.float64), guard)
        head = be.to_numpy(guard)[:G.RING]
        assert (head[G.FAULT], head[G.FAULT_INDEX], head[G.STEP]) == (G.GRADIENT, smallest, 0)
        assert _flags(be) == clean
    # an update that would overflow θ (found by every block) and a clean one after a reset
    guard = be.asarray(np.concatenate([G.fresh(0), np.zeros(G.RING_SIZE)]), np.float64)
    big = np.full(size, 1e300)
    be.sgd_update(params, be.asarray(big, np.float64), buf, step, be.asarray(np.array([1e10, 0.9, 0, 0, 0.0]), np.float64), guard)
    head = be.to_numpy(guard)[:G.RING]
    assert (head[G.FAULT], head[G.FAULT_INDEX], head[G.STEP]) == (G.PARAMS, 0, 0)
    assert _flags(be) == clean
    guard = be.asarray(np.concatenate([G.fresh(0), np.zeros(G.RING_SIZE)]), np.float64)
    be.sgd_update(params, be.asarray(rng.standard_normal(size), np.float64), buf, step,
                  be.asarray(np.array([0.1, 0.9, 0, 0, 0.0]), np.float64), guard)
    assert be.to_numpy(guard)[G.STEP] == 1 and int(be.to_numpy(step)[0]) == 1
    assert _flags(be) == clean
    # record_step over several blocks: the count of every block arrives
    A = rng.random((size // 4, 4))
    Y = (rng.random((size // 4, 4)) > 0.5).astype(float)
    be.record_step(losses.BCE, be.asarray(np.array([0.25]), np.float64), be.asarray(A, np.float64),
                   be.asarray(Y, np.float64), guard)
    head = be.to_numpy(guard)[:G.RING]
    assert head[G.CORRECT] == losses.accuracy(losses.BCE, A, Y) * (size // 4) and head[G.ROWS] == size // 4
    assert _flags(be) == clean
