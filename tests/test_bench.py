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

    def weight_grad(self, delta, A_prev, dW, db, accumulate=False, precision="fp32"):
        super().weight_grad(delta, A_prev, dW, db, accumulate, precision)
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


def test_families_choose_implementations_and_limits():
    names, limits = suite.select_impls("ours-cupy", None)
    assert names == ["gpubp-cupy", "gpubp-cupy-numpy-batches", "gpubp-cupy-unchecked", "gpubp-cupy-graph8",
                     "gpubp-cupy-fused", "gpubp-cupy-per-layer"] and not limits
    names, limits = suite.select_impls("limits,torch", "jax-jit")
    assert names == ["torch-eager", "torch-graph", "jax-jit"] and limits
    assert suite.select_impls(None, None) == (None, True)
    with pytest.raises(ValueError, match="unknown 'nope'"):
        suite.select_impls("nope", None)
    every = {n for ns in impls.families().values() for n in ns}
    assert every == set(impls.registry())       # every implementation is in exactly one family


def test_rows_stream_to_jsonl_and_the_report_joins_the_processes(tmp_path):
    """Two runs (as gpu_check's family processes) append to one file; the report computes the ratios and the
    fractions of the limits across them, and skips a line cut off by a kill."""
    rows_file = tmp_path / "rows.jsonl"
    for family, limits in (("ours-numpy", True), ("torch-cpu", False)):
        names, _ = suite.select_impls(family, None)
        config = suite.Config(workloads=("train",), devices=("cpu",), smoke=True, log=lambda _: None, impls=names,
                              limits=limits, jsonl=str(rows_file))
        run = suite.run_suite(config)
        assert all(r["frac_of_limit"] is None for r in run.rows if r["impl"] == "torch-cpu")
    with open(rows_file, "a") as f:
        f.write('{"record": "row", "workload": "tr')          # a process killed mid-line
    loaded = report.load_jsonl([rows_file])
    assert loaded.bad_lines == 1 and loaded.limits["cpu"]["flops"] > 0
    ours = [r for r in loaded.rows if r["impl"] == "gpubp-numpy"]
    assert ours and all(r["frac_of_limit"] > 0 for r in ours)
    if any(r["impl"] == "torch-cpu" and r["status"] == "ok" for r in loaded.rows):
        assert all(r["ratio_to_peer"] > 0 for r in ours)
    assert report.main(["--jsonl", str(rows_file), "--out", str(tmp_path / "out"), "--stem", "bench",
                        "--no-plots"]) == 0
    assert "gpubp-numpy" in (tmp_path / "out" / "bench.txt").read_text()


class _OnDevice(np.ndarray):
    """An array HostInputsNumpy counts as its own device array."""


class HostInputsNumpy(NumpyBackend):
    """The numpy backend as a GPU backend sees NumPy batches: host arrays, copied into the workspace (only what
    its asarray returns is a device array); run_step records the step keys it is given as the cupy backend's
    graph cache does (second call with a key: a 'graph')."""

    def __init__(self):
        super().__init__()
        self._steps, self.graph_errors = {}, {}

    def asarray(self, x, dtype):
        return np.ascontiguousarray(x, dtype=dtype).view(_OnDevice)

    def is_device_array(self, x):
        return isinstance(x, _OnDevice)

    def run_step(self, key, fn):
        fn()
        if key is not None:
            self._steps[key] = "warm" if key not in self._steps else ("graph",)


def test_the_public_path_row_reaches_the_whole_step_graph():
    """The device-input row's step has key None (eager: its buffers are the caller's); the NumPy-batch row's
    whole step has a key, so a GPU backend replays it as a graph; each row's note says which steps were graphs."""
    mlp = suite.wl.MLP([6, 5, 3], 8, "softmax_ce")
    rng = np.random.default_rng(0)
    sets, params0 = suite.wl.train_sets(mlp, rng), suite.wl.initial_params(mlp, rng)
    check = suite.wl.train_reference(mlp, params0, sets)
    notes = {}
    for host in (False, True):
        runner = impls._gpubp_train("numpy", host_batches=host)(mlp, params0, sets, suite.wl.VALIDATE_LR,
                                                                backend=HostInputsNumpy())
        for i in suite.wl.check_calls("train", len(sets)):
            runner.run(i)
        assert check(runner.result(), "x") < 1e-3
        notes[host] = runner.info()
    graphed = {host: note.split(";")[0].removeprefix("CUDA graphs replayed: ").split(", ")
               for host, note in notes.items()}
    assert "train" in graphed[True] and "train" not in graphed[False], notes


