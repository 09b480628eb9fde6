#!/usr/bin/env bash
# gpu_check.sh: everything the GPU machine must show, in ONE device call (10 minutes at most), as a sequence of
# independent stages. Each stage is its own process with its own time budget (SIGINT at the budget, so pytest
# and the bench still print what they have; KILL GRACE seconds later), and writes to the run folder as it goes.
# A stage that fails, hangs or dies (a sticky CUDA error poisons only its own process) does not stop the next.
#
#   PYTHONPATH=$PWD bash bench/gpu_check.sh                 (from the repository root, on the GPU machine)
#   GPU_CHECK_DRY=1 OUT=/tmp/x bash bench/gpu_check.sh      (a dry run on the CPU: tests/test_gpu_check.py)
#
# Stages, in order (budget in seconds; every stage also stops where the whole run's GPU_CHECK_SECONDS end):
#   versions              nvidia-smi, driver, CUDA runtime/driver, cupy, numba(-cuda), torch, jax, python,
#                         gpubp.availability(), git commit                  -> versions.json      (python -m bench.versions)
#   smoke-cupy/-numba     every kernel once at small awkward sizes, poisoned outputs, against the numpy backend
#                                                                           -> smoke/<backend>.jsonl (python -m bench.smoke)
#   sanitizer-memcheck/-racecheck/-synccheck   compute-sanitizer over the cupy op harness at tiny sizes
#                         (skipped, saying so, where compute-sanitizer is not installed)
#   tests                 pytest tests --require-gpu                        -> tests/junit.xml
#   bench-<family>        one process per implementation family: limits, ours-cupy, torch, cublas, ours-numba,
#                         jax; rows appended to bench/rows.jsonl as each case finishes (python -m bench --family)
#   gemm-tc               our tensor-core GEMM against cuBLAS, n = 4096, tf32/bf16/fp16     -> logs/gemm-tc.log
#   report                table, JSON and plots from whatever rows exist   -> bench/bench.{txt,json}, *.png
# Every stage leaves logs/<stage>.log and status/<stage> (one line: stage, status, exit code, seconds, budget,
# first error); stages.tsv and summary.txt are rewritten before and after every stage, so a run killed at any
# point leaves a summary naming the stage it was in. Status: passed, failed, timeout, skipped, killed.
#
# Where results go: a new folder per run, never an earlier one, gpu-<device>-<UTC date>[-N]/, under $OUT when
# it is set, else under bench/results/. GPU_CHECK_DIR names the folder itself. A dry run never writes under
# bench/results/.
# Packed (the device tool brings back at most 8 files from $OUT, 2 folders deep, and a run writes ~40): on a GPU
# run with $OUT set, the folder is made under ${TMPDIR:-/tmp} instead, and after every stage it is packed whole
# into $OUT/<folder>.tar.gz, with $OUT/<folder>-summary.txt beside it (GPU_CHECK_PACK_TO=<dir> packs into <dir>
# in any run). So a call cut at any point still brings back everything finished. To commit: untar the archive
# into bench/results/.
#
# Settings (environment): PYTHON (default python3; the GPU machine has no plain `python`), GPU_CHECK_SECONDS
# (the whole run, default 530), GPU_CHECK_GRACE_SECONDS (SIGINT to KILL, default 10), GPU_CHECK_BUDGET_<STAGE>
# (e.g. GPU_CHECK_BUDGET_TESTS=200; stage names upper-cased, - as _), GPU_CHECK_ONLY=<stage>[,...] (run only
# these, or names starting <stage>-; the others are recorded as skipped), GPU_CHECK_TESTS (pytest arguments
# instead of the default), GPU_CHECK_BENCH_ARGS (default --quick), GPU_CHECK_FAMILIES, GPU_CHECK_COMMIT (recorded where
# the checkout has no .git), GPU_CHECK_PLANT_FAILURE=<stage>[,<stage>...] (that stage fails on purpose, through
# its own checks: proof that a failure is caught and that the later stages still run; a prefix such as `bench`
# names all bench-* stages), GPU_CHECK_DRY=1 (the CPU dry run: cupy on the CPU emulator of tests/, numba on its
# simulator, tiny sizes, CPU bench families; every file says DRY RUN).
# Nothing is installed and the card's settings are left alone (no clocks, no persistence mode, no reset).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DRY="${GPU_CHECK_DRY:-0}"
export GPU_CHECK_DRY="$DRY"
PLANT="${GPU_CHECK_PLANT_FAILURE:-}"
ONLY="${GPU_CHECK_ONLY:-}"
if [ "$DRY" = 1 ]; then TOTAL_S="${GPU_CHECK_SECONDS:-240}"; else TOTAL_S="${GPU_CHECK_SECONDS:-530}"; fi
GRACE_S="${GPU_CHECK_GRACE_SECONDS:-10}"
REPORT_RESERVE_S=35              # kept back for the report stage (its budget and grace) by every stage before it
START=$(date +%s)
DEADLINE=$(( START + TOTAL_S ))

