"""bench/gpu_check.sh proven on the CPU: a dry run (GPU_CHECK_DRY=1: cupy on the CPU emulator of
tests/cuda_emulation, numba on its simulator, tiny sizes, CPU bench families, into a temporary folder) runs
every stage, writes each stage's files, and survives failures planted on purpose (GPU_CHECK_PLANT_FAILURE);
a stage cut by its time budget still leaves its partial output and a status line; a driver killed mid-stage
leaves a summary naming the stage it was in. Nothing here is a GPU result, and nothing goes to bench/results/.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["versions", "smoke-cupy", "smoke-numba", "sanitizer-memcheck", "sanitizer-racecheck",
          "sanitizer-synccheck", "tests", "bench-limits", "bench-ours-numpy", "bench-torch-cpu", "gemm-tc", "report"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="gpu_check.sh needs bash and coreutils' timeout"),
              pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                 reason="runs in the main test process (it starts its own simulator process)")]


def dry_env(out, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "NUMBA_ENABLE_CUDASIM"))}
    env.update(GPU_CHECK_DRY="1", OUT=str(out), PYTHON=sys.executable, GPU_CHECK_GRACE_SECONDS="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run_dry(out, timeout=240, **extra):
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=dry_env(out, **extra), capture_output=True, text=True,
                          timeout=timeout)
    folders = [p for p in Path(out).iterdir() if p.is_dir()]
    assert len(folders) == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc, folders[0], time.monotonic() - started


def stages(run_dir):
    with open(run_dir / "stages.tsv") as f:
        return {r["stage"]: r for r in csv.DictReader(f, delimiter="\t")}


def results_listing():
    return sorted(p.name for p in (ROOT / "bench" / "results").iterdir())


def test_dry_run_runs_every_stage_and_survives_planted_failures(tmp_path):
    """Three stages fail on purpose, each through its own check: the smoke comparison (a wrong value written
    into a kernel's output), the test suite (a failing test), the bench's reference check (a result 1% off).
    Every later stage still runs; the summary names each failed stage with its first error."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the CPU emulator of the cupy backend cannot be built")
    before = results_listing()
    packed = tmp_path.parent / (tmp_path.name + "-packed")
    proc, run_dir, seconds = run_dry(tmp_path, GPU_CHECK_PLANT_FAILURE="smoke-cupy,tests,bench-ours-numpy",
                                     GPU_CHECK_PACK_TO=str(packed))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    st = stages(run_dir)
    assert list(st) == STAGES, log[-3000:]
    status = {name: r["status"] for name, r in st.items()}
    assert status == {"versions": "passed", "smoke-cupy": "failed", "smoke-numba": "passed",
                      "sanitizer-memcheck": "skipped", "sanitizer-racecheck": "skipped",
                      "sanitizer-synccheck": "skipped", "tests": "failed", "bench-limits": "passed",
                      "bench-ours-numpy": "failed", "bench-torch-cpu": "passed", "gemm-tc": "skipped",
                      "report": "passed"}, log[-4000:]
    # each planted failure is caught by the stage's own check, and named as its first error
    assert st["smoke-cupy"]["first_error"].startswith("FAIL: cupy (CPU emulator)") and "off" in \
        st["smoke-cupy"]["first_error"]
    assert "test_planted_failure" in st["tests"]["first_error"]
    assert "REFUSED" in st["bench-ours-numpy"]["first_error"] and "planted-wrong" in st["bench-ours-numpy"]["first_error"]
    assert "not installed" in st["sanitizer-memcheck"]["first_error"]
    summary = (run_dir / "summary.txt").read_text()
    assert "DRY RUN" in summary and "stages failed: 3" in summary
    for name in ("smoke-cupy", "tests", "bench-ours-numpy"):
        line = next(x for x in summary.splitlines() if x.startswith(name + " "))
        assert "failed" in line and st[name]["first_error"][:60] in line
    # every stage wrote its files
    for name in STAGES:
        assert (run_dir / "status" / name).read_text().startswith(name + "\t")
        if not name.startswith("sanitizer"):
            assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0, name
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["dry_run"] is True and versions["python"] and "availability" in versions["gpubp"]
    smoke = [json.loads(x) for x in (run_dir / "smoke" / "cupy.jsonl").read_text().splitlines()]
    assert smoke[0]["planted"] and smoke[0]["status"] == "failed"
    # the rest agree; an op this backend does not implement yet is listed as missing, not failed
    assert all(r["status"] in ("ok", "missing") for r in smoke[1:]) and any(r["status"] == "ok" for r in smoke[1:])
    numba = [json.loads(x) for x in (run_dir / "smoke" / "numba.jsonl").read_text().splitlines()]
    assert numba and {r["op"] for r in numba} >= {"dense_forward", "weight_grad", "loss_grad", "adam_update"}
    junit = (run_dir / "tests" / "junit.xml").read_text()
    assert "test_planted_failure" in junit and "<failure" in junit
    records = [json.loads(x) for x in (run_dir / "bench" / "rows.jsonl").read_text().splitlines()]
    rows = [r for r in records if r["record"] == "row"]
    assert {r["impl"] for r in rows} >= {"gpubp-numpy", "gpubp-numpy-planted-wrong", "numpy"}
    assert any(r["workload"] == "fit" and r["status"] == "ok" for r in rows)
    assert all(s["dry_run"] for s in records if s["record"] == "start")
    table = (run_dir / "bench" / "bench.txt").read_text()
    assert "DRY RUN" in table and "FAILED: REFUSED" in table
    assert json.loads((run_dir / "bench" / "bench.json").read_text())["environment"]["dry_run"] is True
    assert results_listing() == before          # a dry run never writes under bench/results/
    # packed for the device tool (8 files at most come back): the whole folder in one archive, the summary beside
    assert sorted(p.name for p in packed.iterdir()) == [f"{run_dir.name}-summary.txt", f"{run_dir.name}.tar.gz"]
    assert (packed / f"{run_dir.name}-summary.txt").read_text() == summary
    with tarfile.open(packed / f"{run_dir.name}.tar.gz") as tar:
        names = set(tar.getnames())
        assert {f"{run_dir.name}/{p.relative_to(run_dir)}" for p in run_dir.rglob("*")} <= names
        assert tar.extractfile(f"{run_dir.name}/summary.txt").read().decode() == summary
    print(f"dry run with planted failures: {seconds:.1f} s")


