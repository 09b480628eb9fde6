"""The program bench/profile.sh runs under ncu: one profiled case, warm-up outside the profiler's window.

    python -m bench.profile_step --case a-fp32          (under ncu --profile-from-start off; see profile.sh)
    python -m bench.profile_step --list                 (the cases, one a line: name, kernel regex, launch count)
    python -m bench.profile_step --metrics AVAILABLE    (the --metrics list, keeping the names ncu says it has)

Cases (the cupy backend; float32 inputs, standard normal, never zeros):
  a-fp32      784-1024-1024-10 relu, softmax_ce, batch 1024, float32: the SIMT GEMMs (dense_forward_kernel,
              input_grad_kernel, weight_grad_kernel)
  b-bf16      the same model with precision="bf16", fused=False: the tensor-core kernels of kernels/dense_tc.cu
  c-fused     64-64-64-64-64-1 relu, mse, batch 65536, bf16, fused="auto": fused_mlp_forward/backward_kernel (and
              the per-layer tensor-core weight gradients the fused path hands to dense_tc.cu)
  d-gemm-tc   bench/gemm_tc.py's GEMM: Z = A·Wᵀ, 4096³, bf16 operands stored, float32 out (dense_forward_tc_kernel)

How the window is chosen (decided here, said in bench/README.md): each case runs WARMUP eager steps first (NVRTC
compilation, module load, workspaces), then cudaProfilerStart, exactly ONE step (or one GEMM), a synchronize,
cudaProfilerStop; ncu runs with --profile-from-start off, so nothing outside that window is profiled and no
--launch-skip has to guess how many launches a warm-up makes. The step gets device (CuPy) arrays, so the cupy
backend runs it eagerly (a step on caller-owned buffers is never captured), and use_graphs is switched off as
well: no kernel runs inside a CUDA graph. ncu is still given --graph-profiling node (its default), so a graph
launched by mistake would show its kernels one by one rather than vanish. --launch-count caps each case above
the launches one step can make of the filtered kernels (a cap, not a skip).

FLOPs: MODEL_FLOPS gives our own count for the profiled step (2·N·Σ in·out forward, the same for the weight
gradients, and for the input gradients of every layer but the first); profile_summary.py sets it against the
summed duration of the case's GEMM kernels.
"""
import argparse
import sys

import numpy as np

WARMUP = 3
# name: (what, kernel regex for ncu's -k, launch-count cap)
CASES = {
    "a-fp32": ("784-1024-1024-10 b1024 float32 (SIMT GEMMs)",
               "dense_forward_kernel|input_grad_kernel|weight_grad_kernel|weight_grad_reduce_kernel", 24),
    "b-bf16": ("784-1024-1024-10 b1024 bf16 (tensor-core dense_tc kernels)", "_tc_kernel|weight_grad_reduce_kernel", 24),
    "c-fused": ("64x4 hidden b65536 bf16 fused=auto (fused_mlp kernels)",
                "fused_mlp|_tc_kernel|weight_grad_reduce_kernel", 24),
    "d-gemm-tc": ("GEMM 4096^3 bf16 (bench/gemm_tc.py's; dense_forward_tc_kernel)", "dense_forward_tc_kernel", 1),
}
SHAPES = {"a-fp32": ([784, 1024, 1024, 10], 1024), "b-bf16": ([784, 1024, 1024, 10], 1024),
          "c-fused": ([64, 64, 64, 64, 64, 1], 65536)}
GEMM_N = 4096

# Metrics asked for beside the sections (profile.sh keeps those `ncu --query-metrics` lists; a missing one is
# reported as missing by profile_summary.py, never guessed).
METRICS = [
    "gpu__time_duration.sum",
    "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum",
    "smsp__inst_executed_pipe_tensor_op_hmma.sum",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__maximum_warps_per_active_cycle_pct",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
]
SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "ComputeWorkloadAnalysis",
            "MemoryWorkloadAnalysis"]


def model_flops(widths, N):
    """Our flop count of one training step's GEMMs: forward, weight gradients, input gradients (not layer 0's)."""
    pairs = list(zip(widths[:-1], widths[1:]))
    fwd = sum(2 * N * i * o for i, o in pairs)
    return fwd + fwd + sum(2 * N * i * o for i, o in pairs[1:])


