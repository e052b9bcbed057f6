#!/usr/bin/env bash
# On the GPU machine: builds flash_mha in place plus two tuning variants of the tensor-core kernels
# (each a copy under /tmp with one traits line changed), checks every build against the float64
# reference, runs compute-sanitizer (memcheck, racecheck) and the CUDA tests on the main build,
# and times all three (main with SDPA FLASH alongside). Logs go to $OUT (default /tmp/fmha_out).
#
#   main: as committed
#   B:    forward skips padding columns with a runtime branch (kGuardDims); backward 8 warps for d = 64 too
#   C:    forward one m16 tile per warp, 64-key tiles, 3 blocks per SM for d <= 128
#   D:    forward 64-key tiles for d = 128 too (more spills, half the softmax steps per key)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fmha_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader

variant() {  # name fwd-sed bwd-sed
  local dir=/tmp/fmha_$1
  rm -rf "$dir" && mkdir -p "$dir" && cp -r setup.py pyproject.toml csrc flash_mha benchmarks "$dir"/
  rm -f "$dir"/flash_mha/_C*.so
  (cd "$dir" && sed -i "$2" csrc/cuda/sm80_fwd.cu && sed -i "$3" csrc/cuda/sm80_bwd.cu &&
   MAX_JOBS=5 python setup.py build_ext --inplace > "$OUT/build_$1.log" 2>&1) || echo "build $1 FAILED"
}
t0=$(date +%s)
(MAX_JOBS=5 python setup.py build_ext --inplace > "$OUT/build_main.log" 2>&1 || echo "build main FAILED") &
variant B 's/kGuardDims = false;/kGuardDims = true;/' 's/int kWarps = kD <= 64 ? 4 : 8;/int kWarps = 8;/' &
variant D 's/int kBlockN = kD <= 64 ? 64 : 32;/int kBlockN = kD <= 128 ? 64 : 32;/' 's/^$//' &
variant C 's/int kMT = kD <= 128 ? 2 : 1;/int kMT = 1;/; s/int kBlockN = kD <= 64 ? 64 : 32;/int kBlockN = kD <= 128 ? 64 : 32;/; s/int kMinBlocks = 1;/int kMinBlocks = kD <= 128 ? 3 : 1;/' 's/^$//' &
wait
echo "builds: $(( $(date +%s) - t0 )) s"; grep -h "spill" "$OUT"/build_main.log | sed 's/.*function .\(_Z[^ ]*\)., \(.*\)/\2/' | sort | uniq -c | head -5

check() {  # name
  local dir=$PWD; [ "$1" = main ] || dir=/tmp/fmha_$1
  (cd "$dir" && PYTHONPATH="$dir" timeout 100 python benchmarks/check_cuda.py --no-bench > "$OUT/check_$1.log" 2>&1)
  echo "check $1: rc=$? $(grep -E '^correctness' "$OUT/check_$1.log")"
  grep -E "^FAIL" "$OUT/check_$1.log" | head -8
}
check main
grep -E "worst" "$OUT/check_main.log" | tr -s ' ' | paste -sd ' ' | fold -w 200
PYTHONPATH=$PWD timeout 120 python benchmarks/check_cuda.py --bench-only > "$OUT/bench_main.log" 2>&1
echo "== main (with SDPA FLASH)"; grep -E "^(case|bf16|fp32)" "$OUT/bench_main.log"
for v in B C D; do
  check $v
  (cd /tmp/fmha_$v && PYTHONPATH=/tmp/fmha_$v timeout 80 python benchmarks/check_cuda.py --bench-only --fmha-only > "$OUT/bench_$v.log" 2>&1)
  echo "== variant $v"; grep -E "^bf16" "$OUT/bench_$v.log"
done

PYTHONPATH=$PWD timeout 100 compute-sanitizer --tool memcheck --error-exitcode 99 python benchmarks/check_cuda.py --quick > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY|^correctness' "$OUT/memcheck.log" | tr '\n' ' ')"
PYTHONPATH=$PWD timeout 120 compute-sanitizer --tool racecheck --error-exitcode 99 python benchmarks/check_cuda.py --tiny > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|^correctness' "$OUT/racecheck.log" | tr '\n' ' ')"
PYTHONPATH=$PWD timeout 60 python -m pytest -q tests -k cuda > "$OUT/pytest.log" 2>&1
echo "pytest -k cuda: $(tail -1 "$OUT/pytest.log")"; grep -E "^FAILED" "$OUT/pytest.log" | head -5
echo "total: $(( $(date +%s) - t0 )) s"
