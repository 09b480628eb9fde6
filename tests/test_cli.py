"""The `gpubp` command, run as a user runs it: the installed console script in a subprocess (or
`python -m gpubp.cli` where no script is installed), small epochs, the numpy backend.

Covers train (progress, summary, checkpoint, curves), resume (equal to the uninterrupted run), predict (one CSV
row per input row, the training preprocessing), info, bench's forwarding, and bad input: exit status 2 with one
`gpubp: error:` line and no traceback."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpubp

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SCRIPT = Path(sys.executable).parent / ("gpubp.exe" if os.name == "nt" else "gpubp")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gpubp.cli"]
REPO = Path(gpubp.__file__).resolve().parent.parent


def gpubp_cmd(*args, cwd=None, command=COMMAND):
    env = dict(os.environ, PYTHONWARNINGS="error")     # a warning on the way is a failure, as in-process
    env.pop("GPUBP_TRACEBACK", None)
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def ok(*args, cwd=None):
    result = gpubp_cmd(*args, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def cli_meta(path):
    return gpubp.load(path, backend="numpy").extra["gpubp_cli"]


# ---- train --------------------------------------------------------------------------------------------------------
def test_train_saves_a_checkpoint_and_valid_png_curves(tmp_path):
    result = ok("train", "--data", "breast_cancer", "--epochs", 3, "--backend", "numpy", "--save", tmp_path / "m.npz",
                "--plot", tmp_path / "curves.png")
    lines = result.stdout.splitlines()
    assert "loss bce" in lines[0] and "30 -> 64 relu -> 64 relu -> 1 sigmoid" in lines[0]
    # Not a terminal: one plain line per epoch, no carriage-return bar animation.
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert "samples/s" in lines[1] and "val_accuracy" in lines[1] and "\r" not in result.stdout + result.stderr
    assert lines[-1].startswith("held-out accuracy ")
    assert float(lines[-1].split()[2].rstrip(",")) > 0.9

    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    meta = cli_meta(tmp_path / "m.npz")
    assert meta["epochs_done"] == 3 and len(meta["history"]["val_accuracy"]) == 3
    assert meta["targets"] == {"loss": "bce", "classes": [0, 1], "mean": None, "std": None}
    assert len(meta["features"]["mean"]) == 30


@pytest.mark.parametrize("data, expected", [("spiral", "held-out accuracy"), ("regression", "held-out R²")])
def test_train_generated_sets(data, expected):
    result = ok("train", "--data", data, "--epochs", 2, "--backend", "numpy", "--layers", "16")
    assert result.stdout.splitlines()[-1].startswith(expected)


def test_resume_keeps_the_seed_of_the_first_run(tmp_path):
    # The generated sets depend on the seed: a resume without --seed must use the same data and split.
    ok("train", "--data", "spiral", "--seed", 3, "--epochs", 1, "--layers", 8, "--backend", "numpy",
       "--save", tmp_path / "s.npz")
    ok("train", "--data", "spiral", "--epochs", 2, "--backend", "numpy", "--resume", tmp_path / "s.npz")
    meta = cli_meta(tmp_path / "s.npz")
    assert meta["seed"] == 3 and meta["epochs_done"] == 2


def test_python_dash_m_runs_the_same_command():
    result = gpubp_cmd("--version", command=[sys.executable, "-m", "gpubp.cli"])
    assert result.returncode == 0 and gpubp.__version__ in result.stdout


def test_resume_continues_to_the_same_model_as_an_uninterrupted_run(tmp_path):
    common = ["--data", "iris", "--backend", "numpy", "--optimizer", "adam", "--lr", "0.01", "--layers", "16,8"]
    ok("train", *common, "--epochs", 4, "--save", tmp_path / "full.npz")
    ok("train", *common, "--epochs", 2, "--save", tmp_path / "part.npz", "--checkpoint-every", 1)
    assert cli_meta(tmp_path / "part.npz")["epochs_done"] == 2
    # --resume alone: the network, optimizer and its state, split and preprocessing come from the checkpoint.
    result = ok("train", "--data", "iris", "--backend", "numpy", "--epochs", 4, "--resume", tmp_path / "part.npz")
    assert "resuming at epoch 3" in result.stdout
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("epoch ")] == ["3/4", "4/4"]

    full = gpubp.load(tmp_path / "full.npz", backend="numpy")
    resumed = gpubp.load(tmp_path / "part.npz", backend="numpy")
    assert resumed.steps == full.steps and resumed.optimizer.steps_taken == full.optimizer.steps_taken
    for a, b in zip(full.get_params(), resumed.get_params()):
        np.testing.assert_array_equal(a["W"], b["W"])
        np.testing.assert_array_equal(a["b"], b["b"])
    assert full.extra["gpubp_cli"]["history"] == resumed.extra["gpubp_cli"]["history"]

    again = ok("train", "--data", "iris", "--epochs", 4, "--backend", "numpy", "--resume", tmp_path / "part.npz")
    assert "nothing to do" in again.stdout


# ---- predict ------------------------------------------------------------------------------------------------------
def make_csv(path, n=120, seed=0):
    """Two informative features, a noise column, and a class column in the middle of the file."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    label = np.where(X[:, 0] + X[:, 1] > 0, 7, 3)           # labels other than 0/1: bce maps and maps back
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "kind", "b", "noise"])
        for row, y in zip(X, label):
            writer.writerow([f"{row[0]:.6f}", y, f"{row[1]:.6f}", f"{row[2]:.6f}"])
    return label


