#!/usr/bin/env bash
# A/B of prepared flags (csrc/cuda/sm90.cuh, sm90_*_work.cuh) in one GPU-machine call: the tree as it is
# ("off", built fresh into a side directory) against the tree with one or more flag sets switched on
# ("v1": the first set, the editable build, checked with device_run.sh's quick and stress phases
# first; "v2", ...: further sets, side builds), then the benchmark round robin v1 .. vN, off, twice,
# each run beside its peers, and a side-by-side table.
#
#   FLAGS_ON=kQDoubleBuffer bash benchmarks/ab_flags.sh                     # plain grid, vs cuDNN
#   FLAGS_ON=kQDoubleBuffer AB_BENCH="--case plain --hdim 64" bash benchmarks/ab_flags.sh
#   FLAGS_SETS="kQDoubleBuffer;kDbiasWriterWarps" bash benchmarks/ab_flags.sh
#   git diff HEAD -- csrc > ab_off.patch  # a change not behind a flag: "off" is the tree without it
#   FLAGS_ON=- AB_OFF_PATCH=ab_off.patch bash benchmarks/ab_flags.sh
#
# About 5 minutes on an H200 for one set (builds in parallel, ~25 s per benchmark run), ~1.5 more
# per further set. Results and logs under $OUT (ab.tgz: v*.json, off*.json, logs; ab_table.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flash_mha_out}
mkdir -p "$OUT"
IFS=';' read -r -a sets <<<"${FLAGS_SETS:-${FLAGS_ON:?set FLAGS_ON (one set) or FLAGS_SETS (sets separated by ;)}}"
n=${#sets[@]}
jobs=$((16 / (n + 1)))
# A side build: the tree copied to /tmp/ab_<name>_src, the flags switched on there, installed into
# /tmp/ab_<name>_site.
side_build() {
  local name=$1 flags=$2 src=/tmp/ab_$1_src site=/tmp/ab_$1_site
  rm -rf "$src" "$site" && mkdir -p "$src/benchmarks"
  cp -r csrc flash_mha setup.py pyproject.toml README.md LICENSE requirements.txt "$src"/
  cp benchmarks/device_run.sh "$src/benchmarks/"
  rm -rf "$src"/flash_mha/*.so "$src"/flash_mha/__pycache__  # an earlier editable build's
  if [ "$name" = off ] && [ -n "${AB_OFF_PATCH:-}" ]; then
    (cd "$src" && git apply -R "$OLDPWD/$AB_OFF_PATCH") || echo "off: AB_OFF_PATCH did not reverse" >&2
  fi
  if [ -n "$flags" ]; then
    OUT=/tmp/ab_$1_out FLAGS_ON="$flags" bash "$src/benchmarks/device_run.sh" flags_on | grep "prepared flags on" |
      sed "s/^/$name: /"
  fi
  (cd "$src" && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=$jobs \
    python3 -m pip install --no-build-isolation --no-deps --target "$site" . >"$OUT/${name}_build.log" 2>&1;
    echo "$name build rc=$?" >>"$OUT/${name}_build.log")
}
side_build off "" &
for ((i = 1; i < n; i++)); do side_build "v$((i + 1))" "${sets[i]}" & done
FLAGS_ON="${sets[0]}" MAX_JOBS=$jobs bash benchmarks/device_run.sh flags_on build quick stress
wait
tail -qn 1 "$OUT"/*_build.log
names=()
for ((i = 1; i <= n; i++)); do names+=("v$i"); done
names+=(off)
bench=(--no-progress ${AB_BENCH:---case plain} --impl "${AB_IMPL:-flash_mha,sdpa_cudnn}" --budget-s "${AB_BUDGET:-60}")
files=()
for round in 1 2; do
  for name in "${names[@]}"; do
    if [ "$name" = v1 ]; then
      python3 -m flash_mha.bench "${bench[@]}" --out "$OUT/$name-$round.json" >"$OUT/$name-$round.log" 2>&1
    else
      # From /tmp, so that the side directory's flash_mha is imported, not this tree's.
      (cd /tmp && PYTHONPATH="/tmp/ab_${name}_site" python3 -m flash_mha.bench "${bench[@]}" \
        --out "$OUT/$name-$round.json" >"$OUT/$name-$round.log" 2>&1)
    fi
    echo "$name-$round rc=$?"
    files+=("$OUT/$name-$round.json")
  done
done
{
  for ((i = 0; i < n; i++)); do echo "# v$((i + 1)): ${sets[i]}"; done
  python3 benchmarks/ab_table.py "${files[@]}"
} | tee "$OUT/ab_table.txt"
# One archive: the machine returns only a few files of $OUT.
(cd "$OUT" && tar -czf ab.tgz ./*.log ./*.json ab_table.txt && rm -f ./*.log ./*.json)
