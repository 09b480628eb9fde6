"""The suite: for each workload and case, every implementation that can run here is checked against the numpy
float64 reference and then timed; the hardware's limits are measured in the same run; rows become a table, a
JSON file and plots (bench.report).

    python -m bench [--workloads limits,gemm,train,fit,sweep,dense,fused] [--device cpu|cuda|all] [--quick] [--out DIR]
    python -m bench --family ours-cupy --device cuda --jsonl rows.jsonl --no-save     (gpu_check's bench stages)

--family (or --impls) runs a chosen set of implementations, and measures the limits only where the family
`limits` is named; --jsonl appends each row to a JSON-lines file as soon as its case is done (flushed), so a
process killed half-way leaves every finished row on disk; `python -m bench.report --jsonl` makes the table,
the ratios and the plots from such a file afterwards.

A row is a dict with every key of ROW_FIELDS (None where it does not apply). status is "ok" (timed), or
"failed" (refused by the reference check, or an error): a failed row has no time.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from . import impls as impls_mod
from . import timing
from . import workloads as wl

# the order they run in: SPEC's bars first; fused last (its large batches take what a budgeted run has left)
WORKLOADS = ("limits", "gemm", "train", "fit", "mixed", "sweep", "dense", "fused")
# the kind of work of a workload's cases; a fused case says its own (case.kind: "train" or "predict")
KINDS = {"gemm": "gemm", "dense": "dense", "train": "train", "sweep": "train", "fit": "fit", "mixed": "train",
         "fused": "train"}
CASES = {"gemm": wl.gemm_cases, "dense": wl.dense_cases, "train": wl.train_cases, "sweep": wl.sweep_cases,
         "fit": wl.fit_cases, "mixed": wl.mixed_cases, "fused": wl.fused_cases}
ROW_FIELDS = ("workload", "case", "impl", "device", "params", "status", "error", "median_s", "spread_s", "min_s",
              "max_s", "repeats", "inner", "rel_err", "flops", "min_bytes", "tflops", "gb_per_s",
              "samples_per_s", "limit", "frac_of_limit", "frac_of_tensor_peak", "peer", "ratio_to_peer", "peak_bytes",
              "peer_peak_bytes", "mem_ratio_to_peer", "spec_bar", "spec_bar_samples_per_s", "meets_bar", "note")
# SPEC section 5: (device, workload, case) -> the highest time ratio to the peer that meets the first bar.
SPEC_BARS = {("cuda", "gemm", "n4096"): 1 / 0.7,                        # ≥ 0.7× cuBLAS's FLOP/s
             ("cuda", "train", "784-1024-1024-10 b1024"): 1.0,
             ("cuda", "train", "64-64-64-64-64-1 b65536"): 0.33,
             ("cuda", "mixed", "784-1024-1024-10 b1024 bf16"): 1.0,        # issue 12: faster than autocast eager
             ("cpu", "train", "784-256-256-10 b256"): 1.25,
             ("cpu", "train", "64-64-64-64-64-1 b4096"): 1.25,
             ("cpu", "train", "1024-1024-1024-10 b512"): 1.25,
             # issue 13's moonshot: >= 1.5e9 training samples/s at width 64 on an H100 AND >= 10x PyTorch bf16
             # eager (time ratio <= 0.1), for the fully fused path only, at the largest batch
             ("cuda", "fused", wl.FusedMLP(wl.fused_dims(wl.FUSED_WIDTH), wl.FUSED_BAR_BATCH, "train").name):
                 {"ratio": 0.1, "samples_per_s": 1.5e9, "impl": "gpubp-cupy-fused"}}
# The H100's dense bf16 tensor-core peak, the fused workload's ceiling (its rows' frac_of_tensor_peak, GPU only):
# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM, "BF16 Tensor Core 1,979 teraFLOPS*", * with sparsity; dense is
# half of it, 989 TFLOP/s (H200 SXM: the same figure). A PCIe H100 is lower (756 dense): read it for an SXM part.
TENSOR_PEAK_BF16 = 989e12
TENSOR_PEAK_SOURCE = ("H100 SXM dense bf16 tensor peak 989 TFLOP/s (NVIDIA H100 datasheet: 1,979 with sparsity, "
                      "dense is half)")
TINY_CUDA_NN = ("tiny-cuda-nn: published reference, different GPU (RTX 3090) and precision (its fully fused MLP "
                "runs in FP16), not measured here: width 64, about 1.2e8 to 2.0e8 training samples/s (the range "
                "issue 5 reads from the plot in its README, 'Fully fused networks vs. TensorFlow')")
TINY_CUDA_NN_RANGE = (1.2e8, 2.0e8)


class Config:
    def __init__(self, workloads=WORKLOADS, devices=("cpu", "cuda"), quick=False, smoke=False, threads=None,
                 budget_s=None, seed=0, log=print, impls=None, limits=True, jsonl=None, plant=False):
        self.workloads = tuple(w for w in WORKLOADS if w in workloads)
        self.impls = None if impls is None else tuple(impls)    # implementation names to run (None: all)
        self.limits = limits          # measure the hardware's limits (gpu_check: in the `limits` family only)
        self.jsonl = jsonl            # a JSON-lines file each row is appended to as soon as its case is done
        self.plant = plant            # add an implementation with a wrong result (it must be refused)
        self.devices = tuple(devices)
        self.quick, self.smoke = quick, smoke
        self.threads = threads
        self.budget_s = budget_s
        self.seed = seed
        self.log = log
        # timing: samples per measurement, calls of warm-up, seconds a sample and a measurement aim at
        if smoke:
            self.repeats, self.warmup, self.target_s, self.measure_budget_s = 3, 1, 0.0, 0.2
        elif quick:
            self.repeats, self.warmup, self.target_s, self.measure_budget_s = 7, 2, 0.01, 1.0
        else:
            self.repeats, self.warmup, self.target_s, self.measure_budget_s = 15, 3, 0.02, 4.0


class Run:
    """One run of the suite: the implementations, what each probe said, the limits measured, the rows."""

    def __init__(self, config, registry=None):
        self.config = config
        self.registry = impls_mod.registry() if registry is None else registry
        if config.impls is not None:
            self.registry = {k: v for k, v in self.registry.items() if k in config.impls}
        if config.plant:
            self.registry.update(planted_impls(self.registry))
        self.rows, self.skipped, self.limits = [], [], {}
        self._probes = {}
        self.start = time.monotonic()
        self._cpu_start = _cpu_times()

    def other_cpu_load(self):
        """Average CPU cores busy with other processes since the run began (from /proc/stat and this process's
        own times): well above 0 means a shared machine, and CPU timings to take with care. None if unknown."""
        end = _cpu_times()
        if self._cpu_start is None or end is None:
            return None
        (busy0, own0, t0), (busy1, own1, t1) = self._cpu_start, end
        return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9), 2)

    def log(self, line):
        self.config.log(line)

    def emit(self, record):
        emit(self.config.jsonl, record)

    def add_row(self, row):
        self.rows.append(row)
        self.emit(dict(row, record="row"))

    def probe(self, impl):
        if impl.name not in self._probes:
            try:
                self._probes[impl.name] = impl.probe()
            except Exception as exc:      # a probe that crashes means "cannot run here", with the reason
                self._probes[impl.name] = (False, f"probe failed: {type(exc).__name__}: {exc}")
        return self._probes[impl.name]

    def skip(self, what, reason):
        entry = {"what": what, "reason": reason}
        if entry not in self.skipped:
            self.skipped.append(entry)
            self.emit(dict(entry, record="skipped"))
            self.log(f"  skipped: {what}: {reason}")

    def out_of_time(self):
        b = self.config.budget_s
        return b is not None and time.monotonic() - self.start > b

    def impls_for(self, kind, device):
        """The implementations that can do `kind` on `device` here; the others are skipped with a line."""
        out = []
        for impl in self.registry.values():
            if impl.device != device or not impl.supports(kind):
                continue
            ok, reason = self.probe(impl)
            if ok:
                out.append(impl)
            else:
                self.skip(f"{impl.name} ({kind})", reason)
        return out


def emit(jsonl, record):
    """Append one record to the JSON-lines file `jsonl` (if any), closed at once: on disk even if we are killed
    next. Records: start (one per process), row (a ROW_FIELDS dict), skipped, limits."""
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def dry_run():
    """True in gpu_check's dry run (GPU_CHECK_DRY=1): nothing of it is a GPU result, and it says so."""
    return os.environ.get("GPU_CHECK_DRY") == "1"


