"""The benchmark harness (bench/), on the CPU at tiny sizes: it writes every field, skips absent peers with a
line saying why, and refuses a result that disagrees with the numpy reference (never reports it as a time)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

# bench/ is a top-level package of the repository, not of the installed gpubp: import it from the checkout
# (plain `pytest` puts tests/ on sys.path, not the root; pyproject's `pythonpath = ["."]` would do the same).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import impls, report, suite, timing  # noqa: E402
from gpubp.backends.numpy_backend import NumpyBackend  # noqa: E402


def smoke_config(lines, workloads=("gemm", "train")):
    return suite.Config(workloads=workloads, devices=("cpu",), smoke=True, log=lines.append)


def cpu_registry(*names):
    reg = impls.registry()
    return {name: reg[name] for name in names}


def test_json_has_every_field(tmp_path):
    lines = []
    run = suite.run_suite(smoke_config(lines), cpu_registry("gpubp-numpy", "gpubp-numpy-unchecked", "torch-cpu"))
    paths = report.save(run, tmp_path, plots=True)
    data = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    env = data["environment"]
    for key in ("device", "device_label", "date_utc", "cpu", "threads", "versions", "git_commit"):
        assert key in env, key
    assert env["device_label"].startswith("cpu-") and env["versions"]["numpy"] == np.__version__
    assert data["limits"]["cpu"]["flops"] > 0 and data["limits"]["cpu"]["bytes"] > 0
    rows = data["rows"]
    assert {r["workload"] for r in rows} == {"limits", "gemm", "train"}
    for r in rows:
        assert set(r) == set(suite.ROW_FIELDS), set(r) ^ set(suite.ROW_FIELDS)
    ours = [r for r in rows if r["impl"] == "gpubp-numpy"]
    assert ours and all(r["status"] == "ok" for r in ours), [r["error"] for r in ours]
    for r in ours:
        assert r["median_s"] > 0 and r["spread_s"] >= 0 and r["repeats"] >= 3
        assert 0 <= r["rel_err"] < 1e-3 and r["frac_of_limit"] > 0 and r["limit"]
        assert (r["samples_per_s"] if r["workload"] == "train" else r["tflops"]) > 0
        assert r["peer"] == "torch-cpu"
    if any(r["impl"] == "torch-cpu" and r["status"] == "ok" for r in rows):
        assert all(r["ratio_to_peer"] > 0 for r in ours)
    # the table and the plots come with it, named by device and date
    stem = paths[0].stem
    assert (tmp_path / f"{stem}.txt").read_text().count("gpubp-numpy") >= 2
    assert (tmp_path / f"{stem}_gemm.png").stat().st_size > 1000


def test_absent_peer_is_skipped_with_a_line(monkeypatch):
    reg = cpu_registry("gpubp-numpy", "torch-cpu")
    monkeypatch.setattr(reg["torch-cpu"], "probe", lambda: (False, "torch is not installed (simulated)"))
    lines = []
    run = suite.run_suite(smoke_config(lines, workloads=("train",)), reg)
    assert not any(r["impl"] == "torch-cpu" for r in run.rows)
    assert any("torch-cpu" in s["what"] and "simulated" in s["reason"] for s in run.skipped)
    assert any(line.strip().startswith("skipped: torch-cpu") and "simulated" in line for line in lines)
    ours = [r for r in run.rows if r["impl"] == "gpubp-numpy"]
    assert ours and all(r["status"] == "ok" and r["ratio_to_peer"] is None for r in ours)
    assert "skipped: torch-cpu" in report.table(run)


def test_no_gpu_skips_every_gpu_workload(monkeypatch):
    reg = impls.registry()
    for impl in reg.values():
        if impl.device == "cuda":
            monkeypatch.setattr(impl, "probe", lambda: (False, "no GPU (simulated)"))
    reg = {k: v for k, v in reg.items() if v.device == "cuda" or k == "gpubp-numpy"}
    lines = []
    config = suite.Config(workloads=("gemm",), devices=("cuda", "cpu"), smoke=True, log=lines.append)
    run = suite.run_suite(config, reg)
    assert not any(r["device"] == "cuda" for r in run.rows)
    assert any("every GPU workload" in line and "no GPU (simulated)" in line for line in lines)


class WrongWeightGrad(NumpyBackend):
    """The numpy backend with a 1% error in dW: a kernel bug the harness must catch."""

    def weight_grad(self, delta, A_prev, dW, db, accumulate=False):
        super().weight_grad(delta, A_prev, dW, db, accumulate)
        dW *= 1.01


def test_a_result_that_disagrees_is_refused():
    make_train = impls._gpubp_train("numpy")
    broken_train = impls.Impl("gpubp-broken", "cpu", lambda: (True, ""), ours=True,
                              train=lambda *a: make_train(*a, backend=WrongWeightGrad()),
                              gemm=lambda sets: _off_by_a_bit(impls._gpubp_gemm("numpy")(sets)))
    reg = cpu_registry("gpubp-numpy")
    reg["gpubp-broken"] = broken_train
    lines = []
    run = suite.run_suite(smoke_config(lines), reg)
    broken = [r for r in run.rows if r["impl"] == "gpubp-broken"]
    assert {r["workload"] for r in broken} == {"gemm", "train"}
    for r in broken:
        assert r["status"] == "failed" and r["error"].startswith("REFUSED")
        assert "disagrees" in r["error"]
        assert r["median_s"] is None and r["samples_per_s"] is None and r["tflops"] is None
    assert all(r["status"] == "ok" for r in run.rows if r["impl"] == "gpubp-numpy")
    assert any("gpubp-broken" in line and "REFUSED" in line for line in lines)
    assert "FAILED: REFUSED" in report.table(run)


def _off_by_a_bit(runner):
    result = runner.result
    runner.result = lambda: result() * np.float32(1.001)
    return runner


def test_check_refuses_nan_and_wrong_shape():
    ref = np.ones((3, 2))
    assert timing.check(ref + 1e-9, ref, 1e-6, "x") < 1e-6
    for bad in (np.full((3, 2), np.nan), np.ones((2, 3)), ref * 1.1):
        with pytest.raises(timing.Refused):
            timing.check(bad, ref, 1e-6, "x")


def test_timer_cycles_input_sets_and_takes_the_median():
    seen = []
    t = timing.measure(seen.append, lambda: None, n_sets=3, repeats=5, warmup=2, target_s=0.0, budget_s=1.0)
    assert set(seen) == {0, 1, 2} and t.median >= 0 and t.samples.size >= 3


def test_main_writes_files_and_returns_zero(tmp_path, capsys):
    from bench import main
    assert main(["--smoke", "--device", "cpu", "--workloads", "gemm", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "gpubp-numpy" in out and "wrote" in out
    assert len(list(tmp_path.glob("cpu-*.json"))) == 1


def test_a_step_that_keeps_reading_its_first_inputs_is_refused():
    """A CUDA graph replayed on the buffers of its capture, simulated: every call works on input set 0."""
    make_train = impls._gpubp_train("numpy")

    def stale(*args):
        runner = make_train(*args)
        run = runner.run
        runner.run = lambda i: run(0)
        return runner
    reg = cpu_registry("gpubp-numpy")
    reg["gpubp-stale"] = impls.Impl("gpubp-stale", "cpu", lambda: (True, ""), ours=True, train=stale)
    run = suite.run_suite(smoke_config([], workloads=("train",)), reg)
    stale_rows = [r for r in run.rows if r["impl"] == "gpubp-stale"]
    assert stale_rows and all(r["error"].startswith("REFUSED") for r in stale_rows)


def test_gpu_rows_are_compared_with_torch_eager(monkeypatch):
    """The GPU path of the suite, with CPU stand-ins registered as GPU implementations (no GPU needed)."""
    fake = {
        "gpubp-cupy": impls.Impl("gpubp-cupy", "cuda", lambda: (True, ""), ours=True,
                                 train=impls._gpubp_train("numpy")),
        "torch-eager": impls.Impl("torch-eager", "cuda", impls._torch_cpu_probe, train=impls._torch_train("cpu")),
    }
    monkeypatch.setattr(suite, "_cuda_limits", lambda run, rng, t: {"flops": 1e12, "bytes": 1e11})
    run = suite.run_suite(suite.Config(workloads=("train",), devices=("cuda",), smoke=True, log=lambda _: None),
                          fake)
    ours = [r for r in run.rows if r["impl"] == "gpubp-cupy"]
    assert ours and all(r["status"] == "ok" and r["peer"] == "torch-eager" for r in ours)
    if run.probe(fake["torch-eager"])[0]:
        assert all(r["ratio_to_peer"] > 0 for r in ours)
    assert all(0 < r["frac_of_limit"] for r in ours)
