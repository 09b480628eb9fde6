"""SGD (plain, momentum, Nesterov, weight decay, dampening) and Adam against sequences computed by hand, on a
one-weight model whose gradient is known in closed form: ŷ = w·x (identity, no bias), L = ½(w·x − y)², so
∂L/∂w = (w·x − y)·x. Each expected sequence is the torch.optim rule written out with that gradient."""
import math

import numpy as np
import pytest

import gpubp

X, Y = np.array([[2.0]]), np.array([[1.0]])


def one_weight(w=3.0, backend="numpy"):
    net = gpubp.Sequential(gpubp.Dense(1, 1, "identity", bias=False), backend=backend, dtype="float64")
    net.set_params([{"W": np.array([[w]])}])
    return net


def grad(w):
    return (w * 2.0 - 1.0) * 2.0


def run(net, opt, steps):
    out = []
    for _ in range(steps):
        net.train_step(X, Y, "mse", opt)
        out.append(net.get_params()[0]["W"][0, 0])
    return out


def test_plain_sgd():
    # w ← w − 0.1·(2w − 1)·2: 3 → 2.0 → 1.4 → 1.04
    net = one_weight()
    np.testing.assert_allclose(run(net, gpubp.SGD(net, lr=0.1), 3), [2.0, 1.4, 1.04])


def test_sgd_momentum():
    # b1 = g1 = 10, w = 3 − 1 = 2;  g2 = 6, b2 = 0.9·10 + 6 = 15, w = 2 − 1.5 = 0.5;  g3 = 0, b3 = 13.5, w = −0.85
    net = one_weight()
    np.testing.assert_allclose(run(net, gpubp.SGD(net, lr=0.1, momentum=0.9), 3), [2.0, 0.5, -0.85])


def test_sgd_nesterov():
    # g1 = 10, b1 = 10, step = g + 0.9·b = 19, w = 1.1;  g2 = 2.4, b2 = 11.4, step = 2.4 + 10.26 = 12.66, w = −0.166
    net = one_weight()
    np.testing.assert_allclose(run(net, gpubp.SGD(net, lr=0.1, momentum=0.9, nesterov=True), 2), [1.1, -0.166])


def test_sgd_weight_decay_and_dampening():
    # g = ∇ + 0.5·w: g1 = 10 + 1.5 = 11.5, b1 = 11.5, w = 3 − 1.15 = 1.85
    # g2 = (3.7 − 1)·2 + 0.925 = 6.325, b2 = 0.5·11.5 + (1 − 0.2)·6.325 = 10.81, w = 1.85 − 1.081 = 0.769
    net = one_weight()
    opt = gpubp.SGD(net, lr=0.1, momentum=0.5, weight_decay=0.5, dampening=0.2)
    np.testing.assert_allclose(run(net, opt, 2), [1.85, 0.769])


def test_adam():
    # t = 1: g = 10, m = 1, v = 0.1, m̂ = 10, v̂ = 100 → w = 3 − 0.1·10/(10 + 1e-8)
    net = one_weight()
    w1 = 3 - 0.1 * 10 / (10 + 1e-8)
    g2 = grad(w1)
    m, v = 0.9 * 1.0 + 0.1 * g2, 0.999 * 0.1 + 0.001 * g2 ** 2
    w2 = w1 - (0.1 / (1 - 0.9 ** 2)) * m / (math.sqrt(v) / math.sqrt(1 - 0.999 ** 2) + 1e-8)
    np.testing.assert_allclose(run(net, gpubp.Adam(net, lr=0.1), 2), [w1, w2], rtol=1e-12)


def test_adam_weight_decay_is_l2_added_to_the_gradient():
    net = one_weight()
    g = grad(3.0) + 0.1 * 3.0
    expected = 3 - 0.01 * g / (abs(g) + 1e-8)   # first Adam step moves by lr·sign(g)
    np.testing.assert_allclose(run(net, gpubp.Adam(net, lr=0.01, weight_decay=0.1), 1), [expected], rtol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1), "lr"), (dict(lr=0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr="0.1"), "lr"),
    (dict(lr=0.1, momentum=-0.5), "momentum"), (dict(lr=0.1, nesterov=True), "nesterov"),
    (dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.1), "nesterov"),
])
def test_sgd_rejects_bad_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gpubp.SGD(one_weight(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(0.9,)), "betas"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-1), "weight_decay"),
])
def test_adam_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gpubp.Adam(one_weight(), **kwargs)
