"""Interleaved A/B of flash_mha variants selected by environment variables, beside SDPA cuDNN.

    python3 benchmarks/ab_env.py --variant base:FLASH_MHA_EXP_X=0 --variant new:FLASH_MHA_EXP_X=1 \
        --hdim 64,128 --causal 1 --seqlen 512,1k,2k,4k

Each variant sets its variables (os.environ: the extension reads them per call) before each timing,
so every variant and the peer are timed on the same inputs, point by point, in one process. The
grid is the standard one (bf16, batch * seqlen = 16384, heads * head_dim = 2048). The variants are
checked against each other first: outputs and gradients must agree to bf16 rounding, since an
experimental variable must not change results. Timing: triton.testing.do_bench median (L2
flushed). Prints fwd / bwd TFLOP/s (bwd = fwd+bwd minus fwd; FLOPs as flash_mha.bench).
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flash_mha
from flash_mha.bench import attention_flops


def parse_variant(s):
    name, _, assigns = s.partition(":")
    env = dict(a.split("=", 1) for a in assigns.split(",") if a)
    return name, env


def ints(s):
    return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in s.split(",")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True, help="name:VAR=value,VAR2=value")
    ap.add_argument("--hdim", default="64,128")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--seqlen", default="512,1k,2k,4k,8k,16k")
    ap.add_argument("--rep-ms", type=float, default=100)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    keys = sorted({k for _, env in variants for k in env})
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("# TFLOP/s fwd / bwd; variants: " + "; ".join(f"{n} {e}" for n, e in variants))
    names = ["cudnn"] + [n for n, _ in variants]
    print(f"{'d':>4} {'causal':>6} {'n':>6} | " + " | ".join(f"{n:>13}" for n in names))
    for d in ints(args.hdim):
        for causal in (int(c) for c in args.causal.split(",")):
            for n in ints(args.seqlen):
                b, h = 16384 // n, 2048 // d
                gen = torch.Generator(device="cuda").manual_seed(n + d + causal)
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                           .requires_grad_() for _ in range(3))
                dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                flop = attention_flops(b, h, n, n, d, bool(causal))

                def ours():
                    return flash_mha.attention(q, k, v, causal="bottom_right" if causal else None)

                def cudnn():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))

                results, first = [], None
                for name in names:
                    env = dict(variants)[name] if name != "cudnn" else {}
                    for key in keys:
                        os.environ.pop(key, None)
                    os.environ.update(env)
                    fn = cudnn if name == "cudnn" else ours
                    if name != "cudnn":
                        out = fn()
                        grads = torch.autograd.grad(out, (q, k, v), dout)
                        if first is None:
                            first = (out, grads)
                        else:
                            for a, r in zip((out,) + grads, (first[0],) + first[1]):
                                err = ((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()
                                assert err < 2e-2, f"variant {name} disagrees with {names[1]}: rel err {err:.3g}"
                    fwd_ms = do_bench(fn, rep=args.rep_ms, return_mode="median")
                    fb_ms = do_bench(lambda: torch.autograd.grad(fn(), (q, k, v), dout), rep=args.rep_ms,
                                     return_mode="median")
                    results.append((flop / fwd_ms / 1e9, 2.5 * flop / (fb_ms - fwd_ms) / 1e9))
                for key in keys:
                    os.environ.pop(key, None)
                print(f"{d:>4} {causal:>6} {n:>6} | " + " | ".join(f"{f:6.0f}/{bw:6.0f}" for f, bw in results),
                      flush=True)


if __name__ == "__main__":
    main()