def MODEL_FLOPS(case):
    if case == "d-gemm-tc":
        return 2 * GEMM_N ** 3
    widths, N = SHAPES[case]
    return model_flops(widths, N)


def available_metrics(listing):
    """METRICS whose base name (before the first '.') appears in `ncu --query-metrics` output."""
    names = set()
    for line in listing.splitlines():
        if line.strip():
            names.add(line.split()[0])
    return [m for m in METRICS if m.split(".")[0] in names or m in names]


def _profiler(cp, on):
    rt = cp.cuda.runtime
    if hasattr(rt, "profilerStart"):
        (rt.profilerStart if on else rt.profilerStop)()
    else:                                   # older CuPy: the same two calls in cupy.cuda.profiler
        from cupy.cuda import profiler
        (profiler.start if on else profiler.stop)()


def run_case(case):
    from gpubp.backends import cupy_backend as cb
    ok, why = cb.available()
    if not ok or not getattr(cb.CupyBackend, "real_gpu", False):
        print(f"bench.profile_step: no GPU for the cupy backend here ({why})")
        return 77
    import gpubp
    cp = cb.cp
    rng = np.random.default_rng(0)
    if case == "d-gemm-tc":
        from gpubp import precision as prec
        be = cb.CupyBackend()
        n = GEMM_N
        A, W = (cp.asarray(prec.to_storage(rng.standard_normal((n, n), dtype=np.float32), "bf16")) for _ in range(2))
        Z = cp.full((n, n), np.nan, np.float32)
        step = lambda: be.dense_forward(A, W, None, 0, 0.0, Z, Z, "bf16")   # noqa: E731
    else:
        widths, N = SHAPES[case]
        acts = ["relu"] * (len(widths) - 2) + ["identity"]
        layers = [gpubp.Dense(i, o, a) for i, o, a in zip(widths[:-1], widths[1:], acts)]
        precision = None if case == "a-fp32" else "bf16"
        fused = "auto" if case == "c-fused" else False
        net = gpubp.Sequential(*layers, backend="cupy", seed=0, precision=precision, fused=fused)
        net.backend.use_graphs = False
        if case == "c-fused" and not net.fused:
            raise RuntimeError("c-fused: the model did not take the fused path")
        opt = gpubp.SGD(net, lr=1e-3, momentum=0.9)
        X = cp.asarray(rng.standard_normal((N, widths[0]), dtype=np.float32))
        if case == "c-fused":
            loss, y = "mse", cp.asarray(rng.standard_normal((N, 1), dtype=np.float32))
        else:
            loss, y = "softmax_ce", cp.asarray(rng.integers(0, widths[-1], N))
        step = lambda: net.train_step(X, y, loss=loss, optimizer=opt, sync=False)   # noqa: E731
    for _ in range(WARMUP):
        step()
    cp.cuda.Device().synchronize()
    _profiler(cp, True)
    step()
    cp.cuda.Device().synchronize()
    _profiler(cp, False)
    if case == "d-gemm-tc":
        if not bool(cp.isfinite(Z).all()):
            raise RuntimeError("d-gemm-tc: the GEMM wrote non-finite values")
    else:
        print(f"{case}: loss after the profiled step {float(net.train_step(X, y, loss=loss, optimizer=opt)):.4g}")
    print(f"{case}: profiled one {'GEMM' if case == 'd-gemm-tc' else 'train step'} after {WARMUP} warm-up; "
          f"model flops {MODEL_FLOPS(case):.4g}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--metrics", metavar="AVAILABLE", help="a file of `ncu --query-metrics` output, or - for all")
    args = parser.parse_args(argv)
    if args.list:
        for name, (_, regex, count) in CASES.items():
            print(f"{name}\t{regex}\t{count}")
        return 0
    if args.metrics:
        metrics = METRICS if args.metrics == "-" else available_metrics(open(args.metrics).read())
        print(",".join(metrics))
        return 0
    if not args.case:
        parser.error("--case, --list or --metrics")
    return run_case(args.case)


if __name__ == "__main__":
    sys.exit(main())
