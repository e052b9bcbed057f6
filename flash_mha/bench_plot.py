"""Tables and plots from a flash_mha.bench results file.

    python -m flash_mha.bench_plot benchmarks/results/H100.json [--out-dir DIR]

Writes <stem>.md (ratio table against the best peer at each point, per-implementation TFLOP/s,
the module comparison, refusals) and PNGs next to the JSON: TFLOP/s against seqlen for each
(dtype, head dim, causal) like the FlashAttention README's charts, the extra cases side by side,
and memory and time against seqlen for the module comparison. Ratios only ever compare rows of one
file, i.e. one run on one card.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

POINT_KEYS = ("case", "dtype", "hdim", "causal", "seqlen_q", "seqlen_k", "batch", "heads", "heads_kv", "embed_dim")
METRICS = (("fwd", "fwd"), ("bwd", "bwd"), ("fwdbwd", "fwd+bwd"))


def load(path) -> tuple:
    data = json.loads(Path(path).read_text())
    return data["header"], data["rows"]


def _points(rows) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in POINT_KEYS)].append(r)
    return groups


def _usable(r, metric) -> bool:
    ms = r.get(f"{metric}_ms")
    return not r["refused"] and r.get("check") != "fail" and ms is not None and ms > 0


def best_peer(group_rows, metric, group):
    peers = [r for r in group_rows if not r["ours"] and r.get("group") == group and _usable(r, metric)]
    return min(peers, key=lambda r: r[f"{metric}_ms"]) if peers else None


def _shape(r) -> str:
    n = f"{r['seqlen_q']}" if r["seqlen_q"] == r["seqlen_k"] else f"{r['seqlen_q']}x{r['seqlen_k']}"
    h = f"{r['heads']}" if r["heads"] == r["heads_kv"] else f"{r['heads']}/{r['heads_kv']}"
    return n, f"{r['batch']}x{h}"


def _why(r) -> str:
    if r["refused"]:
        return "skipped" if r.get("skipped") else "refused"
    return "wrong" if r.get("check") == "fail" else ""


def _tf(r, metric) -> str:
    v = r.get(f"{metric}_tflops")
    return "-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.3g}"


def ratio_table(rows) -> str:
    """Markdown: each of our implementations against the fastest working peer, per point and metric.
    ratio = peer ms / ours ms (> 1: flash_mha is faster)."""
    out = ["| case | dtype | d | causal | seqlen | batch x heads | impl | TFLOP/s fwd / bwd | "
           "fwd vs best peer | bwd vs best peer | fwd+bwd vs best peer |", "|" + "---|" * 11]
    mod = ["| embed | heads | seqlen | batch | impl | fwd ms | fwd+bwd ms | peak MiB | "
           "fwd+bwd vs best peer | peak MiB vs that peer |", "|" + "---|" * 10]
    for _, grp in _points(rows).items():
        for r in (r for r in grp if r["ours"]):
            if r.get("embed_dim") is None:
                cells = []
                for metric, _name in METRICS:
                    peer = best_peer(grp, metric, r.get("group"))
                    if peer is None:
                        cells.append("no peer")
                    elif not _usable(r, metric):
                        cells.append(f"{_why(r) or 'refused'} ({peer['impl']})")
                    else:
                        ratio = peer[f"{metric}_ms"] / r[f"{metric}_ms"]
                        cells.append(f"{ratio:.2f}x ({peer['impl']} {_tf(peer, metric)})")
                n, bh = _shape(r)
                tf = f"{_tf(r, 'fwd')} / {_tf(r, 'bwd')}" if not r["refused"] else _why(r)
                if r.get("check") == "fail":
                    tf += " (CHECK FAILED)"
                out.append(f"| {r['case']} | {r['dtype']} | {r['hdim']} | {'yes' if r['causal'] else 'no'} | "
                           f"{n} | {bh} | "
                           f"{r['impl']} | {tf} | " + " | ".join(cells) + " |")
            else:
                peer = best_peer(grp, "fwdbwd", r.get("group"))
                ms = lambda x, k: f"{x[k]:.2f}" if x and x.get(k) is not None else "-"  # noqa: E731
                ratio = (f"{peer['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x ({peer['impl']})"
                         if peer and _usable(r, "fwdbwd") else _why(r) or "no peer")
                mem = (f"{r['peak_mib'] / peer['peak_mib']:.2f}x" if peer and r.get("peak_mib") and peer.get("peak_mib")
                       else "-")
                mod.append(f"| {r['embed_dim']} | {r['heads']} | {r['seqlen_q']} | {r['batch']} | {r['impl']} | "
                           f"{ms(r, 'fwd_ms')} | {ms(r, 'fwdbwd_ms')} | {ms(r, 'peak_mib')} | {ratio} | {mem} |")
    text = ""
    if len(out) > 2:
        text += ("Attention: speed ratio = best peer ms / flash_mha ms (> 1: flash_mha faster)\n\n"
                 + "\n".join(out) + "\n")
    if len(mod) > 2:
        text += ("\nModules (training step, projections included): ratio against the fastest peer of the same "
                 "kind (need_weights=False peers for FlashMHA)\n\n" + "\n".join(mod) + "\n")
    return text


def impl_table(rows) -> str:
    """Markdown per case: every implementation's TFLOP/s (fwd / bwd) at every point, refusals shown."""
    attn = [r for r in rows if r.get("embed_dim") is None]
    impls = list(dict.fromkeys(r["impl"] for r in attn))
    text = []
    by_case = defaultdict(list)
    for r in attn:
        by_case[r["case"]].append(r)
    for case, crows in by_case.items():
        text.append(f"\n### {case}: TFLOP/s fwd / bwd\n")
        text.append("| dtype | d | causal | seqlen | batch x heads | " + " | ".join(impls) + " |")
        text.append("|" + "---|" * (5 + len(impls)))
        for _, grp in _points(crows).items():
            r0 = grp[0]
            by = {r["impl"]: r for r in grp}
            cells = []
            for name in impls:
                r = by.get(name)
                if r is None:
                    cells.append("")
                elif r["refused"]:
                    cells.append(_why(r))
                else:
                    c = f"{_tf(r, 'fwd')} / {_tf(r, 'bwd') if not r['bwd_refused'] else 'refused'}"
                    cells.append(c + (" (wrong)" if r.get("check") == "fail" else ""))
            n, bh = _shape(r0)
            text.append(f"| {r0['dtype']} | {r0['hdim']} | {'yes' if r0['causal'] else 'no'} | {n} | {bh} | "
                        + " | ".join(cells) + " |")
    mods = [r for r in rows if r.get("embed_dim") is not None]
    if mods:
        names = list(dict.fromkeys(r["impl"] for r in mods))
        text.append("\n### module: training step fwd+bwd ms / peak MiB\n")
        text.append("| dtype | embed | heads | seqlen | batch | " + " | ".join(names) + " |")
        text.append("|" + "---|" * (5 + len(names)))
        for _, grp in _points(mods).items():
            r0, by = grp[0], {r["impl"]: r for r in grp}
            cells = []
            for name in names:
                r = by.get(name)
                if r is None or r["refused"] or r.get("fwdbwd_ms") is None:
                    cells.append(_why(r) if r else "")
                else:
                    mem = f" / {r['peak_mib']:.0f}" if r.get("peak_mib") else ""
                    cells.append(f"{r['fwdbwd_ms']:.2f}{mem}" + (" (wrong)" if r.get("check") == "fail" else ""))
            text.append(f"| {r0['dtype']} | {r0['embed_dim']} | {r0['heads']} | {r0['seqlen_q']} | {r0['batch']} | "
                        + " | ".join(cells) + " |")
    reasons = defaultdict(set)
    for r in rows:
        if r["refused"] and not r.get("skipped"):
            reasons[(r["impl"], r["error"])].add(r["case"])
        if r.get("bwd_refused"):
            reasons[(r["impl"], "backward: " + str(r.get("bwd_error")))].add(r["case"])
    if reasons:
        text.append("\n### Refusals (the error's first line)\n")
        for (impl, err), cases in sorted(reasons.items()):
            text.append(f"- {impl} ({', '.join(sorted(cases))}): `{err}`")
    return "\n".join(text) + "\n"


