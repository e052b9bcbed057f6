"""Does the softmax run beside the wgmma it is meant to overlap? A check of compiled SASS.

    nvcc -O3 -std=c++17 --expt-relaxed-constexpr -DFLASH_MHA_WITH_CUDA -Icsrc \\
      -gencode arch=compute_90a,code=sm_90a -c csrc/cuda/sm90_fwd.cu -o /tmp/fwd.o
    cuobjdump --dump-sass /tmp/fwd.o > /tmp/fwd.sass && python3 benchmarks/sass_overlap.py /tmp/fwd.sass

For every kernel, each window from a `WARPGROUP.DEPBAR.LE gsb0, 0x1` (one group still in flight:
the forward's P V, the backward's dP^T) to the next wait prints `inside/after`: the MUFU.EX2 in the
window and in the 400 instructions after it. The forward's key loop should show all of its
exponentials inside (`66/0` at d = 128); ptxas hoisting the wait shows as `0/66`
(sm90::wgmma_wait_group_behind). The backward keeps ptxas's order on purpose (`0/32` in its plain
d = 128 kernels: keeping the wait behind measured slower there). Exit status 1 if a forward
window with exponentials after it has none inside.
"""
import re
import subprocess
import sys


def windows(lines):
    out, i = [], 0
    while i < len(lines):
        if "DEPBAR.LE gsb0, 0x1" in lines[i]:
            j = i + 1
            while j < len(lines) and "DEPBAR.LE gsb0" not in lines[j]:
                j += 1
            out.append((sum("MUFU.EX2" in x for x in lines[i:j]), sum("MUFU.EX2" in x for x in lines[j:j + 400])))
            i = j
        else:
            i += 1
    return out


def main():
    bad = 0
    for fn in open(sys.argv[1]).read().split("Function : ")[1:]:
        name = fn.split("\n", 1)[0].strip()
        dem = subprocess.run(["c++filt"], input=name, capture_output=True, text=True).stdout.strip()
        dem = re.sub(r"flash_mha::cuda::\(anonymous namespace\)::", "", dem).split("(CUtensorMap")[0]
        ins = [x for x in fn.split("\n") if re.search(r"/\*[0-9a-f]{4,}\*/", x)]
        ws = [w for w in windows(ins) if w != (0, 0)]
        if not ws:
            continue
        if "sm90_fwd_kernel" in dem:
            bad += any(inside == 0 and after > 0 for inside, after in ws)
        print(f"{' '.join(f'{a}/{b}' for a, b in ws):12s} {dem}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
