"""One bf16 forward + backward through flash_mha for `ncu` (b4 h16 n2048 d128 by default).

    ncu --clock-control none -k regex:sm80 -c 2 python benchmarks/ncu_case.py [d] [causal] [bias] [impl]

bias: none (default), full ([b, h, n, n]) or heads ([1, h, n, n]), with gradient.
impl: flash_mha (default) or cudnn (torch SDPA's cuDNN backend, no bias: the peer's kernels).
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
if len(sys.argv) > 4 and sys.argv[4] == "cudnn":
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal is not None)
else:
    out = flash_mha.attention(q, k, v, bias=bias, causal=causal)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("done", out.shape)