def _bars(ax, labels, series: dict, ylabel: str, title: str) -> None:
    import numpy as np
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        vals = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, labels=[(f"{v:.0f}" if v >= 10 else f"{v:.2g}") if v else "" for v in vals], fontsize=6,
                     rotation=90, padding=2)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.15)


def _working_impls(rows) -> list:
    return [i for i in dict.fromkeys(r["impl"] for r in rows) if any(not r["refused"] for r in rows if r["impl"] == i)]


def _main_dtype(attn_rows) -> Optional[str]:
    """The dtype the case figures show (float32 rows are shown too): the plain grid's most common
    one, or, in a run of extra cases only, the most common one of the cases other than float32."""
    dtypes = ([r["dtype"] for r in attn_rows if r["case"] == "plain"] or
              [r["dtype"] for r in attn_rows if r["case"] != "float32"])
    return max(set(dtypes), key=dtypes.count) if dtypes else None


def _plot_attention(rows, head, out_dir: Path, stem: str) -> list:
    import matplotlib.pyplot as plt
    paths = []
    attn = [r for r in rows if r.get("embed_dim") is None]
    card = head.get("card_short", head.get("card", ""))
    panels = defaultdict(list)
    for r in attn:
        if r["case"] == "plain":
            panels[(r["dtype"], r["hdim"], r["causal"])].append(r)
    for (dtype, hdim, causal), prs in sorted(panels.items()):
        seqlens = sorted({r["seqlen_q"] for r in prs})
        impls = _working_impls(prs)
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for ax, (metric, name) in zip(axes, METRICS):
            series = {}
            for i in impls:
                by = {r["seqlen_q"]: r for r in prs if r["impl"] == i}
                series[i] = [by[n].get(f"{metric}_tflops") if n in by and _usable(by[n], metric) else None
                             for n in seqlens]
            _bars(ax, [f"{n // 1024}k" if n >= 1024 else str(n) for n in seqlens], series, "TFLOP/s",
                  f"{name}, {dtype}, head dim {hdim}, {'causal' if causal else 'non-causal'}")
        # One legend under the panels: inside one it covered bars once nine implementations ran.
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
        fig.suptitle(f"Attention speed on {card} ({head.get('date', '')[:10]}, {str(head.get('git_commit'))[:12]})",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        p = out_dir / f"{stem}-{dtype}-d{hdim}-{'causal' if causal else 'noncausal'}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    # extra cases side by side, one figure per (dtype, hdim, seqlen) of the non-causal case points
    extra = defaultdict(list)
    for r in attn:
        if not r["causal"]:
            extra[(r["hdim"], r["seqlen_k"])].append(r)
    main_dtype = _main_dtype(attn)
    for (hdim, n), prs in sorted(extra.items()):
        cases = list(dict.fromkeys(r["case"] for r in prs))
        if len(cases) < 2:
            continue
        impls = _working_impls(prs)
        fig, axes = plt.subplots(1, 2, figsize=(16, 4.2))
        for ax, (metric, name) in zip(axes, (METRICS[0], METRICS[2])):
            series = {}
            for i in impls:
                by = {r["case"]: r for r in prs
                      if r["impl"] == i and (r["dtype"] == main_dtype or r["case"] == "float32")}
                series[i] = [by[c].get(f"{metric}_tflops") if c in by and _usable(by[c], metric) else None
                             for c in cases]
            _bars(ax, cases, series, "TFLOP/s", f"{name}, head dim {hdim}, n_k {n}, non-causal (missing bar: refused)")
        axes[0].legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        p = out_dir / f"{stem}-cases-d{hdim}-n{n}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _plot_modules(rows, head, out_dir: Path, stem: str) -> list:
    import matplotlib.pyplot as plt
    mods = [r for r in rows if r.get("embed_dim") is not None]
    if not mods:
        return []
    embeds = sorted({r["embed_dim"] for r in mods})
    panels = [(key, label) for key, label in (("peak_mib", "peak memory, MiB (fwd+bwd)"),
                                               ("fwdbwd_ms", "training step fwd+bwd, ms"))
              if any(r.get(key) for r in mods)]
    if not panels:
        return []
    fig, axes = plt.subplots(len(panels), len(embeds), figsize=(6.5 * len(embeds), 4 * len(panels)), squeeze=False)
    for col, E in enumerate(embeds):
        er = [r for r in mods if r["embed_dim"] == E]
        for row, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for i in dict.fromkeys(r["impl"] for r in er):
                pts = sorted((r["seqlen_q"], r[key]) for r in er if r["impl"] == i and not r["refused"] and r.get(key))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=i)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ns = sorted({r["seqlen_q"] for r in er})
            ax.set_xticks(ns, [f"{n // 1024}k" if n >= 1024 else str(n) for n in ns])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_xlabel("seqlen (batch * seqlen fixed)")
            ax.set_ylabel(label)
            ax.set_title(f"embed {E}, {er[0]['heads']} heads, {er[0]['dtype']}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"Attention modules on {head.get('card_short', head.get('card', ''))} ({head.get('date', '')[:10]})",
                 fontsize=10)
    fig.tight_layout()
    p = out_dir / f"{stem}-modules.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def report_markdown(head, rows) -> str:
    lines = [f"# flash_mha benchmark: {head.get('card')}", "",
             f"torch {head.get('torch')}, CUDA {head.get('cuda')}, cuDNN {head.get('cudnn')}, "
             f"triton {head.get('triton')}; "
             f"commit `{head.get('git_commit')}`; {head.get('date')}; timing: {head.get('timing')}; "
             f"FLOPs: {head.get('flops')}.", "",
             f"Command: `python -m flash_mha.bench {' '.join(head.get('argv', []))}`"
             + ("" if head.get("complete", True) else " (INCOMPLETE run: some points missing)"), "",
             ratio_table(rows), "## All implementations", impl_table(rows)]
    return "\n".join(lines)


def write_report(json_path, out_dir=None) -> list:
    json_path = Path(json_path)
    head, rows = load(json_path)
    out_dir = Path(out_dir) if out_dir else json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{json_path.stem}.md"
    md.write_text(report_markdown(head, rows))
    paths = [md]
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print("bench_plot: matplotlib not installed; wrote the markdown only", file=sys.stderr)
        return paths
    paths += _plot_attention(rows, head, out_dir, json_path.stem)
    paths += _plot_modules(rows, head, out_dir, json_path.stem)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flash_mha.bench_plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a JSON file written by python -m flash_mha.bench")
    ap.add_argument("--out-dir", default=None, help="default: next to the JSON")
    args = ap.parse_args(argv)
    for p in write_report(args.results, args.out_dir):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
