#!/usr/bin/env bash
# Runs benchmarks/gpu_smoke.py under compute-sanitizer's memcheck, racecheck and initcheck.
# Run on the GPU machine after every kernel change; the last clean run is recorded in csrc/cuda/NOTES.md.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for tool in memcheck racecheck initcheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 99 python3 benchmarks/gpu_smoke.py 2>&1 | tail -4
  rc=${PIPESTATUS[0]}
  echo "== $tool exit code: $rc"
  [ "$rc" = 0 ] || status=1
done
exit $status
