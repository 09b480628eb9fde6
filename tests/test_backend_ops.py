"""Every op of the backend interface against the numpy reference computed in float64, on every backend that
can run here, at awkward sizes, with outputs poisoned (NaN) before each op so an unwritten element shows.

    dense_forward   Z = A_prev · Wᵀ + b,  A = g(Z)
    activation_mask δ = dA ⊙ g'(Z)
    weight_grad     dW = δᵀ · A_prev,  db = Σₙ δₙ
    input_grad      dA_prev = δ · W
    loss_grad       fused output activation + loss + ∂L/∂Z
    sgd_update / adam_update over a flat buffer, guarded (a would-be non-finite update writes nothing)
    sgd_update / adam_update check the gradients first (the step's only gradient check; issue 11)
    gather_rows, advance_cursor, guard_loss, record_step: the training loop's device-side ops
"""
import numpy as np
import pytest

from gpubp import activations as acts
from gpubp import guard as G
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

    def hyper(self, *values):
        return self.be.asarray(np.array(values, np.float64), np.float64)

    def guard(self, steps=0, fault=G.NONE):
        """A fresh guard (STEP = steps); with `fault`, one that already holds a fault."""
        guard = np.zeros(G.SIZE)
        guard[:G.RING] = G.fresh(steps)
        guard[G.RING:] = np.nan   # the loss ring is written only where record_step says
        if fault:
            guard[G.FAULT], guard[G.FAULT_STEP], guard[G.FAULT_INDEX] = fault, steps, 5
        return self.be.asarray(guard, np.float64)


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
    step, guard = h.be.zeros((1,), np.int64), h.guard(steps=7)
    hyper = h.hyper(0.1, settings["momentum"], settings["dampening"], settings["weight_decay"], settings["nesterov"])
    for g in grads:
        h.be.sgd_update(params, h.put(g), buf, step, hyper, guard)
    expected = sgd_reference(theta0, grads, 0.1, settings["momentum"], settings["dampening"],
                             settings["weight_decay"], settings["nesterov"])
    np.testing.assert_allclose(h.get(params), expected, **tol(dtype))
    assert int(h.be.to_numpy(step)[0]) == 3
    assert h.be.to_numpy(guard)[G.STEP] == 10 and h.be.to_numpy(guard)[G.FAULT] == G.NONE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_update(backend_name, dtype, weight_decay, rng):
    h = Harness(backend_name, dtype)
    size = pick_sizes(1031, 67)
    theta0 = rng.standard_normal(size).astype(dtype).astype(np.float64)
    grads = [rng.standard_normal(size).astype(dtype).astype(np.float64) for _ in range(4)]
    params, m, v = h.put(theta0), h.be.zeros((size,), h.dtype), h.be.zeros((size,), h.dtype)
    step, guard = h.be.zeros((1,), np.int64), h.guard()
    hyper = h.hyper(1e-2, 0.9, 0.999, 1e-8, weight_decay)
    for g in grads:
        h.be.adam_update(params, h.put(g), m, v, step, hyper, guard)
    expected = adam_reference(theta0, grads, 1e-2, 0.9, 0.999, 1e-8, weight_decay)
    np.testing.assert_allclose(h.get(params), expected, **tol(dtype))
    assert int(h.be.to_numpy(step)[0]) == 4
    assert h.be.to_numpy(guard)[G.STEP] == 4


# ---- guarded updates: a fault already set skips them; an overflowing one writes nothing ------------------------
def _run_update(h, which, params, grads, state, step, hyper, guard):
    if which == "sgd":
        h.be.sgd_update(params, grads, state[0], step, hyper, guard)
    else:
        h.be.adam_update(params, grads, state[0], state[1], step, hyper, guard)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["sgd", "adam"])
def test_updates_do_nothing_once_a_fault_is_set(backend_name, dtype, which, rng):
    h = Harness(backend_name, dtype)
    size = pick_sizes(1031, 67)
    theta0, g, s0 = (rng.standard_normal(size).astype(dtype) for _ in range(3))
    g[size // 2] = np.nan                            # the gradient check leaves a fault already set alone
    params, state = h.put(theta0), [h.put(np.abs(s0)), h.put(np.abs(s0))]
    step, guard = h.be.asarray(np.array([5]), np.int64), h.guard(steps=5, fault=G.PARAMS)
    hyper = h.hyper(0.1, 0.9, 0.0, 0.0, 0.0) if which == "sgd" else h.hyper(0.1, 0.9, 0.999, 1e-8, 0.0)
    guard_before = h.be.to_numpy(guard)
    _run_update(h, which, params, h.put(g), state, step, hyper, guard)
    assert np.array_equal(h.be.to_numpy(params), theta0)
    assert all(np.array_equal(h.be.to_numpy(b), np.abs(s0)) for b in state)
    assert int(h.be.to_numpy(step)[0]) == 5
    np.testing.assert_array_equal(h.be.to_numpy(guard), guard_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which, culprit, case", [("sgd", G.PARAMS, "lr·g"), ("sgd", G.PARAMS, "momentum"),
                                                  ("adam", G.STATE + 1, "g²")])
