#!/usr/bin/env bash
# One use of the GPU machine: build, GPU test suite, sanitizers, benchmark; logs under $OUT.
#
#   bash benchmarks/device_run.sh build test sanitize   # first call (about 9 minutes)
#   bash benchmarks/device_run.sh bench                 # second call, same warm machine
#   bash benchmarks/device_run.sh build quick           # after a kernel change: forced paths + smoke
#   bash benchmarks/device_run.sh flags_on build quick  # the prepared (off) Hopper paths switched on
#                                                       # (FLAGS_ON="kQDoubleBuffer ..." picks some)
#   bash benchmarks/device_run.sh probe                 # racecheck_probe.cu under racecheck
#
# Phases run in the order given; each writes $OUT/<phase>.log and prints a short summary last.
# Wheels for packages the machine lacks (hypothesis, ...) are taken from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flash_mha_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary=()

deps() {
  python3 -c "import hypothesis, expecttest" 2>/dev/null && return
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

phase_build() {
  local t0=$SECONDS
  # Hopper only on the device (halves the build); the default list is "8.0;9.0a".
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1
  local rc=$?
  grep -E "spill|warning C7508|error" "$OUT/build.log" | grep -v "0 bytes spill" | head -20
  summary+=("build rc=$rc in $((SECONDS - t0)) s")
  python3 -c "import flash_mha, torch; print('built_with_cuda', flash_mha.built_with_cuda(), torch.cuda.get_device_name())"
}

phase_test() {
  local t0=$SECONDS
  deps
  # Everything but the fuzzers, then the fuzzers with their GPU budget (FLASH_MHA_FUZZ_EXAMPLES_CUDA).
  # tests/test_bench.py's fixture compiles FlexAttention for the CPU, which took 63 s to over 100 s
  # on the GPU machine (inductor's CPU ISA probe and C++ build): the whole suite needs ~250 s there.
  timeout "${TEST_TIMEOUT:-360}" python3 -m pytest tests -q -p no:cacheprovider --durations=10 -rfE \
    --ignore=tests/test_fuzz.py >"$OUT/test.log" 2>&1
  local rc=$?
  tail -15 "$OUT/test.log"
  summary+=("tests rc=$rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/test.log")")
  t0=$SECONDS
  FLASH_MHA_FUZZ_EXAMPLES_CUDA=${FLASH_MHA_FUZZ_EXAMPLES_CUDA:-3000} timeout "${FUZZ_TIMEOUT:-260}" \
    python3 -m pytest tests/test_fuzz.py -q -p no:cacheprovider -rfE --durations=5 >"$OUT/fuzz.log" 2>&1
  rc=$?
  tail -12 "$OUT/fuzz.log"
  summary+=("fuzz rc=$rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/fuzz.log")")
}

# Short check after a kernel change: every kernel family forced against the reference, then the smoke cases.
phase_quick() {
  local t0=$SECONDS
  deps
  timeout "${QUICK_TIMEOUT:-150}" python3 -m pytest tests/test_cuda_paths.py -q -p no:cacheprovider -rfE -x \
    >"$OUT/quick.log" 2>&1
  local rc=$?
  tail -8 "$OUT/quick.log"
  python3 benchmarks/gpu_smoke.py >"$OUT/smoke.log" 2>&1
  local rc2=$?
  grep -E "FAIL|passed" "$OUT/smoke.log"
  summary+=("quick rc=$rc smoke rc=$rc2 in $((SECONDS - t0)) s: $(tail -1 "$OUT/quick.log")")
}

# The prepared Hopper paths that are off in the source (csrc/cuda/NOTES.md, "Next"), switched on in
# this copy of the tree only (the GPU machine's): run it before `build`, e.g.
#   bash benchmarks/device_run.sh flags_on build quick sanitize
#   FLAGS_ON=kQDoubleBuffer bash benchmarks/device_run.sh flags_on build quick   # one of them
phase_flags_on() {
  local flags=${FLAGS_ON:-kDescriptorAdvance kLazyRescale kQDoubleBuffer kDbiasWriterWarps}
  local files="csrc/cuda/sm90.cuh csrc/cuda/sm90_fwd_work.cuh csrc/cuda/sm90_bwd_work.cuh csrc/cuda/sm80_tile.cuh csrc/cuda/softmax.cuh csrc/cuda/sm80_bwd.cu csrc/cuda/sm80_fwd.cu"
  local f on=0
  for f in $flags; do
    sed -i "s/^constexpr bool $f = false;/constexpr bool $f = true;/" $files
    grep -qhE "^constexpr bool $f = true;" $files && on=$((on + 1))
  done
  echo "prepared flags on: $on / $(echo $flags | wc -w) ($flags)"
  summary+=("flags_on: $on ($flags)")
}

# Random shapes through the Hopper kernels against the portable path (a hang names its case).
phase_stress() {
  local t0=$SECONDS
  timeout "${STRESS_TIMEOUT:-120}" python3 benchmarks/sm90_stress.py --n "${STRESS_N:-400}" >"$OUT/stress.log" 2>&1
  local rc=$?
  grep -B1 FAIL "$OUT/stress.log" | head -20
  tail -1 "$OUT/stress.log"
  summary+=("stress rc=$rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/stress.log")")
}

phase_sanitize() {
  local t0=$SECONDS
  timeout "${SANITIZE_TIMEOUT:-110}" bash benchmarks/sanitize.sh >"$OUT/sanitize.log" 2>&1
  local rc=$?
  grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|FAIL" "$OUT/sanitize.log" | head -20
  summary+=("sanitize rc=$rc in $((SECONDS - t0)) s")
}

# benchmarks/racecheck_probe.cu under racecheck: does the tool follow the dbias writer warps'
# named-barrier hand-off (kDbiasWriterWarps, NOTES.md)?
phase_probe() {
  local t0=$SECONDS
  nvcc -lineinfo -gencode arch=compute_90a,code=sm_90a -o /tmp/racecheck_probe benchmarks/racecheck_probe.cu &&
    timeout 60 /tmp/racecheck_probe &&
    timeout 120 compute-sanitizer --tool racecheck --racecheck-report hazard --print-limit 10 /tmp/racecheck_probe \
      >"$OUT/probe.log" 2>&1
  local rc=$?
  grep -m 4 -A 3 -E "hazard|Race" "$OUT/probe.log" | cut -c1-200
  tail -2 "$OUT/probe.log"
  summary+=("probe rc=$rc in $((SECONDS - t0)) s")
}

phase_bench() {
  local t0=$SECONDS
  # The plain grid and the module level without FlexAttention (it compiles per shape), then the
  # extra cases with every peer. The naive / MATH baselines are left out here to fit the lease;
  # BENCH_IMPL_A='' (and --full via BENCH_EXTRA='--full') runs everything when time allows.
  python3 -m flash_mha.bench --plot --no-progress --case plain,module ${BENCH_EXTRA:-} \
    --impl "${BENCH_IMPL_A-!flex,!naive,!sdpa_math}" \
    --budget-s "${BENCH_BUDGET_A:-170}" --out-dir "$OUT/results" >"$OUT/bench.log" 2>&1
  local rc=$?
  python3 -m flash_mha.bench --plot --no-progress --impl '!naive,!sdpa_math' \
    --case bias,bias_heads,key_padding,gqa,nq_ne_nk,float32,dropout \
    --budget-s "${BENCH_BUDGET_B:-140}" --out "$OUT/results/cases.json" >>"$OUT/bench.log" 2>&1
  local rc2=$?
  tar -C "$OUT" -czf "$OUT/results.tgz" results && rm -rf "$OUT/results"
  grep -v "^|" "$OUT/bench.log" | tail -20
  summary+=("bench rc=$rc/$rc2 in $((SECONDS - t0)) s")
}

for phase in "$@"; do
  echo "=== $phase"
  "phase_$phase"
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
printf '%s\n' "${summary[@]}"
