"""The seed's worked example on every backend: x = 2, y = 1, m1 = 3 (identity), m2 = 0.5 (ReLU), MSE, η = 0.1.

    forward   h = m1·x = 6          ŷ = relu(m2·h) = 3          L = ½(ŷ − y)² = 2
    backward  dL/dŷ = 2   dL/dm2 = 2·h = 12   dL/dh = 2·m2 = 1   dL/dm1 = 1·x = 2
    update    m1 = 3 − 0.1·2 = 2.8            m2 = 0.5 − 0.1·12 = −0.7
"""
import numpy as np
import pytest

import gpubp
from helpers import seed_net


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_seed_example(backend_name, dtype):
    net = seed_net(backend_name, dtype)
    X, y = np.array([[2.0]]), np.array([[1.0]])
    np.testing.assert_allclose(net.predict(X), [[3.0]])
    grads = net.gradients(X, y, loss="mse")
    np.testing.assert_allclose(grads[0]["W"], [[2.0]])
    np.testing.assert_allclose(grads[1]["W"], [[12.0]])
    loss = net.train_step(X, y, loss="mse", optimizer=gpubp.SGD(net, lr=0.1))
    assert loss == pytest.approx(2.0)
    params = net.get_params()
    np.testing.assert_allclose(params[0]["W"], [[2.8]], rtol=1e-6)
    np.testing.assert_allclose(params[1]["W"], [[-0.7]], rtol=1e-6)


def test_seed_example_relu_at_zero_has_zero_gradient():
    """NOTE: relu'(0) = 0: with m2 = 0 the output is 0 and no gradient reaches m1 or m2."""
    net = seed_net()
    net.set_params([{"W": np.array([[3.0]])}, {"W": np.array([[0.0]])}])
    grads = net.gradients(np.array([[2.0]]), np.array([[1.0]]), loss="mse")
    assert grads[0]["W"][0, 0] == 0 and grads[1]["W"][0, 0] == 0
