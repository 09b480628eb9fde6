"""pytest-benchmark's view of the suite: one test per (workload, case, implementation), grouped per workload and
case. With --benchmark-enable (or --benchmark-only) the cases are the suite's full sizes; otherwise (the default,
--benchmark-disable in pyproject) each runs once at tiny sizes, as a smoke test."""
import pytest

from bench import impls, suite


def _full(config):
    return bool(config.getoption("benchmark_enable", False) or config.getoption("benchmark_only", False))


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    full = _full(metafunc.config)
    params = []
    for workload in ("gemm", "train", "fit", "sweep", "dense"):
        kind = suite.KINDS[workload]
        for device in ("cuda", "cpu"):
            for case, p in suite.CASES[workload](device, quick=False, smoke=not full):
                for name, impl in impls.registry().items():
                    # an implementation made for one workload (Impl.only: the fused pair) runs there only
                    if impl.device == device and impl.supports(kind) and (impl.only is None or workload in impl.only):
                        params.append(pytest.param((workload, device, case, p, name),
                                                   id=f"{workload}-{device}-{case}-{name}".replace(" ", "_")))
    metafunc.parametrize("bench_case", params)
