"""gpubp.data: bundled sets, CSV/NPZ loading, the seeded split, standardisation and loss inference; and the
checkpoint's `extra` metadata that carries the command line's preprocessing."""
import numpy as np
import pytest

import gpubp


def test_checkpoint_extra_round_trips(tmp_path):
    net = gpubp.Sequential(gpubp.Dense(3, 2, "identity"), backend="numpy")
    extra = {"mean": [0.5, 1.0, -2.0], "classes": [3, 7], "loss": "softmax_ce", "target": None}
    net.save(tmp_path / "m.npz", extra=extra)
    loaded = gpubp.load(tmp_path / "m.npz", backend="numpy")
    assert loaded.extra == extra
    loaded.save(tmp_path / "again.npz")               # a loaded model keeps its metadata when saved again
    assert gpubp.load(tmp_path / "again.npz", backend="numpy").extra == extra


def test_checkpoint_without_extra_loads_empty_dict(tmp_path):
    net = gpubp.Sequential(gpubp.Dense(3, 1, "sigmoid"), backend="numpy")
    net.save(tmp_path / "m.npz")
    assert gpubp.load(tmp_path / "m.npz", backend="numpy").extra == {}


@pytest.mark.parametrize("extra", [[1, 2], {"x": np.float32(1)}, {"x": float("nan")}])
def test_checkpoint_extra_must_be_json(tmp_path, extra):
    net = gpubp.Sequential(gpubp.Dense(3, 1, "sigmoid"), backend="numpy")
    with pytest.raises(TypeError, match="extra"):
        net.save(tmp_path / "m.npz", extra=extra)
    assert not (tmp_path / "m.npz").exists()
