#!/usr/bin/env bash
# profile.sh: ncu over the hottest kernels of our cupy backend, in ONE device call (ends inside 9 minutes).
#
#   PYTHONPATH=$PWD bash bench/profile.sh                  (repository root, on the GPU machine, after gpu_check)
#   PROFILE_DRY=1 OUT=/tmp/x bash bench/profile.sh         (CI: runs nothing on a device, exits 77)
#
# Cases (bench/profile_step.py): a-fp32 784-1024-1024-10 b1024 float32 (SIMT GEMMs), b-bf16 the same in bf16
# (dense_tc kernels), c-fused 64x4 b65536 bf16 fused="auto" (fused_mlp kernels), d-gemm-tc bench/gemm_tc.py's GEMM
# at 4096 in bf16. Each case is its own ncu process with its own budget (SIGINT, then KILL 10 s later):
#   ncu --profile-from-start off   the step program warms up, then profiles exactly one step between
#                                  cudaProfilerStart/Stop: no --launch-skip has to guess the warm-up's launches
#   -k regex:<the case's kernels> --launch-count <cap>   (cap above one step's launches of those kernels)
#   --graph-profiling node         (the step runs eagerly, graphs off; named so a stray graph shows its kernels)
#   --clock-control none           the card's clocks are left as they are (ncu's default would lock them to base)
#   --section SpeedOfLight Occupancy LaunchStats WarpStateStats ComputeWorkloadAnalysis MemoryWorkloadAnalysis
#   --metrics <the FLOP counts, tensor pipe, occupancy, DRAM>, those `ncu --query-metrics` lists
# then `ncu --import <case>.ncu-rep --csv --page raw --print-units base > <case>.csv`, and
# python -m bench.profile_summary writes summary.txt from the CSVs.
#
# Writes, in a new folder profile-<device>-<UTC date>[-N]/ under $OUT when set, else bench/results/ (at most 8
# files, as the device tool brings back): summary.txt, profile.log, status.tsv, <case>.csv for each case,
# extras.tar.gz (the .ncu-rep reports, per-case logs, the metric listing, commands.txt).
# Settings: PYTHON (default python3), PROFILE_NCU (default ncu), PROFILE_SECONDS (default 520),
# PROFILE_CASES (default all four), PROFILE_BUDGET_<CASE> (e.g. PROFILE_BUDGET_D_GEMM_TC=90), PROFILE_DIR (the
# folder itself), PROFILE_DRY=1. Without ncu or a GPU (or with PROFILE_DRY=1) nothing runs on a device: the
# summary says so, commands.txt holds what would have run, and the exit status is 77.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-python3}"
NCU="${PROFILE_NCU:-ncu}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DRY="${PROFILE_DRY:-0}"
TOTAL_S="${PROFILE_SECONDS:-520}"
GRACE_S=10
START=$(date +%s)
DEADLINE=$(( START + TOTAL_S ))
RESERVE_S=25                 # kept back for the CSV export, the summary and the tarball
slug() { tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//'; }

# ---- can anything run here? ------------------------------------------------------------------------------------------
WHY=""
GPU_LINE=""
if [ "$DRY" = 1 ]; then
  WHY="DRY RUN (PROFILE_DRY=1): no ncu was started and nothing ran on a GPU; NOT a profile"
elif ! command -v "$NCU" >/dev/null 2>&1; then
  WHY="skipped: ncu not found ($NCU is not on PATH): nothing was profiled"
else
  GPU_LINE=$(timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
  [ -n "$GPU_LINE" ] || WHY="skipped: no GPU found by nvidia-smi: nothing was profiled"
fi

# ---- the run folder --------------------------------------------------------------------------------------------------
if [ -n "${PROFILE_DIR:-}" ]; then
  RUN=$PROFILE_DIR
else
  device=$(printf '%s' "${GPU_LINE%%,*}" | slug)
  [ "$DRY" = 1 ] && device=dry-run
  base="${OUT:-$ROOT/bench/results}"
  [ -n "$WHY" ] && [ -z "${OUT:-}" ] && base=$(mktemp -d)   # nothing measured: never under bench/results/
  name="profile-${device:-no-gpu}-$(date -u +%Y%m%d-%H%M)"
  RUN="$base/$name"; n=2
  while [ -e "$RUN" ]; do RUN="$base/$name-$n"; n=$(( n + 1 )); done
fi
if [ -n "$WHY" ]; then
  case "$(mkdir -p "$RUN" && cd "$RUN" && pwd)/" in "$(cd "$ROOT/bench" && pwd)/results/"*)
    rmdir "$RUN" 2>/dev/null
    echo "refusing: no profile ran ($WHY), and bench/results/ holds measurements only; set OUT"; exit 2;; esac
fi
mkdir -p "$RUN/extras" || { echo "cannot make $RUN"; exit 2; }
RUN=$(cd "$RUN" && pwd)
LOG="$RUN/profile.log"
STATUS="$RUN/status.tsv"
: >"$STATUS"

mapfile -t CASE_LINES < <("$PY" -m bench.profile_step --list)
[ ${#CASE_LINES[@]} -gt 0 ] || { echo "bench.profile_step --list gave no cases" | tee "$LOG"; exit 2; }
WANT="${PROFILE_CASES:-}"

if [ -n "$WHY" ]; then METRICS=$("$PY" -m bench.profile_step --metrics -)
else
  timeout 60 "$NCU" --query-metrics >"$RUN/extras/metrics-available.txt" 2>&1
  METRICS=$("$PY" -m bench.profile_step --metrics "$RUN/extras/metrics-available.txt")
  [ -n "$METRICS" ] || METRICS=$("$PY" -m bench.profile_step --metrics -)   # listing failed: ask for all, see log
fi
SECTION_ARGS=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
              --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis)

ncu_command() {   # CASE REGEX COUNT: the command line, one word an element, into CMD
  CMD=("$NCU" --target-processes all --profile-from-start off --graph-profiling node --clock-control none
       -k "regex:.*($2).*" --launch-skip 0 --launch-count "$3" "${SECTION_ARGS[@]}" --metrics "$METRICS"
       -o "$RUN/extras/$1" -f "$PY" -m bench.profile_step --case "$1")
}

finish() {   # NOTE EXIT: export nothing more; summary, tarball, print
  local note=$1 rc=$2
  "$PY" -m bench.profile_summary --dir "$RUN" --status "$STATUS" --note "$note" --out "$RUN/summary.txt" \
    >/dev/null 2>>"$LOG" || { [ "$rc" = 0 ] && rc=1; }
  (cd "$RUN" && tar czf extras.tar.gz extras) 2>>"$LOG"
  if [ "$(stat -c %s "$RUN/extras.tar.gz" 2>/dev/null || echo 0)" -gt 15000000 ]; then   # the tool's 16 MiB a file
    echo "extras.tar.gz over 15 MB: packed again without the .ncu-rep reports" | tee -a "$LOG"
    (cd "$RUN" && tar czf extras.tar.gz --exclude='*.ncu-rep' extras) 2>>"$LOG"
  fi
  rm -rf "$RUN/extras"
  echo; cat "$RUN/summary.txt"
  echo "== profile: done in $(( $(date +%s) - START )) s; files under $RUN"
  exit "$rc"
}

{ echo "# profile.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), ${GPU_LINE:-no GPU line}"; echo "# metrics: $METRICS"; } >>"$LOG"
for line in "${CASE_LINES[@]}"; do
  IFS=$'\t' read -r cname regex count <<<"$line"
  ncu_command "$cname" "$regex" "$count"
  printf '%q ' "${CMD[@]}" >>"$RUN/extras/commands.txt"; echo >>"$RUN/extras/commands.txt"
done

if [ -n "$WHY" ]; then
  for line in "${CASE_LINES[@]}"; do
    printf '%s\tskipped\t-\t0\t%s\n' "${line%%$'\t'*}" "$WHY" >>"$STATUS"
  done
  echo "$WHY" | tee -a "$LOG"
  finish "profile: $WHY (the ncu command lines are in extras.tar.gz: extras/commands.txt)" 77
fi

failed=0
declare -A DEFAULT_BUDGET=([a-fp32]=110 [b-bf16]=140 [c-fused]=120 [d-gemm-tc]=90)
for line in "${CASE_LINES[@]}"; do
  IFS=$'\t' read -r cname regex count <<<"$line"
  if [ -n "$WANT" ] && [[ ",$WANT," != *",$cname,"* ]]; then
    printf '%s\tskipped\t-\t0\tnot selected (PROFILE_CASES=%s)\n' "$cname" "$WANT" >>"$STATUS"; continue
  fi
  var="PROFILE_BUDGET_$(echo "$cname" | tr '[:lower:]-' '[:upper:]_')"
  budget=${!var:-${DEFAULT_BUDGET[$cname]:-100}}
  left=$(( DEADLINE - $(date +%s) - GRACE_S - RESERVE_S ))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 10 ]; then
    printf '%s\tskipped\t-\t0\tout of time (the run'"'"'s %s s are spent)\n' "$cname" "$TOTAL_S" >>"$STATUS"; continue
  fi
  ncu_command "$cname" "$regex" "$count"
  echo "== $cname (budget $budget s): ${CMD[*]}" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -s INT -k "$GRACE_S" "$budget" "${CMD[@]}" >"$RUN/extras/$cname.log" 2>&1 </dev/null
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  tail -n 15 "$RUN/extras/$cname.log" | sed 's/^/   | /' | tee -a "$LOG"
  err=""
  if [ -f "$RUN/extras/$cname.ncu-rep" ]; then
    timeout 30 "$NCU" --import "$RUN/extras/$cname.ncu-rep" --csv --page raw --print-units base >"$RUN/$cname.csv" \
      2>>"$RUN/extras/$cname.log" || err="the CSV export failed; "
  fi
  case $rc in
    0) status=passed;; 77) status=skipped;; 124|137) status=timeout; err+="timed out at $budget s; ";;
    *) status=failed;;
  esac
  [ -f "$RUN/extras/$cname.ncu-rep" ] || { err+="no report written; "; [ "$status" = passed ] && status=failed; }
  err+=$(grep -m1 -E '==ERROR==|Error|error' "$RUN/extras/$cname.log" | cut -c1-300)
  case $status in failed|timeout) failed=$(( failed + 1 ));; esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$cname" "$status" "$rc" "$secs" "${err//$'\t'/ }" >>"$STATUS"
  echo "== $cname: $status ($secs s) ${err:0:200}" | tee -a "$LOG"
done
finish "profile on ${GPU_LINE}: ncu $("$NCU" --version 2>/dev/null | tail -1), clocks not locked (--clock-control none)" \
       $([ $failed = 0 ] && echo 0 || echo 1)
