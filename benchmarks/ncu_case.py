"""One bf16 forward + backward through flash_mha for `ncu` (b4 h16 n2048 d128 by default).

    ncu --clock-control none -k regex:sm80 -c 2 python benchmarks/ncu_case.py [d] [causal] [bias] [impl] [n] [fwd]

bias: none (default), full ([b, h, n, n]) or heads ([1, h, n, n]), with gradient.
impl: flash_mha (default), sm80 (flash_mha with the portable path forced), cudnn or flash (torch
SDPA's cuDNN or FLASH (FlashAttention-2) backend, no bias: the peers' kernels).
n: sequence length (default 2048; batch 8192 / n, at least 1, as the standard grid's b n = 16384
at 16 heads halved). fwd: the forward only.
"""
import sys

import torch

import flash_mha

d = int(sys.argv[1]) if len(sys.argv) > 1 else 128
causal = "top_left" if len(sys.argv) > 2 and sys.argv[2] == "1" else None
bias_kind = sys.argv[3] if len(sys.argv) > 3 else "none"
n = int(sys.argv[5]) if len(sys.argv) > 5 else 2048
b = max(8192 // n, 1)
fwd_only = len(sys.argv) > 6 and sys.argv[6] == "fwd"
q, k, v = (torch.randn(b, 16, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
bias = None
if bias_kind != "none":
    bias = torch.randn(b if bias_kind == "full" else 1, 16, n, n, device="cuda", dtype=torch.bfloat16,
                       requires_grad=True)
impl = sys.argv[4] if len(sys.argv) > 4 else "flash_mha"
if impl in ("cudnn", "flash"):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if impl == "cudnn" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal is not None)
    if not fwd_only:
        out.backward(torch.randn_like(out))
else:
    with flash_mha.force_kernel("sm80" if impl == "sm80" else "auto"):  # the backward too
        out = flash_mha.attention(q, k, v, bias=bias, causal=causal)
        if not fwd_only:
            out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("done", out.shape)
