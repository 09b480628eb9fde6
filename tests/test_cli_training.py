"""The command line's training options (issue 14): --weight-decay, --schedule, --warmup, --early-stopping,
--threads; predict --proba and its score; string class labels; epochs counted from 1 in every message; the
summary saying what a resumed run covers; and each new option's bad value as one line, exit 2. Small runs
(iris, a 100-row CSV), the numpy backend, as tests/test_cli.py."""
import csv

import numpy as np
import pytest

import gpubp
from gpubp import data as gdata
from test_cli import cli_meta, gpubp_cmd, ok, read_predictions


def yes_no_csv(path, n=100):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 2))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "kind"])
        for a, b in X:
            writer.writerow([f"{a:.5f}", f"{b:.5f}", "yes" if a + b > 0 else "no"])
    return np.where(X.sum(axis=1) > 0, "yes", "no")


def test_string_labels_train_predict_and_proba(tmp_path):
    labels = yes_no_csv(tmp_path / "t.csv")
    ok("train", "--data", tmp_path / "t.csv", "--epochs", 8, "--layers", 8, "--backend", "numpy",
       "--optimizer", "adam", "--lr", "0.02", "--weight-decay", "1e-4", "--schedule", "cosine", "--warmup", 2,
       "--save", tmp_path / "m.npz")
    net = gpubp.load(tmp_path / "m.npz", backend="numpy")
    assert net.classes.tolist() == ["no", "yes"] and net.loss == "bce"          # the model keeps its labels
    assert repr(net.optimizer).startswith("Adam(lr=Cosine(lr=0.02, total=8, warmup=2")
    assert net.optimizer.weight_decay == 1e-4

    result = ok("predict", tmp_path / "m.npz", "--data", tmp_path / "t.csv")
    header, rows = read_predictions(result.stdout)
    assert header == ["prediction"] and {r[0] for r in rows} <= {"yes", "no"}
    accuracy = np.mean(np.array([r[0] for r in rows]) == labels)
    assert f"t.csv: accuracy {accuracy:.4f} on 100 labelled rows" in result.stderr and accuracy > 0.8

    header, rows = read_predictions(ok("predict", tmp_path / "m.npz", "--data", tmp_path / "t.csv", "--proba").stdout)
    assert header == ["proba_no", "proba_yes"] and len(rows) == 100
    proba = np.array(rows, dtype=float)
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-6)
    features = gdata.Standardizer.from_dict(cli_meta(tmp_path / "m.npz")["features"])
    X = features.transform(gdata.read_csv(tmp_path / "t.csv").X)
    np.testing.assert_allclose(proba[:, 1], net.predict_proba(X)[:, 0], rtol=1e-6)   # the model's own probabilities


def test_early_stopping_ends_the_run_normally_and_says_so(tmp_path):
    result = ok("train", "--data", "iris", "--epochs", 200, "--layers", 8, "--lr", "0.5", "--backend", "numpy",
                "--early-stopping", 2, "--threads", 1, "--save", tmp_path / "m.npz")
    done = int(result.stdout.split(" of 200 epochs done")[0].split()[-1])
    assert 2 < done < 200
    assert f"stopped after epoch {done}: early stopping: val_loss did not improve" in result.stdout
    history = cli_meta(tmp_path / "m.npz")["history"]
    assert len(history["val_loss"]) == done and int(np.argmin(history["val_loss"])) == done - 3   # patience 2


def test_a_fault_names_epoch_1_and_the_summary_says_what_the_run_covers(tmp_path):
    data = tmp_path / "t.csv"            # a CSV, not a bundled set: no scikit-learn to import, 3 runs stay quick
    yes_no_csv(data)
    result = gpubp_cmd("train", "--data", data, "--epochs", 3, "--layers", 8, "--lr", "1e30", "--backend", "numpy")
    assert result.returncode == 1 and "gpubp: training stopped early: epoch 1, batch " in result.stderr
    assert "0 of 3 epochs done; this run: no epoch" in result.stdout

    ok("train", "--data", data, "--epochs", 2, "--layers", 8, "--backend", "numpy", "--save", tmp_path / "m.npz",
       "--schedule", "step")
    resumed = ok("train", "--data", data, "--epochs", 5, "--backend", "numpy", "--resume", tmp_path / "m.npz")
    assert "; 5 of 5 epochs done; this run: epochs 3-5, " in resumed.stdout.splitlines()[-1]
    assert repr(gpubp.load(tmp_path / "m.npz", backend="numpy").optimizer.schedule).startswith("StepDecay(")


@pytest.mark.parametrize("args, message", [
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--early-stopping", "0"], "--early-stopping"),
    (["--early-stopping", "soon"], "--early-stopping"),
    (["--schedule", "linear"], "--schedule"),
    (["--schedule", "step", "--warmup", "2"], "--warmup: applies to --schedule cosine"),
    (["--schedule", "cosine", "--warmup", "0"], "--warmup"),
    (["--schedule", "cosine", "--warmup", "30"], "--warmup 30: must be fewer than --epochs (30)"),
    (["--threads", "0"], "--threads"),
])
def test_each_new_option_with_a_bad_value_is_one_line_and_exit_2(args, message):
    result = gpubp_cmd("train", "--data", "iris", "--backend", "numpy", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpubp: error: ") and message in lines[0], result.stderr


def test_proba_of_a_regression_and_a_schedule_on_resume_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "r.npz", X=rng.standard_normal((50, 2)), y=rng.standard_normal(50))
    ok("train", "--data", tmp_path / "r.npz", "--epochs", 1, "--layers", "", "--backend", "numpy",
       "--save", tmp_path / "m.npz")
    for args, message in ((["predict", tmp_path / "m.npz", "--data", tmp_path / "r.npz", "--proba"],
                           "regression (loss mse); it has no probabilities"),
                          (["train", "--data", tmp_path / "r.npz", "--resume", tmp_path / "m.npz", "--epochs", 2,
                            "--schedule", "cosine"], "drop --lr, --momentum, --weight-decay and --schedule")):
        result = gpubp_cmd(*args, "--backend", "numpy")
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
