"""Property-based tests (hypothesis) over random architectures (depth 1-4, widths 1-9), batch sizes, inputs,
activations and losses: every backend agrees with the numpy float64 reference; the numpy gradients agree with
central finite differences; predict, gradients and train_step give the right shapes and finite values on valid
input. And deterministic mode: two fresh models with the same seed end bit-identical on every backend.

Examples are few and derandomized (CI reproducible); the numba backend under the CUDA simulator gets fewer."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpubp
from conftest import SIMULATOR

ACTIVATIONS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh"]
OUTPUT_FOR_LOSS = {"bce": "sigmoid", "softmax_ce": "identity"}


def examples(backend_name, full):
    """How many hypothesis examples a test runs: the simulator runs every CUDA thread as an OS thread."""
    return 5 if backend_name == "numba" and SIMULATOR else full


def run_property(backend_name, strategy, check, full=20):
    @settings(max_examples=examples(backend_name, full), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def prop(case):
        check(backend_name, case)
    prop()


@st.composite
def problems(draw, max_depth=4, max_width=9, max_batch=9):
    """(layer configs, loss, X, y, seed): a random MLP and a batch it can train on."""
    depth = draw(st.integers(1, max_depth))
    widths = draw(st.lists(st.integers(1, max_width), min_size=depth + 1, max_size=depth + 1))
    loss = draw(st.sampled_from(["mse", "bce", "softmax_ce"]))
    layers = []
    for i in range(depth):
        last = i == depth - 1
        activation = OUTPUT_FOR_LOSS.get(loss) if last and loss != "mse" else draw(st.sampled_from(ACTIVATIONS))
        layers.append({"n_in": widths[i], "n_out": widths[i + 1], "activation": activation,
                       "bias": draw(st.booleans())})
    N = draw(st.integers(1, max_batch))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = rng.standard_normal((N, widths[0])) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    out = widths[-1]
    if loss == "softmax_ce":
        y = rng.integers(0, out, N) if draw(st.booleans()) else np.eye(out)[rng.integers(0, out, N)]
    elif loss == "bce":
        y = rng.random((N, out)) if draw(st.booleans()) else (rng.random((N, out)) > 0.5).astype(float)
    else:
        y = rng.standard_normal((N, out))
    return layers, loss, X, y, draw(st.integers(0, 1000))


def build(layers, backend, dtype, seed, deterministic=False):
    return gpubp.Sequential(*[gpubp.Dense(**c) for c in layers], backend=backend, dtype=dtype, seed=seed,
                            deterministic=deterministic)


def assert_close(actual, expected, dtype, what):
    # float32 against the float64 reference: a few ulps per operation through at most 4 layers.
    rtol, atol = (2e-3, 2e-4) if dtype == "float32" else (1e-9, 1e-11)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# ---- the backends agree with the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backends_agree_with_the_float64_reference(backend_name, dtype):
    if backend_name == "numpy" and dtype == "float64":
        pytest.skip("that is the reference itself")

    def check(backend_name, case):
        layers, loss, X, y, seed = case
        ref, net = build(layers, "numpy", "float64", seed), build(layers, backend_name, dtype, seed)
        net.set_params(ref.get_params())          # the same starting point, rounded to dtype
        ref.set_params(net.get_params())
        assert_close(net.predict(X), ref.predict(X), dtype, "predict")
        for g, g_ref in zip(net.gradients(X, y, loss), ref.gradients(X, y, loss)):
            for name in g_ref:
                assert_close(g[name], g_ref[name], dtype, f"gradient {name}")
        opt, opt_ref = gpubp.Adam(net, lr=0.01), gpubp.Adam(ref, lr=0.01)
        for _ in range(2):
            value, value_ref = net.train_step(X, y, loss, opt), ref.train_step(X, y, loss, opt_ref)
            assert_close(value, value_ref, dtype, "loss")
        for p, p_ref in zip(net.get_params(), ref.get_params()):
            for name in p_ref:
                assert_close(p[name], p_ref[name], dtype, f"parameter {name} after 2 Adam steps")

    run_property(backend_name, problems(max_batch=6 if SIMULATOR else 9), check, full=50)


# ---- gradients against finite differences (numpy, float64) --------------------------------------------------------
def test_gradients_match_finite_differences():
    def check(_, case):
        layers, loss, X, y, seed = case
        net = build(layers, "numpy", "float64", seed)
        params = net.get_params()
        analytic = net.gradients(X, y, loss)
        rng = np.random.default_rng(seed)
        entries = [(i, name, index) for i, p in enumerate(params) for name in p for index in np.ndindex(p[name].shape)]
        eps = 1e-6
        for k in rng.permutation(len(entries))[:12]:
            i, name, index = entries[k]
            values = []
            for sign in (1, -1):
                moved = [{n: a.copy() for n, a in p.items()} for p in params]
                moved[i][name][index] += sign * eps
                net.set_params(moved)
                values.append(net.evaluate(X, y, loss)[0])
            numeric = (values[0] - values[1]) / (2 * eps)
            # A ReLU kink inside ±eps makes the numeric slope a blend of two; that is rare and tolerated loosely.
            np.testing.assert_allclose(analytic[i][name][index], numeric, rtol=1e-4, atol=1e-6,
                                       err_msg=f"layer {i} {name}{index}")
        net.set_params(params)

    run_property("numpy", problems(), check, full=100)


# ---- shapes and finiteness on valid input ----------------------------------------------------------------------
def test_valid_input_gives_right_shapes_and_finite_values(backend_name):
    def check(backend_name, case):
        layers, loss, X, y, seed = case
        net = build(layers, backend_name, "float32", seed)
        opt = gpubp.SGD(net, lr=0.05, momentum=0.9)
        out = net.predict(X)
        assert isinstance(out, np.ndarray) and out.shape == (X.shape[0], layers[-1]["n_out"])
        assert np.isfinite(out).all()
        shapes = [{k: v.shape for k, v in p.items()} for p in net.get_params()]
        assert [{k: v.shape for k, v in g.items()} for g in net.gradients(X, y, loss)] == shapes
        value = net.train_step(X, y, loss, opt)
        assert isinstance(value, float) and np.isfinite(value) and value >= 0
        assert net.steps == 1 and opt.steps_taken == 1
        assert net.predict(X, batch_size=2).shape == out.shape
        history = net.fit(X, y, loss, opt, epochs=2, batch_size=3)
        assert len(history["loss"]) == 2 and history.stop_reason is None

    run_property(backend_name, problems(max_batch=6 if SIMULATOR else 9), check, full=40)


# ---- deterministic mode ---------------------------------------------------------------------------------------------
def deterministic_run(backend_name, optimizer, dtype="float32", steps=None):
    """Params after `steps` train steps and one shuffled fit epoch of a fresh deterministic model."""
    steps = steps or (3 if SIMULATOR else 20)
    rng = np.random.default_rng(7)
    N = 8 if SIMULATOR else 64
    X, labels = rng.standard_normal((N, 5)), rng.integers(0, 3, N)
    net = gpubp.Sequential(gpubp.Dense(5, 6, "tanh"), gpubp.Dense(6, 4, "relu"), gpubp.Dense(4, 3, "identity"),
                           backend=backend_name, dtype=dtype, seed=11, deterministic=True)
    opt = gpubp.Adam(net, lr=0.01) if optimizer == "adam" else gpubp.SGD(net, lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(steps):
        net.train_step(X, labels, "softmax_ce", opt)
    net.fit(X, labels, "softmax_ce", opt, epochs=1, batch_size=N // 4, shuffle=True)
    return net.backend.to_numpy(net.params), {k: v for k, v in opt.state_arrays().items()}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_deterministic_mode_is_bit_identical_run_to_run(backend_name, optimizer):
    params_a, state_a = deterministic_run(backend_name, optimizer)
    params_b, state_b = deterministic_run(backend_name, optimizer)
    assert params_a.tobytes() == params_b.tobytes()
    for name in state_a:
        assert state_a[name].tobytes() == state_b[name].tobytes(), name


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_deterministic_mode_agrees_with_numpy_to_rounding(backend_name, optimizer, dtype):
    if backend_name == "numpy":
        pytest.skip("numpy is the reference")
    params, _ = deterministic_run(backend_name, optimizer, dtype)
    reference, _ = deterministic_run("numpy", optimizer, dtype)
    # Rounding differences (GPU FMA, flushed denormals) compound over the steps: float32 gets a loose bound.
    rtol, atol = (1e-3, 1e-3) if dtype == "float32" else (1e-9, 1e-11)
    np.testing.assert_allclose(params, reference, rtol=rtol, atol=atol)