def _cpu_times():
    """(seconds all CPUs were busy, seconds this process used, wall seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / hz     # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system, time.monotonic()


def new_row(**values):
    row = dict.fromkeys(ROW_FIELDS)
    row.update(values)
    return row


# ---- the hardware's limits ------------------------------------------------------------------------------------------
def _limit_row(run, device, case, impl, timing_, flops=None, nbytes=None, note=""):
    row = new_row(workload="limits", case=case, impl=impl, device=device, status="ok", note=note,
                  flops=flops, min_bytes=nbytes, params={})
    row.update(timing_.as_dict())
    if flops:
        row["tflops"] = flops / timing_.median / 1e12
    if nbytes:
        row["gb_per_s"] = nbytes / timing_.median / 1e9
    run.add_row(row)
    run.log(f"  limits  {device}  {case:<28} {impl:<12} " + (f"{row['tflops']:.3f} TFLOP/s" if flops else
                                                            f"{row['gb_per_s']:.1f} GB/s"))
    return row


def measure_limits(run, device):
    """{'flops': FLOP/s, 'bytes': B/s}: a large float32 matrix product and a large copy (bytes read + written)."""
    c = run.config
    t = dict(repeats=c.repeats, warmup=c.warmup, target_s=c.target_s, budget_s=c.measure_budget_s)
    rng = np.random.default_rng(c.seed)
    limits = {}
    try:
        if device == "cpu":
            n = 256 if c.smoke else 1024 if c.quick else 2048
            A, B = rng.standard_normal((2, n, n), dtype=np.float32)
            C = np.empty_like(A)
            tm = timing.measure(lambda i: np.matmul(A, B, out=C), lambda: None, **t)
            row = _limit_row(run, device, f"numpy matmul n{n}", "numpy", tm, flops=2 * n**3, note="float32 GEMM")
            limits["flops"] = row["tflops"] * 1e12
            torch_ok, _ = impls_mod._torch_cpu_probe()
            if torch_ok:     # torch's BLAS may be the faster one on this CPU: the limit is the better of the two
                import torch
                tA, tB, tC = torch.from_numpy(A), torch.from_numpy(B), torch.from_numpy(C)
                tm = timing.measure(lambda i: torch.matmul(tA, tB, out=tC), lambda: None, **t)
                row = _limit_row(run, device, f"torch matmul n{n}", "torch", tm, flops=2 * n**3,
                                 note="float32 GEMM, same threads")
                limits["flops"] = max(limits["flops"], row["tflops"] * 1e12)
            m = (2 if c.smoke else 64 if c.quick else 256) * 2**20 // 4
            src, dst = rng.standard_normal(m, dtype=np.float32), np.empty(m, np.float32)
            tm = timing.measure(lambda i: np.copyto(dst, src), lambda: None, **t)
            row = _limit_row(run, device, f"copy {4 * m >> 20} MiB", "numpy", tm, nbytes=8 * m,
                             note="bytes read + written")
            limits["bytes"] = row["gb_per_s"] * 1e9
        else:
            limits.update(_cuda_limits(run, rng, t))
    except Exception as exc:
        run.skip(f"limits on {device}", f"{type(exc).__name__}: {exc}")
    run.limits[device] = limits
    return limits


def _cuda_limits(run, rng, t):
    c = run.config
    n = 1024 if c.smoke else 4096 if c.quick else 8192
    m = (16 if c.smoke else 256 if c.quick else 1024) * 2**20 // 4
    limits = {}
    cupy_ok, reason = impls_mod._cupy_probe()
    if cupy_ok:
        import cupy
        sync = cupy.cuda.Device().synchronize
        A, B = (cupy.asarray(x) for x in rng.standard_normal((2, n, n), dtype=np.float32))
        C = cupy.empty_like(A)
        tm = timing.measure(lambda i: cupy.matmul(A, B, out=C), sync, **t)
        row = _limit_row(run, "cuda", f"cuBLAS SGEMM n{n}", "cupy", tm, flops=2 * n**3,
                         note="cupy.matmul, float32, TF32 off")
        limits["flops"] = row["tflops"] * 1e12
        src, dst = cupy.asarray(rng.standard_normal(m, dtype=np.float32)), cupy.empty(m, cupy.float32)
        tm = timing.measure(lambda i: dst.data.copy_from_device_async(src.data, 4 * m), sync, **t)
        row = _limit_row(run, "cuda", f"D2D copy {4 * m >> 20} MiB", "cupy", tm, nbytes=8 * m,
                         note="cudaMemcpyAsync device to device; bytes read + written")
        limits["bytes"] = row["gb_per_s"] * 1e9
        del A, B, C, src, dst
        cupy.get_default_memory_pool().free_all_blocks()
        return limits
    run.skip("cupy limits", reason)
    torch_ok, reason = impls_mod._torch_cuda_probe()
    if not torch_ok:
        run.skip("torch limits", reason)
        return limits
    import torch
    A, B = torch.randn(2, n, n, device="cuda")
    C = torch.empty_like(A)
    tm = timing.measure(lambda i: torch.matmul(A, B, out=C), torch.cuda.synchronize, **t)
    limits["flops"] = _limit_row(run, "cuda", f"cuBLAS SGEMM n{n}", "torch", tm, flops=2 * n**3,
                                 note="torch.matmul, float32, TF32 off")["tflops"] * 1e12
    src, dst = torch.randn(m, device="cuda"), torch.empty(m, device="cuda")
    tm = timing.measure(lambda i: dst.copy_(src), torch.cuda.synchronize, **t)
    limits["bytes"] = _limit_row(run, "cuda", f"D2D copy {4 * m >> 20} MiB", "torch", tm, nbytes=8 * m,
                                 note="bytes read + written")["gb_per_s"] * 1e9
    return limits


# ---- one case: check every implementation against the reference, then time them all, interleaved ----------------
ROUNDS = 5   # the samples of the implementations of a case are taken in this many interleaved rounds


class Entry:
    """One implementation on one case: what makes its runner, and the row it fills."""

    def __init__(self, impl, make, make_check=None):
        self.impl, self.make, self.make_check = impl, make, make_check
        self.row = self.runner = self.timer = None


def checked_runner(make, kind, check, n_sets, what):
    """(runner, relative error): a runner from make(), run on the input sets of check_calls(kind), then its result
    checked against the float64 reference (`check`, which raises timing.Refused when it disagrees)."""
    runner = make()
    for i in wl.check_calls(kind, n_sets):
        runner.run(i)
    runner.sync()
    return runner, check(runner.result(), what)


def run_case(run, workload, device, case, params, entries, check, n_sets, flops=None, nbytes=None, samples=None,
             kind=None):
    """For each entry: build a runner (make()), check its first result against the reference (make_check()
    builds a separate runner for the check where running changes state, e.g. a train step), warm it up and
    read its peak memory; then take the timing samples of every entry in interleaved rounds. A result that
    disagrees is refused: its row is failed and gets no time. Appends and returns the rows."""
    c = run.config
    live = []
    for e in entries:
        e.row = new_row(workload=workload, case=case, impl=e.impl.name, device=device, params=params, flops=flops,
                        min_bytes=nbytes, note=e.impl.note or None)
        if run.out_of_time():
            e.row.update(status="failed", error=f"not run: the time budget ({c.budget_s:.0f} s) is spent")
            continue
        try:
            checker, e.row["rel_err"] = checked_runner(e.make_check or e.make, kind or KINDS[workload], check,
                                                       n_sets, f"{e.impl.name} on {workload} {case}")
            if e.make_check is not None:
                del checker
                _free_device_memory()
                checker = e.make()
            e.runner = checker
            del checker
            e.timer = timing.Timer(e.runner.run, e.runner.sync, n_sets=n_sets, repeats=c.repeats, warmup=c.warmup,
                                   target_s=c.target_s, budget_s=c.measure_budget_s).warm()
            e.row["peak_bytes"] = e.runner.peak_bytes()
            e.row["status"] = "ok"
            live.append(e)
        except timing.Refused as exc:
            e.row.update(status="failed", error=f"REFUSED: {exc}")
        except Exception as exc:
            e.row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        if e.row["status"] != "ok":
            e.runner = e.timer = None
            _free_device_memory()
    for r in range(ROUNDS):
        for e in live:
            if e.row["status"] != "ok":
                continue
            goal = -(-e.timer.wanted * (r + 1) // ROUNDS)
            try:
                e.timer.sample(max(0, goal - len(e.timer.samples)))
            except Exception as exc:
                e.row.update(status="failed", error=f"{type(exc).__name__} while timing: {exc}")
    for e in entries:
        _finish_row(run, e, device, flops, nbytes, samples)
        e.runner = e.timer = None
        run.add_row(e.row)
    _free_device_memory()
    return [e.row for e in entries]


def _finish_row(run, e, device, flops, nbytes, samples):
    row = e.row
    if row["status"] == "ok":
        row.update(e.timer.timing().as_dict())
        t = row["median_s"]
        if flops:
            row["tflops"] = flops / t / 1e12
        if nbytes:
            row["gb_per_s"] = nbytes / t / 1e9
        if samples:
            row["samples_per_s"] = samples / t
        apply_limits(row, run.limits.get(device, {}))
        apply_tensor_peak(row)
        try:
            info = e.runner.info() if e.runner is not None else None
        except Exception as exc:     # a note is not worth a row
            info = f"info: {type(exc).__name__}: {exc}"
        if info:
            row["note"] = "; ".join(filter(None, [row["note"], info]))
        run.log(f"  {row['workload']:<6} {device:<4} {row['case']:<26} {row['impl']:<22} {_ms(t)} ± "
                f"{_ms(row['spread_s'])}  err {row['rel_err']:.1e}")
    else:
        run.log(f"  {row['workload']:<6} {device:<4} {row['case']:<26} {row['impl']:<22} FAILED: {row['error']}")


def apply_limits(row, lim):
    """frac_of_limit and limit of an ok row from the device's limits {'flops': FLOP/s, 'bytes': B/s}: the larger
    floor (flops at the GEMM limit, or bytes at the copy limit) is what bounds the work; its fraction of the
    measured time."""
    floors = []
    if row.get("flops") and lim.get("flops"):
        floors.append(("flops", row["flops"] / lim["flops"]))
    if row.get("min_bytes") and lim.get("bytes"):
        floors.append(("bytes", row["min_bytes"] / lim["bytes"]))
    if floors and row.get("median_s"):
        which, floor = max(floors, key=lambda f: f[1])
        row["limit"] = {"flops": f"{lim['flops'] / 1e12:.3f} TFLOP/s GEMM", "bytes":
                        f"{lim['bytes'] / 1e9:.0f} GB/s copy"}[which]
        row["frac_of_limit"] = floor / row["median_s"]


def apply_tensor_peak(row):
    """frac_of_tensor_peak of an ok fused row on the GPU: its FLOP/s over TENSOR_PEAK_BF16 (None elsewhere)."""
    if row.get("workload") == "fused" and row.get("device") == "cuda" and row.get("flops") and row.get("median_s"):
        row["frac_of_tensor_peak"] = row["flops"] / row["median_s"] / TENSOR_PEAK_BF16


def _ms(t):
    return f"{t * 1e3:9.4f} ms" if t is not None else "        -"


def _free_device_memory():
    """Between rows: hand cached blocks back so the next row's memory count starts clean."""
    mods = sys.modules
    if "cupy" in mods:
        try:
            mods["cupy"].get_default_memory_pool().free_all_blocks()
        except Exception:   # no device: nothing to free
            pass
    if "torch" in mods and mods["torch"].cuda.is_available():
        mods["torch"].cuda.empty_cache()


