"""float32 accuracy on the GPU: flash_mha (default path) and torch SDPA's float32 backends against
the float64 reference, forward and backward, on long reductions (GQA, thousands of keys / queries).

    python benchmarks/f32_accuracy.py
Prints the norm-wise relative error of out, dq, dk, dv per implementation and shape.
"""
import torch
import torch.nn.functional as F

import flash_mha
from flash_mha import reference


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def run(name, fn, q, k, v, g):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    try:
        out = fn(*leaves)
    except RuntimeError as e:
        return f"{name}: refuses ({str(e).splitlines()[0][:60]})"
    grads = torch.autograd.grad(out, leaves, g)
    return out, grads


def main():
    torch.manual_seed(0)
    shapes = [(1, 8, 2, 1000, 777, 64), (1, 8, 2, 4096, 4096, 128), (2, 4, 4, 8192, 8192, 64)]
    for b, h, h_kv, n_q, n_k, d in shapes:
        q = torch.randn(b, h, n_q, d, device="cuda")
        k = torch.randn(b, h_kv, n_k, d, device="cuda")
        v = torch.randn(b, h_kv, n_k, d, device="cuda")
        g = torch.randn(b, h, n_q, d, device="cuda")
        q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
        ref = reference.attention(q64, k64, v64)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        rep = h // h_kv

        def sdpa(backend):
            def fn(q_, k_, v_):
                with torch.nn.attention.sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q_, k_.repeat_interleave(rep, 1), v_.repeat_interleave(rep, 1))
            return fn

        impls = {"flash_mha": flash_mha.attention, "sdpa_efficient": sdpa(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION),
                 "sdpa_math": sdpa(torch.nn.attention.SDPBackend.MATH)}
        print(f"b{b} h{h}/{h_kv} n{n_q}x{n_k} d{d}: rel. error out dq dk dv")
        for name, fn in impls.items():
            r = run(name, fn, q, k, v, g)
            if isinstance(r, str):
                print("  " + r)
                continue
            out, grads = r
            errs = [rel(out, ref)] + [rel(a, rr) for a, rr in zip(grads, ref_grads)]
            print(f"  {name:15s} " + " ".join(f"{e:.2e}" for e in errs))
        del ref, ref_grads, q64, k64, v64
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