def test_update_that_would_overflow_writes_nothing_and_names_the_buffer(backend_name, dtype, which, culprit, case,
                                                                        rng):
    """The parameters are named before the state (the order of the old host-side report): with SGD a momentum
    buffer that overflows takes θ with it, so only Adam's v can be named alone."""
    h = Harness(backend_name, dtype)
    size = pick_sizes(1031, 67)
    big = np.finfo(dtype).max
    theta0 = rng.standard_normal(size).astype(dtype)
    g = rng.standard_normal(size).astype(dtype)
    bad = [size - 1, size // 2, size // 3]          # the smallest one is the index to report
    if case == "lr·g":                               # lr·g overflows θ, momentum off
        g[bad] = big / 4
        hyper = h.hyper(1e3, 0.0, 0.0, 0.0, 0.0)
    elif case == "momentum":                         # μ·b + g overflows b, and so θ
        g[bad] = big * 0.75
        hyper = h.hyper(1e-30, 0.9, 0.0, 0.0, 0.0)
    else:                                            # (1 − β2)·g·g overflows v (state 1); m and θ stay finite
        g[bad] = np.sqrt(big) * 100
        hyper = h.hyper(1e-3, 0.9, 0.999, 1e-8, 0.0)
    s0 = [np.full(size, big * 0.75 if case == "momentum" else 0.0, dtype), np.zeros(size, dtype)]
    params, state = h.put(theta0), [h.put(s) for s in s0]
    step, guard = h.be.asarray(np.array([1]), np.int64), h.guard(steps=9)
    _run_update(h, which, params, h.put(g), state, step, hyper, guard)
    got = h.be.to_numpy(guard)
    assert got[G.FAULT] == culprit and got[G.FAULT_STEP] == 9 and got[G.FAULT_INDEX] == min(bad) and got[G.STEP] == 9
    assert np.array_equal(h.be.to_numpy(params), theta0)
    assert all(np.array_equal(h.be.to_numpy(b), s) for b, s in zip(state, s0))
    assert int(h.be.to_numpy(step)[0]) == 1


# ---- the guarded updates check the gradients first: the step's only gradient check (issue 11) ---------------------
UPDATE_HYPER = {"sgd": (0.1, 0.9, 0.0, 1e-2, 0.0), "adam": (1e-2, 0.9, 0.999, 1e-8, 1e-2)}   # weight decay on


def _update_here_and_in_numpy(h, which, theta, grads, state, hyper, steps=6):
    """One guarded update from the same inputs on h's backend and on the numpy reference: step count 2, a fresh
    guard with STEP = steps, state buffers 0 and 1 (SGD uses the first). The guards must agree bit for bit, the
    buffers to rounding. Returns h's (guard head, params, state, step count) as numpy."""
    results = []
    for x in (h, Harness("numpy", h.dtype)):
        params, states = x.put(theta), [x.put(s) for s in state]
        step, guard = x.be.asarray(np.array([2]), np.int64), x.guard(steps=steps)
        _run_update(x, which, params, x.put(grads), states, step, x.hyper(*hyper), guard)
        results.append((x.be.to_numpy(guard), x.get(params), [x.get(s) for s in states], int(x.be.to_numpy(step)[0])))
    (guard, params, states, step), (ref_guard, ref_params, ref_states, ref_step) = results
    np.testing.assert_array_equal(guard, ref_guard)
    for got, expected in zip([params, *states], [ref_params, *ref_states]):
        np.testing.assert_allclose(got, expected, **tol(h.dtype.name))
    assert step == ref_step
    return guard[:G.RING], params, states, step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["sgd", "adam"])