# ---- the workloads -------------------------------------------------------------------------------------------------
def run_workload(run, workload, device):
    c = run.config
    kind = KINDS[workload]
    cases = CASES[workload](device, c.quick, c.smoke)
    if workload == "fused":
        _run_fused(run, device, cases)
        return
    impls = run.impls_for(kind, device)
    if workload in ("sweep", "mixed"):   # the unchecked and NumPy-batch steps are shown once, in train; these
        impls = [i for i in impls if not i.name.endswith(("-unchecked", "-numpy-batches"))]   # compare libraries
    if workload == "mixed":
        impls = [i for i in impls if "bf16" in i.precisions]
    impls = [i for i in impls if i.only is None]       # an implementation made for one workload runs there only
    if not impls:
        if c.impls is None:     # a chosen family that does no such work is no news
            run.skip(f"{workload} on {device}", "no implementation can run here")
        return
    rng = np.random.default_rng(c.seed)
    if workload == "sweep" and device == "cuda":
        run.log("  " + TINY_CUDA_NN)
    for case, params in cases:
        try:
            built = build_case(kind, params, rng)
        except Exception as exc:
            run.skip(f"{workload} {case}", f"the numpy reference failed: {type(exc).__name__}: {exc}")
            continue
        run_case(run, workload, device, case, built.params, [built.entry(impl) for impl in impls], built.check,
                 len(built.sets), flops=built.flops, nbytes=built.nbytes, samples=built.samples)
        del built


