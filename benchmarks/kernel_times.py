"""Per-kernel GPU time of one flash_mha forward + backward call (torch.profiler), standard grid.

    python3 benchmarks/kernel_times.py [--points 128:1:512,64:0:1k]   # hdim:causal:seqlen, ...
    python3 benchmarks/kernel_times.py --case bias,bias_nograd --points 128:0:4k

Cases: plain; bias / bias_heads (additive bias (b,h,n,n) / (1,h,n,n) that requires grad);
bias_nograd (the full bias without its gradient: what the dbias stores cost).

Shows where a training step's time goes besides the main kernels (the backward's prep and convert
passes, workspace memsets), which a TFLOP/s figure hides. bf16, batch * seqlen = 16384,
heads * head_dim = 2048; mean over 10 calls after 5 warm-up calls.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import flash_mha
from flash_mha.bench import attention_flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="128:1:512,128:1:1k,128:0:512,64:1:512,64:0:1k,128:1:4k")
    ap.add_argument("--case", default="plain", help="comma-separated: plain, bias, bias_heads, bias_nograd")
    args = ap.parse_args()
    for case, spec in ((c, s) for c in args.case.split(",") for s in args.points.split(",")):
        d, causal, n = spec.split(":")
        d, causal = int(d), int(causal)
        n = int(n[:-1]) * 1024 if n.endswith("k") else int(n)
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        bias, wrt = None, (q, k, v)
        if case != "plain":
            bias = torch.randn(1 if case == "bias_heads" else b, h, n, n, device="cuda", dtype=torch.bfloat16,
                               requires_grad=case != "bias_nograd")
            wrt = wrt + ((bias,) if bias.requires_grad else ())

        def step():
            out = flash_mha.attention(q, k, v, bias=bias, causal="bottom_right" if causal else None)
            return torch.autograd.grad(out, wrt, dout)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"== {case} d{d} causal{causal} n{n} ({b}x{h})")
        total, main_us = 0.0, {}
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total <= 0:
                continue
            us = e.device_time_total / 10
            total += us
            print(f"  {us:8.1f} us  x{e.count / 10:.0f}  {e.key[:100]}")
            for kind in ("fwd", "bwd"):  # the main kernels (sm90_fwd_kernel, sm90_bwd_kernel, sm80_*)
                if f"_{kind}_kernel<" in e.key:
                    main_us[kind] = main_us.get(kind, 0.0) + us
        print(f"  {total:8.1f} us  total")
        # The main kernels' own TFLOP/s (FLOPs as flash_mha.bench: bwd 2.5x fwd), beside the whole
        # step's: the difference is what the side passes (prep, convert, memsets) cost.
        fwd_flops = attention_flops(b, h, n, n, d, bool(causal))
        rates = [f"{kind} main kernel {m * fwd_flops / (main_us[kind] * 1e6):.0f}"
                 for kind, m in (("fwd", 1.0), ("bwd", 2.5)) if main_us.get(kind)]
        print(f"  TFLOP/s: {', '.join(rates)}; whole fwd+bwd step {3.5 * fwd_flops / (total * 1e6):.0f}")


if __name__ == "__main__":
    main()
