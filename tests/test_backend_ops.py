"""Every op of the backend interface against the numpy reference computed in float64, on every backend that
can run here, at awkward sizes, with outputs poisoned (NaN) before each op so an unwritten element shows.

    dense_forward   Z = A_prev · Wᵀ + b,  A = g(Z)
    activation_mask δ = dA ⊙ g'(Z)
    weight_grad     dW = δᵀ · A_prev,  db = Σₙ δₙ
    input_grad      dA_prev = δ · W
    loss_grad       fused output activation + loss + ∂L/∂Z
    sgd_update / adam_update over a flat buffer
"""
import numpy as np
import pytest

from gpubp import activations as acts
from gpubp import losses
from gpubp.backends import get_backend
from conftest import pick_sizes

DTYPES = ["float32", "float64"]
# (N, in, out): 1 and 7 and 33 are below or across any tile; 257 and 1031 cross several.
SHAPES = pick_sizes([(1, 1, 1), (7, 33, 5), (33, 7, 129), (257, 65, 33), (1031, 130, 67)],
                    [(1, 1, 1), (7, 5, 3), (33, 9, 17)])
ACTIVATIONS = list(acts.NAMES.values())


def tol(dtype, k=1):
    """atol + rtol·|ref| for a result that sums k products of O(1) terms: the rounding error of such a sum grows
    with k, and an element near 0 has no relative accuracy. CuPy also flushes float32 denormals (-ftz)."""
    if dtype == "float32":
        return dict(rtol=2e-4, atol=2e-5 + 1e-6 * k)
    return dict(rtol=1e-10, atol=1e-12 + 1e-14 * k)


class Harness:
    """Moves arrays to a backend, poisons outputs, brings results back."""

    def __init__(self, backend_name, dtype):
        self.be = get_backend(backend_name)
        self.dtype = np.dtype(dtype)

    def put(self, x):
        return self.be.asarray(np.array(x, dtype=self.dtype), self.dtype)   # a copy: ops work in place

    def poisoned(self, shape, dtype=None):
        out = self.be.empty(shape, dtype or self.dtype)
        self.be.copy_into(out, np.full(shape, np.nan))
        return out

    def get(self, x):
        return self.be.to_numpy(x).astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: [k for k, v in acts.NAMES.items() if v == a][0])
def test_dense_forward(backend_name, dtype, shape, act, rng):
    N, n_in, n_out = shape
    h = Harness(backend_name, dtype)
    A_prev, W, b = rng.standard_normal((N, n_in)), rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out)
    A_prev, W, b = (x.astype(dtype).astype(np.float64) for x in (A_prev, W, b))
    for bias in (True, False):
        Z, A = h.poisoned((N, n_out)), h.poisoned((N, n_out))
        h.be.dense_forward(h.put(A_prev), h.put(W), h.put(b) if bias else None, act, 0.1, Z, A)
        Z_ref = A_prev @ W.T + (b if bias else 0)
        np.testing.assert_allclose(h.get(Z), Z_ref, **tol(dtype, n_in))
        np.testing.assert_allclose(h.get(A), acts.forward(act, Z_ref, 0.1), **tol(dtype, n_in))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: [k for k, v in acts.NAMES.items() if v == a][0])
