"""gpu_check's versions stage: what the run ran on, printed and written as JSON.

    python -m bench.versions --out versions.json

The GPU (nvidia-smi), the driver, the CUDA runtime and driver API versions (CuPy's and numba's view), the
libraries (cupy, numba, numba-cuda, torch, jax, numpy, pytest, ...), python, gpubp.availability() and the git
commit (GPU_CHECK_COMMIT when the checkout has no .git, as a copied working tree has not). Each probe that
fails is recorded with its error; only an error of the stage itself makes the exit status non-zero.
"""
import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = ("numpy", "cupy-cuda12x", "cupy-cuda13x", "numba", "numba-cuda", "torch", "jax", "jaxlib",
                 "jax-cuda12-plugin", "jax-cuda13-plugin", "pytest", "pytest-benchmark", "matplotlib",
                 "threadpoolctl", "nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12", "gpubp")


def _run(cmd, timeout=20):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return (r.stdout + r.stderr).strip() if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip()[:500]}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not available: {type(exc).__name__}: {exc}"


def _try(fn):
    try:
        return fn()
    except Exception as exc:      # a missing library or device is a fact to record, not a failure
        return f"{type(exc).__name__}: {exc}"


def collect():
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dry_run": os.environ.get("GPU_CHECK_DRY") == "1", "python": sys.version.split()[0],
            "executable": sys.executable, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    info["nvidia_smi"] = _run(["nvidia-smi"])
    info["gpu_query"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                              "temperature.gpu,power.draw,persistence_mode,compute_mode", "--format=csv"])
    info["nvcc"] = _run(["nvcc", "--version"])
    info["compute_sanitizer"] = _run(["compute-sanitizer", "--version"])
    dists = {}
    for d in DISTRIBUTIONS:
        try:
            dists[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    info["distributions"] = dists

    def cupy_info():
        import cupy
        rt = cupy.cuda.runtime
        return {"version": cupy.__version__, "cuda_runtime": rt.runtimeGetVersion(),
                "cuda_driver_api": rt.driverGetVersion(), "devices": rt.getDeviceCount(),
                "device0": rt.getDeviceProperties(0)["name"].decode(),
                "nvrtc": _try(lambda: cupy.cuda.nvrtc.getVersion())}
    info["cupy"] = _try(cupy_info)

    def numba_info():
        import numba
        from numba import cuda
        out = {"numba": numba.__version__, "simulator": os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
               "available": cuda.is_available()}
        if out["available"] and not out["simulator"]:
            out["runtime"] = _try(lambda: cuda.runtime.get_version())
            out["driver"] = _try(lambda: cuda.cudadrv.driver.driver.get_version())
            out["device"] = _try(lambda: cuda.get_current_device().name.decode()
                                 if isinstance(cuda.get_current_device().name, bytes) else cuda.get_current_device().name)
        return out
    info["numba"] = _try(numba_info)

    def torch_info():
        import torch
        out = {"version": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
        if out["available"]:
            out["device"] = torch.cuda.get_device_name(0)
            out["cudnn"] = torch.backends.cudnn.version()
        return out
    info["torch"] = _try(torch_info)

    def jax_info():
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax
        return {"version": jax.__version__, "devices": [str(d) for d in jax.devices()]}
    info["jax"] = _try(jax_info)

    def gpubp_info():
        import gpubp
        return {"version": gpubp.__version__, "file": gpubp.__file__,
                "availability": {k: list(v) for k, v in gpubp.availability().items()}}
    info["gpubp"] = _try(gpubp_info)
    commit = _run(["git", "rev-parse", "HEAD"])
    info["git_commit"] = (commit if len(commit) == 40 else
                          os.environ.get("GPU_CHECK_COMMIT") or f"unknown (no git checkout here: {commit[:120]}; "
                                                                 "set GPU_CHECK_COMMIT)")
    info["git_status"] = _run(["git", "status", "--short"])
    return info


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    p = argparse.ArgumentParser(prog="python -m bench.versions")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    if os.environ.get("GPU_CHECK_PLANTED") == "1":
        print("ERROR: planted failure in the versions stage (GPU_CHECK_PLANTED=1)", flush=True)
        return 1
    info = collect()
    for key, value in info.items():
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
        print(f"{key}: {text}" if "\n" not in text else f"{key}:\n{text}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
