"""Each script in examples/ runs as a user would run it (a subprocess, warnings as errors) and says what it
promises: the seed's numbers exactly, and >= 95% held-out accuracy on the two bundled sets."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args):
    result = subprocess.run([sys.executable, "-W", "error", str(EXAMPLES / name), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_seed_example_prints_and_checks_each_quantity():
    out = run_example("seed_example.py")
    assert "L = ½(y_hat − y)² = 2" in out
    assert "dL/dm2 = 12, dL/dm1 = 2" in out
    assert "m1 = 2.8, m2 = -0.7" in out
    assert "comes out exactly" in out


@pytest.mark.parametrize("name", ["breast_cancer_bce.py", "digits_softmax.py"])
def test_classifier_example_reaches_95_percent(name):
    pytest.importorskip("sklearn")
    out = run_example(name, "--backend", "numpy")
    accuracy = float(re.search(r"held-out accuracy: ([0-9.]+)", out).group(1))
    assert accuracy >= 0.95, out
