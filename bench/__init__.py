"""gpubp's benchmark suite: every backend against its peers (PyTorch eager and CUDA-graph, JAX jit, cuBLAS; PyTorch
CPU with the same threads) and against the hardware's measured limits, in one run.

    python -m bench [--workloads limits,gemm,train,fit,sweep,dense] [--device cpu|cuda|all] [--quick] [--out DIR]
    python -m bench --family ours-cupy --jsonl rows.jsonl --no-save   (one implementation family, rows streamed)
    python -m bench.report --jsonl rows.jsonl --out DIR               (table, JSON and plots from streamed rows)
    python -m bench.smoke --backend cupy                              (every kernel once, against numpy)
    pytest bench/ --benchmark-only --benchmark-enable        (pytest-benchmark, grouped per workload)
    bash bench/gpu_check.sh                                  (the GPU machine's staged check: bench/README.md)

Every result is checked against the numpy float64 reference before it is timed; one that disagrees is refused.
"""


def main(argv=None):
    """The command line (`python -m bench`, `gpubp bench`): runs the chosen set, prints the table; returns the
    exit status (1 when a result was refused)."""
    from .suite import main as _main
    return _main(argv)