# Python with SIGINT restored: a process started in the background by a non-interactive shell inherits SIGINT
# ignored, and Python then never raises KeyboardInterrupt, so timeout's SIGINT would do nothing until the KILL.
PYRUN=("$PY" -u -c 'import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)')

GPU_LINE=""
[ "$DRY" = 1 ] || GPU_LINE=$(timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)

slug() { tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//'; }

# ---- the run folder ----------------------------------------------------------------------------------------------
if [ -n "${GPU_CHECK_DIR:-}" ]; then
  RUN=$GPU_CHECK_DIR
else
  if [ "$DRY" = 1 ]; then
    base="${OUT:-$(mktemp -d)}"; name="dry-run-cpu-$(date -u +%Y%m%d-%H%M)"
  elif [ -n "${OUT:-}" ]; then   # the device tool's $OUT: pack into it (see above), work elsewhere
    GPU_CHECK_PACK_TO="${GPU_CHECK_PACK_TO:-$OUT}"
    base="${TMPDIR:-/tmp}/gpubp-gpu-check"
    device=$(printf '%s' "${GPU_LINE%%,*}" | slug)
    name="gpu-${device:-no-gpu-found}-$(date -u +%Y%m%d-%H%M)"
  else
    base="$ROOT/bench/results"
    device=$(printf '%s' "${GPU_LINE%%,*}" | slug)
    name="gpu-${device:-no-gpu-found}-$(date -u +%Y%m%d-%H%M)"
  fi
  RUN="$base/$name"; n=2
  while [ -e "$RUN" ]; do RUN="$base/$name-$n"; n=$(( n + 1 )); done
fi
mkdir -p "$RUN"/status "$RUN"/logs "$RUN"/smoke "$RUN"/tests "$RUN"/bench || { echo "cannot make $RUN"; exit 2; }
RUN=$(cd "$RUN" && pwd)
PACK_TO="${GPU_CHECK_PACK_TO:-}"
[ -z "$PACK_TO" ] || mkdir -p "$PACK_TO" || { echo "cannot make $PACK_TO"; exit 2; }
if [ "$DRY" = 1 ]; then
  case "$RUN/" in "$(cd "$ROOT/bench" && pwd)/results/"*)
    echo "refusing: a dry run must not write under bench/results/ ($RUN); set OUT"; exit 2;; esac
fi

# ---- stages: status lines and the summary -------------------------------------------------------------------------
SANITIZER_TOOLS=(memcheck racecheck synccheck)
if [ "$DRY" = 1 ]; then FAMILIES=(${GPU_CHECK_FAMILIES:-limits ours-numpy torch-cpu})
else FAMILIES=(${GPU_CHECK_FAMILIES:-limits ours-cupy torch cublas ours-numba jax}); fi
STAGES=(versions smoke-cupy smoke-numba)
for t in "${SANITIZER_TOOLS[@]}"; do STAGES+=("sanitizer-$t"); done
STAGES+=(tests)
for f in "${FAMILIES[@]}"; do STAGES+=("bench-$f"); done
STAGES+=(gemm-tc report)
CURRENT=""

