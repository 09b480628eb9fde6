"""pytest-benchmark runs of the suite's cases:

    pytest bench/ --benchmark-only --benchmark-enable         full sizes, grouped per workload and case
    pytest bench/                                              tiny sizes, each once (a smoke test)

Each implementation's result is checked against the numpy float64 reference before it is timed (a result that
disagrees fails the test); each timed call cycles through several input sets and waits for the device, so
pytest-benchmark's host clock measures the work. `python -m bench` gives the same rows with ratios and plots."""
import numpy as np
import pytest

from bench import impls, suite


def test_bench(benchmark, bench_case):
    workload, device, case, params, name = bench_case
    impl = impls.registry()[name]
    ok, reason = impl.probe()
    if not ok:
        pytest.skip(f"{name}: {reason}")
    built = suite.build_case(suite.KINDS[workload], params, np.random.default_rng(0))
    entry = built.entry(impl)
    checker, rel_err = suite.checked_runner(entry.make_check or entry.make, suite.KINDS[workload], built.check,
                                            len(built.sets), f"{name} on {workload} {case}")  # Refused: fails
    runner = entry.make() if entry.make_check else checker
    del checker
    n_sets, calls = len(built.sets), [0]

    def step():
        runner.run(calls[0] % n_sets)
        calls[0] += 1
        runner.sync()

    benchmark.group = f"{workload} {case} ({device})"
    benchmark.extra_info.update(impl=name, device=device, rel_err=rel_err, flops=built.flops,
                                min_bytes=built.nbytes, samples=built.samples)
    full = not benchmark.disabled
    benchmark.pedantic(step, rounds=20 if full else 1, warmup_rounds=3 if full else 0, iterations=1)
    if full and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        if built.flops:
            benchmark.extra_info["tflops"] = built.flops / median / 1e12
        if built.samples:
            benchmark.extra_info["samples_per_s"] = built.samples / median