def test_fit_rows_time_one_epoch_of_the_public_fit(tmp_path):
    lines = []
    run = suite.run_suite(smoke_config(lines, workloads=("fit",)), cpu_registry("gpubp-numpy"))
    rows = [r for r in run.rows if r["workload"] == "fit"]
    assert rows and all(r["status"] == "ok" and r["samples_per_s"] > 0 and r["rel_err"] < 1e-3 for r in rows)
    assert rows[0]["params"]["samples"] == 128 and rows[0]["params"]["epochs"] == 1
    assert "per step over the last epoch:" in rows[0]["note"], rows[0]["note"]     # the numpy backend counts


def test_a_bar_without_its_peer_says_no_peer_measured_not_misses():
    from types import SimpleNamespace
    row = dict.fromkeys(suite.ROW_FIELDS)
    row.update(workload="train", device="cpu", case="784-256-256-10 b256", impl="gpubp-numpy", status="ok",
               median_s=0.01, spread_s=0.001, peer="torch-cpu", spec_bar=1.25)
    without = dict(row, ratio_to_peer=None, meets_bar=None)
    slower = dict(row, ratio_to_peer=2.0, meets_bar=False)
    run = SimpleNamespace(rows=[without, slower], skipped=[], other_cpu_load=lambda: None, dry_run=False)
    first, second = [line for line in report.table(run).splitlines() if line.startswith("train ")]
    assert first.endswith("no peer measured: ≤ 1.25x torch-cpu") and "misses" not in first
    assert second.endswith("misses ≤ 1.25x torch-cpu")


def test_mixed_rows_train_in_bf16_and_skip_fp32_only_impls():
    """The mixed workload trains gpubp in precision="bf16" (the row's update differs from float64 by bf16's
    rounding, far above fp32's: it really ran in bf16) and asks no implementation that trains in fp32 only."""
    reg = cpu_registry("gpubp-numpy", "gpubp-numpy-unchecked")
    run = suite.run_suite(smoke_config([], workloads=("mixed",)), reg)
    rows = [r for r in run.rows if r["workload"] == "mixed"]
    assert [r["impl"] for r in rows] == ["gpubp-numpy"] and rows[0]["status"] == "ok", rows
    assert rows[0]["params"]["precision"] == "bf16" and rows[0]["case"].endswith(" bf16")
    assert 10 * suite.wl.TRAIN_TOL < rows[0]["rel_err"] < suite.wl.TRAIN_TOL_PRECISION["bf16"]


# ---- the fused workload (issue 13) ----------------------------------------------------------------------------------
FUSED_CPU = ("gpubp-numpy", "gpubp-numpy-fused", "gpubp-numpy-per-layer", "torch-cpu")


def test_fused_rows_on_the_cpu_name_their_path_and_draw_the_plot(tmp_path):
    """The fused workload's smoke rows: gpubp fused and per-layer (and torch CPU's autocast where installed), train
    and predict, bf16, checked within bf16's tolerance; the notes name the path that ran; the table has issue 13's
    lines with tiny-cuda-nn's figure marked published, not measured; the log-log plot is written to tmp_path."""
    run = suite.run_suite(smoke_config([], workloads=("fused",)), cpu_registry(*FUSED_CPU))
    rows = [r for r in run.rows if r["workload"] == "fused"]
    assert rows and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert "gpubp-numpy" not in {r["impl"] for r in rows}    # the plain row does not repeat the fused one
    expected = {"gpubp-numpy-fused", "gpubp-numpy-per-layer"}
    if run.probe(impls.registry()["torch-cpu"])[0]:
        expected.add("torch-cpu")
    for kind in ("train", "predict"):
        assert {r["impl"] for r in rows if r["params"]["kind"] == kind} == expected, kind
    path = {"gpubp-numpy-fused": "path: fused MLP", "gpubp-numpy-per-layer": "path: per-layer kernels"}
    for r in rows:
        assert r["params"]["precision"] == "bf16" and r["case"].endswith(" " + r["params"]["kind"])
        assert r["samples_per_s"] > 0 and 0 < r["rel_err"] < suite.wl.TRAIN_TOL_PRECISION["bf16"]
        assert r["frac_of_tensor_peak"] is None     # the H100's peak says nothing about a CPU
        if r["impl"] in path:
            assert r["note"].endswith(path[r["impl"]]), r["note"]
        if "torch-cpu" in expected:
            assert r["peer"] == "torch-cpu" and r["ratio_to_peer"] > 0
    text = report.table(run)
    assert "fused MLP (issue 13)" in text and "published, not measured: tiny-cuda-nn" in text
    paths = report.save(run, tmp_path, plots=True)
    plot = [p for p in paths if p.name.endswith("_fused.png")]
    assert plot == [tmp_path / plot[0].name] and plot[0].stat().st_size > 1000
    drawn = report.fused_rows_to_plot(run.rows)
    assert {r["params"]["batch"] for r in drawn} == {64, 128} and {r["params"]["kind"] for r in drawn} == {"train"}


