"""gpubp's benchmark suite: every backend against its peers (PyTorch eager and CUDA-graph, JAX jit, cuBLAS; PyTorch
CPU with the same threads) and against the hardware's measured limits, in one run.

    python -m bench [--workloads limits,gemm,train,sweep,dense] [--device cpu|cuda|all] [--quick] [--out DIR]
    pytest bench/ --benchmark-only --benchmark-enable        (pytest-benchmark, grouped per workload)

Every result is checked against the numpy float64 reference before it is timed; one that disagrees is refused.
"""


def main(argv=None):
    """The command line (`python -m bench`, `gpubp bench`): runs the chosen set, prints the table; returns the
    exit status (1 when a result was refused)."""
    from .suite import main as _main
    return _main(argv)