def _run_fused(run, device, cases):
    """Issue 13's fused workload: each case is a training step or inference (case.kind); ours are the
    implementations made for it (Impl.only: fused and per-layer), the peers those that run in bf16."""
    impls = {}
    for kind in ("train", "predict"):
        impls[kind] = [i for i in run.impls_for(kind, device) if "bf16" in i.precisions
                       and (i.only is not None and "fused" in i.only or i.only is None and not i.ours)]
        impls[kind] = [i for i in impls[kind] if not i.name.endswith(("-unchecked", "-numpy-batches"))]
    if not any(impls.values()):
        if run.config.impls is None:
            run.skip(f"fused on {device}", "no implementation can run here")
        return
    if device == "cuda":
        run.log("  " + TINY_CUDA_NN)
        run.log("  " + TENSOR_PEAK_SOURCE)
    rng = np.random.default_rng(run.config.seed)
    for case, spec in cases:
        if not impls[spec.kind]:
            continue
        try:
            built = build_case(spec.kind, spec, rng)
        except Exception as exc:
            run.skip(f"fused {case}", f"the numpy reference failed: {type(exc).__name__}: {exc}")
            continue
        run_case(run, "fused", device, case, built.params, [built.entry(impl) for impl in impls[spec.kind]],
                 built.check, len(built.sets), flops=built.flops, nbytes=built.nbytes, samples=built.samples,
                 kind=spec.kind)
        del built


