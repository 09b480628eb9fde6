"""Bad input raises ValueError/TypeError naming the argument, before anything is touched: the parameters, the
optimizer state and the counters stay bit-for-bit as they were (SPEC section 2)."""
import numpy as np
import pytest

import gpubp
from helpers import assert_unchanged, make_net, snapshot


@pytest.fixture
def trained():
    """A model with some history, so its optimizer state is not all zeros."""
    rng = np.random.default_rng(0)
    net = make_net([4, 5, 3], hidden="relu", loss="softmax_ce", dtype="float32")
    opt = gpubp.SGD(net, lr=0.1, momentum=0.9)
    for _ in range(3):
        net.train_step(rng.standard_normal((6, 4)), rng.integers(0, 3, 6), "softmax_ce", opt)
    return net, opt


GOOD_X = np.ones((6, 4))
GOOD_Y = np.array([0, 1, 2, 0, 1, 2])
BAD_CALLS = [
    # (description, X, y, loss, exception, words the message must contain)
    ("X wrong width", np.ones((6, 5)), GOOD_Y, "softmax_ce", ValueError, ["X", "(N, 4)", "(6, 5)"]),
    ("X 1-D", np.ones(4), GOOD_Y, "softmax_ce", ValueError, ["X", "(N, 4)"]),
    ("X 3-D", np.ones((6, 4, 1)), GOOD_Y, "softmax_ce", ValueError, ["X"]),
    ("X empty", np.ones((0, 4)), GOOD_Y[:0], "softmax_ce", ValueError, ["X", "N >= 1"]),
    ("X NaN", np.where(np.eye(6, 4) > 0, np.nan, 1.0), GOOD_Y, "softmax_ce", ValueError, ["X", "NaN"]),
    ("X inf", np.full((6, 4), np.inf), GOOD_Y, "softmax_ce", ValueError, ["X", "inf"]),
    ("X strings", np.array([["a"] * 4] * 6), GOOD_Y, "softmax_ce", TypeError, ["X", "numeric"]),
    ("X objects", np.array([[object()] * 4] * 6), GOOD_Y, "softmax_ce", TypeError, ["X", "numeric"]),
    ("X a string", "not an array", GOOD_Y, "softmax_ce", TypeError, ["X"]),
    ("X None", None, GOOD_Y, "softmax_ce", TypeError, ["X"]),
    ("X complex", np.ones((6, 4), complex), GOOD_Y, "softmax_ce", TypeError, ["X", "complex"]),
    ("y too few rows", GOOD_X, GOOD_Y[:5], "softmax_ce", ValueError, ["y", "6", "5"]),
    ("y label out of range", GOOD_X, np.array([0, 1, 2, 3, 0, 1]), "softmax_ce", ValueError, ["y", "[0, 3)"]),
    ("y negative label", GOOD_X, np.array([0, 1, 2, -1, 0, 1]), "softmax_ce", ValueError, ["y"]),
    ("y float labels", GOOD_X, GOOD_Y.astype(float), "softmax_ce", TypeError, ["y", "integer"]),
    ("y one-hot wrong width", GOOD_X, np.eye(4)[[0, 1, 2, 3, 0, 1]], "softmax_ce", ValueError, ["y", "(N, 3)"]),
    ("y NaN", GOOD_X, np.full((6, 3), np.nan), "softmax_ce", ValueError, ["y", "NaN"]),
    ("unknown loss", GOOD_X, GOOD_Y, "hinge", ValueError, ["loss", "hinge", "mse"]),
    ("loss not a string", GOOD_X, GOOD_Y, 3, ValueError, ["loss"]),
    ("bce on identity output", GOOD_X, np.ones((6, 3)), "bce", ValueError, ["bce", "sigmoid", "identity"]),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_train_step_input_is_refused_and_changes_nothing(trained, case):
    net, opt = trained
    _, X, y, loss, exc, words = case
    before = snapshot(net)
    with pytest.raises(exc) as info:
        net.train_step(X, y, loss, opt)
    for word in words:
        assert word in str(info.value)
    assert_unchanged(before, net)


# fit reads a 1-D y as class labels (gpubp/labels.py): three distinct floats are three classes there.
BAD_FIT_CALLS = [c for c in BAD_CALLS if c[0] != "y float labels"]


@pytest.mark.parametrize("case", BAD_FIT_CALLS, ids=[c[0] for c in BAD_FIT_CALLS])
def test_bad_fit_input_is_refused_and_changes_nothing(trained, case):
    net, opt = trained
    _, X, y, loss, exc, _ = case
    before = snapshot(net)
    with pytest.raises(exc):
        net.fit(X, y, loss, opt, epochs=1, batch_size=2)
    assert_unchanged(before, net)


def test_bad_predict_and_gradients_input(trained):
    net, _ = trained
    before = snapshot(net)
    with pytest.raises(ValueError, match="X"):
        net.predict(np.ones((2, 3)))
    with pytest.raises(ValueError, match="batch_size"):
        net.predict(GOOD_X, batch_size=0)
    with pytest.raises(TypeError, match="y"):
        net.gradients(GOOD_X, np.array(["a"] * 6), "softmax_ce")
    assert_unchanged(before, net)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(epochs=0), ValueError, "epochs"), (dict(batch_size=-1), ValueError, "batch_size"),
    (dict(batch_size=2.5), ValueError, "batch_size"), (dict(shuffle="yes"), TypeError, "shuffle"),
    (dict(validation_data=GOOD_X), ValueError, "validation_data"),
    (dict(validation_data=(np.ones((3, 2)), GOOD_Y[:3])), ValueError, "X"),
])
def test_bad_fit_settings(trained, kwargs, exc, word):
    net, opt = trained
    before = snapshot(net)
    with pytest.raises(exc, match=word):
        net.fit(GOOD_X, GOOD_Y, "softmax_ce", opt, **kwargs)
    assert_unchanged(before, net)


