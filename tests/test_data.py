"""gpubp.data: bundled sets, CSV/NPZ loading, the seeded split, standardisation and loss inference; and the
checkpoint's `extra` metadata that carries the command line's preprocessing."""
import numpy as np
import pytest

import gpubp
from gpubp import data


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


# ---- gpubp.data -------------------------------------------------------------------------------------------------
def write(path, text):
    path.write_text(text)
    return str(path)


def test_infer_loss_from_the_target():
    assert data.infer_loss(np.array([0, 1, 2, 1])) == "softmax_ce"
    assert data.infer_loss(np.array([0, 1, 1, 0])) == "bce"
    assert data.infer_loss(np.array([3, 7, 7])) == "bce"
    assert data.infer_loss(np.array([0.5, 1.25])) == "mse"
    assert data.infer_loss(np.zeros((4, 2))) == "mse"
    with pytest.raises(ValueError, match="only one class"):
        data.infer_loss(np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="--loss mse"):
        data.infer_loss(np.arange(500))             # whole-number prices, say: ask, don't make 500 classes


def test_read_csv_takes_the_named_target_and_reads_whole_numbers_as_labels(tmp_path):
    path = write(tmp_path / "d.csv", "a,label,b\n1,0,2.5\n3,2,4\n\n5,1,-6e-1\n")
    ds = data.read_csv(path, target="label")
    assert ds.feature_names == ["a", "b"] and ds.target_name == "label"
    np.testing.assert_array_equal(ds.X, [[1, 2.5], [3, 4], [5, -0.6]])
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [0, 2, 1]


def test_read_csv_default_target_is_the_last_column_and_decimals_are_floats(tmp_path):
    ds = data.read_csv(write(tmp_path / "d.csv", "x,y\n1,0.5\n2,1.0\n"))
    assert ds.target_name == "y" and ds.y.dtype == np.float64


@pytest.mark.parametrize("text, target, message", [
    ("a,b\nx,1\n", None, r"column 'a' is not numeric \(line 2: 'x'\)"),
    ("a,b\n1,2\n\n3,4\n5,\n", None, "missing value in column b, line 5"),     # the file's own line numbers
    ("a,b\n1,yes\n2,\n", None, "missing value in column b, line 3"),
    ("a,b\n1,2\n ,3\n", None, "missing value in column a, line 3"),
    ("a,b\n1,2\n3\n", None, "line 3 has 1 fields"),
    ("a,b\n1,2\n", "c", "no column 'c'"),
    ("a,b\n", None, "at least one data row"),
    ("a,a\n1,2\n", None, "names a column twice"),
    ("a,b\n1,nan\n", None, "NaN or inf"),
])
def test_read_csv_errors_name_what_is_wrong(tmp_path, text, target, message):
    with pytest.raises(ValueError, match=message):
        data.read_csv(write(tmp_path / "d.csv", text), target=target)


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_dataset(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="bundled set"):
        data.load_dataset("mnist_please")


def test_read_npz(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.arange(6).reshape(3, 2), y=np.array([0.5, 1, 2]))
    ds = data.load_dataset(str(tmp_path / "d.npz"))
    assert ds.X.dtype == np.float64 and ds.X.shape == (3, 2) and ds.y.dtype == np.float64
    np.savez(tmp_path / "bad.npz", X=np.arange(3))
    with pytest.raises(ValueError, match="no array 'y'"):
        data.load_dataset(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match=r"X must be a numeric array \(N, features\)"):
        data.read_npz(str(tmp_path / "bad.npz"), require_target=False)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot be read"):
        data.load_dataset(str(tmp_path / "junk.npz"))


@pytest.mark.parametrize("name, shape, n_classes", [("spiral", (900, 2), 3), ("regression", (1000, 8), None)])
def test_generated_sets_are_seeded(name, shape, n_classes):
    a, b, c = data.bundled(name, seed=1), data.bundled(name, seed=1), data.bundled(name, seed=2)
    assert a.X.shape == shape
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)
    if n_classes:
        assert sorted(set(a.y.tolist())) == list(range(n_classes))
    else:
        assert a.y.dtype == np.float64


