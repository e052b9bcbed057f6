"""Side-by-side attention benchmark: flash_mha against torch's peers, in one process on one device.

    python -m flash_mha.bench                    # full grid (GPU); the CPU comparison without a GPU
    python -m flash_mha.bench --quick            # a few points of each section
    python -m flash_mha.bench --cpu-check        # issue 2: float32 d64, seqlen 1k and 4k, vs torch CPU SDPA
    python -m flash_mha.bench --plot             # also write the markdown table and PNGs
    python -m flash_mha.bench_plot results.json  # table and PNGs from a results file

Filters: --case, --impl (names or globs such as 'sdpa_*'), --dtype, --hdim, --seqlen, --causal;
--list shows what exists. Results: <--out-dir, default benchmarks/results>/<CARD>.json
(-quick / -partial when quick or filtered), a JSON object
{"header": {card, versions, commit, date, ...}, "rows": [...]}, rewritten after every point so an
interrupted run keeps what it measured. Row fields: see ROW_FIELDS; times in ms; peak_mib (CUDA
only, else null) = the operands' bytes plus the most one fwd+bwd step allocates on top of them;
refused/error = the forward raised (or, with skipped, the bench did not run it); bwd_refused/
bwd_error = only the backward raised; check = "ok" / "fail" / "skipped (dropout)".

Method. Every implementation runs on the same fresh random inputs (never zeros). Before timing,
its output and gradients are compared with a float32 reference on one (batch, kv-head group)
slice, with the CUDA allocator poisoned (0xFF bytes: NaN) so unwritten outputs show; a mismatch is
flagged (check="fail") and kept out of the best-peer choice. Times are medians after warm-up
(triton.testing.do_bench, which flushes L2, on CUDA; time.perf_counter on CPU); the forward is
timed with inputs requiring grad (the training forward) and bwd = fwd+bwd - fwd. TFLOP/s follow
the FlashAttention convention: fwd 4*b*h*n_q*n_k*d, halved when causal; bwd 2.5x; fwd+bwd 3.5x.
Causal with n_q != n_k is bottom-right aligned for every implementation (SDPA gets
causal_lower_right). FlexAttention is compiled once per shape (static shapes, dynamo's recompile
limits raised, hitting one raises rather than running unfused) and its block mask is built outside
the timed region. naive and SDPA MATH are skipped above --max-scores score elements. A peer that
raises is recorded with refused=true and the error's first line, never dropped.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

# The implementations compared: one line each in IMPLS / MODULE_IMPLS (bench_impls.py).
from .bench_impls import IMPLS, MODULE_IMPLS, Impl

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Loose relative-error bounds (||out - ref|| / ||ref||) against the float32 reference slice.
FWD_TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 2e-3}
GRAD_TOL_FACTOR = 2.5
ROW_FIELDS = ("impl", "case", "dtype", "hdim", "causal", "seqlen_q", "seqlen_k", "batch", "heads",
              "heads_kv", "embed_dim", "fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_tflops", "bwd_tflops",
              "fwdbwd_tflops", "peak_mib", "refused", "error", "bwd_refused", "bwd_error", "skipped",
              "check", "fwd_err", "grad_err", "ours", "group", "wall_s")


# ----------------------------------------------------------------------------------------------
# FLOPs (FlashAttention convention)

def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, hdim: int, causal: bool) -> float:
    """Forward FLOPs: 4*b*h*n_q*n_k*d, halved when causal (square). Non-square causal is
    bottom-right aligned here (query i sees keys j <= i + n_k - n_q): count the visible pairs.
    Backward is 2.5x this, fwd+bwd 3.5x."""
    if not causal:
        pairs = seqlen_q * seqlen_k
    elif seqlen_q == seqlen_k:
        pairs = seqlen_q * seqlen_k / 2
    else:
        shift = seqlen_k - seqlen_q
        pairs = sum(min(max(i + 1 + shift, 0), seqlen_k) for i in range(seqlen_q))
    return 4.0 * batch * heads * pairs * hdim


# ----------------------------------------------------------------------------------------------
# Cases and their inputs

@dataclass(frozen=True)
class Case:
    name: str
    doc: str
    causal: str = "opt"           # "both": causal and not by default; "opt": causal only with --causal;
                                  # "no": SDPA cannot combine it with is_causal
    bias: Optional[str] = None    # "full" (b,h,n_q,n_k) or "heads" (1,h,n_q,n_k)
    bias_grad: bool = True        # the bias requires grad
    key_padding: bool = False     # bool mask (b,1,1,n_k), last quarter of the keys masked out
    heads: Optional[int] = None   # query heads (default: model_dim // hdim)
    heads_kv: Optional[int] = None
    q_div: int = 1                # n_q = seqlen // q_div, n_k = seqlen
    dtype: Optional[torch.dtype] = None
    dropout_p: float = 0.0


CASES = {c.name: c for c in (
    Case("plain", "q, k, v only", causal="both"),
    Case("bias", "additive bias (b,h,n,n) requiring grad", causal="no", bias="full"),
    Case("bias_heads", "additive bias (1,h,n,n) requiring grad", causal="no", bias="heads"),
    Case("key_padding", "bool key-padding mask, last quarter of keys masked", causal="no", key_padding=True),
    Case("bias_key_padding", "additive bias (1,h,n,n) without grad + key padding (nn.MultiheadAttention's "
         "float attn_mask beside key_padding_mask)", causal="no", bias="heads", bias_grad=False, key_padding=True),
    Case("gqa", "32 query heads over 8 kv heads", heads=32, heads_kv=8),
    Case("nq_ne_nk", "n_q = n_k / 4 (causal: bottom-right, as a KV cache)", causal="both", q_div=4),
    Case("float32", "float32 inputs", dtype=torch.float32),
    Case("dropout", "dropout 0.1", dropout_p=0.1),
)}


@dataclass(frozen=True)
class Point:
    case: str
    dtype: torch.dtype
    hdim: int
    causal: bool
    batch: int
    heads: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    embed_dim: Optional[int] = None  # module level only

    @property
    def label(self) -> str:
        c = "causal" if self.causal else "full"
        if self.embed_dim is not None:
            return f"module E{self.embed_dim} h{self.heads} n{self.seqlen_q} b{self.batch} {DTYPE_NAMES[self.dtype]}"
        return (f"{self.case} {DTYPE_NAMES[self.dtype]} d{self.hdim} {c} {self.batch}x{self.heads}"
                f"{'/' + str(self.heads_kv) if self.heads_kv != self.heads else ''} n{self.seqlen_q}"
                f"{'x' + str(self.seqlen_k) if self.seqlen_k != self.seqlen_q else ''}")


@dataclass
class Inputs:
    """Attention operands in flash_mha's layout [b, h, n, d]; mask is bool, True = attend."""
    point: Point
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    bias: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    scale: float = 1.0

    @property
    def causal(self) -> bool:
        return self.point.causal

    @property
    def causal_shift(self) -> int:
        """Causal masks are bottom-right aligned: query i sees keys j <= i + shift (0 when square)."""
        return self.point.seqlen_k - self.point.seqlen_q

    def grad_inputs(self) -> list:
        return [self.q, self.k, self.v] + ([self.bias] if self.bias is not None and self.bias.requires_grad else [])