@pytest.mark.parametrize("size", pick_sizes([1, 7, 1031], [1, 7, 67]))
@pytest.mark.parametrize("where", ["first", "last", "several", "run"])
def test_update_with_a_non_finite_gradient_writes_nothing_and_names_it(backend_name, dtype, which, size, where,
                                                                       rng):
    """NaN and ±inf gradients at index 0, at the last index, at several, or a run of them from P/3 on (each
    thread's grid-stride walk meets several; the smallest is named): FAULT = GRADIENT, nothing written, the step
    not counted. Then, the guard reset as the host resets it, a clean update
    is applied: the check left nothing behind in the backend's scratch."""
    h = Harness(backend_name, dtype)
    theta, g, s = (rng.standard_normal(size).astype(dtype).astype(np.float64) for _ in range(3))
    state = [np.abs(s), np.abs(s)]
    bad = {"first": [0], "last": [size - 1], "several": [size - 1, size // 2, size // 3],
           "run": list(range(size // 3, size))}[where]
    g[bad] = np.resize([np.nan, np.inf, -np.inf], len(bad))
    head, params, states, step = _update_here_and_in_numpy(h, which, theta, g, state, UPDATE_HYPER[which])
    assert (head[G.FAULT], head[G.FAULT_STEP], head[G.FAULT_INDEX], head[G.STEP]) == (G.GRADIENT, 6, min(bad), 6)
    assert np.array_equal(params, theta) and all(np.array_equal(b, a) for b, a in zip(states, state)) and step == 2
    _run_update(h, which, h.put(theta), h.put(g), [h.put(b) for b in state], h.be.asarray(np.array([2]), np.int64),
                h.hyper(*UPDATE_HYPER[which]), h.guard(steps=6))              # the backend's scratch after a fault
    g[bad] = 0.5
    head, params, _, step = _update_here_and_in_numpy(h, which, theta, g, state, UPDATE_HYPER[which])
    assert (head[G.FAULT], head[G.STEP], step) == (G.NONE, 7, 3) and not np.array_equal(params, theta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["sgd", "adam"])
@pytest.mark.parametrize("case", ["gradient-and-overflow", "decay-overflow"])
def test_update_names_the_raw_gradient_before_the_update(backend_name, dtype, which, case, rng):
    """gradient-and-overflow: a NaN gradient at the last index and, at index 0, a finite one whose update
    overflows (SGD: lr·g overflows θ; Adam: g² overflows v): the gradient is named, not the update, whatever the
    indices. decay-overflow: finite gradient and θ whose g + wd·θ overflows: the gradient is checked as backward
    made it, before weight decay, so the update (θ) is named, not the gradient."""
    h = Harness(backend_name, dtype)
    size = pick_sizes(1031, 67)
    big = float(np.finfo(dtype).max)
    theta, g, s = (rng.standard_normal(size).astype(dtype).astype(np.float64) for _ in range(3))
    state, hyper = [np.abs(s), np.abs(s)], UPDATE_HYPER[which]
    if case == "gradient-and-overflow":
        g[size - 1] = np.nan
        if which == "sgd":
            g[0], hyper = big / 4, (1e3,) + hyper[1:]
        else:
            g[0] = np.sqrt(big) * 100
        expected = (G.GRADIENT, size - 1)
    else:
        theta[size // 2] = g[size // 2] = np.float64(np.array(big * 0.75, dtype))   # g + 1·θ overflows
        hyper = hyper[:-1] + (1.0,) if which == "adam" else hyper[:3] + (1.0, 0.0)
        expected = (G.PARAMS, size // 2)
    head, params, states, step = _update_here_and_in_numpy(h, which, theta, g, state, hyper)
    assert (head[G.FAULT], head[G.FAULT_INDEX]) == expected
    assert np.array_equal(params, theta) and all(np.array_equal(b, a) for b, a in zip(states, state)) and step == 2


# ---- the training loop's device-side ops ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, F, n, start", [(1, 1, 1, 0), (7, 3, 3, 4), (33, 9, 32, 1), (1031, 67, 257, 700)],
                         ids=str)
def test_gather_rows_and_advance_cursor(backend_name, dtype, M, F, n, start, rng):
    if backend_name == "numba" and M > 100:
        M, F, n, start = 130, 9, 33, 90        # the simulator runs a thread at a time
    h = Harness(backend_name, dtype)
    src = rng.standard_normal((M, F)).astype(dtype)
    order = rng.permutation(M)
    order_dev = h.be.asarray(np.append(order, start), np.int64)
    cursor = h.be.view(order_dev, M, (1,))
    out = h.poisoned((n, F))
    h.be.gather_rows(h.put(src), order_dev, cursor, out)
    np.testing.assert_array_equal(h.be.to_numpy(out), src[order[start:start + n]])
    h.be.advance_cursor(cursor, n)
    assert int(h.be.to_numpy(order_dev)[M]) == start + n
    np.testing.assert_array_equal(h.be.to_numpy(order_dev)[:M], order)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["sgd", "adam"])
def test_guard_loss_then_the_update(backend_name, dtype, which, rng):
    """guard_loss, then the guarded update, as a step runs them: a finite loss changes nothing; a non-finite loss
    is named (index -1) before a non-finite gradient and nothing is written; with a fault already set, guard_loss
    counts the step as skipped and the update writes nothing, whatever its gradients."""
    h = Harness(backend_name, dtype)
    size = pick_sizes(1031, 67)
    theta, g, s = (rng.standard_normal(size).astype(dtype) for _ in range(3))
    bad = g.copy()
    bad[size // 2] = np.nan
    params, state, step = h.put(theta), [h.put(np.abs(s)), h.put(np.abs(s))], h.be.asarray(np.array([2]), np.int64)
    hyper = h.hyper(*UPDATE_HYPER[which])

    def step_with(loss, grads, guard):
        h.be.guard_loss(h.put([loss]), guard)
        _run_update(h, which, params, h.put(grads), state, step, hyper, guard)
        return h.be.to_numpy(guard)[:G.RING]

    guard = h.guard(steps=3)
    h.be.guard_loss(h.put([0.5]), guard)
    np.testing.assert_array_equal(h.be.to_numpy(guard)[:G.RING], G.fresh(3))
    for loss in (np.nan, np.inf, -np.inf):
        head = step_with(loss, bad, h.guard(steps=3))
        assert (head[G.FAULT], head[G.FAULT_STEP], head[G.FAULT_INDEX], head[G.SKIPPED]) == (G.LOSS, 3, -1, 0)
    guard = h.guard(steps=3)
    head = step_with(0.5, bad, guard)                                       # the gradient, named by the update
    assert (head[G.FAULT], head[G.FAULT_INDEX], head[G.SKIPPED], head[G.STEP]) == (G.GRADIENT, size // 2, 0, 3)
    step_with(np.nan, bad, guard)                                           # later steps: skipped, and counted
    head = step_with(0.5, g, guard)
    assert (head[G.FAULT], head[G.FAULT_INDEX], head[G.SKIPPED], head[G.STEP]) == (G.GRADIENT, size // 2, 2, 3)
    assert np.array_equal(h.be.to_numpy(params), theta) and int(h.be.to_numpy(step)[0]) == 2
    assert all(np.array_equal(h.be.to_numpy(b), np.abs(s)) for b in state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", [losses.MSE, losses.BCE, losses.SOFTMAX_CE], ids=losses.name_of)
@pytest.mark.parametrize("N, C", [(1, 1), (7, 3), (33, 1), (1031, 10)], ids=str)
def test_record_step(backend_name, dtype, loss, N, C, rng):
    if backend_name == "numba" and N > 100:
        N = 130
    if loss == losses.SOFTMAX_CE and C == 1:
        C = 2
    h = Harness(backend_name, dtype)
    A = rng.random((N, C)).astype(dtype)
    if loss == losses.SOFTMAX_CE:
        A[:, 0] = A[:, 1]                         # ties: argmax takes the first, as numpy does
        Y = np.eye(C, dtype=dtype)[rng.integers(0, C, N)]
    else:
        Y = (rng.random((N, C)) > 0.5).astype(dtype)
        A[0, 0] = 0.5                             # exactly 0.5 is not > 0.5
    guard = h.guard(steps=G.RING_SIZE + 2)        # the ring wraps: the slot of step RING_SIZE + 1 is 1
    loss_value = np.array([0.25], dtype)
    for _ in range(2):
        h.be.record_step(loss, h.put(loss_value), h.put(A), h.put(Y), guard)
    got = h.be.to_numpy(guard)
    accuracy = losses.accuracy(loss, A, Y)
    assert got[G.LOSS_SUM] == 2 * (0.25 * N) and got[G.ROWS] == 2 * N
    assert got[G.CORRECT] == (0.0 if accuracy is None else 2 * (accuracy * N))   # bit for bit, as fit summed it
    assert got[G.RING + 1] == 0.25 and np.isnan(np.delete(got[G.RING:], 1)).all()
    # a faulted step records nothing
    faulted = h.guard(steps=3, fault=G.LOSS)
    before = h.be.to_numpy(faulted)
    h.be.record_step(loss, h.put(loss_value), h.put(A), h.put(Y), faulted)
    np.testing.assert_array_equal(h.be.to_numpy(faulted), before)


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
    # a label out of range gives a row of NaN (the guard then reports the step), never a wrapped index
    h.be.one_hot(h.be.asarray(np.array([2, -1, 3, 0]), np.int64), 3, out)
    got = h.be.to_numpy(out)
    assert np.isnan(got[[1, 2]]).all() and np.array_equal(got[[0, 3]], np.eye(3)[[2, 0]])
    assert h.be.is_device_array(flat) and not (backend_name != "numpy" and h.be.is_device_array(np.zeros(2)))
