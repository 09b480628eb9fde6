"""What is particular to the numba backend: how it reports itself, that "auto" never picks the simulator, that
CuPy arrays are used in place (on a GPU), and that its kernels launch at any size. The kernels themselves are
checked against the numpy reference by test_backend_ops.py, test_network_backends.py and test_seed_example.py,
which run the numba backend under the simulator in CI (tests/run.sh) and on a GPU with the gpu marker."""
import numpy as np
import pytest

import gpubp
from gpubp import guard as G
from conftest import SIMULATOR

numba_backend = pytest.importorskip("gpubp.backends.numba_backend")
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