def make_inputs(p: Point, device: torch.device, seed: int) -> Inputs:
    case = CASES[p.case]
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std).to(p.dtype)

    q = randn(p.batch, p.heads, p.seqlen_q, p.hdim).requires_grad_()
    k = randn(p.batch, p.heads_kv, p.seqlen_k, p.hdim).requires_grad_()
    v = randn(p.batch, p.heads_kv, p.seqlen_k, p.hdim).requires_grad_()
    x = Inputs(p, q, k, v, randn(p.batch, p.heads, p.seqlen_q, p.hdim), dropout_p=case.dropout_p,
               scale=1.0 / math.sqrt(p.hdim))
    if case.bias:
        nb = p.batch if case.bias == "full" else 1
        x.bias = randn(nb, p.heads, p.seqlen_q, p.seqlen_k, std=0.5).requires_grad_(case.bias_grad)
    if case.key_padding:
        x.mask = torch.ones(p.batch, 1, 1, p.seqlen_k, dtype=torch.bool, device=device)
        x.mask[..., p.seqlen_k - p.seqlen_k // 4:] = False
    return x


def reference_slice(x: Inputs, with_grads: bool) -> dict:
    """float32 math on batch 0 and kv head 0's query-head group, chunked over query rows so the
    score matrix never exceeds ~128 MiB: out, dq, dk, dv (and dbias when its slice is exact)."""
    p, grp = x.point, x.point.heads // x.point.heads_kv
    full = (p.batch, p.heads, p.seqlen_q, p.seqlen_k)
    q = x.q.detach()[:1, :grp].float()
    k = x.k.detach()[:1, :1].float().requires_grad_(with_grads)
    v = x.v.detach()[:1, :1].float().requires_grad_(with_grads)
    dout = x.dout[:1, :grp].float()
    bias = x.bias.detach().expand(full)[:1, :grp].float() if x.bias is not None else None
    mask = x.mask.expand(full)[:1, :grp] if x.mask is not None else None
    rows = max(16, (1 << 25) // (grp * max(p.seqlen_k, 1)))
    outs, dqs, dbs = [], [], []
    for r0 in range(0, p.seqlen_q, rows):
        r1 = min(r0 + rows, p.seqlen_q)
        with torch.enable_grad():
            qc = q[:, :, r0:r1].clone().requires_grad_(with_grads)
            s = (qc @ k.transpose(-1, -2)) * x.scale
            bc = None
            if bias is not None:
                bc = bias[:, :, r0:r1].clone().requires_grad_(with_grads)
                s = s + bc
            if mask is not None:
                s = s.masked_fill(~mask[:, :, r0:r1], float("-inf"))
            if x.causal:
                i = torch.arange(r0, r1, device=s.device).view(-1, 1) + x.causal_shift
                s = s.masked_fill(torch.arange(p.seqlen_k, device=s.device).view(1, -1) > i, float("-inf"))
            o = torch.softmax(s, dim=-1) @ v
            if with_grads:
                o.backward(dout[:, :, r0:r1])
                dqs.append(qc.grad)
                dbs.append(bc.grad if bc is not None else None)
        outs.append(o.detach())
    ref = {"out": torch.cat(outs, dim=2)}
    if with_grads:
        ref.update(dq=torch.cat(dqs, dim=2), dk=k.grad, dv=v.grad)
        if bias is not None and (x.bias.shape[0] == p.batch or p.batch == 1):
            ref["dbias"] = torch.cat(dbs, dim=2)
    return ref


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().double()
    ref = ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


@dataclass
class ModuleInputs:
    point: Point
    q: torch.Tensor            # x [b, n, E], requires grad
    dout: torch.Tensor
    state_dict: dict = field(default_factory=dict)  # the weights every module under test loads

    def grad_inputs(self) -> list:
        return [self.q]


def make_module_inputs(p: Point, device: torch.device, seed: int) -> ModuleInputs:
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(p.embed_dim, p.heads, batch_first=True, device=device, dtype=p.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(p.batch, p.seqlen_q, p.embed_dim, generator=g, device=device).to(p.dtype).requires_grad_()
    dout = torch.randn(p.batch, p.seqlen_q, p.embed_dim, generator=g, device=device).to(p.dtype)
    return ModuleInputs(p, x, dout, {k: t.detach().clone() for k, t in ref.state_dict().items()})


def module_reference(x: ModuleInputs) -> dict:
    """float32 nn.MultiheadAttention with the same weights: output and input gradient."""
    p = x.point
    m = torch.nn.MultiheadAttention(p.embed_dim, p.heads, batch_first=True, device=x.q.device)
    m.load_state_dict({k: t.float() for k, t in x.state_dict.items()})
    xi = x.q.detach().float().requires_grad_()
    with torch.enable_grad():
        out = m(xi, xi, xi, need_weights=False)[0]
        out.backward(x.dout.float())
    return {"out": out.detach(), "dx": xi.grad}


# ----------------------------------------------------------------------------------------------
# Timing

class Timer:
    def __init__(self, device: torch.device, warmup_ms: float, rep_ms: float):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self._do_bench = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench
                self._do_bench = do_bench
            except ImportError:
                pass

    @property
    def method(self) -> str:
        if self.device.type != "cuda":
            return "time.perf_counter median"
        return "triton.testing.do_bench median" if self._do_bench else "cuda events median"

    def __call__(self, fn) -> float:
        if self._do_bench is not None:
            return float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        est = max(time.perf_counter() - t0, 1e-6) * 1e3
        for _ in range(int(self.warmup_ms / est)):
            fn()
        reps = max(3, min(1000, int(self.rep_ms / est)))
        if self.device.type == "cuda":  # events; flush L2 between runs like do_bench
            flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for a, b in ev:
                flush.zero_()
                a.record()
                fn()
                b.record()
            sync()
            return statistics.median(a.elapsed_time(b) for a, b in ev)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _poison_allocator(device: torch.device, nbytes: int) -> None:
    """Leave 0xFF bytes (NaN in every float dtype) in the CUDA caching allocator's free blocks, so an
    output element the kernel never writes reads as NaN in the check."""
    if device.type != "cuda":
        return
    try:
        torch.full((nbytes,), 255, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError:
        pass


def _first_line(e: BaseException, caught=()) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    # SDPA says why a forced backend declined only through warnings: keep those reasons.
    why = []
    for w in caught if ("No available kernel" in msg or "No viable backend" in msg) else ():
        text = re.sub(r"\s*\(Triggered internally at .*\)\s*$", "", str(w.message).strip().splitlines()[0])
        if text and not text.endswith("because:") and text not in why:
            why.append(text)
    return f"{type(e).__name__}: {msg}" + (f" [{'; '.join(why[:3])}]" if why else "")


# ----------------------------------------------------------------------------------------------
# One measurement

def _row(impl: Impl, p: Point) -> dict:
    r = dict.fromkeys(ROW_FIELDS)
    r.update(impl=impl.name, case=p.case, dtype=DTYPE_NAMES[p.dtype], hdim=p.hdim, causal=p.causal,
             seqlen_q=p.seqlen_q, seqlen_k=p.seqlen_k, batch=p.batch, heads=p.heads, heads_kv=p.heads_kv,
             embed_dim=p.embed_dim, refused=False, bwd_refused=False, skipped=False, ours=impl.ours,
             group=impl.group)
    return r


def _check(r: dict, out, grads, x, ref: dict, names) -> None:
    p = x.point
    tol = FWD_TOL[p.dtype]
    if not torch.isfinite(out).all():
        r["check"] = "fail"
        r["fwd_err"] = float("nan")
        return
    if ref is None:
        r["check"] = "skipped (dropout)"
        return
    sl = (slice(0, 1), slice(0, p.heads // p.heads_kv)) if p.embed_dim is None else (slice(None),)
    r["fwd_err"] = rel_err(out[sl], ref["out"])
    ok = r["fwd_err"] <= tol
    if grads is not None:
        errs = []
        for name, gr in zip(names, grads):
            if name in ref:
                gsl = (slice(0, 1), slice(0, 1)) if name in ("dk", "dv") else sl
                errs.append(rel_err(gr[gsl], ref[name]))
        r["grad_err"] = max(errs) if errs else None
        ok = ok and all(e <= tol * GRAD_TOL_FACTOR for e in errs)
    r["check"] = "ok" if ok else "fail"


def measure(impl: Impl, x, ref: Optional[dict], timer: Timer, max_scores: float) -> dict:
    p = x.point
    r = _row(impl, p)
    dev = x.q.device
    if impl.materializes and p.batch * p.heads * p.seqlen_q * p.seqlen_k > max_scores:
        r.update(refused=True, skipped=True,
                 error=f"skipped: the (n_q, n_k) scores exceed --max-scores {max_scores:.3g}")
        return r
    names = ("dq", "dk", "dv", "dbias") if p.embed_dim is None else ("dx",)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with impl.context():
                fwd = impl.prepare(x)
                # module parameters get their gradients too: a real training step
                inputs = x.grad_inputs() + list(getattr(fwd, "params", []))
                _poison_allocator(dev, 4 * sum(t.numel() * t.element_size() for t in inputs))
                out = fwd()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
        except Exception as e:  # the peer refuses this case
            r.update(refused=True, error=_first_line(e, caught))
            return r
    grads = None
    no_backward = getattr(fwd, "no_backward", None)
    if no_backward:
        r.update(bwd_refused=True, bwd_error=no_backward)
    else:
        try:
            with impl.context():
                _poison_allocator(dev, 4 * sum(t.numel() * t.element_size() for t in inputs))
                grads = torch.autograd.grad(out, inputs, x.dout)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
        except Exception as e:
            r.update(bwd_refused=True, bwd_error=_first_line(e))
    _check(r, out, grads, x, ref, names)
    del out, grads

    def fwdbwd():
        torch.autograd.grad(fwd(), inputs, x.dout)

    try:
        with impl.context():
            r["fwd_ms"] = timer(fwd)
            if not r["bwd_refused"]:
                r["fwdbwd_ms"] = timer(fwdbwd)
                r["bwd_ms"] = r["fwdbwd_ms"] - r["fwd_ms"]
            if dev.type == "cuda":  # operands + what one step allocates (not the bench's own buffers)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                (fwd if r["bwd_refused"] else fwdbwd)()
                torch.cuda.synchronize()
                extra = torch.cuda.max_memory_allocated() - before
                operands = {t.data_ptr(): t.untyped_storage().nbytes() for t in inputs + [x.dout]
                            + ([x.mask] if getattr(x, "mask", None) is not None else [])}
                r["peak_mib"] = (extra + sum(operands.values())) / 2**20
    except Exception as e:  # e.g. out of memory in the timing loop
        r.update(refused=True, error="while timing: " + _first_line(e))
    if p.embed_dim is None and r["fwd_ms"]:
        f = attention_flops(p.batch, p.heads, p.seqlen_q, p.seqlen_k, p.hdim, p.causal)
        for key, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
            ms = r[f"{key}_ms"]
            r[f"{key}_tflops"] = mult * f / (ms * 1e-3) / 1e12 if ms and ms > 0 else None
    return r


# ----------------------------------------------------------------------------------------------
# Grids

def _ints(s: Optional[str]) -> Optional[list]:
    if s is None:
        return None
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in s.split(",") if t]


@dataclass
class Grid:
    dtypes: list
    hdims: list
    seqlens: list
    case_seqlens: list
    case_hdims: list
    tokens: int
    model_dim: int
    module_embeds: list
    module_seqlens: list
    module_heads: int = 16
    module_tokens: int = 16384


def default_grid(device: torch.device, quick: bool, tiny: bool) -> Grid:
    """The ANCHORS grid on a GPU (16k tokens, heads * head_dim = 2048); a small CPU comparison."""
    k = 1024
    if tiny:  # for the smoke test: seconds on a CPU
        return Grid(dtypes=["fp32"], hdims=[16], seqlens=[32, 64], case_seqlens=[64], case_hdims=[16], tokens=128,
                    model_dim=32, module_embeds=[32], module_seqlens=[32], module_heads=2, module_tokens=64)
    if device.type == "cpu":
        return Grid(dtypes=["fp32"], hdims=[64], seqlens=[256, 1 * k] if quick else [256, 512, 1 * k],
                    case_seqlens=[256] if quick else [512], case_hdims=[64], tokens=2 * k, model_dim=512,
                    module_embeds=[256], module_seqlens=[256] if quick else [256, 1 * k], module_heads=4,
                    module_tokens=1 * k if quick else 2 * k)
    if quick:
        return Grid(dtypes=["bf16"], hdims=[64, 128], seqlens=[1 * k, 4 * k], case_seqlens=[4 * k], case_hdims=[128],
                    tokens=16 * k, model_dim=2048, module_embeds=[1024], module_seqlens=[1 * k, 4 * k])
    return Grid(dtypes=["bf16"], hdims=[64, 128], seqlens=[512, 1 * k, 2 * k, 4 * k, 8 * k, 16 * k],
                case_seqlens=[1 * k, 4 * k], case_hdims=[128], tokens=16 * k, model_dim=2048,
                module_embeds=[1024, 2048], module_seqlens=[512, 1 * k, 2 * k, 4 * k, 8 * k])


def build_points(args, grid: Grid) -> list:
    """Plain grid first, then the module comparison, then the extra cases (the order a --budget-s
    cut keeps). Without --dtype, only the plain grid runs every grid dtype; the rest the first."""
    dtypes = args.dtype.split(",") if args.dtype else grid.dtypes
    other_dtypes = dtypes if args.dtype else dtypes[:1]
    causals = [bool(int(c)) for c in args.causal.split(",")] if args.causal else [False, True]
    known = list(CASES) + ["module"]
    if args.case:
        cases = args.case.split(",")
    else:  # the float32 case is the plain grid again when the grid is float32 already
        cases = [c for c in known if not (c == "float32" and dtypes == ["fp32"])]
    for c in cases:
        if c not in known:
            raise SystemExit(f"bench: unknown case {c!r}; known: {', '.join(known)}")
    points = {c: [] for c in cases}
    if "module" in cases and args.causal != "1":
        for dt in other_dtypes:
            for E in _ints(args.embed) or grid.module_embeds:
                for n in _ints(args.seqlen) or grid.module_seqlens:
                    H = grid.module_heads
                    points["module"].append(Point("module", DTYPES[dt], E // H, False,
                                                  max(1, grid.module_tokens // n), H, H, n, n, embed_dim=E))
    for name in (c for c in cases if c != "module"):
        case, plain = CASES[name], name == "plain"
        seqlens = _ints(args.seqlen) or (grid.seqlens if plain else grid.case_seqlens)
        hdims = _ints(args.hdim) or (grid.hdims if plain else grid.case_hdims)
        for dt in ([DTYPE_NAMES[case.dtype]] if case.dtype else dtypes if plain else other_dtypes):
            for d in hdims:
                for causal in causals:
                    if causal and (case.causal == "no" or case.causal == "opt" and not args.causal):
                        continue
                    for n in seqlens:
                        h = case.heads or max(1, grid.model_dim // d)
                        hkv = case.heads_kv or h
                        points[name].append(Point(name, DTYPES[dt], d, causal, max(1, grid.tokens // n), h, hkv,
                                                  max(1, n // case.q_div), n))
    order = ["plain", "module"] + [c for c in cases if c not in ("plain", "module")]
    return [p for c in order if c in points for p in points[c]]


def select_impls(pattern: Optional[str], registry: list, device: torch.device) -> list:
    """Names or globs, comma-separated; a leading '!' excludes (e.g. '!flex': everything but flex)."""
    impls = [i for i in registry if device.type in i.devices]
    if pattern:
        pats = pattern.split(",")
        keep, drop = [p for p in pats if not p.startswith("!")], [p[1:] for p in pats if p.startswith("!")]
        impls = [i for i in impls if (not keep or any(fnmatch.fnmatch(i.name, p) for p in keep))
                 and not any(fnmatch.fnmatch(i.name, p) for p in drop)]
    return impls


# ----------------------------------------------------------------------------------------------
# Header, progress, output

def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def card_short(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", torch.cuda.get_device_name(device).replace("NVIDIA", ""))
    return m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def _git(*cmd) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 (16 hex digits) over the sources a build is made of: csrc/ (C++ / CUDA), flash_mha/*.py,
    setup.py. It names the code of a run even where the checkout's .git is missing or stale (the GPU
    machine's copy); `python -m flash_mha.bench --source-digest` prints it for the checkout at hand."""
    h = hashlib.sha256()
    files = sorted(p for p in (REPO / "csrc").rglob("*") if p.suffix in {".cpp", ".h", ".cu", ".cuh"})
    files += sorted((REPO / "flash_mha").glob("*.py")) + [REPO / "setup.py"]
    for f in files:
        if f.is_file():
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def header(device: torch.device, args, timer: Timer) -> dict:
    # FLASH_MHA_GIT_COMMIT: the commit as the caller knows it, for copies whose .git is stale or
    # missing (the GPU machine's); sources_sha256 below checks it.
    commit = os.environ.get("FLASH_MHA_GIT_COMMIT")
    if not commit:
        commit = _git("rev-parse", "HEAD") or "none"
        if _git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import flash_mha
        fm_version = getattr(flash_mha, "__version__", None)
    except Exception as e:  # noqa: BLE001
        fm_version = f"import failed: {_first_line(e)}"
    cuda = device.type == "cuda"
    return {
        "record": "header", "card": card_name(device), "card_short": card_short(device), "device": device.type,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "flash_mha": fm_version,
        "git_commit": commit, "sources_sha256": source_digest(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "threads": torch.get_num_threads(), "argv": args.argv,
        "loadavg_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "timing": timer.method, "warmup_ms": timer.warmup_ms, "rep_ms": timer.rep_ms,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "flops": "fwd 4*b*h*n_q*n_k*d (causal: /2 square, visible pairs otherwise); bwd 2.5x; fwdbwd 3.5x",
        "tolerance": {DTYPE_NAMES[k]: v for k, v in FWD_TOL.items()}, "grad_tol_factor": GRAD_TOL_FACTOR,
    }


class _Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int, disable: bool):
        self.n, self.total, self.disable, self._bar = 0, total, disable, None
        if not disable:
            try:
                from tqdm import tqdm
                # a captured (non-terminal) stderr gets a line every 30 s, not one per step
                self._bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, smoothing=0.05,
                                 mininterval=0.5 if sys.stderr.isatty() else 30)
            except ImportError:
                pass

    def update(self, desc: str) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(desc[:60], refresh=False)
            self._bar.update()
        elif not self.disable:
            print(f"[{self.n}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def write_json(path: Path, head: dict, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Runs

def run_points(points: list, impls: list, module_impls: list, device, timer, args, progress, on_point) -> list:
    rows = []
    t_start = time.monotonic()
    for i, p in enumerate(points):
        if args.budget_s and time.monotonic() - t_start > args.budget_s:
            print(f"bench: --budget-s {args.budget_s} reached; {len(points) - i} points not run", file=sys.stderr)
            break
        seed = args.seed + i
        is_module = p.embed_dim is not None
        x = make_module_inputs(p, device, seed) if is_module else make_inputs(p, device, seed)
        if is_module:
            ref = module_reference(x)
        else:
            ref = None if x.dropout_p > 0 else reference_slice(x, with_grads=True)
        for impl in (module_impls if is_module else impls):
            t0 = time.monotonic()
            r = measure(impl, x, ref, timer, args.max_scores)
            r["wall_s"] = round(time.monotonic() - t0, 3)
            if r["check"] == "fail":
                print(f"\nbench: CHECK FAILED {impl.name} {p.label}: fwd_err={r['fwd_err']} grad_err={r['grad_err']}",
                      file=sys.stderr)
            rows.append(r)
            progress.update(f"{impl.name} {p.label}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del x, ref
        on_point(rows)
    return rows


def _cpu_seconds() -> tuple:
    """(CPU seconds the whole machine spent busy, CPU seconds this process spent), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


def cpu_check(args) -> int:
    """Issue 2's requirement: flash_mha >= 0.5x torch CPU SDPA, float32, d64, seqlen 1k and 4k,
    forward and fwd+bwd (speed ratio = sdpa_ms / flash_mha_ms). The two alternate over --rounds
    passes and each time is the median over passes, so a burst of load elsewhere on the machine
    does not land on one side only."""
    device = torch.device("cpu")
    timer = Timer(device, warmup_ms=args.warmup_ms or 300, rep_ms=args.rep_ms or 2000)
    heads = lambda n: 8 if n <= 1024 else 4  # noqa: E731  (a minute or two on 2 cores)
    points = [Point("plain", torch.float32, 64, False, 1, heads(n), heads(n), n, n)
              for n in _ints(args.seqlen) or [1024, 4096]]
    impls = select_impls("flash_mha,sdpa", IMPLS, device)
    args.budget_s = None
    head = header(device, args, timer)
    progress = _Progress(args.rounds * len(points) * len(impls), args.no_progress)
    (busy0, own0), t0 = _cpu_seconds(), time.monotonic()
    passes = [run_points(points, impls, [], device, timer, args, progress, lambda rows: None)
              for _ in range(args.rounds)]
    (busy1, own1), wall = _cpu_seconds(), time.monotonic() - t0
    # Other processes compete for the same cores and skew the ratio (torch's SDPA, which splits
    # work evenly over threads, suffers most): say how busy the machine was.
    head["other_load_cores"] = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall, 2)
    progress.close()
    rows = []
    for i, r in enumerate(passes[0]):
        r = dict(r, case="cpu_check", rounds=len(passes))
        for key in ("fwd_ms", "fwdbwd_ms"):
            vals = [ps[i][key] for ps in passes if ps[i][key] is not None]
            r[key] = statistics.median(vals) if vals else None
            r[key.replace("_ms", "_ms_all")] = vals
        if r["fwd_ms"] and r["fwdbwd_ms"]:
            r["bwd_ms"] = r["fwdbwd_ms"] - r["fwd_ms"]
            f = attention_flops(r["batch"], r["heads"], r["seqlen_q"], r["seqlen_k"], r["hdim"], r["causal"])
            for key, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
                r[f"{key}_tflops"] = mult * f / (r[f"{key}_ms"] * 1e-3) / 1e12 if r[f"{key}_ms"] > 0 else None
        rows.append(r)
    out = Path(args.out) if args.out else Path(args.out_dir) / "CPU-cpu-check.json"
    write_json(out, head, rows)
    print(f"\nCPU check: {head['card']}, torch {head['torch']}, float32, head dim 64, non-causal, "
          f"median of {args.rounds} alternating passes")
    print(f"other processes kept {head['other_load_cores']} of {os.cpu_count()} cores busy meanwhile"
          + (" -- fewer free cores than threads: these ratios are not reliable"
             if head["other_load_cores"] > (os.cpu_count() or 1) - torch.get_num_threads() + 0.2 else ""))
    print("speed ratio = torch SDPA ms / flash_mha ms (issue 2 asks >= 0.5)\n")
    print("| seqlen | batch x heads | fwd ms flash_mha / sdpa | fwd ratio | fwd+bwd ms flash_mha / sdpa "
          "| fwd+bwd ratio |")
    print("|---|---|---|---|---|---|")
    ok = True
    for p in points:
        by = {r["impl"]: r for r in rows if r["seqlen_q"] == p.seqlen_q}
        f, s = by.get("flash_mha", {}), by.get("sdpa", {})
        cells = []
        for key in ("fwd_ms", "fwdbwd_ms"):
            fm, sm = f.get(key), s.get(key)
            ratio = sm / fm if fm and sm else None
            ok = ok and ratio is not None and ratio >= 0.5
            cells += [f"{fm or float('nan'):.1f} / {sm or float('nan'):.1f}",
                      f"{ratio:.3f}" if ratio else f"n/a ({f.get('error') or f.get('bwd_error')})"]
        print(f"| {p.seqlen_q} | {p.batch} x {p.heads} | " + " | ".join(cells) + " |")
    bad = [r for r in rows if r["check"] == "fail"]
    print(f"\nchecks vs float32 reference: {'FAILED for ' + ', '.join(r['impl'] for r in bad) if bad else 'ok'}")
    print(f"meets 0.5x on every point: {'yes' if ok else 'NO'}; rows written to {out}")
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m flash_mha.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few points of each section")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the smoke test)")
    ap.add_argument("--full", action="store_true", help="also fp16 and head dim 256 on the plain grid")
    ap.add_argument("--source-digest", action="store_true",
                    help="print the digest of the sources (the header's sources_sha256) and exit")
    ap.add_argument("--cpu-check", action="store_true",
                    help="issue 2's CPU ratios vs torch SDPA (float32 d64, --seqlen default 1k,4k), then exit")
    ap.add_argument("--rounds", type=int, default=3, help="--cpu-check: alternating passes (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default=None,
                    help="results JSON (default <out-dir>/<CARD>[-quick|-partial].json, CARD e.g. H100)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="default: benchmarks/results")
    ap.add_argument("--case", default=None, help=f"comma list of {', '.join(list(CASES) + ['module'])}")
    ap.add_argument("--impl", default=None,
                    help="comma list of impl names or globs, '!' excludes (e.g. 'flash_mha,sdpa_*' or '!flex')")
    ap.add_argument("--dtype", default=None, help="comma list of bf16, fp16, fp32")
    ap.add_argument("--hdim", default=None, help="comma list of head dims")
    ap.add_argument("--seqlen", default=None, help="comma list of seqlens, e.g. 512,1k,4k")
    ap.add_argument("--causal", default=None, choices=["0", "1", "0,1"], metavar="{0,1}",
                    help="causal filter: 0, 1 or 0,1 (default: both where the case allows)")
    ap.add_argument("--embed", default=None, help="module level: comma list of embed dims")
    ap.add_argument("--tokens", type=int, default=None, help="batch * seqlen (default 16384 on GPU)")
    ap.add_argument("--model-dim", type=int, default=None, help="heads * head_dim (default 2048 on GPU)")
    ap.add_argument("--max-scores", type=float, default=None,
                    help="naive/MATH run only while b*h*n_q*n_k <= this (default 2^30 GPU, 2^26 CPU)")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new points after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", action="store_true", help="write the markdown table and PNGs next to the JSON")
    ap.add_argument("--list", action="store_true", help="list cases and implementations, then exit")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        for c in CASES.values():
            print(f"case {c.name:12s} {c.doc}")
        print("case module       FlashMHA / flash_mha.MultiheadAttention vs nn.MultiheadAttention, training step")
        for i in IMPLS + MODULE_IMPLS:
            print(f"impl {i.name:22s} {type(i).__name__} devices={','.join(i.devices)}")
        return 0
    if args.source_digest:
        print(source_digest())
        return 0
    if args.cpu_check:
        return cpu_check(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = default_grid(device, args.quick, args.tiny)
    if args.full:
        grid.dtypes, grid.hdims = ["bf16", "fp16"], [64, 128, 256]
    grid.tokens = args.tokens or grid.tokens
    grid.model_dim = args.model_dim or grid.model_dim
    if args.max_scores is None:
        args.max_scores = float(2**30 if device.type == "cuda" else 2**26)
    timer = Timer(device, warmup_ms=args.warmup_ms or (25 if device.type == "cuda" else 100),
                  rep_ms=args.rep_ms or (100 if device.type == "cuda" else 500))
    if args.quick and device.type == "cuda":
        timer.warmup_ms, timer.rep_ms = args.warmup_ms or 10, args.rep_ms or 40
    if args.tiny:
        timer.warmup_ms, timer.rep_ms = args.warmup_ms or 1, args.rep_ms or 5
    points = build_points(args, grid)
    impls = select_impls(args.impl, IMPLS, device)
    module_impls = select_impls(args.impl, MODULE_IMPLS, device)
    filtered = any(getattr(args, a) for a in ("case", "impl", "dtype", "hdim", "seqlen", "causal", "embed", "tiny",
                                              "tokens", "model_dim"))
    suffix = "-quick" if args.quick else "-partial" if filtered else ""
    out = Path(args.out) if args.out else Path(args.out_dir) / f"{card_short(device)}{suffix}.json"
    head = header(device, args, timer)
    head["points"] = len(points)
    head["impls"] = [i.name for i in impls + module_impls]
    total = sum(len(module_impls if p.embed_dim else impls) for p in points)
    print(f"bench: {head['card']}, torch {head['torch']}, {len(points)} points, {total} measurements -> {out}",
          file=sys.stderr)
    progress = _Progress(total, args.no_progress)
    t0 = time.monotonic()
    rows = run_points(points, impls, module_impls, device, timer, args, progress,
                      lambda rows: write_json(out, head, rows))
    progress.close()
    head["complete"] = len(rows) == total
    head["wall_s"] = round(time.monotonic() - t0, 1)
    write_json(out, head, rows)
    spent = {}
    for r in rows:
        spent[r["impl"]] = spent.get(r["impl"], 0.0) + (r["wall_s"] or 0.0)
    print(f"bench: {head['wall_s']:.0f} s in all; by impl (compiles included): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])), file=sys.stderr)
    from . import bench_plot
    print(bench_plot.ratio_table(rows))
    if args.plot:
        for path in bench_plot.write_report(out):
            print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