def test_activation_mask(backend_name, dtype, act, rng):
    h = Harness(backend_name, dtype)
    for N, _, n_out in SHAPES:
        Z = rng.standard_normal((N, n_out)).astype(dtype).astype(np.float64)
        Z[0, 0] = 0.0   # relu'(0) must be 0, as in the seed
        A = acts.forward(act, Z, 0.1)
        dA = rng.standard_normal((N, n_out)).astype(dtype).astype(np.float64)
        delta = h.poisoned((N, n_out))
        h.be.activation_mask(h.put(dA), h.put(Z), h.put(A), act, 0.1, delta)
        np.testing.assert_allclose(h.get(delta), acts.derivative_mask(act, dA, Z, A, 0.1), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weight_grad(backend_name, dtype, shape, rng):
    N, n_in, n_out = shape
    h = Harness(backend_name, dtype)
    delta = rng.standard_normal((N, n_out)).astype(dtype).astype(np.float64)
    A_prev = rng.standard_normal((N, n_in)).astype(dtype).astype(np.float64)
    dW, db = h.poisoned((n_out, n_in)), h.poisoned((n_out,))
    h.be.weight_grad(h.put(delta), h.put(A_prev), dW, db)
    np.testing.assert_allclose(h.get(dW), delta.T @ A_prev, **tol(dtype, N))
    np.testing.assert_allclose(h.get(db), delta.sum(axis=0), **tol(dtype, N))
    # accumulate: a second call adds the same gradient again; no-bias form leaves db alone
    h.be.weight_grad(h.put(delta), h.put(A_prev), dW, None, accumulate=True)
    np.testing.assert_allclose(h.get(dW), 2 * (delta.T @ A_prev), **tol(dtype, 2 * N))
    np.testing.assert_allclose(h.get(db), delta.sum(axis=0), **tol(dtype, N))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_grad(backend_name, dtype, shape, rng):
    N, n_in, n_out = shape
    h = Harness(backend_name, dtype)
    delta = rng.standard_normal((N, n_out)).astype(dtype).astype(np.float64)
    W = rng.standard_normal((n_out, n_in)).astype(dtype).astype(np.float64)
    dA_prev = h.poisoned((N, n_in))
    h.be.input_grad(h.put(delta), h.put(W), dA_prev)
    np.testing.assert_allclose(h.get(dA_prev), delta @ W, **tol(dtype, n_out))


def reference_loss(loss, act, Z, y):
    """The losses in their textbook (unfused) forms, float64, with ∂L/∂Z by the chain rule."""
    N, out = Z.shape
    if loss == losses.MSE:
        A = acts.forward(act, Z, 0.1)
        L = 0.5 * np.sum((A - y) ** 2) / N
        return L, acts.derivative_mask(act, (A - y) / N, Z, A, 0.1)
    if loss == losses.BCE:
        p = 1 / (1 + np.exp(-Z))
        L = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        return L, (p - y) / (N * out)
    e = np.exp(Z - Z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return -np.sum(y * np.log(p)) / N, (p - y) / N


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", list(losses.NAMES.values()), ids=list(losses.NAMES))
def test_loss_grad(backend_name, dtype, loss, rng):
    h = Harness(backend_name, dtype)
    for N, _, n_out in SHAPES:
        Z = (3 * rng.standard_normal((N, n_out))).astype(dtype).astype(np.float64)
        if loss == losses.SOFTMAX_CE:
            y = np.eye(n_out)[rng.integers(0, n_out, N)]
        else:
            y = rng.random((N, n_out))
        act_choices = [losses.REQUIRED_ACTIVATION[loss]] if losses.REQUIRED_ACTIVATION[loss] is not None \
            else ACTIVATIONS
        for act in act_choices:
            A, delta, loss_out = h.poisoned((N, n_out)), h.poisoned((N, n_out)), h.poisoned((1,))
            h.be.loss_grad(loss, act, 0.1, h.put(Z), h.put(y), A, delta, loss_out)
            L_ref, delta_ref = reference_loss(loss, act, Z, y)
            np.testing.assert_allclose(h.get(loss_out)[0], L_ref, **tol(dtype, N * n_out))
            np.testing.assert_allclose(h.get(delta), delta_ref, **tol(dtype))
            A_ref = acts.forward(act, Z, 0.1) if loss != losses.SOFTMAX_CE else np.exp(Z) / np.exp(Z).sum(1, keepdims=True)
            np.testing.assert_allclose(h.get(A), A_ref, **tol(dtype))


def test_loss_grad_is_stable_for_huge_logits(backend_name):
    """The fused forms never take log(0) or exp(large): logits of ±1e4 give finite losses and gradients."""
    h = Harness(backend_name, "float32")
    Z = np.array([[1e4, -1e4], [-1e4, 1e4]])
    for loss, act, y in ((losses.BCE, acts.SIGMOID, np.array([[0.0, 1.0], [1.0, 0.0]])),
                         (losses.SOFTMAX_CE, acts.IDENTITY, np.eye(2)[[1, 0]])):
        A, delta, loss_out = h.poisoned((2, 2)), h.poisoned((2, 2)), h.poisoned((1,))
        h.be.loss_grad(loss, act, 0.1, h.put(Z), h.put(y), A, delta, loss_out)
        assert np.isfinite(h.get(loss_out)).all() and np.isfinite(h.get(delta)).all()
        assert h.get(loss_out)[0] > 1e3   # confidently wrong: a huge, but finite, loss


def sgd_reference(theta, grads, lr, momentum, dampening, wd, nesterov):
    """torch.optim.SGD written out step by step in float64."""
    theta, buf = theta.copy(), None
    for g in grads:
        g = g + wd * theta
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        theta = theta - lr * g
    return theta


def adam_reference(theta, grads, lr, b1, b2, eps, wd):
    theta, m, v = theta.copy(), np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        g = g + wd * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return theta


SGD_SETTINGS = [dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
                dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False),
                dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True),
                dict(momentum=0.5, dampening=0.3, weight_decay=1e-3, nesterov=False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=lambda s: "mom%(momentum)s-damp%(dampening)s-wd%(weight_decay)s-nest%(nesterov)s" % s)
def test_sgd_update(backend_name, dtype, settings, rng):
    h = Harness(backend_name, dtype)
    size = pick_sizes(1031, 67)
    theta0 = rng.standard_normal(size).astype(dtype).astype(np.float64)
    grads = [rng.standard_normal(size).astype(dtype).astype(np.float64) for _ in range(3)]
    params, buf = h.put(theta0), h.poisoned((size,))
    step = h.be.zeros((1,), np.int64)
    for g in grads:
        h.be.sgd_update(params, h.put(g), buf, step, 0.1, settings["momentum"], settings["dampening"],
                        settings["weight_decay"], settings["nesterov"])
    expected = sgd_reference(theta0, grads, 0.1, settings["momentum"], settings["dampening"],
                             settings["weight_decay"], settings["nesterov"])
    np.testing.assert_allclose(h.get(params), expected, **tol(dtype))
    assert int(h.be.to_numpy(step)[0]) == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_update(backend_name, dtype, weight_decay, rng):
    h = Harness(backend_name, dtype)
    size = pick_sizes(1031, 67)
    theta0 = rng.standard_normal(size).astype(dtype).astype(np.float64)
    grads = [rng.standard_normal(size).astype(dtype).astype(np.float64) for _ in range(4)]
    params, m, v = h.put(theta0), h.be.zeros((size,), h.dtype), h.be.zeros((size,), h.dtype)
    step = h.be.zeros((1,), np.int64)
    for g in grads:
        h.be.adam_update(params, h.put(g), m, v, step, 1e-2, 0.9, 0.999, 1e-8, weight_decay)
    expected = adam_reference(theta0, grads, 1e-2, 0.9, 0.999, 1e-8, weight_decay)
    np.testing.assert_allclose(h.get(params), expected, **tol(dtype))
    assert int(h.be.to_numpy(step)[0]) == 4


def test_deterministic_weight_grad_is_bit_identical(backend_name, rng):
    h = Harness(backend_name, "float32")
    h.be = get_backend(backend_name, deterministic=True)
    N, n_in, n_out = SHAPES[-1]
    delta, A_prev = h.put(rng.standard_normal((N, n_out))), h.put(rng.standard_normal((N, n_in)))
    results = []
    for _ in range(3):
        dW, db = h.poisoned((n_out, n_in)), h.poisoned((n_out,))
        h.be.weight_grad(delta, A_prev, dW, db)
        results.append((h.be.to_numpy(dW), h.be.to_numpy(db)))
    for dW, db in results[1:]:
        assert np.array_equal(dW, results[0][0]) and np.array_equal(db, results[0][1])


def test_array_utilities(backend_name, rng):
    h = Harness(backend_name, "float64")
    flat = h.put(np.arange(10.0))
    view = h.be.view(flat, 2, (2, 3))
    assert np.array_equal(h.be.to_numpy(view), np.arange(2.0, 8.0).reshape(2, 3))
    assert h.be.all_finite(flat)
    assert not h.be.all_finite(h.put([1.0, np.inf])) and not h.be.all_finite(h.put([np.nan]))
    out = h.poisoned((4, 3))
    h.be.one_hot(np.array([2, 0, 1, 2]), 3, out)
    assert np.array_equal(h.be.to_numpy(out), np.eye(3)[[2, 0, 1, 2]])
    assert h.be.is_device_array(flat) and not (backend_name != "numpy" and h.be.is_device_array(np.zeros(2)))