def test_a_wrong_prediction_is_refused():
    """A predict runner whose output is 20% off (bf16's predict tolerance, 5%, lets a 1% error through), and one
    that keeps predicting the first set it was given (a graph replayed on stale buffers): both REFUSED, never
    timed."""
    make = impls._gpubp_predict("numpy", True)

    def off(*args):
        runner = make(*args)
        result = runner.result
        runner.result = lambda: result() * np.float32(1.2)
        return runner

    def stale(*args):
        runner = make(*args)
        run_ = runner.run
        runner.run = lambda i: run_(1)
        return runner
    reg = cpu_registry("gpubp-numpy-fused")
    for name, factory in (("gpubp-off", off), ("gpubp-stale", stale)):
        reg[name] = impls.Impl(name, "cpu", lambda: (True, ""), ours=True, predict=factory, precisions=("bf16",),
                               only=("fused",))
    run = suite.run_suite(smoke_config([], workloads=("fused",)), reg)
    for name in ("gpubp-off", "gpubp-stale"):
        bad = [r for r in run.rows if r["impl"] == name]
        assert bad and all(r["status"] == "failed" and r["error"].startswith("REFUSED") for r in bad), bad
        assert all(r["samples_per_s"] is None for r in bad)
    assert all(r["status"] == "ok" for r in run.rows if r["impl"] == "gpubp-numpy-fused")


def test_fused_gpu_rows_read_as_a_fraction_of_the_tensor_peak(monkeypatch, tmp_path):
    """The GPU path of the fused workload with CPU stand-ins registered as GPU implementations: the peer is torch
    eager (autocast), each row has its fraction of TENSOR_PEAK_BF16, the log names the published figure."""
    fused, per_layer = impls._fused_pair("numpy", "cuda", "ours-cupy")
    fake = {"gpubp-cupy-fused": fused, "gpubp-cupy-per-layer": per_layer,
            "torch-eager": impls.Impl("torch-eager", "cuda", impls._torch_cpu_probe, train=impls._torch_train("cpu"),
                                      predict=impls._torch_predict("cpu"), precisions=impls.MIXED)}
    monkeypatch.setattr(suite, "_cuda_limits", lambda run, rng, t: {"flops": 1e12, "bytes": 1e11})
    lines = []
    run = suite.run_suite(suite.Config(workloads=("fused",), devices=("cuda",), smoke=True, log=lines.append), fake)
    ours = [r for r in run.rows if r["impl"].startswith("gpubp-numpy-")]
    assert len(ours) == 8 and all(r["status"] == "ok" and r["peer"] == "torch-eager" for r in ours), ours
    for r in ours:
        assert r["frac_of_tensor_peak"] == pytest.approx(r["flops"] / r["median_s"] / suite.TENSOR_PEAK_BF16)
    assert any(suite.TINY_CUDA_NN in line for line in lines)
    assert any(suite.TENSOR_PEAK_SOURCE in line for line in lines)
    plot = report.fused_plot(run.rows, tmp_path / "stand-ins", {"device": "CPU stand-ins", "date_utc": "x" * 10})
    assert plot and plot[0].stat().st_size > 1000      # with tiny-cuda-nn's published band beside the lines


