#!/usr/bin/env bash
# The whole GPU check in one call: environment, kernel resource usage, the test suite (CPU and
# GPU parts), the selftest, compute-sanitizer and the benchmarks. Logs go to $OUT (default
# ./device_out): every log in logs.tar.gz, and beside it the few a reader looks at first (the
# device tool brings back at most 8 files).
#   scripts/device_suite.sh              everything
#   scripts/device_suite.sh tests        tests and selftest only
#   scripts/device_suite.sh sanitize     compute-sanitizer only (scripts/sanitize.sh)
#   scripts/device_suite.sh bench ARGS   kernel benchmark only, ARGS go to `python -m cuqk bench`
#   scripts/device_suite.sh e2e          decoder-layer benchmark only (`bench --e2e`)
# The device has no network: transformers (integration tests, e2e) installs from ./wheels when
# that folder was carried along (pip download transformers==5.23.0 -d wheels, minus numpy).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
LOG=$OUT/logs
mkdir -p "$LOG"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cuqk-cupy-cache}
what=${1:-all}
shift || true
status=0
if [[ -d wheels ]] && ! python3 -c 'import transformers' 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links wheels transformers==5.23.0 2>&1 | tail -2
fi

if [[ $what == all || $what == tests ]]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$LOG/env.txt"
  python3 -m cuqk info 2>&1 | tee -a "$LOG/env.txt" || true
  python3 -m cuqk precompile 2>&1 | tee "$LOG/precompile.txt"
  # Four pytest processes side by side (the GPU is mostly idle in these small cases): the
  # kernel grids, the model integrations, the fusion pass (Inductor compiles), and every
  # other file.
  kernels=(tests/test_qk_norm_rope.py tests/test_fuzz.py)
  models=(tests/test_integrations_transformers.py)
  fusion=(tests/test_fusion.py)
  others=()
  for f in tests/test_*.py; do
    [[ " ${kernels[*]} ${models[*]} ${fusion[*]} " == *" $f "* ]] || others+=("$f")
  done
  pids=()
  for group in kernels models fusion others; do
    declare -n files=$group
    python3 -m pytest -q -rfE --durations=8 "${files[@]}" > "$LOG/pytest_$group.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid"
    status=$((status | $?))
  done
  tail -n 3 "$LOG"/pytest_*.log | tee "$LOG/pytest.log"
  grep -h -E "^(FAILED|ERROR)" "$LOG"/pytest_*.log | tee -a "$LOG/pytest.log"
  python3 -m cuqk selftest 2>&1 | tee "$LOG/selftest.log"
  status=$((status | ${PIPESTATUS[0]}))
fi
if [[ $what == all || $what == sanitize ]]; then
  OUT=$LOG/sanitize scripts/sanitize.sh 2>&1 | tee "$LOG/sanitize.txt"
  status=$((status | ${PIPESTATUS[0]}))
fi
if [[ $what == all || $what == bench ]]; then
  python3 scripts/profile_host.py > "$LOG/profile.txt" 2>&1
  python3 -m cuqk bench --json "$LOG/bench.json" --plot "$LOG/bench.png" "$@" 2>&1 \
    | tee "$LOG/bench.log"
  status=$((status | ${PIPESTATUS[0]}))
fi
if [[ $what == all || $what == e2e ]]; then
  python3 -m cuqk bench --e2e --json "$LOG/e2e.json" 2>&1 | tee "$LOG/e2e.log"
  status=$((status | ${PIPESTATUS[0]}))
fi
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs
for f in pytest.log selftest.log sanitize.txt bench.log bench.json bench.png e2e.log; do
  [[ -f $LOG/$f ]] && cp "$LOG/$f" "$OUT/"
done
rm -rf "$LOG"
exit $status
