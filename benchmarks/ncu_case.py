"""One bf16 forward + backward through flash_mha for `ncu` (b4 h16 n2048 d128 by default).

    ncu --clock-control none -k regex:sm80 -c 2 python benchmarks/ncu_case.py [d] [causal] [bias]

bias: none (default), full ([b, h, n, n]) or heads ([1, h, n, n]), with gradient.
"""
import sys

import torch

import flash_mha

d = int(sys.argv[1]) if len(sys.argv) > 1 else 128
causal = "top_left" if len(sys.argv) > 2 and sys.argv[2] == "1" else None
bias_kind = sys.argv[3] if len(sys.argv) > 3 else "none"
q, k, v = (torch.randn(4, 16, 2048, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
bias = None
if bias_kind != "none":
    bias = torch.randn(4 if bias_kind == "full" else 1, 16, 2048, 2048, device="cuda", dtype=torch.bfloat16,
                       requires_grad=True)
out = flash_mha.attention(q, k, v, bias=bias, causal=causal)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("done", out.shape)
