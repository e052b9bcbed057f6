"""flash_mha: fused multi-head attention for PyTorch (CPU and CUDA kernels as torch custom ops).

    import flash_mha
    out = flash_mha.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)
    mha = flash_mha.MultiheadAttention(embed_dim, num_heads, batch_first=True)  # nn.MultiheadAttention drop-in
"""
import contextlib

import torch

from . import reference
from .ops import attention, attention_fwd, scaled_dot_product_attention
from .modules import FlashAttention, FlashMHA, MultiheadAttention

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """True when the CUDA kernels were compiled into this build."""
    return bool(torch.ops.flash_mha.built_with_cuda())


_KERNEL_PATHS = {"auto": 0, "simt": 1, "sm80": 2, "sm90": 3}


@contextlib.contextmanager
def force_kernel(path: str):
    """Runs the CUDA calls inside the block on one kernel family: "auto" (default dispatch),
    "simt", "sm80" or "sm90". A forced family that does not take a call (dtype, head dim,
    architecture) falls back to the next one down (sm90 -> sm80 -> simt). For benchmarks and tests;
    process-wide, not thread-safe."""
    if path not in _KERNEL_PATHS:
        raise ValueError(f"flash_mha: kernel path must be one of {sorted(_KERNEL_PATHS)}, got {path!r}")
    if path != "auto" and not built_with_cuda():
        raise RuntimeError("flash_mha: this build has no CUDA kernels, so no CUDA kernel path can be forced")
    prev = torch.ops.flash_mha.set_cuda_path(_KERNEL_PATHS[path])
    try:
        yield
    finally:
        torch.ops.flash_mha.set_cuda_path(prev)


__all__ = [
    "attention",
    "attention_fwd",
    "scaled_dot_product_attention",
    "FlashAttention",
    "FlashMHA",
    "MultiheadAttention",
    "reference",
    "built_with_cuda",
    "force_kernel",
]