class BuiltCase:
    """A case made concrete: its input sets, its reference check, its counts, and an Entry per implementation."""

    def __init__(self, kind, params, sets, check, flops, nbytes, samples=None, mlp=None, params0=None):
        self.kind, self.params, self.sets, self.check = kind, params, sets, check
        self.flops, self.nbytes, self.samples = flops, nbytes, samples
        self.mlp, self.params0 = mlp, params0

    def entry(self, impl):
        if self.kind == "gemm":
            return Entry(impl, lambda: impl.gemm(self.sets))
        if self.kind == "dense":
            return Entry(impl, lambda: impl.dense(self.sets))
        if self.kind == "fit":
            return Entry(impl, lambda: impl.fit(self.mlp, self.params0, self.sets[0], wl.TIMING_LR),
                         lambda: impl.fit(self.mlp, self.params0, wl.fit_check_data(self.mlp, self.sets[0]),
                                          wl.VALIDATE_LR))
        if self.kind == "predict":
            return Entry(impl, lambda: impl.predict(self.mlp, self.params0, self.sets))
        return Entry(impl, lambda: impl.train(self.mlp, self.params0, self.sets, wl.TIMING_LR),
                     lambda: impl.train(self.mlp, self.params0, self.sets, wl.VALIDATE_LR))


