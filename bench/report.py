"""What a run leaves behind: the environment it ran in, a table of ratios, a JSON file, PNG plots.

Files are named by device and date: bench/results/<device>_<YYYYMMDD-HHMM>.{json,txt}, _sweep.png, _gemm.png,
_fused.png,
where <device> is the GPU's name (e.g. nvidia-h100-80gb-hbm3) or cpu-<model> on a machine without one.

    python -m bench.report --jsonl rows.jsonl [--jsonl more.jsonl] --out DIR [--stem bench] [--versions FILE]

makes the same files from the JSON-lines records that `python -m bench --jsonl` streams (gpu_check's report
stage: rows of several processes, one per implementation family; ratios and fractions of the limits are
computed here, across them). Lines that do not parse (a process killed mid-write) are counted and skipped.
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

from . import suite

RESULTS = Path(__file__).resolve().parent / "results"


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions():
    out = {"python": sys.version.split()[0]}
    for dist in ("numpy", "gpubp", "torch", "jax", "jaxlib", "cupy-cuda12x", "cupy-cuda13x", "numba", "numba-cuda",
                 "threadpoolctl", "pytest-benchmark"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _gpu_info():
    info = {}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and q.stdout.strip():
            name, driver, mem, clock = [s.strip() for s in q.stdout.strip().splitlines()[0].split(",")]
            info.update(gpu=name, driver=driver, gpu_memory=mem, sm_clock_max=clock)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    if "cupy" in sys.modules:
        try:
            rt = sys.modules["cupy"].cuda.runtime
            info["cuda_runtime"] = rt.runtimeGetVersion()
            info["cuda_driver_api"] = rt.driverGetVersion()
            info.setdefault("gpu", rt.getDeviceProperties(0)["name"].decode())
        except Exception:      # no device
            pass
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info.setdefault("gpu", torch.cuda.get_device_name(0))
            with warnings.catch_warnings():      # newer torch may call allow_tf32 a legacy setting
                warnings.simplefilter("ignore")
                info["torch_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
                info["torch_matmul_precision"] = torch.get_float32_matmul_precision()
    return info


def environment(run):
    env = {"dry_run": bool(getattr(run, "dry_run", False) or suite.dry_run()),"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": run.threads, "platform": platform.platform(),
           "versions": _versions(), "cupy_tf32_env": os.environ.get("CUPY_TF32"), "argv": sys.argv,
           "other_cpu_load": run.other_cpu_load(), "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    env.update(_gpu_info())
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    try:
        import threadpoolctl
        env["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                       for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        pass
    gpu_ran = any(r["device"] == "cuda" and r["status"] == "ok" for r in run.rows)
    env["device"] = env["gpu"] if gpu_ran and env.get("gpu") else f"cpu {env['cpu']}"
    env["device_label"] = _slug(env["gpu"]) if gpu_ran and env.get("gpu") else "cpu-" + _slug(env["cpu"])
    return env


# ---- the table ---------------------------------------------------------------------------------------------------------
def _fmt(v, spec):
    width = int(re.match(r"\d*", spec).group() or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


def _rate(r):
    if r["workload"] in ("train", "sweep", "dense", "fit", "mixed", "fused") and r["samples_per_s"]:
        return f"{r['samples_per_s']:.3g} samp/s"
    if r["tflops"]:
        return f"{r['tflops']:.3f} TFLOP/s"
    if r["gb_per_s"]:
        return f"{r['gb_per_s']:.1f} GB/s"
    return "-"


def table(run):
    lines = []
    if getattr(run, "dry_run", False) or suite.dry_run():
        lines.append("DRY RUN (GPU_CHECK_DRY=1): CPU stand-ins at tiny sizes; nothing here is a GPU result")
    lines += [f"{'workload':<7} {'dev':<4} {'case':<26} {'impl':<22} {'median':>11} {'±':>9} {'rate':>18} "
             f"{'of limit':>8} {'x peer':>7} {'peak MiB':>9} {'mem x':>6}  bar"]
    for r in run.rows:
        if r["status"] != "ok":
            lines.append(f"{r['workload']:<7} {r['device']:<4} {r['case']:<26.26} {r['impl']:<22} FAILED: "
                         f"{(r['error'] or '')[:150]}")
            continue
        bar = ""
        if r["spec_bar"] is not None:
            # without the peer's time there is no ratio: the bar is neither met nor missed
            verdict = "no peer measured:" if r["meets_bar"] is None else "MEETS" if r["meets_bar"] else "misses"
            bar = f"{verdict} ≤ {r['spec_bar']:.2f}x {r['peer']}"
            if r["spec_bar_samples_per_s"] is not None:
                bar = (f"moonshot (H100): {verdict} ≥ {r['spec_bar_samples_per_s']:.2g} samp/s and ≤ "
                       f"{r['spec_bar']:.2f}x {r['peer']}")
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        lines.append(f"{r['workload']:<7} {r['device']:<4} {r['case']:<26.26} {r['impl']:<22} "
                     f"{r['median_s'] * 1e3:8.4f} ms {r['spread_s'] * 1e3:6.4f} ms {_rate(r):>18} "
                     f"{_fmt(r['frac_of_limit'], '8.2f')} {_fmt(r['ratio_to_peer'], '7.3f')} {_fmt(peak, '9.1f')} "
                     f"{_fmt(r['mem_ratio_to_peer'], '6.2f')}  {bar}")
    lines.append("")
    lines.append("x peer: median time over the peer's (cuBLAS for gemm, torch eager on the GPU, torch's "
                 "graph-captured loop for fit on the GPU, torch CPU with the same threads on the CPU); of limit: the floor time (flops at the GEMM limit, or bytes at the copy "
                 "limit, whichever is larger) over the median.")
    if any(r["workload"] == "sweep" and r["device"] == "cuda" for r in run.rows):
        lines.append(suite.TINY_CUDA_NN)
    lines += fused_summary(run.rows)
    load = run.other_cpu_load()
    if load is not None and load > 0.25:
        lines.append(f"NOTE: other processes kept {load} CPU cores busy on average during this run: CPU timings "
                     "are disturbed (the interleaved rounds spread that over every implementation alike).")
    for s in run.skipped:
        lines.append(f"skipped: {s['what']}: {s['reason']}")
    return "\n".join(lines)


def fused_summary(rows):
    """Issue 13's lines: for each fused row measured, samples/s, the fraction of the bf16 tensor peak (GPU rows)
    and the ratio to PyTorch autocast eager (its speed-up: the peer's time over ours); tiny-cuda-nn's published
    figure beside them, which was not measured here. [] when no fused row ran."""
    fused = [r for r in rows if r["workload"] == "fused" and r["status"] == "ok"]
    if not fused:
        return []
    out = ["", f"fused MLP (issue 13), bf16: samples/s, fraction of the {suite.TENSOR_PEAK_SOURCE} (GPU rows), "
               "speed-up over the peer (PyTorch autocast(bfloat16) eager on the GPU, torch CPU on the CPU)"]
    for r in fused:
        peak = "-" if r["frac_of_tensor_peak"] is None else f"{100 * r['frac_of_tensor_peak']:.2f}%"
        speedup = "-" if r["ratio_to_peer"] is None else f"{1 / r['ratio_to_peer']:.2f}x"
        out.append(f"  {r['device']:<4} {r['case']:<34.34} {r['impl']:<22} {r['samples_per_s']:10.3g} samp/s  "
                   f"of peak {peak:>7}  speed-up over {r['peer']} {speedup:>7}")
    lo, hi = suite.TINY_CUDA_NN_RANGE
    out.append(f"  published, not measured: tiny-cuda-nn {lo:.2g} to {hi:.2g} training samples/s "
               f"({suite.TINY_CUDA_NN})")
    return out


# ---- files ---------------------------------------------------------------------------------------------------------------
def to_json(run, env):
    return {"schema": 1, "environment": env, "config": {"workloads": list(run.config.workloads),
            "devices": list(run.config.devices), "quick": run.config.quick, "smoke": run.config.smoke,
            "budget_s": run.config.budget_s}, "limits": run.limits, "skipped": run.skipped,
            "published_reference": {"what": suite.TINY_CUDA_NN, "samples_per_s": list(suite.TINY_CUDA_NN_RANGE)},
            "rows": run.rows}


def save(run, out=None, plots=True, stem=None, extra=None):
    """Write <label>_<date>.json and .txt (and plots) under `out` (default bench/results), or <stem>.json ... when
    a stem is given; `extra` is added to the environment (e.g. gpu_check's versions). Returns the paths."""
    env = environment(run)
    if extra:
        env.update(extra)
    out = Path(out) if out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{env['device_label']}_{env['date_utc'][:16].replace('-', '').replace(':', '').replace('T', '-')}"
    paths = [out / f"{stem}.json", out / f"{stem}.txt"]
    paths[0].write_text(json.dumps(to_json(run, env), indent=1, default=str) + "\n")
    paths[1].write_text(f"{env['device']}, {env['threads']} CPU threads, {env['date_utc']}; other processes kept "
                        f"{env['other_cpu_load']} CPU cores busy on average during the run\n\n{table(run)}\n")
    if plots:
        try:
            paths += plot(run, out / stem, env)
        except ImportError as exc:
            run.log(f"plots skipped: matplotlib cannot be imported ({exc})")
    return paths


def plot(run, stem, env):
    """<stem>_sweep.png (samples/s and time per step against batch size), <stem>_gemm.png and <stem>_fused.png
    (fused_plot), log-log, one line per implementation and device."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    sweep = [r for r in run.rows if r["workload"] == "sweep" and r["status"] == "ok"]
    if sweep:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for (impl, device), rows in _lines(sweep).items():
            xs = [r["params"]["batch"] for r in rows]
            ax1.plot(xs, [r["samples_per_s"] for r in rows], "o-", ms=3, label=f"{impl} ({device})")
            ax2.plot(xs, [r["median_s"] * 1e3 for r in rows], "o-", ms=3, label=f"{impl} ({device})")
        if any(r["device"] == "cuda" for r in sweep):
            lo, hi = suite.TINY_CUDA_NN_RANGE
            ax1.axhspan(lo, hi, color="0.85", zorder=0,
                        label="tiny-cuda-nn, published: RTX 3090, FP16\n(different GPU, not measured here)")
        dims = "-".join(map(str, sweep[0]["params"]["dims"]))
        ax1.set(yscale="log", xlabel="batch size", ylabel="training samples / s",
                title=f"{dims} train step (mse, SGD momentum)")
        ax2.set(yscale="log", xlabel="batch size", ylabel="ms per step", title="time per step")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", lw=0.3)
        ax1.legend(fontsize=7)
        written.append(_save_figure(fig, env, f"{stem}_sweep.png"))
    gemm = [r for r in run.rows if r["workload"] == "gemm" and r["status"] == "ok"]
    if gemm:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for (impl, device), rows in _lines(gemm).items():
            ax.plot([r["params"]["n"] for r in rows], [r["tflops"] for r in rows], "o-", ms=3,
                    label=f"{impl} ({device})")
        ax.set(xscale="log", yscale="log", xlabel="n (n×n×n, float32)", ylabel="TFLOP/s", title="GEMM Z = A·Wᵀ")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
        written.append(_save_figure(fig, env, f"{stem}_gemm.png"))
    written += fused_plot(run.rows, stem, env)
    return written


def fused_rows_to_plot(rows):
    """The fused workload's ok training rows at its most common architecture (width 64 on the GPU; the smoke
    width on the CPU), the batch sweep the plot draws."""
    train = [r for r in rows if r["workload"] == "fused" and r["status"] == "ok"
             and (r["params"] or {}).get("kind") == "train"]
    if not train:
        return []
    dims = [tuple(r["params"]["dims"]) for r in train]
    common = max(set(dims), key=dims.count)
    return [r for r in train if tuple(r["params"]["dims"]) == common]


def fused_plot(rows, stem, env):
    """<stem>_fused.png: training samples/s against batch size, log-log, one line per implementation and device,
    tiny-cuda-nn's published range beside the GPU lines (published, not measured). [] when no fused row ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sweep = fused_rows_to_plot(rows)
    if not sweep:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    for (impl, device), line in _lines(sweep).items():
        line = sorted(line, key=lambda r: r["params"]["batch"])
        ax.plot([r["params"]["batch"] for r in line], [r["samples_per_s"] for r in line], "o-", ms=3,
                label=f"{impl} ({device})")
    if any(r["device"] == "cuda" for r in sweep):
        lo, hi = suite.TINY_CUDA_NN_RANGE
        ax.axhspan(lo, hi, color="0.85", zorder=0,
                   label="tiny-cuda-nn: published, not measured\n(RTX 3090, FP16)")
    dims = "-".join(map(str, sweep[0]["params"]["dims"]))
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="batch size", ylabel="training samples / s",
           title=f"fused MLP {dims}, bf16 train step (mse, SGD momentum)")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7)
    return [_save_figure(fig, env, f"{stem}_fused.png")]


