#!/usr/bin/env bash
# A/B of prepared flags (csrc/cuda/sm90.cuh, sm90_*_work.cuh) in one GPU-machine call: the tree as it is
# ("off", built fresh into a side directory) against the tree with FLAGS_ON switched on ("on",
# the editable build, checked with device_run.sh's quick and stress phases first), then the
# benchmark alternating on / off / on / off, each run beside its peers, and a side-by-side table.
#
#   FLAGS_ON=kQDoubleBuffer bash benchmarks/ab_flags.sh                     # plain grid, vs cuDNN
#   FLAGS_ON=kQDoubleBuffer AB_BENCH="--case plain --hdim 64" bash benchmarks/ab_flags.sh
#
# About 5 minutes on an H200 (two builds in parallel, four ~25 s benchmark runs). Results and
# logs under $OUT (on*.json, off*.json, ab_table.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flash_mha_out}
mkdir -p "$OUT"
: "${FLAGS_ON:?set FLAGS_ON to the flags to switch on, e.g. FLAGS_ON=kQDoubleBuffer}"
root=$(pwd)
off_src=/tmp/ab_off_src off_site=/tmp/ab_off_site
rm -rf "$off_src" "$off_site" && mkdir -p "$off_src"
cp -r csrc flash_mha setup.py pyproject.toml README.md LICENSE requirements.txt "$off_src"/
rm -rf "$off_src"/flash_mha/*.so "$off_src"/flash_mha/__pycache__  # an earlier editable build's
(cd "$off_src" && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=8 \
  python3 -m pip install --no-build-isolation --no-deps --target "$off_site" . >"$OUT/off_build.log" 2>&1;
  echo "off build rc=$?" >>"$OUT/off_build.log") &
MAX_JOBS=8 bash benchmarks/device_run.sh flags_on build quick stress
wait
tail -1 "$OUT/off_build.log"
bench=(--no-progress ${AB_BENCH:---case plain} --impl "${AB_IMPL:-flash_mha,sdpa_cudnn}" --budget-s "${AB_BUDGET:-60}")
for round in 1 2; do
  python3 -m flash_mha.bench "${bench[@]}" --out "$OUT/on$round.json" >"$OUT/on$round.log" 2>&1
  echo "on$round rc=$?"
  # From /tmp, so that the side directory's flash_mha is imported, not this tree's.
  (cd /tmp && PYTHONPATH="$off_site" python3 -m flash_mha.bench "${bench[@]}" --out "$OUT/off$round.json" \
    >"$OUT/off$round.log" 2>&1; echo "off$round rc=$?")
done
python3 benchmarks/ab_table.py "$OUT/on1.json" "$OUT/off1.json" "$OUT/on2.json" "$OUT/off2.json" | tee "$OUT/ab_table.txt"
# One archive: the machine returns only a few files of $OUT.
(cd "$OUT" && tar -czf ab.tgz ./*.log ./*.json ab_table.txt && rm -f ./*.log ./*.json)