def build_case(kind, params, rng):
    """Input sets drawn from rng, the float64 reference check, flop and byte counts, for one case."""
    if kind == "gemm":
        sets, n = wl.gemm_sets(params, rng), params["n"]
        return BuiltCase(kind, params, sets, wl.gemm_reference(sets, rng), 2 * n**3, 3 * 4 * n * n)
    if kind == "dense":
        sets = wl.dense_sets(params, rng)
        N, i, o = params["N"], params["in"], params["out"]
        return BuiltCase(kind, params, sets, wl.dense_reference(sets, rng), 2 * N * i * o,
                         4 * (N * i + o * i + o + N * o), samples=N)
    if kind == "fit":
        spec = params
        data = wl.fit_data(spec, rng)
        params0 = wl.initial_params(spec, rng)
        return BuiltCase(kind, spec.params(), [data], wl.fit_reference(spec, params0, data), spec.flops(),
                         spec.min_bytes(), samples=spec.samples, mlp=spec, params0=params0)
    mlp = params
    sets = wl.train_sets(mlp, rng)
    params0 = wl.initial_params(mlp, rng)
    if kind == "predict":
        return BuiltCase(kind, mlp.params(), sets, wl.predict_reference(mlp, params0, sets, rng), mlp.flops(),
                         mlp.min_bytes(), samples=mlp.batch, mlp=mlp, params0=params0)
    return BuiltCase(kind, mlp.params(), sets, wl.train_reference(mlp, params0, sets), mlp.flops(),
                     mlp.min_bytes(), samples=mlp.batch, mlp=mlp, params0=params0)


def row_kind(row):
    """The kind of work of a row: its case's own (the fused workload's train or predict), else its workload's."""
    params = row.get("params") or {}
    return params.get("kind") or KINDS.get(row["workload"], row["workload"])


