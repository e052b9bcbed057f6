#!/usr/bin/env bash
# Runs benchmarks/gpu_smoke.py under compute-sanitizer's memcheck, racecheck and initcheck.
# Run on the GPU machine after every kernel change; the last clean run is recorded in csrc/cuda/NOTES.md.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
# SANITIZE_TOOLS overrides the list (e.g. add synccheck: invalid barrier use).
for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
  echo "== compute-sanitizer --tool $tool"
  log=$(mktemp)
  compute-sanitizer --tool "$tool" --error-exitcode 99 python3 benchmarks/gpu_smoke.py >"$log" 2>&1
  rc=$?
  # The first reports in full (kernel, access, source line), then the summary.
  grep -m 12 -A 8 -E "^========= (Error|Race reported|Invalid|Uninitialized|Warning)" "$log" | cut -c1-900
  tail -4 "$log"
  rm -f "$log"
  echo "== $tool exit code: $rc"
  [ "$rc" = 0 ] || status=1
done
exit $status
