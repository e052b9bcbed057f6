"""Side-by-side forward / backward TFLOP/s of flash_mha.bench result files (one column per file).

    python3 benchmarks/ab_table.py on1.json off1.json on2.json off2.json [--peer sdpa_cudnn]

Each file is one `python -m flash_mha.bench --out FILE` run (benchmarks/ab_flags.sh makes them: the
same grid with two builds, alternating, each beside its peers). Prints one row per point: the
forward and backward TFLOP/s of each of our implementations in the files (flash_mha, flash_mha_sm80,
...) in every file, then the peer's forward in every file (its spread between runs is the noise
floor of the comparison; "-" where the peer did not run).
"""
import argparse
import json
import os


def load(path):
    with open(path) as f:
        return json.load(f)["rows"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--peer", default="sdpa_cudnn")
    args = ap.parse_args()
    names = [os.path.splitext(os.path.basename(f))[0] for f in args.files]
    table = {}
    ours = []  # our implementations in the files (flash_mha, flash_mha_sm80, ...), in order of appearance
    for name, path in zip(names, args.files):
        for r in load(path):
            if r.get("error") or r.get("skipped"):
                continue
            if r.get("ours") and r["impl"] not in ours:
                ours.append(r["impl"])
            key = (r["case"], r["dtype"], r["hdim"], int(bool(r["causal"])), r["seqlen_q"])
            table.setdefault(key, {})[(name, r["impl"])] = r

    def cell(row, name, impl, field):
        r = row.get((name, impl))
        return "%5.0f" % r[field] if r and r.get(field) else "    -"

    groups = [(impl, field) for impl in ours for field in ("fwd_tflops", "bwd_tflops")] + [(args.peer, "fwd_tflops")]
    print("case dtype d causal n | " + " | ".join(f"{impl} {field[:3]}: " + " ".join(names) for impl, field in groups))
    for key in sorted(table):
        row = table[key]
        print(" ".join(str(k) for k in key), "|",
              " | ".join(" ".join(cell(row, n, impl, field) for n in names) for impl, field in groups))


if __name__ == "__main__":
    main()