def add_ratios(rows):
    """Each ok row's time over its peer's (same workload, case, device), memory likewise, and SPEC's bars: a bar
    is the highest time ratio to the peer that meets it, or a dict {"ratio", "samples_per_s" (a floor, also to
    meet), "impl" (the one row it applies to)}."""
    by_key = {(r["workload"], r["case"], r["device"], r["impl"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["workload"] == "limits":
            continue
        peer = impls_mod.PEER.get((r["device"], row_kind(r)))
        r["peer"] = peer
        p = by_key.get((r["workload"], r["case"], r["device"], peer))
        if r["status"] == "ok" and p is not None:
            r["ratio_to_peer"] = r["median_s"] / p["median_s"]
            r["peer_peak_bytes"] = p["peak_bytes"]
            if r["peak_bytes"] is not None and p["peak_bytes"]:
                r["mem_ratio_to_peer"] = r["peak_bytes"] / p["peak_bytes"]
        bar = SPEC_BARS.get((r["device"], r["workload"], r["case"]))
        if isinstance(bar, dict):
            if r["impl"] == bar["impl"]:
                r["spec_bar"], r["spec_bar_samples_per_s"] = bar["ratio"], bar["samples_per_s"]
                if r["status"] == "ok" and r["samples_per_s"] < bar["samples_per_s"]:
                    r["meets_bar"] = False      # too slow whatever the peer did
                elif r["ratio_to_peer"] is not None:
                    r["meets_bar"] = bool(r["ratio_to_peer"] <= bar["ratio"])
        elif bar is not None and r["impl"].startswith("gpubp-") and "unchecked" not in r["impl"]:
            r["spec_bar"] = bar
            r["meets_bar"] = None if r["ratio_to_peer"] is None else bool(r["ratio_to_peer"] <= bar)


def planted_impls(registry):
    """gpu_check's planted failure: a copy of the first implementation of `registry` whose results are off by
    1% (as a kernel bug would make them); the reference check must refuse every one of its rows."""
    first = next(iter(registry.values()), None)
    if first is None:
        return {}

    def wrong(factory):
        if factory is None:
            return None

        def make(*args, **kwargs):
            runner = factory(*args, **kwargs)
            result = runner.result

            def off():
                r = result()
                if isinstance(r, list):     # parameters: the first layer's weights off by 1%
                    r = [dict(p) for p in r]
                    r[0]["W"] = np.asarray(r[0]["W"]) * 1.01
                    return r
                return np.asarray(r) * np.float32(1.01)
            runner.result = off
            return runner
        return make
    name = f"{first.name}-planted-wrong"
    return {name: impls_mod.Impl(name, first.device, first.probe, gemm=wrong(first.gemm), dense=wrong(first.dense),
                                 train=wrong(first.train), fit=wrong(first.fit), ours=first.ours,
                                 family=first.family, note="PLANTED: results off by 1% on purpose; must be REFUSED")}


def set_threads(threads):
    """The same number of CPU threads for numpy's BLAS and for torch; returns (threads, a limiter to keep)."""
    limiter = None
    try:
        import threadpoolctl
        info = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        if threads is None:
            threads = max((i["num_threads"] for i in info), default=None)
        if threads is not None:
            limiter = threadpoolctl.threadpool_limits(threads, user_api="blas")
    except ImportError:
        pass
    if threads is None:
        import os
        threads = os.cpu_count() or 1
    if "torch" in sys.modules or _torch_importable():
        import torch
        torch.set_num_threads(threads)
    return threads, limiter


def _torch_importable():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def run_suite(config, registry=None):
    """Run every chosen workload on every chosen device; returns the Run (rows, skipped, limits, threads)."""
    run = Run(config, registry)
    run.threads, limiter = set_threads(config.threads)
    run.log(f"gpubp bench: workloads {', '.join(config.workloads)}; devices {', '.join(config.devices)}; "
            f"{'smoke' if config.smoke else 'quick' if config.quick else 'full'} settings; {run.threads} CPU threads "
            "for numpy's BLAS and torch")
    try:
        for device in config.devices:
            if device == "cuda" and run.registry and not any(run.probe(i)[0] for i in run.registry.values()
                                                             if i.device == "cuda"):
                reasons = "; ".join(f"{i.name}: {run.probe(i)[1]}" for i in run.registry.values()
                                    if i.device == "cuda")
                run.skip("every GPU workload", f"nothing can run on a GPU here ({reasons})")
                continue
            if config.limits:
                measure_limits(run, device)
                run.emit({"record": "limits", "device": device, "limits": run.limits.get(device, {})})
            if not any(i.device == device for i in run.registry.values()):
                continue
            for workload in config.workloads:
                if workload != "limits":
                    run.log(f"-- {workload} on {device}")
                    run_workload(run, workload, device)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        run.emit({"record": "end", "threads": run.threads, "other_cpu_load": run.other_cpu_load(),
                  "seconds": round(time.monotonic() - run.start, 1)})
    add_ratios(run.rows)
    return run


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from {','.join(WORKLOADS)} (default: all; limits always run)")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs, times nothing real")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for numpy and torch (default: numpy's)")
    p.add_argument("--budget", type=float, default=None, help="seconds; rows after that are marked not run")
    p.add_argument("--out", default=None, help="directory for the JSON, table and plots (default bench/results)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--family", default=None,
                   help="comma-separated implementation families (ours-cupy, ours-numba, ours-numpy, cublas, torch, "
                        "torch-cpu, jax, limits): run only these; limits are measured only when `limits` is named")
    p.add_argument("--impls", default=None, help="comma-separated implementation names (as --family)")
    p.add_argument("--jsonl", default=None, help="append each row to this JSON-lines file as its case finishes")
    p.add_argument("--require-rows", action="store_true",
                   help="exit 1 when no row was measured (gpu_check on the GPU machine: a family that cannot run "
                        "there is a failure, not a quiet pass)")
    p.add_argument("--no-save", action="store_true",
                   help="write no JSON/table/plots at the end (gpu_check's report stage makes them from --jsonl)")
    args = p.parse_args(argv)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(chosen) - set(WORKLOADS))
    if unknown:
        p.error(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    return args, chosen


def select_impls(family, names, registry=None):
    """(implementation names, measure limits?) for --family / --impls; (None, True) when neither is given."""
    if family is None and names is None:
        return None, True
    families = impls_mod.families(registry)
    chosen, limits = [], False
    for f in (x.strip() for x in (family or "").split(",") if x.strip()):
        if f == "limits":
            limits = True
        elif f in families:
            chosen += families[f]
        else:
            raise ValueError(f"--family: unknown {f!r}; choose from {sorted(families) + ['limits']}")
    for n in (x.strip() for x in (names or "").split(",") if x.strip()):
        if n not in (registry or impls_mod.registry()):
            raise ValueError(f"--impls: unknown {n!r}")
        chosen.append(n)
    return chosen, limits


def main(argv=None):
    import signal
    from . import report
    signal.signal(signal.SIGINT, signal.default_int_handler)   # gpu_check's timeout sends SIGINT: rows so far stay
    args, chosen = parse_args(sys.argv[1:] if argv is None else argv)
    devices = ("cuda", "cpu") if args.device == "all" else (args.device,)
    try:
        names, limits = select_impls(args.family, args.impls)
    except ValueError as exc:
        print(f"ERROR: {exc}")
        return 2
    plant = os.environ.get("GPU_CHECK_PLANTED") == "1"
    config = Config(workloads=chosen, devices=devices, quick=args.quick, smoke=args.smoke, threads=args.threads,
                    budget_s=args.budget, impls=names, limits=limits, jsonl=args.jsonl, plant=plant)
    emit(args.jsonl, {"record": "start", "argv": sys.argv if argv is None else list(argv), "pid": os.getpid(),
                      "family": args.family, "impls": names, "dry_run": dry_run(), "quick": args.quick,
                      "smoke": args.smoke, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    run = run_suite(config)
    if plant and not any(r["impl"].endswith("-planted-wrong") for r in run.rows):
        print("ERROR: planted failure: no implementation to plant a wrong result in (GPU_CHECK_PLANTED=1)")
        return 1
    print()
    print(report.table(run))
    print()
    if not args.no_save:
        for p in report.save(run, args.out, plots=not args.no_plots):
            print(f"wrote {p}")
    failed = [r for r in run.rows if r["status"] != "ok" and not (r["error"] or "").startswith("not run:")]
    for r in failed:
        print(f"FAILED: {r['workload']} {r['device']} {r['case']} {r['impl']}: {r['error']}")
    if args.require_rows and not any(r["status"] == "ok" for r in run.rows):
        reasons = "; ".join(f"{s['what']}: {s['reason']}" for s in run.skipped) or "nothing was chosen"
        print(f"ERROR: no row was measured ({reasons})")
        return 1
    return 1 if failed else 0
