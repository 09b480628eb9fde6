"""gpu_check's smoke stage: every kernel of one GPU backend once, at small awkward sizes, against the numpy
backend in float64. Outputs are poisoned (NaN) before each op, so an element no thread writes shows.

    python -m bench.smoke --backend cupy [--sizes small|tiny] [--dtypes float32,float64] [--jsonl FILE]
    python -m bench.smoke --backend cupy --emulate      (the cupy backend on the CPU emulator of tests/)

Each case runs one op of the backend interface (gpubp/backends/base.py) on inputs rounded to the dtype; the
same op on the numpy backend in float64, on the same values, is the reference; the tolerance is the op
harness's (tests/test_backend_ops.py: atol + rtol·|ref|, atol growing with the length of the sums). One line
per case goes to --jsonl as soon as it is known; a FAIL line per wrong case goes to stdout; exit status 1 when
any case failed; 77 (skipped) only where --emulate cannot build the emulator (no g++): a GPU backend that
cannot run here is a failure, never a skip, since on the GPU machine that is what it is.

Under compute-sanitizer (gpu_check's sanitizer stages) this is the op harness the tools watch. With
GPU_CHECK_PLANTED=1 in the environment a failure is planted on purpose, to prove it is caught: in the smoke
stage one element of the first output is changed after its kernel ran (the comparison must report it); in a
sanitizer stage (GPU_CHECK_STAGE=sanitizer-<tool>) a small kernel with the bug that tool looks for runs after
the op set (an out-of-bounds write, a shared-memory race, a barrier in divergent code).
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# (N, in, out): 1 and 7 and 33 are below or across any tile; 257 and 1031 cross several (the op harness's sizes)
SIZES = {"small": [(1, 1, 1), (7, 33, 5), (33, 7, 129), (257, 65, 33), (1031, 130, 67)],
         "tiny": [(1, 1, 1), (7, 5, 3), (33, 9, 17)]}
ALPHA = 0.1


def tol(dtype, k=1):
    """The op harness's tolerance for a result summing k products of O(1) terms (tests/test_backend_ops.py)."""
    if dtype == "float32":
        return dict(rtol=2e-4, atol=2e-5 + 1e-6 * k)
    return dict(rtol=1e-10, atol=1e-12 + 1e-14 * k)


class Case:
    """One op call: inputs (float64 numpy, already rounded to the dtype), a function run(be, ins, out) that
    launches the op (out(name, shape, init=None) makes a poisoned output), and the sum length k for the
    tolerance."""

    def __init__(self, op, dtype, shape, inputs, run, k=1, what=""):
        self.op, self.dtype, self.shape, self.inputs, self.run, self.k = op, dtype, shape, inputs, run, k
        self.what = what

    @property
    def name(self):
        return f"{self.op}[{self.dtype} {'x'.join(map(str, self.shape))}{' ' + self.what if self.what else ''}]"