def _save_figure(fig, env, path):
    """Every plot's ending: the device and date as its title, written to `path` (PNG), closed; returns the path."""
    import matplotlib.pyplot as plt   # already imported (Agg) by the caller
    fig.suptitle(f"{env['device']}, {env['date_utc'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def _lines(rows):
    lines = {}
    for r in rows:
        lines.setdefault((r["impl"], r["device"]), []).append(r)
    return lines


# ---- a run read back from JSON lines (gpu_check's report stage) -------------------------------------------------------
class LoadedRun:
    """What `python -m bench --jsonl` streamed, from one or more files, shaped like a suite.Run for table() and
    save(): rows, skipped entries, the limits (the best measured per device), the processes' start records."""

    def __init__(self, records, bad_lines=0):
        self.rows = [{k: r.get(k) for k in suite.ROW_FIELDS} for r in records if r.get("record") == "row"]
        self.skipped = [{"what": r["what"], "reason": r["reason"]} for r in records if r.get("record") == "skipped"]
        self.starts = [r for r in records if r.get("record") == "start"]
        self.bad_lines = bad_lines
        self.dry_run = any(r.get("dry_run") for r in self.starts)
        self.limits = {}
        for r in records:
            if r.get("record") == "limits":
                lim = self.limits.setdefault(r["device"], {})
                for k, v in r["limits"].items():
                    lim[k] = max(lim.get(k, 0), v)
        for r in self.rows:
            if r["status"] == "ok" and r["workload"] != "limits":
                suite.apply_limits(r, self.limits.get(r["device"], {}))
        suite.add_ratios(self.rows)
        ends = [r for r in records if r.get("record") == "end"]
        self.threads = max((r["threads"] for r in ends if r.get("threads")), default=None)
        loads = [r["other_cpu_load"] for r in ends if r.get("other_cpu_load") is not None]
        self._load = max(loads) if loads else None
        self.config = argparse.Namespace(
            workloads=sorted({r["workload"] for r in self.rows}), devices=sorted({r["device"] for r in self.rows}),
            quick=any(s.get("quick") for s in self.starts), smoke=any(s.get("smoke") for s in self.starts),
            budget_s=None)

    def other_cpu_load(self):
        return self._load


def load_jsonl(paths):
    records, bad = [], 0
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:      # the last line of a process killed while writing it
                bad += 1
    return LoadedRun(records, bad)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description="the table, JSON and plots from the "
                                "JSON-lines rows of `python -m bench --jsonl`")
    p.add_argument("--jsonl", action="append", required=True, help="a rows file (repeat for several)")
    p.add_argument("--out", required=True, help="directory for the files")
    p.add_argument("--stem", default=None, help="file name stem (default <device>_<date>)")
    p.add_argument("--versions", default=None, help="a JSON file of versions (gpu_check's) to record with them")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.jsonl if Path(x).exists()]
    if not paths:
        print(f"ERROR: no rows file: {', '.join(args.jsonl)} (no bench stage wrote a row)")
        return 1
    run = load_jsonl(paths)
    extra = {"from_jsonl": [str(x) for x in paths], "unparsed_lines": run.bad_lines}
    if args.versions and Path(args.versions).exists():
        extra["gpu_check_versions"] = json.loads(Path(args.versions).read_text())
    if os.environ.get("GPU_CHECK_PLANTED") == "1":
        print("ERROR: planted failure in the report stage (GPU_CHECK_PLANTED=1)")
        return 1
    print(table(run))
    print()
    for path in save(run, args.out, plots=not args.no_plots, stem=args.stem, extra=extra):
        print(f"wrote {path}")
    if run.bad_lines:
        print(f"note: {run.bad_lines} unparsed line(s) skipped (a process killed while writing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
