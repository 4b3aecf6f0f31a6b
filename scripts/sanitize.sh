#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over every kernel variant and
# the edge shapes in scripts/sanitize_cases.py. Needs a GPU; logs go to $OUT (default
# ./device_out). Exit status is non-zero if any tool reports an error.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
python3 -m cuqk precompile > /dev/null  # compile outside the sanitizer
status=0
for tool in memcheck racecheck initcheck synccheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
    python3 scripts/sanitize_cases.py > "$OUT/sanitize_$tool.log" 2>&1
  rc=$?
  echo "$tool: exit $rc; $(grep -h 'ERROR SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
  [[ $rc -eq 0 ]] || status=1
done
exit $status
