"""How the benchmark's timing method moves flash_mha against cuDNN: forward and forward + backward
of both, timed (a) as flash_mha.bench does (L2 flushed before every repetition) and (b) back to back
(20 calls between two events, no flush), on the standard grid (bf16, batch * seqlen = 16384, heads *
head_dim = 2048). If the flush costs one side more, the ratio differs between (a) and (b).

    python3 benchmarks/timing_check.py [--points 128:0:1k,128:0:4k]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_mha
from flash_mha.bench import Timer


def back_to_back(fn, calls=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="128:0:1k,128:0:4k,128:0:16k,64:1:4k")
    args = ap.parse_args()
    timer = Timer(torch.device("cuda"), warmup_ms=50, rep_ms=200)
    print("point what | ours flushed, b2b ms | cudnn flushed, b2b ms | ratio cudnn/ours flushed, b2b")
    for spec in args.points.split(","):
        d, causal, n = spec.split(":")
        d, causal = int(d), bool(int(causal))
        n = int(n[:-1]) * 1024 if n.endswith("k") else int(n)
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)

        def ours():
            return flash_mha.attention(q, k, v, causal="top_left" if causal else None)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        for what in ("fwd", "fwd+bwd"):
            res = []
            for f in (ours, cudnn):
                # As the bench: the forward builds its autograd graph (inputs require grad).
                fn = f if what == "fwd" else (lambda f=f: torch.autograd.grad(f(), (q, k, v), dout))
                res.append((timer(fn), back_to_back(fn)))
            (of, ob), (cf, cb) = res
            print(f"d{d} causal{int(causal)} n{n} {what} | {of:.3f}, {ob:.3f} | {cf:.3f}, {cb:.3f} | "
                  f"{cf / of:.3f}, {cb / ob:.3f}", flush=True)


if __name__ == "__main__":
    main()