def test_bad_set_params_changes_nothing(trained):
    net, _ = trained
    good = net.get_params()
    before = snapshot(net)
    bad_cases = [
        (good[:1], ValueError, "2 dicts"),
        ([good[0], {"W": good[1]["W"]}], ValueError, "keys"),
        ([good[0], {"W": good[1]["W"].T, "b": good[1]["b"]}], ValueError, "shape"),
        ([good[0], {"W": good[1]["W"] * np.nan, "b": good[1]["b"]}], ValueError, "NaN"),
        ([good[0], {"W": good[1]["W"].astype(str), "b": good[1]["b"]}], TypeError, "numeric"),
        ("weights", ValueError, "list"),
    ]
    for params, exc, word in bad_cases:
        with pytest.raises(exc, match=word):
            net.set_params(params)
        assert_unchanged(before, net)


def test_optimizer_mix_ups(trained):
    net, opt = trained
    other = make_net([4, 5, 3], hidden="relu", loss="softmax_ce")
    before = snapshot(net)
    with pytest.raises(ValueError, match="another model"):
        net.train_step(GOOD_X, GOOD_Y, "softmax_ce", gpubp.SGD(other, lr=0.1))
    with pytest.raises(TypeError, match="optimizer"):
        net.train_step(GOOD_X, GOOD_Y, "softmax_ce", "sgd")
    assert_unchanged(before, net)


@pytest.mark.parametrize("build, exc, words", [
    (lambda: gpubp.Sequential(gpubp.Dense(3, 4), gpubp.Dense(5, 1)), ValueError, ["layer 1", "5 inputs", "4 outputs"]),
    (lambda: gpubp.Sequential(), ValueError, ["at least one"]),
    (lambda: gpubp.Sequential("dense"), TypeError, ["Dense"]),
    (lambda: gpubp.Dense(3, 0), ValueError, ["n_out", "positive"]),
    (lambda: gpubp.Dense(2.5, 1), ValueError, ["n_in"]),
    (lambda: gpubp.Dense(3, 1, activation="gelu"), ValueError, ["activation", "gelu", "relu"]),
    (lambda: gpubp.Dense(3, 1, bias="no"), TypeError, ["bias"]),
    (lambda: gpubp.Sequential(gpubp.Dense(3, 1), dtype="float16"), ValueError, ["dtype", "float16"]),
    (lambda: gpubp.Sequential(gpubp.Dense(3, 1), backend="tpu"), ValueError, ["backend", "tpu"]),
    (lambda: gpubp.Sequential(gpubp.Dense(3, 1), seed=-1), ValueError, ["seed"]),
])
def test_bad_construction(build, exc, words):
    with pytest.raises(exc) as info:
        build()
    for word in words:
        assert word in str(info.value)


def test_unavailable_backend_says_why():
    availability = gpubp.availability()
    for name in ("cupy", "numba"):
        ok, reason = availability[name]
        if not ok:
            with pytest.raises(gpubp.BackendUnavailable, match=name):
                gpubp.Sequential(gpubp.Dense(3, 1), backend=name)
            assert reason


def test_integer_and_list_inputs_are_accepted():
    net = make_net([2, 1], loss="mse")
    opt = gpubp.SGD(net, lr=0.1)
    assert np.isfinite(net.train_step([[1, 2], [3, 4]], [1, 2], "mse", opt))
    assert net.predict([[1, 2]]).shape == (1, 1)