def cases(sizes, dtypes, rng, rotate=False):
    from gpubp import activations as acts
    from gpubp import losses
    act_names = {v: k for k, v in acts.NAMES.items()}
    ACTS = list(acts.NAMES.values())

    def r(dtype, *shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype).astype(np.float64)

    out = []
    for dtype in dtypes:
        for j, (N, n_in, n_out) in enumerate(sizes):
            # every activation at every size ("small"), or each activation once over the sizes ("tiny", for the
            # simulators); bias on and off alternate
            for a, act in enumerate(ACTS):
                if rotate and a % len(sizes) != j:
                    continue
                bias = (a + j) % 2 == 0

                def forward(be, x, o, act=act, bias=bias, N=N, n_out=n_out):
                    Z, A = o("Z", (N, n_out)), o("A", (N, n_out))
                    be.dense_forward(x["A_prev"], x["W"], x["b"] if bias else None, act, ALPHA, Z, A)
                out.append(Case("dense_forward", dtype, (N, n_in, n_out),
                                dict(A_prev=r(dtype, N, n_in), W=r(dtype, n_out, n_in), b=r(dtype, n_out)),
                                forward, k=n_in, what=f"{act_names[act]}{'' if bias else ' no-bias'}"))
                Z = r(dtype, N, n_out)
                Z[0, 0] = 0.0      # the derivative at 0 is defined by the seed (relu'(0) = 0)
                A = acts.forward(act, Z, ALPHA)

                def mask(be, x, o, act=act, N=N, n_out=n_out):
                    be.activation_mask(x["dA"], x["Z"], x["A"], act, ALPHA, o("delta", (N, n_out)))
                out.append(Case("activation_mask", dtype, (N, n_out), dict(dA=r(dtype, N, n_out), Z=Z, A=A), mask,
                                what=act_names[act]))
                Zp = r(dtype, N, n_in)
                Ap = acts.forward(act, Zp, ALPHA)

                def masked(be, x, o, act=act, N=N, n_in=n_in):
                    be.input_grad_masked(x["delta"], x["W"], x["Z_prev"], x["A_prev"], act, ALPHA,
                                         o("delta_prev", (N, n_in)))
                out.append(Case("input_grad_masked", dtype, (N, n_in, n_out),
                                dict(delta=r(dtype, N, n_out), W=r(dtype, n_out, n_in), Z_prev=Zp, A_prev=Ap), masked,
                                k=n_out, what=act_names[act]))

            def wgrad(be, x, o, N=N, n_in=n_in, n_out=n_out):
                dW, db = o("dW", (n_out, n_in)), o("db", (n_out,))
                be.weight_grad(x["delta"], x["A_prev"], dW, db)
                be.weight_grad(x["delta"], x["A_prev"], o("dW_acc", (n_out, n_in), x["dW0"]), None, accumulate=True)
            out.append(Case("weight_grad", dtype, (N, n_in, n_out),
                            dict(delta=r(dtype, N, n_out), A_prev=r(dtype, N, n_in), dW0=r(dtype, n_out, n_in)),
                            wgrad, k=2 * N, what="overwrite, then accumulate without bias"))

            def igrad(be, x, o, N=N, n_in=n_in):
                be.input_grad(x["delta"], x["W"], o("dA_prev", (N, n_in)))
            out.append(Case("input_grad", dtype, (N, n_in, n_out),
                            dict(delta=r(dtype, N, n_out), W=r(dtype, n_out, n_in)), igrad, k=n_out))

            mse_acts = [a for i, a in enumerate(ACTS) if not rotate or i % len(sizes) == j]
            for loss, act in [(losses.MSE, a) for a in mse_acts] + [(losses.BCE, acts.SIGMOID),
                                                                    (losses.SOFTMAX_CE, acts.IDENTITY)]:
                if loss == losses.SOFTMAX_CE:
                    y = np.eye(n_out)[rng.integers(0, n_out, N)]
                else:
                    y = rng.random((N, n_out)).astype(dtype).astype(np.float64)

                def lossgrad(be, x, o, loss=loss, act=act, N=N, n_out=n_out):
                    be.loss_grad(loss, act, ALPHA, x["Z"], x["y"], o("A", (N, n_out)), o("delta", (N, n_out)),
                                 o("loss", (1,)))
                out.append(Case("loss_grad", dtype, (N, n_out), dict(Z=r(dtype, N, n_out, scale=3.0), y=y), lossgrad,
                                k=N * n_out, what=f"{losses.name_of(loss)} {act_names[act]}"))

        size = max(n_in * n_out + n_out for _, n_in, n_out in sizes)
        for momentum, dampening, wd, nesterov in [(0.0, 0.0, 0.0, False), (0.9, 0.0, 1e-2, True),
                                                  (0.5, 0.3, 1e-3, False)]:
            def sgd(be, x, o, m=momentum, d=dampening, wd=wd, nest=nesterov):
                params, buf = o("params", (size,), x["theta"]), o("momentum_buf", (size,))
                step = o("step", (1,), [0], dtype=np.int64)
                for g in ("g0", "g1"):
                    update(be, "sgd_update", (params, x[g], buf, step), (0.1, m, d, wd, nest))
            out.append(Case("sgd_update", dtype, (size,), dict(theta=r(dtype, size), g0=r(dtype, size),
                                                               g1=r(dtype, size)), sgd,
                            what=f"momentum {momentum} dampening {dampening} wd {wd} nesterov {nesterov}"))

        def adam(be, x, o):
            params = o("params", (size,), x["theta"])
            m, v = o("m", (size,), np.zeros(size)), o("v", (size,), np.zeros(size))
            step = o("step", (1,), [0], dtype=np.int64)
            for g in ("g0", "g1"):
                update(be, "adam_update", (params, x[g], m, v, step), (1e-2, 0.9, 0.999, 1e-8, 1e-2))
        out.append(Case("adam_update", dtype, (size,), dict(theta=r(dtype, size), g0=r(dtype, size),
                                                            g1=r(dtype, size)), adam, what="weight decay 1e-2"))
        N, _, n_out = sizes[-1]
        labels = rng.integers(0, max(n_out, 2), N)

        def one_hot(be, x, o, N=N, labels=labels):
            be.one_hot(labels, max(n_out, 2), o("onehot", (N, max(n_out, 2))))
        out.append(Case("one_hot", dtype, (N, max(n_out, 2)), {}, one_hot))

        # the training loop's device-side ops (gpubp/guard.py): gather, cursor, guard, step records
        M, F = 2 * N + 3, max(n_out, 2)
        order = rng.permutation(M)

        def gather(be, x, o, N=N, F=F, order=order):
            order_d = be.asarray(order.astype(np.int64), np.int64)
            cursor = o("cursor", (1,), [3], dtype=np.int64)
            be.gather_rows(x["src"], order_d, cursor, o("rows", (N, F)))
            be.advance_cursor(cursor, N)
            be.gather_rows(x["src"], order_d, cursor, o("rows_next", (N, F)))
        out.append(Case("gather_rows", dtype, (M, F), dict(src=r(dtype, M, F)), gather,
                        what="then advance_cursor, then gather again"))

        theta = r(dtype, 257)

        def guards(be, x, o, N=N, F=F, theta=theta):
            from gpubp import guard as G
            clean = np.concatenate([G.fresh(5), np.zeros(G.RING_SIZE)])
            faulted = clean.copy()
            faulted[G.FAULT], faulted[G.FAULT_INDEX] = G.GRADIENT, 3
            for name, loss, head in (("ok", "loss", clean), ("nan_loss", "nan", clean), ("already", "loss", faulted)):
                be.guard_loss(x[loss], o(f"guard_{name}", (G.SIZE,), head, dtype=np.float64))
            # a non-finite gradient: named by the guarded update's check, which writes nothing
            hyper = be.asarray(np.array([0.1, 0.9, 0.0, 1e-2, 0.0]), np.float64)
            be.sgd_update(o("params", (257,), theta), x["bad_grads"], o("momentum", (257,), np.zeros(257)),
                          o("step", (1,), [2], dtype=np.int64), hyper,
                          o("guard_inf_grad", (G.SIZE,), clean, dtype=np.float64))
            for name, loss in (("record", losses.SOFTMAX_CE), ("record_mse", losses.MSE)):
                be.record_step(loss, x["loss"], x["A"], x["Y"], o(f"guard_{name}", (G.SIZE,), clean, dtype=np.float64))
        bad_grads = r(dtype, 257)
        bad_grads[[20, 7]] = [np.nan, np.inf]
        out.append(Case("guard_ops", dtype, (N, F), dict(loss=np.array([0.75]), nan=np.array([np.nan]),
                                                         bad_grads=bad_grads, A=r(dtype, N, F),
                                                         Y=np.eye(F)[rng.integers(0, F, N)]), guards,
                        what="guard_loss (no fault, NaN loss, fault already set), sgd_update with an inf gradient, "
                             "record_step"))

        def finite(be, x, o):
            flags = [be.all_finite(x["ok"]), be.all_finite(x["nan"]), be.all_finite_many([x["ok"], x["inf"]]),
                     be.all_finite_many([x["ok"], x["ok"]])]
            o("flags", (4,), np.array(flags, dtype=np.float64))
        bad = r(dtype, 257)
        out.append(Case("all_finite", dtype, (257,), dict(ok=bad, nan=np.where(np.arange(257) == 200, np.nan, bad),
                                                          inf=np.where(np.arange(257) == 3, np.inf, bad)), finite))
    return out


