"""Class labels (gpubp/labels.py): fit takes strings, {1, 2}, {-1, 1} and the like, encodes them once, keeps them
in the model and its checkpoint; predict_classes answers with them and predict_proba with probabilities."""
import numpy as np
import pytest

import gpubp
from helpers import assert_unchanged, make_net, snapshot


def _blobs(rng, labels, n=60):
    """Rows around one centre per label, easy to separate; y holds the labels themselves."""
    centres = rng.standard_normal((len(labels), 3)) * 4
    which = rng.integers(0, len(labels), n)
    X = centres[which] + 0.3 * rng.standard_normal((n, 3))
    return X, np.asarray(labels)[which]


@pytest.mark.parametrize("labels, loss", [
    (["cat", "dog", "emu"], "softmax_ce"),
    ([1, 2, 3], "softmax_ce"),
    ([-1, 1], "bce"),
    ([1, 2], "bce"),
    (["no", "yes"], "bce"),
])
def test_labels_round_trip_through_fit_predict_and_a_checkpoint(rng, tmp_path, labels, loss):
    X, y = _blobs(rng, labels)
    n_out = 1 if loss == "bce" else len(labels)
    net = make_net([3, 8, n_out], loss=loss, dtype="float64")
    opt = gpubp.Adam(net, lr=0.05)
    history = net.fit(X, y, loss, opt, epochs=30, batch_size=16, validation_data=(X[:10], y[:10]))
    assert history["accuracy"][-1] > 0.9 and net.loss == loss
    assert net.classes.tolist() == sorted(labels)
    predicted = net.predict_classes(X)
    assert predicted.shape == (60,) and np.mean(predicted == y) > 0.9 and set(predicted.tolist()) <= set(labels)
    proba = net.predict_proba(X)
    assert proba.shape == (60, n_out) and np.all((proba >= 0) & (proba <= 1))
    if loss == "softmax_ce":
        assert np.allclose(proba.sum(axis=1), 1) and np.array_equal(labels_of(proba, net.classes), predicted)
    else:
        assert np.array_equal(net.predict(X), proba)                   # the sigmoid output as it is
    assert net.evaluate(X, y, loss)[1] > 0.9                              # evaluate reads the labels too
    net.save(tmp_path / "m.npz")
    loaded = gpubp.load(tmp_path / "m.npz", backend="numpy")
    assert loaded.loss == loss and loaded.classes.tolist() == net.classes.tolist()
    assert np.array_equal(loaded.predict_classes(X), predicted)
    with pytest.raises(ValueError, match="is not one of the model's classes"):   # a label it never saw
        loaded.fit(X, np.where(y == labels[0], labels[0] * 2 if isinstance(labels[0], str) else 99, y), loss,
                   epochs=1)


def labels_of(proba, classes):
    return classes[proba.argmax(axis=1)]


def test_label_indices_need_no_classes(rng):
    X = rng.standard_normal((20, 3))
    net = make_net([3, 4, 3], loss="softmax_ce")
    net.fit(X, rng.integers(0, 3, 20), "softmax_ce", gpubp.SGD(net, lr=0.1), epochs=1)
    assert net.classes is None and net.predict_classes(X).dtype == np.int64
    bce = make_net([3, 4, 1], loss="bce")
    bce.fit(X, rng.random(20), "bce", gpubp.SGD(bce, lr=0.1), epochs=1)       # probabilities as targets
    assert bce.classes is None and set(bce.predict_classes(X).tolist()) <= {0, 1}


def test_predict_proba_of_a_regression_says_there_are_none(rng):
    net = make_net([3, 4, 2], loss="mse")
    with pytest.raises(ValueError, match="does not know its loss yet"):
        net.predict_proba(rng.standard_normal((4, 3)))
    net.train_step(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)), "mse", gpubp.SGD(net, lr=0.1))
    for method in (net.predict_proba, net.predict_classes):
        with pytest.raises(ValueError, match="trained with mse .* no probabilities"):
            method(rng.standard_normal((4, 3)))


@pytest.mark.parametrize("y, n_out, loss, error, match", [
    (["a", "b", "c"] * 4, 1, "bce", ValueError, "two distinct labels, or targets in \\[0, 1\\]; got 3"),
    (["a", "b"] * 6, 3, "softmax_ce", ValueError, "3 distinct labels .* got 2 distinct values \\['a', 'b'\\]"),
    ([1, 2, 4] * 4, 4, "softmax_ce", ValueError, "4 distinct labels .* got 3"),
    (np.array(["a", 1] * 6, dtype=object), 2, "softmax_ce", TypeError, "all strings or all numbers"),
    ([0.5, np.nan] * 6, 2, "softmax_ce", ValueError, "NaN"),
])
def test_labels_that_cannot_be_classes_are_refused_before_anything_changes(rng, y, n_out, loss, error, match):
    net = make_net([3, 4, n_out], loss=loss)
    opt = gpubp.SGD(net, lr=0.1)
    before = snapshot(net)
    with pytest.raises(error, match=match):
        net.fit(rng.standard_normal((12, 3)), y, loss, opt, epochs=1)
    assert_unchanged(before, net)
    assert net.classes is None and net.loss is None


def test_classes_set_by_hand_are_checked(rng):
    net = make_net([3, 4, 3], loss="softmax_ce")
    for bad, match in ((["a", "b"], "expected 3 labels"), (["a", "a", "b"], "distinct"), ([1, "a", 2], "one kind"),
                       ("abc", "a list")):
        with pytest.raises((ValueError, TypeError), match=match):
            net.classes = bad
    from gpubp import labels, losses
    encoded, _ = labels.encode(["y", "z", "x"], losses.SOFTMAX_CE, 3, np.array(["z", "x", "y"]), fitting=False)
    assert encoded.tolist() == [2, 0, 1]          # positions in the classes as given, not in sorted order
    net.classes = ["x", "y", "z"]        # every class fixed before fit, though the rows show only two of them
    net.fit(rng.standard_normal((8, 3)), ["x", "z"] * 4, "softmax_ce", gpubp.SGD(net, lr=0.1), epochs=1)
    assert net.classes.tolist() == ["x", "y", "z"]
