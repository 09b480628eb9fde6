"""Small builders shared by the test modules."""
import numpy as np

import gpubp
from gpubp import losses

OUTPUT_ACTIVATION = {"bce": "sigmoid", "softmax_ce": "identity"}


def make_net(sizes, hidden="tanh", loss="mse", backend="numpy", dtype="float64", seed=0, output=None, **kw):
    """An MLP with layer widths `sizes` (in, h1, ..., out); the output activation suits the loss."""
    output = output or OUTPUT_ACTIVATION.get(loss, hidden)
    layers = [gpubp.Dense(a, b, hidden if i < len(sizes) - 2 else output)
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    return gpubp.Sequential(*layers, backend=backend, dtype=dtype, seed=seed, **kw)


def make_data(rng, N, n_in, n_out, loss):
    X = rng.standard_normal((N, n_in))
    if loss == "softmax_ce":
        y = rng.integers(0, n_out, N)
    elif loss == "bce":
        y = (rng.random((N, n_out)) > 0.5).astype(float)
    else:
        y = rng.standard_normal((N, n_out))
    return X, y


def seed_net(backend="numpy", dtype="float64"):
    """The seed's network: m1 = 3 (identity, no bias), m2 = 0.5 (ReLU, no bias)."""
    net = gpubp.Sequential(gpubp.Dense(1, 1, "identity", bias=False), gpubp.Dense(1, 1, "relu", bias=False),
                           backend=backend, dtype=dtype)
    net.set_params([{"W": np.array([[3.0]])}, {"W": np.array([[0.5]])}])
    return net


def snapshot(net):
    """Everything a failed call must leave untouched: parameters, optimizer state, counters (host copies)."""
    state = {"params": net.backend.to_numpy(net.params).copy(), "steps": net.steps,
             "rng": repr(net.rng.bit_generator.state)}
    if net.optimizer is not None:
        state.update({"opt." + k: v.copy() for k, v in net.optimizer.state_arrays().items()})
    return state


def assert_unchanged(before, net):
    after = snapshot(net)
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], np.ndarray):
            assert np.array_equal(before[key], after[key]), f"{key} changed"
        else:
            assert before[key] == after[key], f"{key} changed"


LOSS_NAMES = list(losses.NAMES)
