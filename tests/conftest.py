"""Shared test setup: backends as a parameter, the `gpu` marker, sizes that suit the CUDA simulator.

Tests that take the `backend_name` fixture run once per backend: numpy always; cupy and numba where they can
run (a real GPU, or numba under NUMBA_ENABLE_CUDASIM=1 in its own pytest process, see tests/run.sh). A GPU
backend that cannot run here is skipped with the reason its probe gives; `--require-gpu` turns those skips into
an error on the GPU machine, so a broken CUDA setup cannot pass as skipped."""
import os
import zlib

import numpy as np
import pytest

from gpubp.backends import availability

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
_AVAILABILITY = {}


def backend_status(name):
    """(usable, reason) for a backend name, probed once per process."""
    if not _AVAILABILITY:
        _AVAILABILITY.update(availability())
    return _AVAILABILITY[name]


def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true",
                     help="fail, instead of skipping, tests marked gpu when no GPU backend can run")


def pytest_generate_tests(metafunc):
    if "backend_name" in metafunc.fixturenames:
        params = []
        for name in ("numpy", "cupy", "numba"):
            marks = [] if name == "numpy" else [pytest.mark.gpu] if name == "cupy" else [pytest.mark.numba]
            params.append(pytest.param(name, marks=marks, id=name))
        metafunc.parametrize("backend_name", params)


def _gpu_reason():
    """None when a GPU backend can run here, else why not."""
    if backend_status("cupy")[0] or (backend_status("numba")[0] and not SIMULATOR):
        return None
    return "no GPU backend can run here: cupy: %s; numba: %s" % (backend_status("cupy")[1], backend_status("numba")[1])


def pytest_collection_modifyitems(config, items):
    if config.getoption("--require-gpu") and _gpu_reason() is not None:
        raise pytest.UsageError("--require-gpu was given but " + _gpu_reason())
    for item in items:
        name = item.callspec.params.get("backend_name") if hasattr(item, "callspec") else None
        if name is not None and name != "numpy":
            ok, reason = backend_status(name)
            if not ok:
                item.add_marker(pytest.mark.skip(reason=f"{name}: {reason}"))
            elif name == "numba" and not SIMULATOR:
                item.add_marker(pytest.mark.gpu)
        elif item.get_closest_marker("gpu") is not None and _gpu_reason() is not None:
            item.add_marker(pytest.mark.skip(reason=_gpu_reason()))


def pytest_terminal_summary(terminalreporter):
    """Skips summarised as one line per reason with its count, most frequent first (pyproject's addopts asks
    pytest for failures, errors and xfails only, -rfExX, not its line per test file and reason)."""
    counts = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
        counts[reason] = counts.get(reason, 0) + 1
    if counts:
        terminalreporter.section(f"{sum(counts.values())} skipped, by reason", sep="-")
        for reason, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            terminalreporter.line(f"{count:5d} × {reason}")


def pick_sizes(full, simulated):
    """Problem sizes: `full` on real hardware and numpy, `simulated` under the (slow) CUDA simulator."""
    return simulated if SIMULATOR else full


@pytest.fixture
def rng(request):
    # A fresh, reproducible stream per test: the seed comes from the test's id (crc32: stable across runs).
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The kernels/*.cu built for the CPU emulation of CUDA (tests/cuda_emulation), once a session; the tests
    that need it skip where g++ is missing."""
    from cuda_emulation import emulator as emulator_module
    try:
        return emulator_module.build(tmp_path_factory.mktemp("cuda_emulation"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
