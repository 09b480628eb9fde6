"""tests/conftest.py's summary of skips: one line per reason with its count, whatever file each skip came from
(pytest's own -rs prints a line per file and reason). Runs pytest on three small planted files."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_skips_are_counted_by_reason_across_files(tmp_path):
    for name, reasons in (("test_a.py", ["no GPU", "no GPU", "no torch"]), ("test_b.py", ["no GPU"]),
                          ("test_c.py", [])):
        tests = "".join(f"def test_{i}():\n    pytest.skip({r!r})\n\n" for i, r in enumerate(reasons))
        body = "import pytest\n\n" + tests
        (tmp_path / name).write_text(body + "def test_runs():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
                             "-rfExX", "-q", "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    start = next(i for i, line in enumerate(lines) if "4 skipped, by reason" in line)
    assert [line.strip() for line in lines[start + 1:start + 3]] == ["3 × no GPU", "1 × no torch"]
    assert not any(line.startswith("SKIPPED") for line in lines)          # no line per file as well