def update(be, op, arrays, settings):
    """An optimizer update in the form the backend has: the settings as a device float64 array `hyper` and a
    fresh guard (the guarded updates of gpubp/guard.py), or as host scalars (the form before them). The smoke
    compares parameters, state and step count, which both forms produce."""
    import inspect
    fn = getattr(be, op)
    if "hyper" in inspect.signature(fn).parameters:
        from gpubp import guard as G
        hyper = be.asarray(np.array(settings, np.float64), np.float64)
        guard = be.asarray(np.concatenate([G.fresh(0), np.zeros(G.RING_SIZE)]), np.float64)
        fn(*arrays, hyper, guard)
    else:
        fn(*arrays, *settings)


class Missing(Exception):
    """The backend does not implement this op of the interface (yet): reported, not counted as a failure."""


def run_case(be, case, dtype, plant=False):
    """Run the case on backend `be` in `dtype`; {output name: float64 numpy array}."""
    outs = {}

    def out(name, shape, init=None, dtype=dtype):
        a = be.empty(shape, dtype)
        be.copy_into(a, np.full(shape, np.nan) if init is None else np.asarray(init))
        outs[name] = a
        return a
    ins = {k: be.asarray(np.array(v, dtype=dtype), dtype) for k, v in case.inputs.items()}
    try:
        case.run(be, ins, out)
    except NotImplementedError as exc:      # the base class's: this backend has no such op
        raise Missing(f"{type(be).__name__} does not implement {case.op} ({exc})") from None
    if plant:     # a wrong value in the last element of the first output, written on the device
        first = next(iter(outs.values()))
        wrong = be.to_numpy(first).copy()
        wrong.flat[-1] += 1.0
        be.copy_into(first, wrong)
    return {k: be.to_numpy(v).astype(np.float64) for k, v in outs.items()}


