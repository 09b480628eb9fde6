#!/usr/bin/env bash
# The project's test command (the README's second command; .ci/run calls it too). Two pytest processes:
#   1. every test; GPU-backend cases skip with the probe's reason where no GPU can run;
#   2. the numba backend's tests under the CUDA simulator, which must be switched on before numba is imported,
#      hence a process of its own (NUMBA_ENABLE_CUDASIM=1), at small sizes.
# Both are single-threaded Python most of the time, so they run side by side (CI has 2 cores: ~6 min instead of
# ~11 one after the other). The first streams its output; the simulator's is kept in a log and printed after.
# Extra arguments go to both pytest runs (e.g. -x, -k seed).
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi

sim_log=$(mktemp "${TMPDIR:-/tmp}/gpubp-simulator.XXXXXX")
trap 'rm -f "$sim_log"' EXIT
NUMBA_ENABLE_CUDASIM=1 "$py" -m pytest tests -m numba "$@" >"$sim_log" 2>&1 &
sim_pid=$!

echo "== pytest: all tests =="
"$py" -m pytest tests "$@"
main=$?

wait "$sim_pid"
sim=$?
echo "== pytest: numba backend under the CUDA simulator (ran alongside) =="
cat "$sim_log"

echo "== results: all tests exit $main, simulator exit $sim =="
[ "$main" -eq 0 ] && [ "$sim" -eq 0 ]
