"""What torch.use_deterministic_algorithms(True) costs a flash_mha training step (forward + backward).

    python3 benchmarks/deterministic_cost.py [--points 128:0:4k,64:1:4k] [--case plain,bias_1hqk] [--path sm80]

Cases: plain; bias_bhqk / bias_1hqk / bias_11qk (an additive bias that requires grad, broadcast over
nothing / the batch / batch and heads: a shared dbias is stored whole and summed in deterministic
mode). bf16, batch * seqlen = 16384, heads * head_dim = 2048 (the standard grid); flash_mha.bench's
timer (L2 flushed between repetitions). Prints both times, their ratio, and whether the gradients of
two deterministic runs are bitwise equal. --path forces a kernel family (flash_mha.force_kernel), e.g.
sm80 (dQ in key-block order there as well; a shared dbias goes to SIMT in deterministic mode).
"""
import argparse

import torch

import flash_mha
from flash_mha.bench import Timer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="128:0:1k,128:0:4k,128:1:4k,64:0:4k,64:1:4k")
    ap.add_argument("--case", default="plain,bias_1hqk")
    ap.add_argument("--path", default="auto", help="auto, sm90, sm80 or simt")
    args = ap.parse_args()
    timer = Timer(torch.device("cuda"), warmup_ms=50, rep_ms=200)
    print("case point | default ms | deterministic ms | ratio | bitwise repeatable")
    for case in args.case.split(","):
        for spec in args.points.split(","):
            d, causal, n = spec.split(":")
            d, causal = int(d), bool(int(causal))
            n = int(n[:-1]) * 1024 if n.endswith("k") else int(n)
            b, h = 16384 // n, 2048 // d
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
            bias, wrt = None, [q, k, v]
            if case != "plain":
                full = {"b": b, "h": h, "q": n, "k": n}
                bias = torch.randn(*(full[c] if c in full else 1 for c in case[5:]), device="cuda",
                                   dtype=torch.bfloat16, requires_grad=True)
                wrt.append(bias)

            def step():
                out = flash_mha.attention(q, k, v, bias=bias, causal="top_left" if causal else None)
                return torch.autograd.grad(out, wrt, dout)

            ms = {}
            for det in (False, True):
                torch.use_deterministic_algorithms(det)
                try:
                    with flash_mha.force_kernel(args.path):
                        ms[det] = timer(step)
                        if det:
                            g1, g2 = step(), step()
                            same = all(torch.equal(a, b_) for a, b_ in zip(g1, g2))
                finally:
                    torch.use_deterministic_algorithms(False)
            print(f"{args.path} {case} d{d} causal{int(causal)} n{n} | {ms[False]:.3f} | {ms[True]:.3f} | "
                  f"{ms[True] / ms[False]:.2f} | {same}", flush=True)


if __name__ == "__main__":
    main()
