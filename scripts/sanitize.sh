#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over scripts/sanitize_cases.py:
# every kernel variant through every op, each flag and the edge shapes. Needs a GPU.
# Prints one line per tool (its error count, the cases' own summary, the exit status); full
# logs go to $OUT (default ./device_out). Exit status is non-zero if any tool reports an error,
# a case fails or a variant is not reached.
#   SANITIZER=path        compute-sanitizer to use (default: PATH, /usr/local/cuda/bin, or the
#                         nvidia-cuda-sanitizer-api wheel of python3)
#   SANITIZE_SERIAL=1     run the tools one after another instead of side by side
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# Exact-size allocations: with torch's caching allocator an overrun lands inside a larger block
# the sanitizer counts as valid.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

sanitizer=${SANITIZER:-$(command -v compute-sanitizer || true)}
if [[ -z $sanitizer && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  sanitizer=/usr/local/cuda/bin/compute-sanitizer
fi
if [[ -z $sanitizer ]]; then
  sanitizer=$(python3 -c 'import glob, os, site
hits = [p for d in site.getsitepackages()
        for p in glob.glob(os.path.join(d, "nvidia", "**", "compute-sanitizer"), recursive=True)
        if os.path.isfile(p) and os.access(p, os.X_OK)]
print(hits[0] if hits else "")')
fi
if [[ -z $sanitizer ]]; then
  echo "compute-sanitizer not found: install the CUDA toolkit or the nvidia-cuda-sanitizer-api" \
       "wheel, or set SANITIZER" >&2
  exit 2
fi

# Compile outside the sanitizer; the runs below load every variant from the disk cache.
if ! python3 -m cuqk precompile > "$OUT/sanitize_precompile.log" 2>&1; then
  echo "precompile failed; see $OUT/sanitize_precompile.log" >&2
  exit 1
fi

tools=(memcheck racecheck initcheck synccheck)
run_tool() {
  "$sanitizer" --tool "$1" --error-exitcode 99 --target-processes all \
    python3 scripts/sanitize_cases.py > "$OUT/sanitize_$1.log" 2>&1
  echo $? > "$OUT/sanitize_$1.rc"
}
start=$SECONDS
if [[ ${SANITIZE_SERIAL:-0} == 1 ]]; then
  for tool in "${tools[@]}"; do run_tool "$tool"; done
else
  for tool in "${tools[@]}"; do run_tool "$tool" & done
  wait
fi

status=0
for tool in "${tools[@]}"; do
  rc=$(cat "$OUT/sanitize_$tool.rc")
  # racecheck reports "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)".
  errors=$(grep -hE '(ERROR|RACECHECK) SUMMARY' "$OUT/sanitize_$tool.log" | tail -1 \
           | sed 's/^=* *//')
  cases=$(grep -hE '^[0-9]+ cases, ' "$OUT/sanitize_$tool.log" | tail -1)
  echo "$tool: ${errors:-no ERROR SUMMARY (sanitizer did not finish)};" \
       "${cases:-cases did not finish}; exit $rc"
  [[ $rc -eq 0 && -n $errors && -n $cases ]] || status=1
done
echo "sanitize: $((SECONDS - start)) s with $("$sanitizer" --version | tail -1)"
exit $status