write_summary() {
  local s line stage status rc secs budget err failed=0 tsv="$RUN/stages.tsv"
  {
    printf 'stage\tstatus\texit\tseconds\tbudget_s\tfirst_error\n'
    for s in "${STAGES[@]}"; do [ -f "$RUN/status/$s" ] && cat "$RUN/status/$s"; done
  } >"$tsv.tmp" && mv "$tsv.tmp" "$tsv"
  {
    if [ "$DRY" = 1 ]; then echo "gpu_check DRY RUN on the CPU (emulated cupy, simulated numba, tiny sizes): NOT a GPU result"
    else echo "gpu_check on ${GPU_LINE:-no GPU found by nvidia-smi}"; fi
    echo "run folder: $RUN"
    echo "started $(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo "$START"), $(( $(date +%s) - START )) s so far of $TOTAL_S s${PLANT:+; planted failure: $PLANT}"
    for s in "${STAGES[@]}"; do
      if [ -f "$RUN/status/$s" ]; then
        IFS=$'\t' read -r stage status rc secs budget err <"$RUN/status/$s"
        case "$status" in failed|timeout|killed) failed=$(( failed + 1 ));; esac
        printf '%-22s %-8s %5s s of %4s s  %s\n' "$s" "$status" "$secs" "$budget" "$err"
      else
        printf '%-22s %s\n' "$s" "pending"
      fi
    done
    echo "stages failed: $failed"
  } >"$RUN/summary.txt.tmp" && mv "$RUN/summary.txt.tmp" "$RUN/summary.txt"
  pack_run
}

pack_run() {   # the run folder whole into $PACK_TO/<folder>.tar.gz (without logs/ past 15 MiB), its summary beside
  [ -n "$PACK_TO" ] || return 0
  local name parent archive
  name=$(basename "$RUN"); parent=$(dirname "$RUN"); archive="$PACK_TO/$name.tar.gz"
  tar -czf "$archive.tmp" -C "$parent" "$name" 2>/dev/null
  if [ "$(stat -c %s "$archive.tmp" 2>/dev/null || echo 0)" -gt 15728640 ]; then
    tar -czf "$archive.tmp" -C "$parent" --exclude="$name/logs" "$name" 2>/dev/null
  fi
  mv "$archive.tmp" "$archive" 2>/dev/null
  cp "$RUN/summary.txt" "$PACK_TO/$name-summary.txt" 2>/dev/null
  return 0
}

set_status() {   # NAME STATUS EXIT SECONDS BUDGET FIRST_ERROR (an empty field is written as -)
  local err=${6//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "${3:--}" "${4:--}" "${5:--}" "${err:0:400}" >"$RUN/status/.$1" &&
    mv "$RUN/status/.$1" "$RUN/status/$1"     # whole or not at all, for a reader or a kill mid-write
  write_summary
}

first_error() {   # LOGFILE: the line most worth reading first
  local log=$1 line
  for pattern in '^(FAIL|FAILED|ERROR)[: ]' '^========= (Invalid|Error|Barrier|Race|.*[Hh]azard|ERROR SUMMARY: [1-9])' \
                 '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt|Exit)(:|$)'; do
    line=$(grep -m1 -E "$pattern" "$log" 2>/dev/null) && { printf '%s' "${line:0:400}"; return; }
  done
  line=$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -1)
  printf '%s' "${line:0:400}"
}

selected() {   # NAME: is the stage to run (GPU_CHECK_ONLY, a list of names or prefixes; all when unset)?
  local p
  [ -z "$ONLY" ] && return 0
  for p in ${ONLY//,/ }; do
    case "$1" in "$p"|"$p"-*) return 0;; esac
  done
  return 1
}

planted() {   # NAME: is a failure planted in this stage?
  local p
  for p in ${PLANT//,/ }; do
    case "$1" in "$p"|"$p"-*) return 0;; esac
  done
  return 1
}

stage_budget() {   # NAME DEFAULT: the stage's budget, within what is left of the run
  local var="GPU_CHECK_BUDGET_$(echo "$1" | tr '[:lower:]-' '[:upper:]_')" reserve=$REPORT_RESERVE_S
  local want=${!var:-$2}
  [ "$1" = report ] && reserve=0
  local left=$(( DEADLINE - $(date +%s) - GRACE_S - reserve ))
  [ "$want" -gt "$left" ] && want=$left
  echo "$want"
}

