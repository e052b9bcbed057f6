#!/usr/bin/env bash
# One GPU call for the Hopper backward alone (csrc/cuda/sm90_bwd.cu, without torch): build the
# standalone harness, then run the phases given, each under its own timeout, logs in $OUT.
#
#   bash benchmarks/sm90_bwd_run.sh small check sanitize time
#
#   small     the five small cases: a hang shows as "HANG" after 20 s (the harness watchdog)
#   check     every correctness case (sm90, the sm80 yardstick, the persistent sm90p / sm90p2)
#   sanitize  compute-sanitizer memcheck + racecheck + synccheck on the small cases (all variants;
#             sm90p2 walks several items per block there)
#   time      the standard grid, sm90 vs sm80 vs sm90p (persistent) backward, TFLOP/s
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flash_mha_out}
mkdir -p "$OUT" .bin
bin=.bin/sm90_bwd_harness
nvcc -O3 -std=c++17 --expt-relaxed-constexpr -DFLASH_MHA_WITH_CUDA -Icsrc -gencode arch=compute_90a,code=sm_90a \
  -lineinfo -Xptxas -v -o "$bin" benchmarks/sm90_bwd_harness.cu csrc/cuda/sm90_bwd.cu csrc/cuda/sm80_bwd.cu csrc/cuda/simt_attention.cu \
  >"$OUT/sm90_bwd_build.log" 2>&1 || { echo "build FAILED"; tail -20 "$OUT/sm90_bwd_build.log"; exit 1; }
awk '/Compiling entry function .*sm90_bwd_kernel/ {k = ($0 ~ /nv_bfloat16/ ? "bf16" : "fp16") ($0 ~ /Li128E/ ? " d128" : " d64") ($0 ~ /Lb1ELb0ELb0E/ ? " persistent" : $0 ~ /Lb1ELb0ELb1E/ ? " persistent key-mask" : $0 ~ /Lb0ELb0ELb1E/ ? " key-mask" : $0 ~ /Lb0ELb1ELb0E/ ? " general" : " default"); next}
     k && /spill stores/ {sub(/^ +/, ""); print k ": " $0; k = ""}' "$OUT/sm90_bwd_build.log"
for phase in "$@"; do
  case "$phase" in
    small) timeout 60 "$bin" small 2>&1 | tee "$OUT/sm90_bwd_small.log" ;;
    check) timeout 240 "$bin" check 2>&1 | tee "$OUT/sm90_bwd_check.log" ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        echo "== compute-sanitizer --tool $tool"
        timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 99 "$bin" small >"$OUT/sm90_bwd_$tool.log" 2>&1
        echo "== $tool exit code: $?"
        tail -3 "$OUT/sm90_bwd_$tool.log"
      done ;;
    time) timeout 200 "$bin" time 2>&1 | tee "$OUT/sm90_bwd_time.log" ;;
    *) echo "unknown phase $phase" ;;
  esac
  echo "== $phase exit code: ${PIPESTATUS[0]}"
done
