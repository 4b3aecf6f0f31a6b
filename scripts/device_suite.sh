#!/usr/bin/env bash
# The whole GPU check in one call: environment, kernel resource usage, the test suite (CPU and
# GPU parts), the selftest and the benchmark. Logs go to $OUT (default ./device_out).
#   scripts/device_suite.sh            everything
#   scripts/device_suite.sh tests      tests only
#   scripts/device_suite.sh bench ARGS benchmark only, ARGS passed to `python -m cuqk bench`
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cuqk-cupy-cache}
what=${1:-all}
shift || true
status=0

if [[ $what == all || $what == tests ]]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.txt"
  python3 -m cuqk info 2>&1 | tee -a "$OUT/env.txt" || true
  python3 -m cuqk precompile 2>&1 | tee "$OUT/precompile.txt"
  python3 -m pytest -q -rfE --durations=15 tests 2>&1 \
    | tee "$OUT/pytest.log"
  status=$((status | ${PIPESTATUS[0]}))
  python3 -m cuqk selftest 2>&1 | tee "$OUT/selftest.log"
  status=$((status | ${PIPESTATUS[0]}))
fi
if [[ $what == all || $what == bench ]]; then
  python3 scripts/profile_host.py > "$OUT/profile.txt" 2>&1
  python3 -m cuqk bench --json "$OUT/bench.json" --plot "$OUT/bench.png" "$@" 2>&1 \
    | tee "$OUT/bench.log"
  status=$((status | ${PIPESTATUS[0]}))
fi
exit $status
