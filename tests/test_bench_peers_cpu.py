"""The benchmark's peers (PyTorch, JAX) executed on the CPU, through the suite's own check against numpy float64.

The GPU rows torch-eager and jax-jit are made by the same builders as their CPU twins (bench/impls.py: the device
is the builders' one parameter), so this runs their math (layouts, losses, SGD momentum, bf16 autocast and bf16
operands, state across steps, JAX's donated buffers) on every workload they serve, at the suite's smoke sizes.
What only a GPU runs (torch-graph's CUDA-graph capture, cuBLAS through cupy) is left to bench/gpu_check.sh."""
import sys
from pathlib import Path

import pytest

# bench/ is a top-level package of the repository (tests/test_bench.py says why it is imported this way)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import impls, suite  # noqa: E402

# sweep is train's step at other batch sizes: nothing more to check there
WORKLOADS = tuple(w for w in suite.WORKLOADS if w not in ("limits", "sweep"))
KINDS = ("gemm", "dense", "train", "fit", "predict")
BF16_FLOOR = 1e-3    # a bf16 row's error against float64 is above this, a float32 row's far below


def torch_peers():
    pytest.importorskip("torch", reason="torch is not installed (pip install -e .[test])")
    reg = impls.registry()
    return reg["torch-eager"], reg["torch-cpu"]


def jax_peers():
    pytest.importorskip("jax", reason="jax is not installed (pip install -e .[test] brings jax[cpu])")
    return impls.registry()["jax-jit"], impls.jax_impl("jax-cpu", "cpu", lambda: (True, ""))


def expected_rows(impl):
    """(workload, kind) of every row the suite makes for `impl`: the kinds of work it does, bf16 workloads
    (mixed, fused) only where it trains in bf16."""
    rows = set()
    for workload in WORKLOADS:
        kinds = ("train", "predict") if workload == "fused" else (suite.KINDS[workload],)
        in_bf16 = workload in ("mixed", "fused")
        rows |= {(workload, k) for k in kinds if impl.supports(k) and (not in_bf16 or "bf16" in impl.precisions)}
    return rows


@pytest.mark.parametrize("peers", [torch_peers, jax_peers], ids=["torch", "jax"])
def test_peer_rows_run_on_the_cpu_and_agree_with_float64(peers):
    gpu_peer, cpu_peer = peers()
    # the CPU twin does every kind of work the GPU row does, in the same precisions: nothing left unexecuted
    assert [cpu_peer.supports(k) for k in KINDS] == [gpu_peer.supports(k) for k in KINDS]
    assert cpu_peer.precisions == gpu_peer.precisions
    config = suite.Config(workloads=WORKLOADS, devices=("cpu",), smoke=True, limits=False, log=lambda _: None)
    run = suite.run_suite(config, {cpu_peer.name: cpu_peer})
    failed = [f"{r['workload']} {r['case']}: {r['error']}" for r in run.rows if r["status"] != "ok"]
    assert not failed, failed
    assert {(r["workload"], suite.row_kind(r)) for r in run.rows} == expected_rows(cpu_peer)
    for r in run.rows:
        if r["params"].get("precision") == "bf16":
            # it really ran in bf16: float32 lands at 1e-7 to 1e-5 here, bf16's rounding at 1e-2 to 4e-2
            assert r["rel_err"] > BF16_FLOOR, (r["workload"], r["case"], r["rel_err"])
