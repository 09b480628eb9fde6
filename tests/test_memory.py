"""Memory stays flat over long training: a train step at a fixed batch size allocates nothing that outlives it.

CPU (numpy backend): resident memory (/proc/self/statm) and Python-traced allocations (tracemalloc) over 2,000
steps, over faults that raise and roll back, and over predict at ever-changing batch sizes (workspaces are kept
for a few sizes only). GPU (marker gpu): device memory over 10,000 steps, from CuPy's memory pool
(used_bytes/total_bytes) for the cupy backend and from the CUDA context's free memory for numba."""
import os
import tracemalloc

import numpy as np
import pytest

import gpubp
from conftest import SIMULATOR, backend_status

MiB = 2**20


def model(backend_name, dtype="float32", N=64):
    net = gpubp.Sequential(gpubp.Dense(16, 32, "relu"), gpubp.Dense(32, 32, "tanh"), gpubp.Dense(32, 10, "identity"),
                           backend=backend_name, dtype=dtype, seed=0)
    opt = gpubp.Adam(net, lr=1e-3)
    rng = np.random.default_rng(0)
    X, labels = rng.standard_normal((N, 16)).astype(dtype), rng.integers(0, 10, N)
    return net, opt, X, labels


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def samples_while(run, n_samples, measure):
    """measure() after each of n_samples calls of run()."""
    values = []
    for _ in range(n_samples):
        run()
        values.append(measure())
    return values


def assert_flat(values, slack, what):
    # Flat: no sample after the first exceeds it by more than `slack` (allocator noise, not growth per step).
    growth = max(values[1:]) - values[0]
    assert growth <= slack, f"{what} grew by {growth / MiB:.2f} MiB: {[round(v / MiB, 2) for v in values]}"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
@pytest.mark.slow
def test_resident_memory_is_flat_over_2000_numpy_steps():
    net, opt, X, labels = model("numpy")

    def steps(n):
        def run():
            for _ in range(n):
                net.train_step(X, labels, "softmax_ce", opt)
        return run
    steps(200)()                                             # warm up: workspaces, allocator arenas
    assert_flat(samples_while(steps(500), 4, rss_bytes), 2 * MiB, "resident memory")
    assert net.steps == 2200


@pytest.mark.slow
def test_traced_allocations_are_flat_over_numpy_steps_faults_and_predicts():
    net, opt, X, labels = model("numpy")
    huge = np.full_like(X, 1e30)                             # overflows float32 inside the step: a fault
    many_rows = np.random.default_rng(1).standard_normal((200, 16))

    predict_calls = []

    def mixed(n):
        def run():
            for i in range(n):
                net.train_step(X, labels, "softmax_ce", opt)
                try:
                    net.train_step(huge, labels, "softmax_ce", opt)
                except FloatingPointError:
                    pass
                predict_calls.append(1)
                # A new batch size nearly every call, cycling through 200: only 4 workspaces are kept.
                net.predict(many_rows[: 1 + len(predict_calls) * 37 % 200])
        return run
    mixed(50)()
    tracemalloc.start()
    try:
        values = samples_while(mixed(100), 4, lambda: tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    # The 4 kept workspaces hold up to 200 rows each: what is held moves by up to ~1 MiB with their sizes.
    assert_flat(values, 1 * MiB, "traced memory")


# ---- on a GPU ---------------------------------------------------------------------------------------------------------
def gpu_steps(backend_name, steps=10_000, samples=5):
    """Train `steps` steps at a fixed batch size after a warm-up; `measure` sampled every steps/samples."""
    net, opt, X, labels = model(backend_name)
    be = net.backend
    Xd, yd = be.asarray(X, np.float32), be.asarray(np.eye(10, dtype=np.float32)[labels], np.float32)

    def run(n):
        def go():
            for _ in range(n):
                net.train_step(Xd, yd, "softmax_ce", opt)
            be.synchronize()
        return go
    run(100)()
    return run(steps // samples), samples


@pytest.mark.gpu
@pytest.mark.slow
def test_cupy_device_memory_is_flat_over_10000_steps():
    ok, reason = backend_status("cupy")
    if not ok:
        pytest.skip(f"cupy: {reason}")
    import cupy as cp
    pool = cp.get_default_memory_pool()
    run, n = gpu_steps("cupy")
    used = samples_while(run, n, pool.used_bytes)
    total = [pool.total_bytes()]
    total += samples_while(run, n, pool.total_bytes)
    assert_flat(used, 64 * 1024, "cupy pool used_bytes")
    assert_flat(total, 1 * MiB, "cupy pool total_bytes")


@pytest.mark.gpu
@pytest.mark.slow
def test_numba_device_memory_is_flat_over_10000_steps():
    ok, reason = backend_status("numba")
    if not ok or SIMULATOR:
        pytest.skip(f"numba on a real GPU: {reason if not ok else 'the simulator has no device memory'}")
    from numba import cuda
    ctx = cuda.current_context()

    def used():
        ctx.deallocations.clear()         # numba frees device memory lazily; count only what is still held
        free, total = ctx.get_memory_info()
        return total - free
    run, n = gpu_steps("numba")
    # Device-wide free memory moves in allocation granules (2 MiB) and with other processes: a loose bound.
    assert_flat(samples_while(run, n, used), 8 * MiB, "numba device memory in use")