run_stage() {   # NAME BUDGET_S COMMAND...: run it in its own process, record how it ended
  local name=$1 budget=$2 log="$RUN/logs/$1.log" t0 rc status err plant=0
  shift 2
  if ! selected "$name"; then
    set_status "$name" skipped "" 0 "" "skipped: not selected (GPU_CHECK_ONLY=$ONLY)"
    return
  fi
  if [ "$budget" -lt 1 ]; then
    echo "== $name: skipped, out of time" | tee "$log"
    set_status "$name" skipped "" 0 "$budget" "skipped: out of time (the run's ${TOTAL_S} s are spent)"
    return
  fi
  planted "$name" && plant=1
  echo "== $name (budget ${budget} s$([ $plant = 1 ] && echo ', PLANTED FAILURE'))"
  CURRENT=$name
  set_status "$name" running "" 0 "$budget" "started $(date -u +%H:%M:%SZ)"
  t0=$(date +%s)
  { echo "## $name: $*"; echo "## budget ${budget} s, started $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$log"
  GPU_CHECK_STAGE=$name GPU_CHECK_PLANTED=$plant timeout -s INT -k "$GRACE_S" "$budget" "$@" >>"$log" 2>&1 </dev/null
  rc=$?
  CURRENT=""
  err=$(first_error "$log")
  case $rc in
    0)   status=passed; err=$(grep -m1 '^MISSING:' "$log" | cut -c1-400);;   # an op a backend lacks: worth a look
    77)  status=skipped;;
    124) status=timeout; err="timed out at ${budget} s (SIGINT); ${err}";;
    137) status=timeout; err="timed out at ${budget} s, killed ${GRACE_S} s after SIGINT; ${err}";;
    *)   status=failed;;
  esac
  echo "## exit $rc: $status" >>"$log"
  set_status "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$budget" "$err"
  tail -n 12 "$log" | sed 's/^/   | /'
  echo "== $name: $status ($(( $(date +%s) - t0 )) s)${err:+: ${err:0:200}}"
}

skip_stage() {   # NAME REASON
  selected "$1" || { set_status "$1" skipped "" 0 "" "skipped: not selected (GPU_CHECK_ONLY=$ONLY)"; return; }
  echo "== $1: skipped: $2" | tee "$RUN/logs/$1.log"
  set_status "$1" skipped "" 0 "" "skipped: $2"
}

