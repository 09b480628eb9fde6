#!/usr/bin/env bash
# gpu_check.sh: everything the GPU machine must show, in ONE device call of at most 10 minutes.
#
#   PYTHONPATH=$PWD bash bench/gpu_check.sh          (from the repository root; OUT defaults to ./gpu_out)
#
# 1. versions: nvidia-smi, driver, CUDA, cupy, numba, numba-cuda, torch, jax       -> $OUT/bench.log
# 2. the whole test suite with --require-gpu (a broken CUDA setup cannot pass as skipped) -> $OUT/tests.log
# 3. the benchmark suite, every workload, GPU first, with whatever time is left     -> $OUT/bench.log and
#    $OUT/<device>_<date>.{json,txt}, _sweep.png, _gemm.png (copied to bench/results/ too)
# Nothing is installed: torch, jax, cupy, numba-cuda, pytest and pytest-benchmark are expected on the machine.
# The card's settings are left alone (no clocks, no persistence mode, no reset).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
TOTAL_S="${GPU_CHECK_SECONDS:-530}"        # the whole script; a device call is cut at 600 s
TESTS_MAX_S="${GPU_CHECK_TESTS_SECONDS:-240}"
START=$(date +%s)
LOG="$OUT/bench.log"

{
  echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
             --format=csv || true
  nvcc --version 2>/dev/null | tail -1 || true
  python - <<'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "cupy", "numba", "numba.cuda", "torch", "jax", "pytest", "pytest_benchmark"):
    try:
        m = importlib.import_module(name)
        print(f"{name:18} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{name:18} not importable: {type(exc).__name__}: {exc}")
try:
    import cupy
    rt = cupy.cuda.runtime
    print("cuda runtime", rt.runtimeGetVersion(), "driver api", rt.driverGetVersion(),
          "device", rt.getDeviceProperties(0)["name"].decode())
except Exception as exc:
    print("cupy runtime:", type(exc).__name__, exc)
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch:", type(exc).__name__, exc)
import gpubp
print("gpubp availability:", gpubp.availability())
PY
} 2>&1 | tee "$LOG"

echo "== tests (at most ${TESTS_MAX_S} s)" | tee -a "$LOG"
timeout "$TESTS_MAX_S" python -m pytest tests --require-gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
TESTS_RC=${PIPESTATUS[0]}
echo "== tests exit status $TESTS_RC (124: cut at ${TESTS_MAX_S} s)" | tee -a "$LOG"

LEFT=$(( TOTAL_S - ($(date +%s) - START) - 40 ))    # 40 s for the table, the plots and the copy back
[ "$LEFT" -lt 120 ] && LEFT=120
echo "== bench (budget ${LEFT} s)" | tee -a "$LOG"
timeout $(( LEFT + 60 )) python -m bench --device all --budget "$LEFT" --out "$OUT" 2>&1 | tee -a "$LOG" | tail -70
BENCH_RC=${PIPESTATUS[0]}
echo "== bench exit status $BENCH_RC (1: a result was refused; 124: cut)" | tee -a "$LOG"
mkdir -p bench/results && cp -n "$OUT"/*.json "$OUT"/*.txt "$OUT"/*.png bench/results/ 2>/dev/null
echo "== done in $(( $(date +%s) - START )) s; files in $OUT:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
exit $(( TESTS_RC != 0 || BENCH_RC != 0 ))
