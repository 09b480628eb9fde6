"""fit on real data: scikit-learn's bundled breast-cancer (BCE, sigmoid output) and digits (softmax_ce) sets
reach at least 95% accuracy on a held-out split; shuffling is seeded; history has one entry per epoch."""
import numpy as np
import pytest

import gpubp

sklearn_datasets = pytest.importorskip("sklearn.datasets")
from sklearn.model_selection import train_test_split  # noqa: E402


def standardised_split(X, y, seed=0):
    Xt, Xv, yt, yv = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = Xt.mean(axis=0), Xt.std(axis=0) + 1e-8     # fitted on the training part only
    return (Xt - mean) / std, (Xv - mean) / std, yt, yv


def test_breast_cancer_bce():
    X, y = sklearn_datasets.load_breast_cancer(return_X_y=True)
    Xt, Xv, yt, yv = standardised_split(X, y.astype(float))
    net = gpubp.Sequential(gpubp.Dense(30, 32, "relu"), gpubp.Dense(32, 1, "sigmoid"), backend="numpy", seed=0)
    history = net.fit(Xt, yt, loss="bce", optimizer=gpubp.SGD(net, lr=0.05, momentum=0.9), epochs=30,
                      batch_size=32, validation_data=(Xv, yv))
    assert sorted(history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert all(len(v) == 30 for v in history.values())
    assert history["loss"][-1] < history["loss"][0]
    accuracy = np.mean((net.predict(Xv)[:, 0] > 0.5) == (yv > 0.5))
    assert accuracy >= 0.95
    assert history["val_accuracy"][-1] == pytest.approx(accuracy)


def test_digits_softmax_ce():
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    Xt, Xv, yt, yv = standardised_split(X, y)
    net = gpubp.Sequential(gpubp.Dense(64, 64, "relu"), gpubp.Dense(64, 10, "identity"), backend="numpy", seed=0)
    history = net.fit(Xt, yt, loss="softmax_ce", optimizer=gpubp.Adam(net, lr=1e-3), epochs=20, batch_size=32,
                      validation_data=(Xv, yv))
    accuracy = np.mean(net.predict(Xv).argmax(axis=1) == yv)
    assert accuracy >= 0.95
    assert history["accuracy"][-1] > 0.95


def test_fit_is_reproducible_and_seeded(rng):
    X, y = rng.standard_normal((50, 4)), rng.standard_normal((50, 2))
    runs = []
    for seed in (1, 1, 2):
        net = gpubp.Sequential(gpubp.Dense(4, 5, "tanh"), gpubp.Dense(5, 2), backend="numpy", seed=seed)
        net.fit(X, y, loss="mse", optimizer=gpubp.SGD(net, lr=0.1), epochs=3, batch_size=8)
        runs.append(net.get_params()[0]["W"])
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


def test_fit_without_shuffle_visits_rows_in_order(rng):
    """shuffle=False: one epoch of fit equals train_step over consecutive batches."""
    X, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 1))
    a = gpubp.Sequential(gpubp.Dense(3, 1), backend="numpy", dtype="float64")
    b = gpubp.Sequential(gpubp.Dense(3, 1), backend="numpy", dtype="float64")
    a.fit(X, y, loss="mse", optimizer=gpubp.SGD(a, lr=0.1), epochs=1, batch_size=4, shuffle=False)
    opt = gpubp.SGD(b, lr=0.1)
    for start in range(0, 10, 4):
        b.train_step(X[start:start + 4], y[start:start + 4], "mse", opt)
    assert np.array_equal(a.get_params()[0]["W"], b.get_params()[0]["W"])