on_signal() {
  [ -n "$CURRENT" ] && set_status "$CURRENT" killed "" "" "" "the driver got SIG$1 during this stage"
  write_summary
  echo "== gpu_check: stopped by SIG$1; summary in $RUN/summary.txt"
  exit 1
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

write_summary
echo "== gpu_check$([ "$DRY" = 1 ] && echo ' DRY RUN'): run folder $RUN, ${TOTAL_S} s in all"

# ---- 1. versions ------------------------------------------------------------------------------------------------------
b=$(stage_budget versions 30)
run_stage versions "$b" "${PYRUN[@]}" bench.versions --out "$RUN/versions.json"

# ---- 2. smoke: every kernel once, per backend, each in its own process ------------------------------------------------
if [ "$DRY" = 1 ]; then
  b=$(stage_budget smoke-cupy 30)
  run_stage smoke-cupy "$b" "${PYRUN[@]}" bench.smoke --backend cupy --emulate --sizes tiny --dtypes float32 \
            --jsonl "$RUN/smoke/cupy.jsonl"
  b=$(stage_budget smoke-numba 40)
  run_stage smoke-numba "$b" env NUMBA_ENABLE_CUDASIM=1 "${PYRUN[@]}" bench.smoke --backend numba --sizes tiny \
            --dtypes float32 --jsonl "$RUN/smoke/numba.jsonl"
else
  b=$(stage_budget smoke-cupy 60)
  run_stage smoke-cupy "$b" "${PYRUN[@]}" bench.smoke --backend cupy --tiles --jsonl "$RUN/smoke/cupy.jsonl"
  b=$(stage_budget smoke-numba 75)
  run_stage smoke-numba "$b" "${PYRUN[@]}" bench.smoke --backend numba --jsonl "$RUN/smoke/numba.jsonl"
fi

# ---- 3. compute-sanitizer over the cupy op harness, tiny sizes ------------------------------------------------------
declare -A SANITIZER_BUDGET=([memcheck]=40 [racecheck]=45 [synccheck]=30)
for tool in "${SANITIZER_TOOLS[@]}"; do
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    skip_stage "sanitizer-$tool" "not installed (compute-sanitizer is not on PATH)"
  elif [ "$DRY" = 1 ]; then
    skip_stage "sanitizer-$tool" "dry run (no GPU for compute-sanitizer to watch)"
  else
    b=$(stage_budget "sanitizer-$tool" "${SANITIZER_BUDGET[$tool]}")
    run_stage "sanitizer-$tool" "$b" compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
              "${PYRUN[@]}" bench.smoke --backend cupy --sizes tiny --dtypes float32
  fi
done

# ---- 4. the test suite (SIGINT at the budget: pytest still prints its summary and writes the junit xml) -----------
if [ "$DRY" = 1 ]; then
  # a small subset (the cupy cases skip: smoke-cupy has already run the emulator, which takes a g++ build)
  TESTS_ARGS=(${GPU_CHECK_TESTS:-tests/test_seed_example.py})
else
  # the tests that run on the GPU (the gpu marker: every cupy case, numba off the simulator, the GPU-only
  # tests); the CPU-only rest ran in CI, and the whole suite would not fit in the stage's budget
  TESTS_ARGS=(${GPU_CHECK_TESTS:-tests -m gpu --require-gpu})
fi
# COLUMNS: pytest cuts its short summary lines at the terminal's width, and the first error comes from there
planted tests && TESTS_ARGS+=(bench/planted_failure.py)
b=$(stage_budget tests 150)
run_stage tests "$b" env COLUMNS=400 "PYTHONPATH=$ROOT/tests:$PYTHONPATH" "${PYRUN[@]}" pytest "${TESTS_ARGS[@]}" -q -rfE -p no:cacheprovider --durations=15 \
          --junitxml="$RUN/tests/junit.xml"

# ---- 5. benchmarks: one process per implementation family, rows streamed to bench/rows.jsonl -------------------------
declare -A FAMILY_BUDGET=([limits]=20 [ours-cupy]=70 [torch]=40 [cublas]=15 [ours-numba]=50 [jax]=30
                          [ours-numpy]=30 [torch-cpu]=30)
if [ "$DRY" = 1 ]; then BENCH_ARGS=(--device cpu --smoke --workloads train,fit)
else BENCH_ARGS=(--device cuda --require-rows ${GPU_CHECK_BENCH_ARGS:---quick}); fi
for fam in "${FAMILIES[@]}"; do
  b=$(stage_budget "bench-$fam" "${FAMILY_BUDGET[$fam]:-30}")
  inner=$(( b > 20 ? b - 10 : b * 2 / 3 ))   # the suite stops starting rows here; the stage's SIGINT comes later
  run_stage "bench-$fam" "$b" "${PYRUN[@]}" bench --family "$fam" "${BENCH_ARGS[@]}" --budget "$inner" \
            --jsonl "$RUN/bench/rows.jsonl" --no-save
done

# ---- 6. the tensor-core GEMM against cuBLAS in tf32/bf16/fp16 (bench/gemm_tc.py; says why where no GPU) ----------
b=$(stage_budget gemm-tc 40)
run_stage gemm-tc "$b" "${PYRUN[@]}" bench.gemm_tc $([ "$DRY" = 1 ] && echo "--n 64 --repeats 3")

# ---- 7. the table and plots from whatever rows exist -------------------------------------------------------------------
b=$(stage_budget report 25)
run_stage report "$b" "${PYRUN[@]}" bench.report --jsonl "$RUN/bench/rows.jsonl" --out "$RUN/bench" --stem bench \
          --versions "$RUN/versions.json"

write_summary
# the table, then the summary last: a caller that keeps only the end of the output (the device tool keeps the
# last 12,000 characters) still gets the summary
[ -f "$RUN/bench/bench.txt" ] && { echo; cat "$RUN/bench/bench.txt"; }
echo
cat "$RUN/summary.txt"
echo "== done in $(( $(date +%s) - START )) s; files under $RUN${PACK_TO:+, packed into $PACK_TO/$(basename "$RUN").tar.gz}"
grep -q -E '^stages failed: 0$' "$RUN/summary.txt"
