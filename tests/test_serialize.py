"""save/load: a round trip keeps architecture, dtype, parameters and optimizer state; a run resumed from a
checkpoint equals the uninterrupted run; a truncated or foreign file gives a clear error."""
import numpy as np
import pytest

import gpubp
from helpers import make_data, make_net


@pytest.mark.parametrize("make_opt", [lambda n: gpubp.SGD(n, lr=0.05, momentum=0.9, nesterov=True),
                                      lambda n: gpubp.Adam(n, lr=1e-2, weight_decay=1e-3)], ids=["sgd", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip(tmp_path, make_opt, dtype, rng):
    net = make_net([5, 7, 3], hidden="leaky_relu", loss="softmax_ce", dtype=dtype)
    opt = make_opt(net)
    X, y = make_data(rng, 20, 5, 3, "softmax_ce")
    for _ in range(3):
        net.train_step(X, y, "softmax_ce", opt)
    net.save(tmp_path / "model.npz")
    loaded = gpubp.load(tmp_path / "model.npz", backend="numpy")
    assert loaded.dtype == net.dtype and repr(loaded.layers) == repr(net.layers)
    assert loaded.steps == 3 and loaded.optimizer.config() == opt.config()
    for a, b in zip(loaded.get_params(), net.get_params()):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for name, value in opt.state_arrays().items():
        assert np.array_equal(loaded.optimizer.state_arrays()[name], value)
    np.testing.assert_array_equal(loaded.predict(X), net.predict(X))


def test_resumed_training_equals_uninterrupted(tmp_path, rng):
    X, y = make_data(rng, 40, 4, 1, "bce")

    def fresh():
        net = make_net([4, 6, 1], hidden="tanh", loss="bce", dtype="float64", seed=3)
        return net, gpubp.Adam(net, lr=1e-2)

    straight, opt = fresh()
    straight.fit(X, y, "bce", opt, epochs=4, batch_size=7)

    first, opt = fresh()
    first.fit(X, y, "bce", opt, epochs=2, batch_size=7)
    first.save(tmp_path / "half.npz")
    resumed = gpubp.load(tmp_path / "half.npz", backend="numpy")
    resumed.fit(X, y, "bce", epochs=2, batch_size=7)     # the loaded optimizer is the model's own
    assert np.array_equal(resumed.backend.to_numpy(resumed.params), straight.backend.to_numpy(straight.params))


def test_model_without_optimizer_round_trips(tmp_path):
    net = make_net([2, 1], loss="mse")
    net.save(tmp_path / "m.npz")
    assert gpubp.load(tmp_path / "m.npz").optimizer is None


def test_truncated_and_foreign_files_are_refused(tmp_path):
    net = make_net([3, 2], loss="mse")
    gpubp.SGD(net, lr=0.1)
    net.save(tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "foreign.npz", weights=np.ones(3))
    for name in ("truncated.npz", "text.npz", "foreign.npz"):
        with pytest.raises(ValueError, match="not a usable gpubp checkpoint"):
            gpubp.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        gpubp.load(tmp_path / "missing.npz")


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint intact and no temporary file behind."""
    net = make_net([3, 2], loss="mse")
    path = tmp_path / "m.npz"
    net.save(path)
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        net.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]
