#!/usr/bin/env bash
# The whole GPU check in one call: environment, kernel resource usage, the test suite (CPU and
# GPU parts), the selftest, compute-sanitizer and the benchmarks. Logs go to $OUT (default
# ./device_out).
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
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cuqk-cupy-cache}
what=${1:-all}
shift || true
status=0
if [[ -d wheels ]] && ! python3 -c 'import transformers' 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links wheels transformers==5.23.0 2>&1 | tail -2
fi

if [[ $what == all || $what == tests ]]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.txt"
  python3 -m cuqk info 2>&1 | tee -a "$OUT/env.txt" || true
  python3 -m cuqk precompile 2>&1 | tee "$OUT/precompile.txt"
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
    python3 -m pytest -q -rfE --durations=8 "${files[@]}" > "$OUT/pytest_$group.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid"
    status=$((status | $?))
  done
  tail -n 3 "$OUT"/pytest_*.log | tee "$OUT/pytest.log"
  grep -h -E "^(FAILED|ERROR)" "$OUT"/pytest_*.log | tee -a "$OUT/pytest.log"
  python3 -m cuqk selftest 2>&1 | tee "$OUT/selftest.log"
  status=$((status | ${PIPESTATUS[0]}))
fi
if [[ $what == all || $what == sanitize ]]; then
  scripts/sanitize.sh 2>&1 | tee "$OUT/sanitize.txt"
  status=$((status | ${PIPESTATUS[0]}))
fi
if [[ $what == all || $what == bench ]]; then
  python3 scripts/profile_host.py > "$OUT/profile.txt" 2>&1
  python3 -m cuqk bench --json "$OUT/bench.json" --plot "$OUT/bench.png" "$@" 2>&1 \
    | tee "$OUT/bench.log"
  status=$((status | ${PIPESTATUS[0]}))
fi
if [[ $what == all || $what == e2e ]]; then
  python3 -m cuqk bench --e2e --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
  status=$((status | ${PIPESTATUS[0]}))
fi
exit $status