def compare(got, ref, dtype, k):
    """None when every output agrees, else the first disagreement in words."""
    for name, want in ref.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            return f"{name}: shape {None if have is None else have.shape}, expected {want.shape}"
        unwritten = np.isnan(have) & ~np.isnan(want)
        if unwritten.any():
            return (f"{name}: {int(unwritten.sum())} of {have.size} elements still NaN (never written), first at "
                    f"{tuple(int(v) for v in np.unravel_index(int(np.argmax(unwritten)), have.shape))}")
        t = tol(dtype, k)
        bad = ~np.isclose(have, want, equal_nan=True, **t)
        if bad.any():
            i = tuple(int(v) for v in np.unravel_index(int(np.argmax(bad)), have.shape))
            return (f"{name}: {int(bad.sum())} of {have.size} elements off (rtol {t['rtol']:g}, atol {t['atol']:.2g}), "
                    f"first at {i}: got {have[i]!r}, expected {want[i]!r}")
    return None


def deterministic_case(backend_name, dtype, sizes, rng):
    """weight_grad of a deterministic backend three times on the same inputs: bit-identical results."""
    from gpubp.backends import get_backend
    be = get_backend(backend_name, deterministic=True)
    N, n_in, n_out = sizes[-1]
    delta = be.asarray(rng.standard_normal((N, n_out)).astype(dtype), dtype)
    A_prev = be.asarray(rng.standard_normal((N, n_in)).astype(dtype), dtype)
    results = []
    for _ in range(3):
        dW, db = be.empty((n_out, n_in), dtype), be.empty((n_out,), dtype)
        be.copy_into(dW, np.full((n_out, n_in), np.nan))
        be.copy_into(db, np.full((n_out,), np.nan))
        be.weight_grad(delta, A_prev, dW, db)
        results.append(np.concatenate([be.to_numpy(dW).ravel(), be.to_numpy(db)]))
    if not all(np.array_equal(r, results[0]) for r in results[1:]) or np.isnan(results[0]).any():
        return "deterministic weight_grad: results differ between runs, or hold NaN"
    return None


# Relative error (in norm) allowed between a backend and the numpy reference of the same precision: both follow
# the contract of gpubp/backends/base.py, but sum in different orders, so a stored 16-bit value may land one ulp
# apart and carry that on (tf32 stores nothing narrow: only the float32 summation order differs); a missing
# rounding is above these (planted once: a GEMM without operand rounding gave 6e-4 in tf32, 6e-2 bf16, 3e-2 fp16).
PRECISION_TOL = {"tf32": 1e-4, "bf16": 1e-2, "fp16": 2e-3}