@pytest.mark.parametrize("name, n_features, loss", [("breast_cancer", 30, "bce"), ("digits", 64, "softmax_ce"),
                                                     ("iris", 4, "softmax_ce"), ("wine", 13, "softmax_ce")])
def test_sklearn_bundled_sets(name, n_features, loss):
    pytest.importorskip("sklearn")
    ds = data.bundled(name)
    assert ds.X.shape[1] == n_features == len(ds.feature_names)
    assert data.infer_loss(ds.y) == loss


def test_split_is_seeded_disjoint_and_stratified():
    y = np.array([0] * 10 + [1] * 30)
    train, held = data.split_indices(y, 0.2, seed=3, stratify=True)
    assert len(held) == 8 and sorted(np.concatenate([train, held]).tolist()) == list(range(40))
    assert (y[held] == 0).sum() == 2 and (y[held] == 1).sum() == 6
    again = data.split_indices(y, 0.2, seed=3, stratify=True)
    np.testing.assert_array_equal(held, again[1])
    assert not np.array_equal(held, data.split_indices(y, 0.2, seed=4, stratify=True)[1])
    with pytest.raises(ValueError, match="--val-split"):
        data.split_indices(y, 1.5, seed=0)


def test_standardizer_uses_given_rows_and_survives_constant_columns():
    X = np.array([[1.0, 5.0], [3.0, 5.0]])
    scaler = data.Standardizer.fit(X)
    np.testing.assert_allclose(scaler.transform(X), [[-1, 0], [1, 0]])
    again = data.Standardizer.from_dict(scaler.to_dict())
    np.testing.assert_array_equal(again.transform(np.array([[2.0, 7.0]])), [[0, 2]])
    with pytest.raises(ValueError, match="expected 2 feature columns"):
        scaler.transform(np.zeros((1, 3)))


def test_targets_encode_and_decode_each_loss():
    t = data.Targets.fit(np.array([3, 7, 3]), "bce")
    np.testing.assert_array_equal(t.encode(np.array([7, 3])), [[1.0], [0.0]])
    assert t.decode(np.array([[0.9], [0.2]])).tolist() == [7, 3]
    t = data.Targets.from_dict(data.Targets.fit(np.array([5, 1, 9, 1]), "softmax_ce").to_dict())
    assert t.n_out == 3 and t.encode(np.array([9, 1, 5])).tolist() == [2, 0, 1]
    assert t.decode(np.array([[0, 0, 1.0], [1.0, 0, 0]])).tolist() == [9, 1]
    with pytest.raises(ValueError, match="not one of the model's classes"):
        t.encode(np.array([4]))
    y = np.array([10.0, 20.0, 30.0])
    t = data.Targets.fit(y, "mse")
    np.testing.assert_allclose(t.decode(t.encode(y)).ravel(), y)
    assert abs(t.encode(y).mean()) < 1e-12
    with pytest.raises(ValueError, match="--loss bce"):
        data.Targets.fit(np.array([0.5, 2.0]), "bce")


def test_text_labels_are_classes_and_not_a_regression(tmp_path):
    ds = data.read_csv(write(tmp_path / "d.csv", "x,kind\n1,cat\n2,dog\n3,emu\n4,cat\n"))
    assert ds.y.tolist() == ["cat", "dog", "emu", "cat"] and data.infer_loss(ds.y) == "softmax_ce"
    targets = data.Targets.fit(ds.y, "softmax_ce")
    assert targets.classes == ["cat", "dog", "emu"] and targets.decode(np.eye(3)[[2, 0]]).tolist() == ["emu", "cat"]
    with pytest.raises(ValueError, match="--loss mse: needs numeric targets"):
        data.Targets.fit(ds.y, "mse")