def test_the_moonshot_bar_sits_on_the_fused_row_at_width_64():
    """>= 1.5e9 training samples/s and >= 10x PyTorch bf16 eager, on gpubp-cupy-fused at the largest width-64
    batch, which --quick runs too; met only when both hold; no ratio: 'no peer measured'; too slow: missed."""
    (key, bar), = [(k, v) for k, v in suite.SPEC_BARS.items() if k[1] == "fused"]
    case = key[2]
    for quick in (False, True):
        assert case in dict(suite.wl.fused_cases("cuda", quick))
    assert bar == {"ratio": 0.1, "samples_per_s": 1.5e9, "impl": "gpubp-cupy-fused"}
    N = dict(suite.wl.fused_cases("cuda", False))[case].batch

    def rows(ours_s, peer_s):
        out = []
        for impl, t in (("gpubp-cupy-fused", ours_s), ("gpubp-cupy-per-layer", ours_s), ("torch-eager", peer_s)):
            if t is not None:
                out.append(suite.new_row(workload="fused", case=case, impl=impl, device="cuda", status="ok",
                                         median_s=t, spread_s=0.0, samples_per_s=N / t,
                                         params={"kind": "train", "dims": [64] * 5 + [1], "batch": N}))
        suite.add_ratios(out)
        return out
    fast = N / 2e9
    met, _, _ = rows(fast, 11 * fast)
    assert met["meets_bar"] is True and met["spec_bar_samples_per_s"] == 1.5e9
    assert rows(fast, 9 * fast)[0]["meets_bar"] is False                # fast enough, but < 10x torch
    assert rows(N / 1e9, 100 * N / 1e9)[0]["meets_bar"] is False         # 100x torch, but < 1.5e9 samples/s
    assert rows(fast, None)[0]["meets_bar"] is None                      # no torch row: neither met nor missed
    assert rows(N / 1e9, None)[0]["meets_bar"] is False                  # too slow whatever torch does
    assert all(r["spec_bar"] is None for r in rows(fast, 11 * fast)[1:])  # per-layer and torch carry no bar
    from types import SimpleNamespace
    table = report.table(SimpleNamespace(rows=[met], skipped=[], other_cpu_load=lambda: None, dry_run=False))
    assert "moonshot (H100): MEETS ≥ 1.5e+09 samp/s and ≤ 0.10x torch-eager" in table


def test_the_predict_check_measures_against_the_outputs_variation():
    """An output mostly bias (here the last bias + 100: the same for every row) must not let the prediction of the
    wrong input set through: the check divides by ‖ref − mean(ref)‖, where ‖ref‖ would make it pass."""
    spec = suite.wl.FusedMLP(suite.wl.fused_dims(16), 256, "predict")
    rng = np.random.default_rng(0)
    sets, params0 = suite.wl.train_sets(spec, rng), suite.wl.initial_params(spec, rng)
    params0[-1]["b"] = params0[-1]["b"] + np.float32(100)
    check = suite.wl.predict_reference(spec, params0, sets, rng)
    runner = impls._gpubp_predict("numpy", True)(spec, params0, sets)
    runner.run(0)
    assert check(runner.result(), "right set") < 0.02
    runner.run(1)
    with pytest.raises(timing.Refused, match="disagrees"):
        check(runner.result(), "wrong set")


class WayOffWeightGrad(NumpyBackend):
    """The numpy backend with a 20% error in dW (bf16's training tolerance, 10%, would let 5% through)."""

    def weight_grad(self, delta, A_prev, dW, db, accumulate=False, precision="fp32"):
        super().weight_grad(delta, A_prev, dW, db, accumulate, precision)
        dW *= 1.2


def test_a_wrong_fused_train_step_is_refused():
    """The fused rows' train step (sync=False: nothing is read per step) is still checked: a dW 20% off, on the
    fused path, is REFUSED."""
    make = impls._gpubp_train("numpy", fused=True, sync=False)
    reg = cpu_registry("gpubp-numpy-fused")
    reg["gpubp-off"] = impls.Impl("gpubp-off", "cpu", lambda: (True, ""), ours=True, precisions=("bf16",),
                                  only=("fused",), train=lambda *a: make(*a, backend=WayOffWeightGrad()))
    run = suite.run_suite(smoke_config([], workloads=("fused",)), reg)
    bad = [r for r in run.rows if r["impl"] == "gpubp-off"]
    assert len(bad) == 2 and all(r["error"].startswith("REFUSED") for r in bad), bad
    assert all(r["status"] == "ok" for r in run.rows if r["impl"] == "gpubp-numpy-fused")