def precision_cases(backend_name, rng, tiny=False):
    """Every reduced precision the backend implements, through the public API on a small awkward MLP: the
    gradients (loss-scaled and unscaled for fp16) and three train steps, against the numpy backend in the same
    precision. [(name, error or None)]; a precision the backend lacks is reported as missing, not as a failure.
    tiny: a 5-9-7-3 net on 16 rows (the simulators: the 7-48-33-5 one on 33 rows takes ~80 s under numba's)."""
    import gpubp
    from gpubp import precision as P
    from gpubp.backends import get_backend
    have = get_backend(backend_name).PRECISIONS
    dims, rows = ([5, 9, 7, 3], 16) if tiny else ([7, 48, 33, 5], 33)
    X = rng.standard_normal((rows, dims[0]))
    y = rng.integers(0, dims[-1], rows)
    results = []
    for precision in P.REDUCED:
        name = f"precision {precision} (gradients, 3 adam steps; {'-'.join(map(str, dims))} tanh/relu, {rows} rows)"
        if precision not in have:
            results.append((name, "missing"))
            continue
        nets = [gpubp.Sequential(gpubp.Dense(dims[0], dims[1], "tanh"), gpubp.Dense(dims[1], dims[2], "relu"),
                                 gpubp.Dense(dims[2], dims[3]), backend=b, precision=precision, seed=3)
                for b in (backend_name, "numpy")]
        grads = [net.gradients(X, y, "softmax_ce") for net in nets]
        error = None
        for layer, (got, want) in enumerate(zip(*grads)):
            for key in want:
                rel = np.linalg.norm(got[key] - want[key]) / max(np.linalg.norm(want[key]), 1e-30)
                if not rel <= PRECISION_TOL[precision]:
                    error = error or f"layer {layer} d{key}: relative error {rel:.3g} > {PRECISION_TOL[precision]}"
        losses = [[net.train_step(X, y, "softmax_ce", gpubp.Adam(net, lr=1e-2) if i == 0 else net.optimizer)
                   for i in range(3)] for net in nets]
        if not np.allclose(losses[0], losses[1], rtol=10 * PRECISION_TOL[precision]):
            error = error or f"train-step losses {losses[0]} vs numpy's {losses[1]}"
        params = [net.get_params()[0]["W"] for net in nets]
        if not np.isfinite(params[0]).all():
            error = error or "non-finite parameters after 3 steps"
        results.append((name, error))
    return results


# ---- planted sanitizer bugs: one small kernel per tool, each with the bug that tool exists to find ----------
PLANTED_KERNELS = {
    "memcheck": ("planted_oob", r'''extern "C" __global__ void planted_oob(float* out, int n) {
    // every thread writes 1 GiB past the end of out: beyond the memory pool's chunk too, which a write just
    // past the end would still land in (memcheck knows allocations, not arrays)
    out[(size_t)n + (size_t)268435456 + threadIdx.x] = 1.0f;
}'''),
    "racecheck": ("planted_race", r'''extern "C" __global__ void planted_race(float* out, int n) {
    __shared__ float s[32];
    s[threadIdx.x % 32] = threadIdx.x;  // several warps write the same words, no barrier before the read
    out[threadIdx.x % n] = s[(threadIdx.x + 1) % 32];
}'''),
    "synccheck": ("planted_divergent_barrier", r'''extern "C" __global__ void planted_divergent_barrier(float* out, int n) {
    if (threadIdx.x < 16) __syncthreads();   // half a warp waits at a barrier the other half never reaches
    out[threadIdx.x % n] = 1.0f;
}'''),
}


