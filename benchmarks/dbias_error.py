"""dbias error of large broadcast sums, per kernel path, against the float64 reference.

A bias broadcast over the batch / heads / queries gets a gradient summed over those dims: up to
b h n_q terms per element. This prints, per case, the norm-wise relative error of dbias against the
reference's reduced dbias (not against the unreduced dS, as the tests' floor allows), next to the
error of rounding the exact dbias to the dtype once (what no kernel can beat).

    python3 benchmarks/dbias_error.py                   # paths sm80 and auto
    python3 benchmarks/dbias_error.py --paths sm80 --seed 3
"""
import argparse

import torch

import flash_mha
from flash_mha import reference

CASES = [  # (b, h, n_q, n_k, d, bias shape letters)
    (8, 8, 1024, 512, 64, "11qk"),
    (8, 8, 1024, 512, 64, "111k"),
    (16, 4, 512, 512, 64, "1hqk"),
    (8, 8, 1024, 512, 128, "11qk"),
    (4, 8, 2048, 256, 128, "111k"),
]


def rel(a, b):
    return (torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", default="sm80,auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    for dtype in (torch.bfloat16, torch.float16):
        for b, h, n_q, n_k, d, dims in CASES:
            full = {"b": b, "h": h, "q": n_q, "k": n_k}
            shape = tuple(full[c] if c in full else 1 for c in dims)
            q = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype)
            k = torch.randn(b, h, n_k, d, device="cuda", dtype=dtype)
            v = torch.randn(b, h, n_k, d, device="cuda", dtype=dtype)
            bias = torch.randn(shape, device="cuda", dtype=dtype)
            dout = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype)
            b64 = bias.double().requires_grad_(True)
            ref = reference.attention(q.double(), k.double(), v.double(), bias=b64.expand(b, h, n_q, n_k))
            (ref_db,) = torch.autograd.grad(ref, b64, dout.double())
            line = [f"{str(dtype)[6:]:8s} b{b} h{h} q{n_q} k{n_k} d{d} bias {dims}:",
                    f"rounding {rel(ref_db.to(dtype), ref_db):.2e}"]
            for path in args.paths.split(","):
                bl = bias.clone().requires_grad_(True)
                with flash_mha.force_kernel(path):
                    out = flash_mha.attention(q, k, v, bias=bl)
                    (db,) = torch.autograd.grad(out, bl, dout)
                line.append(f"{path} {rel(db, ref_db):.2e}")
            print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
