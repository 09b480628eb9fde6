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


def check_seed_example_in_precision(net, precision):
    """The seed's numbers on `net` (its m1 = 3, m2 = 0.5 already set): ŷ = 3, dL/dm1 = 2, dL/dm2 = 12, loss 2, then
    m1 = 2.8, m2 = −0.7, exactly, in any precision (every number is exact in bf16 and fp16). fp16: the first two
    steps overflow (δ_out = 2·S with S = 2¹⁶, then 2¹⁵: above fp16's 65504), are skipped and halve the scale; the
    third applies the update. Returns (gradients, parameters after the update) for the caller's own checks."""
    X, y = np.array([[2.0]]), np.array([[1.0]])
    np.testing.assert_array_equal(net.predict(X), [[3.0]])
    grads = net.gradients(X, y, loss="mse")
    assert grads[0]["W"][0, 0] == 2.0 and grads[1]["W"][0, 0] == 12.0
    opt = gpubp.SGD(net, lr=0.1)
    skipped = 2 if precision == "fp16" else 0
    for _ in range(skipped + 1):
        assert net.train_step(X, y, loss="mse", optimizer=opt) == 2.0
    params = net.get_params()
    assert params[0]["W"][0, 0] == np.float32(2.8) and params[1]["W"][0, 0] == np.float32(0.5) - np.float32(1.2)
    assert net.steps == skipped + 1
    if precision == "fp16":
        assert net.loss_scale == (2.0**14, 2)
    return grads, params


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
