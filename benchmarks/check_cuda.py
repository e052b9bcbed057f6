"""GPU check of flash_mha's CUDA kernels against flash_mha.reference (float64), plus a quick timing
against torch SDPA (FLASH backend). Run on the GPU machine after building:

    python benchmarks/check_cuda.py            # correctness grid, then timings
    python benchmarks/check_cuda.py --quick    # small cases (for compute-sanitizer memcheck)
    python benchmarks/check_cuda.py --tiny     # a dozen cases (for racecheck)
    python benchmarks/check_cuda.py --no-bench

Prints one line per case (max relative error of out / lse / dq / dk / dv / dbias) and a summary.
"""
import argparse
import itertools
import math
import sys
import time

import torch

import flash_mha  # noqa: F401  (registers torch.ops.flash_mha)
from flash_mha import reference

DEV = "cuda"
# ||x - ref|| / ||ref|| limits per dtype (forward, backward).
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 8e-3),
    torch.bfloat16: (2.5e-2, 5e-2),
}


def poison():
    """Fill freed allocator memory with NaN so unwritten outputs show up."""
    x = torch.full((64 * 1024 * 1024,), float("nan"), device=DEV)
    del x


def rel(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def rel_floor(x, ref, floor):
    """||x - ref|| / max(||ref||, floor)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return (x - ref).norm().item() / max(ref.norm().item(), floor)


def make_case(dtype, b, h, h_kv, n_q, n_k, d, dv, bias_shape, mask_shape, causal, p, strided, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if strided:  # [b, n, h, d] storage viewed as [b, h, n, d]
        q = rnd(b, n_q, h, d).to(DEV, dtype).transpose(1, 2)
        k = rnd(b, n_k, h_kv, d).to(DEV, dtype).transpose(1, 2)
        v = rnd(b, n_k, h_kv, dv).to(DEV, dtype).transpose(1, 2)
    else:
        q = rnd(b, h, n_q, d).to(DEV, dtype)
        k = rnd(b, h_kv, n_k, d).to(DEV, dtype)
        v = rnd(b, h_kv, n_k, dv).to(DEV, dtype)
    bias = None
    if bias_shape is not None:
        full = (b, h, n_q, n_k)
        shape = [full[i] if c == "f" else 1 for i, c in enumerate(bias_shape)]
        bias = rnd(*shape).to(DEV, dtype)
    mask = None
    if mask_shape is not None:
        full = (b, h, n_q, n_k)
        shape = [full[i] if c == "f" else 1 for i, c in enumerate(mask_shape)]
        mask = torch.rand(*shape, generator=g) > 0.3
        if mask.shape[2] > 1:
            mask[..., 0, :] = False  # a row that sees nothing
        mask = mask.to(DEV)
    rng = torch.tensor([seed * 7919 + 11, seed * 31 + 3], dtype=torch.int64, device=DEV) if p > 0 else None
    dout = rnd(b, h, n_q, dv).to(DEV, dtype)
    return q, k, v, bias, mask, rng, dout


def run_case(dtype, b, h, h_kv, n_q, n_k, d, dv, bias_shape=None, mask_shape=None, causal=0, p=0.0,
             strided=False, seed=0, bias_grad=True, deterministic=False):
    q, k, v, bias, mask, rng, dout = make_case(dtype, b, h, h_kv, n_q, n_k, d, dv, bias_shape, mask_shape,
                                               causal, p, strided, seed)
    scale = 1.0 / math.sqrt(d)
    poison()
    out, lse, _ = torch.ops.flash_mha.fwd(q, k, v, bias, mask, scale, causal, p, rng)
    bg = bias is not None and bias_grad
    torch.use_deterministic_algorithms(deterministic)
    poison()
    dq, dk, dv_, dbias = torch.ops.flash_mha.bwd(dout, q, k, v, out, lse, bias, mask, scale, causal, p, rng, bg)
    again = None
    if deterministic:
        poison()
        again = torch.ops.flash_mha.bwd(dout, q, k, v, out, lse, bias, mask, scale, causal, p, rng, bg)
    torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()

    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    br = bias.detach().double().requires_grad_(bg) if bias is not None else None
    cmode = {0: None, 1: "top_left", 2: "bottom_right"}[causal]
    ref_out, ref_lse = reference.attention(qr, kr, vr, bias=br, mask=mask, scale=scale, causal=cmode,
                                           dropout_p=p, rng_state=rng, return_lse=True)
    ref_out.backward(dout.double())
    errs = {"out": rel(out, ref_out.detach())}
    fin = torch.isfinite(ref_lse)
    lse_ok = bool((torch.isfinite(lse) == fin).all())
    errs["lse"] = (lse.double()[fin] - ref_lse.detach()[fin]).abs().max().item() if fin.any() else 0.0
    if not lse_ok:
        errs["lse"] = float("inf")
    errs["dq"] = rel(dq, qr.grad)
    errs["dk"] = rel(dk, kr.grad)
    errs["dv"] = rel(dv_, vr.grad)
    if bg:
        floor = 0.0
        if bias_shape[3] == "1":
            # A bias broadcast over keys has an exactly zero gradient (sum_j dS_ij = D_i - D_i sum_j
            # P_ij), so what is left is rounding of the summed dS: measure it against the norm of the
            # unreduced dS (the gradient of a full-size bias). In float16/bfloat16, D = dO . O uses
            # the rounded output, so the rows of dS sum to O(eps |D|): a floor of 1 per element there.
            full_bias = br.detach().expand(b, h, n_q, n_k).clone().requires_grad_()
            reference.attention(qr.detach(), kr.detach(), vr.detach(), bias=full_bias, mask=mask, scale=scale,
                                causal=cmode, dropout_p=p, rng_state=rng).backward(dout.double())
            floor = full_bias.grad.norm().item()
            if dtype in (torch.float16, torch.bfloat16):
                floor = max(floor, math.sqrt(br.grad.numel()))
        errs["dbias"] = rel_floor(dbias, br.grad, floor)
    tf, tb = TOL[dtype]
    ok = errs["out"] <= tf and errs["lse"] <= max(tf, 1e-5) * 10 and all(
        errs[n] <= tb for n in ("dq", "dk", "dv", "dbias") if n in errs)
    if deterministic:
        same = all(torch.equal(x, y) for x, y in zip((dq, dk, dv_, dbias), again))
        errs["bitwise"] = 0.0 if same else 1.0
        ok = ok and same
    return ok, errs


def grid(quick, tiny=False):
    dts = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    if quick:
        dts = [torch.float32, torch.float16]
    cases = []
    if tiny:  # for racecheck: the tensor-core kernels (fast and general) and one SIMT case
        for dt, sh in itertools.product((torch.float16, torch.bfloat16),
                                        [(1, 2, 1, 70, 130, 64, 64), (1, 2, 2, 64, 64, 128, 128)]):
            cases.append(dict(dtype=dt, shape=sh, causal=1))
            cases.append(dict(dtype=dt, shape=sh, bias_shape="ffff", mask_shape="1fff", causal=2, p=0.2))
        cases.append(dict(dtype=torch.float32, shape=(1, 2, 1, 40, 50, 24, 40), bias_shape="1f1f", causal=0, p=0.1))
        return cases
    # (b, h, h_kv, n_q, n_k, d, dv)
    shapes = [(2, 4, 2, 77, 133, 64, 64), (1, 2, 1, 130, 70, 128, 128), (1, 3, 3, 65, 65, 33, 17),
              (2, 2, 2, 200, 190, 96, 64), (1, 2, 2, 64, 300, 256, 256), (1, 4, 1, 50, 129, 8, 40)]
    if quick:
        shapes = [(1, 2, 1, 40, 70, 64, 64), (1, 2, 2, 33, 20, 33, 17), (1, 2, 2, 70, 70, 256, 256)]
    for dt, sh in itertools.product(dts, shapes):
        for causal in (0, 1, 2):
            cases.append(dict(dtype=dt, shape=sh, causal=causal))
        cases.append(dict(dtype=dt, shape=sh, bias_shape="ffff", mask_shape="1fff", causal=2, p=0.2))
        cases.append(dict(dtype=dt, shape=sh, bias_shape="1f1f", mask_shape="f11f", causal=0, p=0.0))
        cases.append(dict(dtype=dt, shape=sh, bias_shape="f1ff", causal=1, p=0.1, deterministic=True))
        cases.append(dict(dtype=dt, shape=sh, bias_shape="1fff", causal=0, p=0.3, strided=True))
        cases.append(dict(dtype=dt, shape=sh, bias_shape="ff1f", causal=0, deterministic=True))
        cases.append(dict(dtype=dt, shape=sh, bias_shape="fff1", mask_shape="ffff", causal=1))
    return cases


def check(quick, tiny=False):
    n_ok = n_fail = 0
    worst = {}
    for idx, c in enumerate(grid(quick, tiny)):
        b, h, h_kv, n_q, n_k, d, dv = c.pop("shape")
        dt = c.pop("dtype")
        try:
            ok, errs = run_case(dt, b, h, h_kv, n_q, n_k, d, dv, seed=idx, **c)
        except Exception as e:  # noqa: BLE001
            ok, errs = False, {"exception": repr(e)[:200]}
        n_ok += ok
        n_fail += not ok
        key = str(dt).replace("torch.", "")
        for n, e in errs.items():
            if isinstance(e, float):
                worst[(key, n)] = max(worst.get((key, n), 0.0), e)
        line = " ".join(f"{n}={e:.2e}" if isinstance(e, float) else f"{n}={e}" for n, e in errs.items())
        print(f"{'ok  ' if ok else 'FAIL'} {key:8s} b{b} h{h}/{h_kv} nq{n_q} nk{n_k} d{d}/{dv} {c} {line}", flush=True)
    print(f"\ncorrectness: {n_ok} passed, {n_fail} failed")
    for (dt, n), e in sorted(worst.items()):
        print(f"  worst {dt:8s} {n:6s} {e:.2e}")
    return n_fail == 0


def bench(fmha_only=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    import triton.testing

    print(f"\ntimings on {torch.cuda.get_device_name()} (ms, median; TFLOP/s)")
    print(f"{'case':34s} {'fmha fwd':>14s} {'sdpa fwd':>14s} {'fmha f+b':>14s} {'sdpa f+b':>14s}")
    rows = []
    for d, n, causal in itertools.product((64, 128), (1024, 2048, 4096), (False, True)):
        b, h = 16384 // n, 16
        q, k, v = (torch.randn(b, h, n, d, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
        cmode = "top_left" if causal else None

        def f_fmha():
            return flash_mha.attention(q, k, v, causal=cmode)

        def f_sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        res = []
        fns = (f_fmha,) if fmha_only else (f_fmha, f_sdpa)
        for fn in fns:
            with torch.no_grad():
                res.append(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))
        for fn in fns:
            def fb(fn=fn):
                fn().backward(dout)
            res.append(triton.testing.do_bench(fb, warmup=50, rep=200, return_mode="median", grad_to_none=[q, k, v]))
        if fmha_only:
            res = [res[0], float("nan"), res[1], float("nan")]
        tf = [flops / t / 1e9 if i < 2 else 3.5 * flops / t / 1e9 for i, t in enumerate(res)]
        name = f"bf16 b{b} h{h} n{n} d{d} causal={int(causal)}"
        print(f"{name:34s} " + " ".join(f"{t:6.3f} ({x:4.0f})" for t, x in zip(res, tf)), flush=True)
        rows.append((name, res))
    if not fmha_only:  # the SIMT path (float32) against SDPA's default float32 backend
        b, h, n, d = 4, 16, 1024, 64
        q, k, v = (torch.randn(b, h, n, d, device=DEV, dtype=torch.float32, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        flops = 4 * b * h * n * n * d
        fns = (lambda: flash_mha.attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v))
        res = []
        for fn in fns:
            with torch.no_grad():
                res.append(triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median"))
        for fn in fns:
            res.append(triton.testing.do_bench(lambda fn=fn: fn().backward(dout), warmup=20, rep=100,
                                               return_mode="median", grad_to_none=[q, k, v]))
        tf = [flops / t / 1e9 if i < 2 else 3.5 * flops / t / 1e9 for i, t in enumerate(res)]
        name = f"fp32 b{b} h{h} n{n} d{d} (simt; sdpa default)"
        print(f"{name:34s} " + " ".join(f"{t:6.3f} ({x:4.0f})" for t, x in zip(res, tf)), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a dozen small cases (racecheck)")
    ap.add_argument("--fmha-only", action="store_true", help="bench without the SDPA columns")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    ok = True
    if not a.bench_only:
        t0 = time.time()
        ok = check(a.quick or a.tiny, a.tiny)
        print(f"check took {time.time() - t0:.1f}s")
    if not (a.quick or a.tiny) and not a.no_bench:
        bench(a.fmha_only)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