def test_a_stage_cut_by_its_budget_leaves_its_output_and_a_status(tmp_path):
    """A stage past its budget is cut (SIGINT, then KILL) and recorded as a timeout with its log: pytest cut
    mid-run by its budget still prints its summary and writes its junit xml (timeout -s INT); the versions
    stage, given 1 s, either finishes or is cut and says so (how long it takes depends on the machine); the
    report stage, with no bench rows at all, fails saying so; the stages not selected are recorded as skipped."""
    slow = tmp_path / "suite" / "test_slow.py"
    slow.parent.mkdir()
    slow.write_text("import time\n\ndef test_fast():\n    pass\n\ndef test_slow():\n    time.sleep(120)\n")
    out = tmp_path / "out"
    out.mkdir()
    proc, run_dir, seconds = run_dry(out, GPU_CHECK_ONLY="versions,tests,report", GPU_CHECK_BUDGET_VERSIONS="1",
                                     GPU_CHECK_BUDGET_TESTS="8", GPU_CHECK_TESTS=str(slow))
    log = proc.stdout + proc.stderr
    st = stages(run_dir)
    assert st["versions"]["status"] in ("passed", "timeout"), log[-3000:]
    if st["versions"]["status"] == "timeout":
        assert st["versions"]["exit"] in ("124", "137") and st["versions"]["first_error"].startswith("timed out at 1 s")
    assert (run_dir / "logs" / "versions.log").read_text().startswith("## versions:")
    assert st["tests"]["status"] == "timeout" and st["tests"]["exit"] in ("124", "137"), log[-3000:]
    assert st["tests"]["first_error"].startswith("timed out at 8 s")
    tests_log = (run_dir / "logs" / "tests.log").read_text()
    assert "KeyboardInterrupt" in tests_log and "1 passed" in tests_log      # pytest's own summary
    junit = (run_dir / "tests" / "junit.xml").read_text()
    assert 'name="test_fast"' in junit
    assert st["report"]["status"] == "failed" and "no rows file" in st["report"]["first_error"]
    assert st["smoke-cupy"]["status"] == "skipped" and "not selected" in st["smoke-cupy"]["first_error"]
    assert seconds < 60, seconds


def test_a_driver_killed_mid_stage_leaves_a_summary(tmp_path):
    """The summary is rewritten before each stage starts: a run killed in the middle of one (the device call's
    own limit, say) leaves every finished stage's results and names the stage it was in."""
    env = dry_env(tmp_path, GPU_CHECK_ONLY="versions,smoke-numba")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            found = list(tmp_path.glob("*/status/smoke-numba"))
            if found and found[0].read_text().split("\t")[1:2] == ["running"]:
                status = found[0]
                break
            time.sleep(0.2)
        assert status is not None, "smoke-numba never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)      # everything the driver started, as a device call's end does
        proc.wait()
    run_dir = status.parents[1]
    summary = (run_dir / "summary.txt").read_text()
    assert any(x.startswith("versions ") and "passed" in x for x in summary.splitlines())
    assert any(x.startswith("smoke-numba ") and "running" in x for x in summary.splitlines())
    assert any(x.startswith("report ") and "pending" in x for x in summary.splitlines())
    assert (run_dir / "versions.json").exists()