def plant_sanitizer_bug(tool):
    import cupy
    name, source = PLANTED_KERNELS[tool]
    kernel = cupy.RawKernel(source, name)
    buf = cupy.zeros(4, dtype=cupy.float32)
    kernel((1,), (64,), (buf, np.int32(4)))
    cupy.cuda.Device().synchronize()
    print(f"planted: launched {name} for {tool}; the sanitizer must report it")


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)    # a timeout's SIGINT ends us with a traceback
    p = argparse.ArgumentParser(prog="python -m bench.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("cupy", "numba", "numpy"), required=True)
    p.add_argument("--sizes", choices=sorted(SIZES), default="small")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--emulate", action="store_true",
                   help="cupy on the CPU emulator of tests/cuda_emulation (a dry run: no GPU involved)")
    p.add_argument("--tiles", action="store_true",
                   help="cupy: run the op set again with each GEMM tile forced (SM count 1, then 10**6)")
    p.add_argument("--jsonl", default=None, help="append one JSON line per case, as each finishes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stage = os.environ.get("GPU_CHECK_STAGE", "smoke")
    planted = os.environ.get("GPU_CHECK_PLANTED") == "1"
    if args.emulate:
        sys.path.insert(0, str(ROOT / "tests"))
        try:
            import cuda_emulation.emulated_cupy_plugin  # noqa: F401  (patches the cupy backend onto the emulator)
        except FileNotFoundError as exc:   # no g++: the emulator cannot be built here
            print(f"skipped: {exc}", flush=True)
            return 77
    from gpubp.backends import availability, get_backend
    ok, reason = availability()[args.backend]
    label = f"{args.backend}{' (CPU emulator)' if args.emulate else ''}"
    print(f"smoke: backend {label}: {reason}", flush=True)
    if not ok:
        print(f"FAIL: backend {args.backend} cannot run here: {reason}", flush=True)
        return 1
    be = get_backend(args.backend)
    ref_be = get_backend("numpy")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    sizes = SIZES[args.sizes]
    rng = np.random.default_rng(args.seed)
    all_cases = cases(sizes, dtypes, rng, rotate=args.sizes == "tiny")
    variants = [("device", None)]
    if args.tiles and args.backend == "cupy" and not args.emulate:
        variants += [("large-tile", 1), ("small-tile-split-k", 10**6)]
    sink = open(args.jsonl, "a") if args.jsonl else None
    failures, missing, n, t0 = [], set(), 0, time.monotonic()
    try:
        for variant, sm_count in variants:
            restore = _force_sm_count(sm_count) if sm_count else None
            try:
                for case in all_cases:
                    plant = planted and not stage.startswith("sanitizer") and n == 0
                    error, status, t = None, "ok", time.monotonic()
                    try:
                        got = run_case(be, case, case.dtype, plant=plant)
                        want = run_case(ref_be, case, np.float64)
                        error = compare(got, want, case.dtype, case.k)
                    except Missing as exc:
                        status, error = "missing", str(exc)
                        if case.op not in missing:
                            missing.add(case.op)
                            print(f"MISSING: {label}: {exc}", flush=True)
                    except Exception as exc:   # a launch error, a sticky CUDA error: this case fails, say how
                        error = f"{type(exc).__name__}: {exc}"
                    n += 1
                    if error and status == "ok":
                        status = "failed"
                    record = {"stage": stage, "backend": label, "variant": variant, "op": case.op, "case": case.name,
                              "dtype": case.dtype, "status": status, "error": error,
                              "seconds": round(time.monotonic() - t, 4), "planted": plant}
                    if sink:
                        sink.write(json.dumps(record) + "\n")
                        sink.flush()
                    if status == "failed":
                        failures.append(f"{label} {variant} {case.name}: {error}")
                        print(f"FAIL: {failures[-1]}", flush=True)
            finally:
                if restore:
                    restore()
        for dtype in dtypes:
            error = deterministic_case(args.backend, dtype, sizes, rng)
            n += 1
            if error:
                failures.append(f"{label} {dtype}: {error}")
                print(f"FAIL: {failures[-1]}", flush=True)
        if "float32" in dtypes:
            for name, error in precision_cases(args.backend, rng, tiny=args.sizes == "tiny"):
                n += 1
                status = "missing" if error == "missing" else "failed" if error else "ok"
                if sink:
                    sink.write(json.dumps({"stage": stage, "backend": label, "variant": "api", "op": "precision",
                                           "case": name, "dtype": "float32", "status": status,
                                           "error": error}) + "\n")
                    sink.flush()
                if status == "missing":
                    missing.add(name.split(" (")[0])
                    print(f"MISSING: {label}: {name}", flush=True)
                elif error:
                    failures.append(f"{label} {name}: {error}")
                    print(f"FAIL: {failures[-1]}", flush=True)
    finally:
        if sink:
            sink.close()
    by_op = {}
    for c in all_cases:
        by_op.setdefault(c.op, 0)
        by_op[c.op] += 1
    print(f"smoke: {label}: {n} cases ({', '.join(f'{op} {k}' for op, k in by_op.items())}; x{len(variants)} "
          f"tile variant(s); deterministic weight_grad; reduced precisions through the API) in {time.monotonic() - t0:.1f} s: {len(failures)} failed"
          f"{'; not implemented by this backend: ' + ', '.join(sorted(missing)) if missing else ''}", flush=True)
    if planted and stage.startswith("sanitizer-"):
        plant_sanitizer_bug(stage.split("-", 1)[1])
    return 1 if failures else 0


def _force_sm_count(n):
    """cupy backend: pretend the device has n SMs (1: every GEMM takes the large tile, never split; 10**6: the
    small tile, split-K wherever it can), as tests/test_cupy_kernels_emulated.py does on the emulator."""
    from gpubp.backends import cupy_backend as cb
    saved = cb._sm_count
    cb._sm_count = lambda: n
    return lambda: setattr(cb, "_sm_count", saved)


if __name__ == "__main__":
    sys.exit(main())
