"""The tensor-core GEMM row (issue 12): Z = A·Wᵀ, n×n×n, float32 out, operands in tf32 / bf16 / fp16, our
kernel (the cupy backend's dense_forward, kernels/dense_tc.cu on gemm_tc.cuh: identity, no bias, Z = A) against
cuBLAS in the same precision (cublasGemmEx through CuPy's bindings: cupy.matmul itself has no bfloat16 and takes
TF32 only from the CUPY_TF32 environment variable at import). GPU only.

    python -m bench.gemm_tc [--n 4096] [--repeats 20]

Both sides get the operands already stored in the precision (bf16 bits as uint16, fp16 as float16, tf32 as
float32 rounded inside the GEMM), so the row times the GEMM alone: no conversion of W (what a 16-bit copy kept
by the optimizer will give the layers). Each result is first checked against gpubp.precision.reference_gemm on
sampled rows with the tensor-core GEMM's bound (tests/test_tc_gemm.py: (ceil(K/k_mma) + 1)·8u·|A|·|W|ᵀ), then
timed with CUDA events around each call (median of the repeats, after 3 warm-up calls); TFLOP/s = 2n³ / t.
Prints one line per precision; exits 77 (gpu_check's "skipped") with a note where no GPU can run it.
"""
import argparse
import math
import sys

import numpy as np

MMA_K = {"tf32": 8, "bf16": 16, "fp16": 16}
CHECK_ROWS = 64


def _cublas_gemm(cp, precision, A, W, Z):
    """Z (M, N) row-major = A (M, K) · W (N, K)ᵀ by cublasGemmEx: column-major Zᵀ = W_colᵀ · A_col."""
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas
    M, K = A.shape
    N = W.shape[0]
    dtype = {"tf32": runtime.CUDA_R_32F, "bf16": runtime.CUDA_R_16BF, "fp16": runtime.CUDA_R_16F}[precision]
    compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if precision == "tf32" else cublas.CUBLAS_COMPUTE_32F
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    handle = cp.cuda.device.get_cublas_handle()
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, N, M, K, one.ctypes.data, W.data.ptr, dtype,
                      K, A.data.ptr, dtype, K, zero.ctypes.data, Z.data.ptr, runtime.CUDA_R_32F, N, compute,
                      cublas.CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)


def _check(name, Z, A, W, precision, rows):
    from gpubp import precision as prec
    got = Z[rows].astype(np.float64)
    ref = prec.reference_gemm(A[rows], W, precision).astype(np.float64)
    bound = (math.ceil(A.shape[1] / MMA_K[precision]) + 1) * 8 * 2.0**-24 * (
        np.abs(prec.round_operand(A[rows], precision)).astype(np.float64)
        @ np.abs(prec.round_operand(W, precision)).astype(np.float64).T)
    worst = float(np.max(np.abs(got - ref) / np.maximum(bound, 1e-300)))
    if not np.isfinite(Z).all() or worst > 1:
        raise RuntimeError(f"{name} {precision}: {worst:.3g} x the tolerance (or non-finite): not timed")
    return worst


def _time(cp, fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--precisions", default="tf32,bf16,fp16")
    args = parser.parse_args(argv)
    from gpubp.backends import cupy_backend as cb
    ok, why = cb.available()
    if not ok or not getattr(cb.CupyBackend, "real_gpu", False) or cb.cp is None or not hasattr(cb.cp, "cuda") \
            or not hasattr(cb.cp.cuda, "Event"):
        print(f"bench.gemm_tc: skipped, no GPU for the cupy backend here ({why})")
        return 77
    from gpubp import precision as prec
    cp = cb.cp
    be = cb.CupyBackend()
    n = args.n
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n), dtype=np.float32)
    W = rng.standard_normal((n, n), dtype=np.float32)
    rows = np.sort(rng.choice(n, min(n, CHECK_ROWS), replace=False))
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["name"]
    print(f"GEMM {n}x{n}x{n}, Z float32, on {device.decode() if isinstance(device, bytes) else device}")
    for precision in args.precisions.split(","):
        stored = [prec.to_storage(x, precision) for x in (A, W)]
        if precision == "fp16":
            stored = [s.view(np.float16) for s in stored]
        A_dev, W_dev = (cp.asarray(s) for s in stored)
        Z = cp.full((n, n), np.nan, np.float32)
        ours = lambda: be.dense_forward(A_dev, W_dev, None, 0, 0.0, Z, Z, precision)   # noqa: E731
        theirs = lambda: _cublas_gemm(cp, precision, A_dev, W_dev, Z)                 # noqa: E731
        line = [f"{precision}:"]
        for name, fn in (("gpubp", ours), ("cuBLAS", theirs)):
            Z.fill(np.nan)
            fn()
            try:
                _check(name, cp.asnumpy(Z), A, W, precision, rows)
            except RuntimeError as exc:
                line.append(f"{name} refused ({exc})")
                continue
            t = _time(cp, fn, args.repeats)
            line.append(f"{name} {t * 1e3:.3f} ms {2 * n**3 / t / 1e12:.1f} TFLOP/s")
        print("  ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
