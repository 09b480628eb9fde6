"""Numerical faults: a train step whose loss, gradients, parameters or optimizer state would become NaN or inf
raises FloatingPointError naming the step and the layer, and leaves the parameters, the optimizer state and the
step counters exactly as they were before that step; fit stops there, keeps the last good parameters and says
so. Run on every backend (numba under the CUDA simulator, at small sizes)."""
import numpy as np
import pytest

import gpubp


def make(backend_name, dtype="float32", optimizer="sgd", lr=0.1, sizes=(3, 4, 2), hidden="tanh", **opt_kw):
    layers = [gpubp.Dense(a, b, hidden if i < len(sizes) - 2 else "identity")
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    net = gpubp.Sequential(*layers, backend=backend_name, dtype=dtype, seed=3)
    opt = gpubp.SGD(net, lr=lr, **opt_kw) if optimizer == "sgd" else gpubp.Adam(net, lr=lr, **opt_kw)
    return net, opt


def state_of(net, opt):
    """Host copies of everything a step writes: parameters, optimizer state (with its step), net.steps."""
    state = {"params": net.backend.to_numpy(net.params), "steps": net.steps}
    state.update({"opt." + k: v for k, v in opt.state_arrays().items()})
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), f"{key} changed"


def train_until_fault(net, opt, X, y, loss="mse", max_steps=200):
    """Train until a step raises FloatingPointError; (state before that step, the error, steps done)."""
    for step in range(max_steps):
        before = state_of(net, opt)
        assert all(np.isfinite(v).all() for v in before.values())
        try:
            net.train_step(X, y, loss, opt)
        except FloatingPointError as err:
            return before, err, step
    raise AssertionError(f"no FloatingPointError within {max_steps} steps")


def test_overflowing_gradient_raises_and_changes_nothing(backend_name):
    net, opt = make(backend_name, momentum=0.9, hidden="identity")
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    for _ in range(3):
        net.train_step(X, y, "mse", opt)          # some history: non-zero momentum, steps = 3
    before = state_of(net, opt)
    huge = np.full((5, 3), 1e30)                  # finite input whose products overflow float32
    with pytest.raises(FloatingPointError, match=r"train step 3: .*(loss|layer \d)"):
        net.train_step(huge, y, "mse", opt)
    assert_same_state(before, state_of(net, opt))
    # The model is still usable after the fault.
    net.train_step(X, y, "mse", opt)
    assert net.steps == 4 and opt.steps_taken == 4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_update_that_overflows_the_parameters_raises_and_rolls_back(backend_name, dtype):
    # The gradients are finite and only the update overflows: lr·g is beyond the dtype's range.
    lr = 1e38 if dtype == "float32" else 1e308
    net, opt = make(backend_name, dtype=dtype, lr=lr)
    X, y = np.ones((4, 3)), np.full((4, 2), 5.0)
    before = state_of(net, opt)
    with pytest.raises(FloatingPointError, match=r"train step 0: the update made the parameters of layer \d"):
        net.train_step(X, y, "mse", opt)
    assert_same_state(before, state_of(net, opt))


def test_adam_state_overflow_raises_instead_of_stalling(backend_name):
    # g ~ 1e34 is finite in float32 but g² is not: Adam's second moment would become inf, and every later
    # update m / (√v + ε) would be 0: training would stop silently. The step must raise instead.
    net, opt = make(backend_name, optimizer="adam", lr=0.01, sizes=(3, 2))
    X, y = np.full((4, 3), 1e17), np.ones((4, 2))
    before = state_of(net, opt)
    with pytest.raises(FloatingPointError, match=r"train step 0: .*'exp_avg_sq' of layer 0"):
        net.train_step(X, y, "mse", opt)
    assert_same_state(before, state_of(net, opt))


@pytest.mark.parametrize("optimizer, lr, kw", [("sgd", 50.0, {"momentum": 0.9}), ("sgd", 1e4, {}),
                                               ("adam", 1e6, {})])
def test_divergence_stops_at_the_first_non_finite_step(backend_name, optimizer, lr, kw):
    # A learning rate far too large makes the parameters grow step after step until something overflows;
    # that step raises, and the last finite parameters stay.
    net, opt = make(backend_name, optimizer=optimizer, lr=lr, hidden="identity", **kw)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((6, 3)) * 10, rng.standard_normal((6, 2)) * 10
    before, err, step = train_until_fault(net, opt, X, y)
    assert f"train step {step}" in str(err)
    assert_same_state(before, state_of(net, opt))
    assert net.steps == step and opt.steps_taken == step


def test_nonfinite_loss_names_the_loss(backend_name):
    # bce on logits that overflow: z·y is inf at the output, the loss cannot be finite.
    layers = [gpubp.Dense(2, 1, "sigmoid")]
    net = gpubp.Sequential(*layers, backend=backend_name, dtype="float32", seed=0)
    opt = gpubp.SGD(net, lr=0.1)
    net.set_params([{"W": np.array([[3e38, 3e38]]), "b": np.array([3e38])}])
    before = state_of(net, opt)
    with pytest.raises(FloatingPointError, match=r"train step 0: the (loss|gradient of layer 0)"):
        net.train_step(np.ones((3, 2)), np.zeros(3), "bce", opt)
    assert_same_state(before, state_of(net, opt))


def test_fit_stops_keeps_the_last_good_parameters_and_says_so(backend_name):
    net, opt = make(backend_name, lr=50.0, momentum=0.9, hidden="identity")
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((12, 3)) * 10, rng.standard_normal((12, 2)) * 10
    after_each_batch = []
    with pytest.warns(RuntimeWarning, match="fit stopped: epoch \\d+, batch \\d+ of \\d+: train step \\d+"):
        history = net.fit(X, y, "mse", opt, epochs=500, batch_size=4,
                          on_batch_end=lambda b, n, loss: after_each_batch.append(state_of(net, opt)))
    assert history.stop_reason is not None and "not finite" in history.stop_reason
    assert len(after_each_batch) == net.steps
    assert_same_state(after_each_batch[-1], state_of(net, opt))
    assert all(np.isfinite(a).all() for p in net.get_params() for a in p.values())


def test_fit_without_faults_has_no_stop_reason():
    net, opt = make("numpy", lr=0.01)
    rng = np.random.default_rng(3)
    history = net.fit(rng.standard_normal((8, 3)), rng.standard_normal((8, 2)), "mse", opt, epochs=2)
    assert history.stop_reason is None and len(history["loss"]) == 2


@pytest.mark.parametrize("loss, output", [("mse", "identity"), ("bce", "sigmoid"), ("softmax_ce", "identity")])
def test_reading_calls_report_overflow_in_their_values_not_as_warnings(backend_name, loss, output):
    # X is finite in float32 but the products overflow: gradients and evaluate return what they get, with no
    # numpy RuntimeWarning (which pytest here turns into an error), and change nothing.
    net = gpubp.Sequential(gpubp.Dense(3, 4, "identity"), gpubp.Dense(4, 2, output), backend=backend_name,
                           dtype="float32", seed=0)
    opt = gpubp.SGD(net, lr=0.1)
    X, y = np.full((3, 3), 3e38), (np.zeros(3, int) if loss == "softmax_ce" else np.zeros((3, 2)))
    before = state_of(net, opt)
    grads = net.gradients(X, y, loss)
    value, _ = net.evaluate(X, y, loss)
    if loss == "mse":     # bce and softmax_ce are computed in stable forms that may stay finite
        assert not all(np.isfinite(g).all() for layer in grads for g in layer.values()) or not np.isfinite(value)
    assert_same_state(before, state_of(net, opt))