def read_predictions(path_or_text):
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    rows = list(csv.reader(text.splitlines()))
    return rows[0], rows[1:]


def test_predict_writes_one_label_per_input_row(tmp_path):
    labels = make_csv(tmp_path / "train.csv")
    ok("train", "--data", tmp_path / "train.csv", "--target", "kind", "--epochs", 15, "--backend", "numpy",
       "--save", tmp_path / "m.npz")
    # New rows with the columns in another order and without the target column: chosen by name.
    rng = np.random.default_rng(1)
    new = rng.standard_normal((25, 3))
    with open(tmp_path / "new.csv", "w") as f:
        f.write("noise,b,a\n" + "".join(f"{c},{b},{a}\n" for a, b, c in new))
    ok("predict", tmp_path / "m.npz", "--data", tmp_path / "new.csv", "--out", tmp_path / "preds.csv")
    header, rows = read_predictions(tmp_path / "preds.csv")
    assert header == ["prediction"] and len(rows) == 25
    predicted = np.array([int(r[0]) for r in rows])
    assert set(predicted) <= {3, 7}
    assert np.mean(predicted == np.where(new[:, 0] + new[:, 1] > 0, 7, 3)) > 0.85

    # The training file itself (its target column is ignored), predictions on stdout.
    result = ok("predict", tmp_path / "m.npz", "--data", tmp_path / "train.csv")
    header, rows = read_predictions(result.stdout)
    assert len(rows) == len(labels)


def test_predict_regression_values_in_target_units(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 2))
    y = 1000.0 + 50.0 * X[:, 0] - 20.0 * X[:, 1]
    np.savez(tmp_path / "r.npz", X=X, y=y)
    result = ok("train", "--data", tmp_path / "r.npz", "--epochs", 20, "--layers", "", "--backend", "numpy",
                "--save", tmp_path / "m.npz")
    assert "loss mse" in result.stdout and "held-out R²" in result.stdout
    np.savez(tmp_path / "x.npz", X=X[:10])
    header, rows = read_predictions(ok("predict", tmp_path / "m.npz", "--data", tmp_path / "x.npz").stdout)
    assert header == ["prediction"] and len(rows) == 10
    np.testing.assert_allclose([float(r[0]) for r in rows], y[:10], rtol=0.02)


# ---- info and bench -----------------------------------------------------------------------------------------------
def test_info_lists_backends_and_versions():
    out = ok("info").stdout
    assert f"gpubp {gpubp.__version__}" in out and "python 3." in out and "numpy " in out
    for name, (usable, _) in gpubp.availability().items():
        assert any(line.split()[:2] == [name, "yes" if usable else "no"] for line in out.splitlines())
    assert "gpu: " in out


def test_bench_forwards_its_arguments_or_says_it_needs_a_checkout():
    result = gpubp_cmd("bench", "--help")
    if (REPO / "bench" / "__init__.py").is_file():
        assert result.returncode == 0 and "usage" in result.stdout.lower()
    else:
        assert result.returncode == 2 and "gpubp bench runs from a source checkout" in result.stderr


# ---- bad input: one line, exit 2 ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iris_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "iris.npz"
    ok("train", "--data", "iris", "--epochs", 1, "--backend", "numpy", "--layers", "8", "--save", path)
    return path


