"""bench/profile.sh and bench/profile_summary.py without a GPU: the dry run (and a machine without ncu) runs
nothing on a device, says so and exits 77, never under bench/results/; the CSV parser reads a SYNTHETIC fixture
(tests/fixtures/ncu_raw_SYNTHETIC.csv: hand-written in the layout of `ncu --csv --page raw --print-units base`,
NOT a measurement) and refuses the same file with a planted wrong column. No number here came from a GPU.
"""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import profile_step, profile_summary
from bench.profile_summary import ProfileCSVError, read_csv, summarize

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "profile.sh"
FIXTURE = ROOT / "tests" / "fixtures" / "ncu_raw_SYNTHETIC.csv"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="profile.sh needs bash and coreutils' timeout")


def run_script(out, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILE_")}
    env.update(PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    if out is not None:
        env["OUT"] = str(out)
    env.update(extra)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def results_listing():
    return sorted(p.name for p in (ROOT / "bench" / "results").iterdir())


@needs_bash
def test_dry_run_profiles_nothing_says_so_and_exits_77(tmp_path):
    before = results_listing()
    proc = run_script(tmp_path, PROFILE_DRY="1")
    assert proc.returncode == 77, proc.stdout + proc.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert run_dir.name.startswith("profile-dry-run-")
    summary = (run_dir / "summary.txt").read_text()
    assert "DRY RUN" in summary and "nothing ran on a GPU" in summary and "NOT a profile" in summary
    assert "no profile: no case CSV" in summary
    assert not list(run_dir.glob("*.csv"))
    status = [line.split("\t") for line in (run_dir / "status.tsv").read_text().splitlines()]
    assert [s[0] for s in status] == list(profile_step.CASES) and all(s[1] == "skipped" for s in status)
    # the commands that would run: one ncu per case, its window, filter and cap, clocks left alone
    with tarfile.open(run_dir / "extras.tar.gz") as tar:
        commands = tar.extractfile("extras/commands.txt").read().decode().splitlines()
    assert len(commands) == 4
    for line, (case, (_, regex, count)) in zip(commands, profile_step.CASES.items()):
        for flag in ("--profile-from-start off", "--clock-control none", "--graph-profiling node",
                     f"--launch-count {count}", "--section WarpStateStats", "--section Occupancy",
                     f"bench.profile_step --case {case}"):
            assert flag in line, (flag, line)
    assert "--launch-count 1 " in commands[3]
    assert len(list(run_dir.rglob("*"))) <= 8          # what the device tool brings back
    assert results_listing() == before


@needs_bash
def test_without_ncu_it_skips_with_77_and_never_writes_under_results(tmp_path):
    before = results_listing()
    proc = run_script(tmp_path, PROFILE_NCU=str(tmp_path / "no-such-ncu"))
    assert proc.returncode == 77, proc.stdout + proc.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "ncu not found" in (run_dir / "summary.txt").read_text()
    # a dry run pointed at bench/results/ is refused and leaves nothing there
    proc = run_script(None, PROFILE_DRY="1", PROFILE_DIR=str(ROOT / "bench" / "results" / "profile-dry-test"))
    assert proc.returncode == 2 and "refusing" in proc.stdout
    assert results_listing() == before


def test_parser_reads_the_synthetic_fixture(tmp_path):
    kernels = read_csv(FIXTURE)
    assert [k["id"] for k in kernels] == ["0", "1"]
    m0, m1 = kernels[0]["metrics"], kernels[1]["metrics"]
    assert m0["gpu__time_duration.sum"] == pytest.approx(100e-6)        # "100,000" nsecond
    assert m0["dram__bytes.sum"] == 12_582_912
    assert m0["device__attribute_display_name"] == "NVIDIA H100 (synthetic)"   # text columns are kept as text
    assert profile_summary.flops(m0)[1] == pytest.approx(2 * 1e9 + 1e6 + 1e6)
    assert profile_summary.flops(m1)[1] == pytest.approx(1e6 * 4096)
    shutil.copy(FIXTURE, tmp_path / "b-bf16.csv")
    text, ok = summarize(tmp_path)
    assert ok
    assert "SYNTHETIC FIXTURE: not a measurement" in text
    assert "fp32 SIMT 20 TFLOP/s" in text and "tensor 205 TFLOP/s" in text
    assert "achieved 45.5% vs theoretical 50.0%" in text and "10.5% of peak" in text
    assert "long_scoreboard 3.25, mio_throttle 2, barrier 1.5" in text
    assert "tensor pipe 60.0% of peak" in text
    assert "a-fp32: " in text and "no CSV" in text


def test_a_missing_metric_is_named_not_guessed(tmp_path):
    lines = FIXTURE.read_text().splitlines()
    rows = [line.split('","') for line in lines[1:]]
    drop = rows[0].index("sm__warps_active.avg.pct_of_peak_sustained_active")
    kept = ['","'.join(r[:drop] + r[drop + 1:]) for r in rows]
    (tmp_path / "a-fp32.csv").write_text("\n".join([lines[0]] + kept) + "\n")
    text, ok = summarize(tmp_path)
    assert ok and "achieved missing (sm__warps_active.avg.pct_of_peak_sustained_active not in the CSV)" in text


@pytest.mark.parametrize("plant, why", [
    (lambda t: t.replace('"%","%","%","%","",', '"%","%","%","warp","",', 1), "sm__warps_active.avg.pct_of_peak_sustained_active' has unit 'warp'"),
    (lambda t: t.replace('"10.5"', '"4800"', 1), "is not a percentage"),
    (lambda t: t.replace('"Kernel Name"', '"Kernel"', 1), "no 'Kernel Name' column"),
])
def test_a_planted_wrong_column_fails_the_check(tmp_path, plant, why):
    text = FIXTURE.read_text()
    planted = plant(text)
    assert planted != text
    path = tmp_path / "c-fused.csv"
    path.write_text(planted)
    with pytest.raises(ProfileCSVError, match=why):
        read_csv(path)
    summary, ok = summarize(tmp_path)
    assert not ok and "UNREADABLE" in summary
    assert profile_summary.main(["--dir", str(tmp_path)]) == 1


def test_model_flops_and_metric_filter():
    fwd = 2 * 1024 * (784 * 1024 + 1024 * 1024 + 1024 * 10)
    assert profile_step.MODEL_FLOPS("a-fp32") == 2 * fwd + 2 * 1024 * (1024 * 1024 + 1024 * 10)
    assert profile_step.MODEL_FLOPS("d-gemm-tc") == 2 * 4096 ** 3
    listing = "Device NVIDIA H100 (GH100)\ngpu__time_duration   Duration\ndram__bytes    bytes\n"
    assert profile_step.available_metrics(listing) == ["gpu__time_duration.sum", "dram__bytes.sum"]


FAKE_NCU = """#!/usr/bin/env bash
# A FAKE ncu for the driver's own logic (tests/test_profile.py): it profiles nothing and runs no GPU; it
# 'writes' the SYNTHETIC fixture as each report and prints it back on --import.
case "$1" in
  --query-metrics) printf 'Device FAKE\\ngpu__time_duration  Duration\\ndram__bytes  bytes\\n';;
  --version) echo 'FAKE ncu for tests';;
  --import) cat "$2";;
  *) while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
     case "$out" in *c-fused) echo '==ERROR== planted by the fake: no report'; exit 3;; esac
     cp "$FIXTURE" "$out.ncu-rep";;
esac
"""


@needs_bash
def test_the_driver_with_a_fake_ncu(tmp_path):
    """The non-dry path of profile.sh, end to end, with a FAKE ncu and nvidia-smi (nothing profiled, no GPU):
    each case is run, its report exported to <case>.csv and summarised; a case whose ncu fails is named as
    failed and the exit status is 1; the metric list keeps only what --query-metrics lists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ncu").write_text(FAKE_NCU)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'FAKE GPU, 0.0'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_script(out, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FIXTURE=str(FIXTURE),
                      PROFILE_CASES="a-fp32,c-fused,d-gemm-tc")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (run_dir,) = list(out.iterdir())
    assert run_dir.name.startswith("profile-fake-gpu-")
    status = {s.split("\t")[0]: s.split("\t") for s in (run_dir / "status.tsv").read_text().splitlines()}
    assert status["a-fp32"][1] == "passed" and status["d-gemm-tc"][1] == "passed"
    assert status["b-bf16"][1] == "skipped" and "not selected" in status["b-bf16"][4]
    assert status["c-fused"][1] == "failed" and "planted by the fake" in status["c-fused"][4]
    assert sorted(p.name for p in run_dir.glob("*.csv")) == ["a-fp32.csv", "d-gemm-tc.csv"]
    summary = (run_dir / "summary.txt").read_text()
    assert "SYNTHETIC FIXTURE: not a measurement" in summary and "tensor 205 TFLOP/s" in summary
    log = (run_dir / "profile.log").read_text()
    assert "# metrics: gpu__time_duration.sum,dram__bytes.sum\n" in log
    assert len(list(run_dir.rglob("*"))) <= 8
