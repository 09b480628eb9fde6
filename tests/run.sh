#!/usr/bin/env bash
# The project's test command (the README's second command; .ci/run calls it too). Two pytest processes:
#   1. every test; GPU-backend cases skip with the probe's reason where no GPU can run;
#   2. the numba backend's tests under the CUDA simulator, which must be switched on before numba is imported,
#      hence a process of its own (NUMBA_ENABLE_CUDASIM=1), at small sizes.
# Extra arguments go to both pytest runs (e.g. -x, -k seed).
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi

echo "== pytest: all tests =="
"$py" -m pytest tests "$@"
main=$?

echo "== pytest: numba backend under the CUDA simulator =="
NUMBA_ENABLE_CUDASIM=1 "$py" -m pytest tests -m numba "$@"
sim=$?

echo "== results: all tests exit $main, simulator exit $sim =="
[ "$main" -eq 0 ] && [ "$sim" -eq 0 ]
