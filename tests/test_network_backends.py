"""Whole networks on every backend against the numpy backend: gradients of a deep net, and a few training
steps (20 on a real GPU, 5 under the simulator) with SGD and Adam; predict returns numpy on every backend."""
import numpy as np
import pytest

import gpubp
from conftest import SIMULATOR, pick_sizes
from helpers import make_data, make_net

CASES = [("relu", "mse"), ("tanh", "bce"), ("leaky_relu", "softmax_ce"), ("sigmoid", "mse")]
SIZES = pick_sizes([3 * 37, 65, 33, 129, 5], [5, 7, 9, 3])     # in, hidden..., out
N = pick_sizes(257, 9)
STEPS = 5 if SIMULATOR else 20


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hidden, loss", CASES)
def test_gradients_agree_with_numpy(backend_name, dtype, hidden, loss, rng):
    X, y = make_data(rng, N, SIZES[0], SIZES[-1], loss)
    ours = make_net(SIZES, hidden=hidden, loss=loss, backend=backend_name, dtype=dtype)
    reference = make_net(SIZES, hidden=hidden, loss=loss, backend="numpy", dtype="float64")
    reference.set_params(ours.get_params())
    for g, r in zip(ours.gradients(X, y, loss), reference.gradients(X, y, loss)):
        for name in g:
            np.testing.assert_allclose(g[name], r[name], **tol(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("make_opt", [lambda n: gpubp.SGD(n, lr=0.05, momentum=0.9, weight_decay=1e-3),
                                      lambda n: gpubp.Adam(n, lr=1e-3)], ids=["sgd", "adam"])
def test_training_steps_agree_with_numpy(backend_name, dtype, make_opt, rng):
    X, y = make_data(rng, N, SIZES[0], SIZES[-1], "softmax_ce")
    ours = make_net(SIZES, hidden="relu", loss="softmax_ce", backend=backend_name, dtype=dtype)
    reference = make_net(SIZES, hidden="relu", loss="softmax_ce", backend="numpy", dtype=dtype)
    reference.set_params(ours.get_params())
    ours_opt, reference_opt = make_opt(ours), make_opt(reference)
    for _ in range(STEPS):
        a = ours.train_step(X, y, "softmax_ce", ours_opt)
        b = reference.train_step(X, y, "softmax_ce", reference_opt)
        assert a == pytest.approx(b, rel=1e-4 if dtype == "float32" else 1e-9)
    out = ours.predict(X)
    assert isinstance(out, np.ndarray) and out.shape == (N, SIZES[-1])
    np.testing.assert_allclose(out, reference.predict(X), rtol=1e-3 if dtype == "float32" else 1e-8, atol=1e-4)


def test_device_arrays_are_used_in_place(backend_name, rng):
    """A batch already on the backend's device trains without a host round trip and gives the same result."""
    X, y = make_data(rng, N, SIZES[0], SIZES[-1], "mse")
    a = make_net(SIZES, loss="mse", backend=backend_name, dtype="float32")
    b = make_net(SIZES, loss="mse", backend=backend_name, dtype="float32")
    Xd, yd = a.backend.asarray(X, np.float32), a.backend.asarray(y, np.float32)
    loss_device = a.train_step(Xd, yd, "mse", gpubp.SGD(a, lr=0.01))
    loss_host = b.train_step(X, y, "mse", gpubp.SGD(b, lr=0.01))
    assert loss_device == pytest.approx(loss_host, rel=1e-6)
    np.testing.assert_allclose(a.predict(Xd), b.predict(X), rtol=1e-6, atol=1e-7)