def bad_inputs(tmp, checkpoint):
    (tmp / "text.csv").write_text("a,b,y\n1,hello,0\n2,3,1\n")
    (tmp / "ok.csv").write_text("a,b,y\n1,2,0\n2,3,1\n3,1,0\n4,4,1\n5,2,0\n")
    (tmp / "corrupt.npz").write_bytes(checkpoint.read_bytes()[:300])
    gpubp.Sequential(gpubp.Dense(4, 3, "identity"), backend="numpy").save(tmp / "api.npz")
    return {
        "missing file": (["train", "--data", tmp / "nope.csv"], "no such file"),
        "non-numeric column": (["train", "--data", tmp / "text.csv"], "column 'b' is not numeric"),
        "unknown target": (["train", "--data", tmp / "ok.csv", "--target", "price"], "no column 'price'"),
        "bad layers": (["train", "--data", "iris", "--layers", "64,x"], "--layers"),
        "zero layer": (["train", "--data", "iris", "--layers", "0"], "--layers"),
        "unknown dataset": (["train", "--data", "mnist"], "bundled set"),
        "unknown backend": (["train", "--data", "iris", "--backend", "tpu"], "--backend"),
        "missing --data": (["train"], "--data"),
        "other architecture": (["train", "--data", "iris", "--layers", "32,32", "--resume", checkpoint],
                               "holds the network"),
        "other data on resume": (["train", "--data", "wine", "--resume", checkpoint], "trained on 4 features"),
        "corrupt checkpoint on resume": (["train", "--data", "iris", "--resume", tmp / "corrupt.npz"],
                                         "not a usable gpubp checkpoint"),
        "corrupt checkpoint on predict": (["predict", tmp / "corrupt.npz", "--data", "iris"],
                                          "not a usable gpubp checkpoint"),
        "missing checkpoint": (["predict", tmp / "none.npz", "--data", "iris"], "no such checkpoint"),
        "predict on other features": (["predict", checkpoint, "--data", tmp / "ok.csv"], "the model needs"),
        "checkpoint-every without save": (["train", "--data", "iris", "--checkpoint-every", "2"], "--save"),
        "other seed on resume": (["train", "--data", "iris", "--resume", checkpoint, "--seed", "5"], "--seed 0"),
        "momentum with adam": (["train", "--data", "iris", "--optimizer", "adam", "--momentum", "0.5"],
                               "--momentum"),
        "checkpoint from the Python API": (["predict", tmp / "api.npz", "--data", "iris"],
                                           "not written by `gpubp train`"),
        "bad val-split": (["train", "--data", "iris", "--val-split", "1"], "--val-split"),
    }


CASES = ["missing file", "non-numeric column", "unknown target", "bad layers", "zero layer", "unknown dataset",
         "unknown backend", "missing --data", "other architecture", "other data on resume",
         "corrupt checkpoint on resume", "corrupt checkpoint on predict", "missing checkpoint",
         "predict on other features", "checkpoint-every without save", "other seed on resume", "momentum with adam",
         "checkpoint from the Python API", "bad val-split"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path, iris_checkpoint, case):
    args, message = bad_inputs(tmp_path, iris_checkpoint)[case]
    result = gpubp_cmd(*args) if "--backend" in args else gpubp_cmd(*args, "--backend", "numpy")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpubp: error: "), result.stderr
    assert message in lines[0]
    assert json.dumps(lines[0])           # printable as one line


def test_checkpoint_is_unchanged_by_a_failed_resume(tmp_path, iris_checkpoint):
    before = iris_checkpoint.read_bytes()
    gpubp_cmd("train", "--data", "iris", "--layers", "32", "--resume", iris_checkpoint, "--backend", "numpy")
    assert iris_checkpoint.read_bytes() == before


# ---- precision ----------------------------------------------------------------------------------------------------
def test_train_in_bf16_and_resume_keeps_it(tmp_path):
    result = ok("train", "--data", "breast_cancer", "--epochs", 2, "--backend", "numpy", "--precision", "bf16",
                "--save", tmp_path / "m.npz")
    assert "float32, precision bf16" in result.stdout.splitlines()[0]
    assert float(result.stdout.splitlines()[-1].split()[2].rstrip(",")) > 0.9
    assert gpubp.load(tmp_path / "m.npz", backend="numpy").precision == "bf16"
    resumed = ok("train", "--data", "breast_cancer", "--epochs", 3, "--backend", "numpy", "--resume", tmp_path / "m.npz")
    assert "precision bf16" in resumed.stdout.splitlines()[0]
    wrong = gpubp_cmd("train", "--data", "breast_cancer", "--epochs", 4, "--backend", "numpy", "--resume",
                      tmp_path / "m.npz", "--precision", "fp16")
    assert wrong.returncode == 2 and "precision bf16, not --precision fp16" in wrong.stderr


def test_fused_option_and_info(tmp_path):
    """--fused on|off|auto: the first line says when the fused MLP runs; on for a model that cannot is exit 2
    naming why; off is kept by the checkpoint; info says which backends have the fused path."""
    common = ("train", "--data", "breast_cancer", "--epochs", 1, "--backend", "numpy", "--layers", "16,16")
    assert "fused MLP" in ok(*common, "--precision", "bf16").stdout.splitlines()[0]
    off = ok(*common, "--precision", "bf16", "--fused", "off", "--save", tmp_path / "m.npz")
    assert "fused MLP" not in off.stdout.splitlines()[0]
    assert gpubp.load(tmp_path / "m.npz", backend="numpy").fused_setting is False
    bad = gpubp_cmd(*common, "--fused", "on")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--fused on: fused=True: this model cannot take the fused MLP path: precision 'fp32'" in bad.stderr
    info = ok("info").stdout.splitlines()
    fused_lines = info[[i for i, line in enumerate(info) if line.startswith("fused MLP")][0] + 1:]
    assert fused_lines[0].split()[:2] == ["numpy", "yes"]


@pytest.mark.parametrize("args, message", [
    (("--precision", "fp8"), "'fp8' is not one of"),
    (("--precision", "bf16", "--dtype", "float64"), "--precision bf16: needs --dtype float32"),
])
def test_bad_precision_is_one_line_exit_2(args, message):
    result = gpubp_cmd("train", "--data", "breast_cancer", "--epochs", 1, "--backend", "numpy", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
