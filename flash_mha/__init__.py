"""flash_mha: fused multi-head attention for PyTorch (CPU and CUDA kernels as torch custom ops).

    import flash_mha
    out = flash_mha.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)
    mha = flash_mha.MultiheadAttention(embed_dim, num_heads, batch_first=True)  # nn.MultiheadAttention drop-in
"""
import torch

from . import reference
from .ops import attention, attention_fwd, scaled_dot_product_attention
from .modules import FlashAttention, FlashMHA, MultiheadAttention

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """True when the CUDA kernels were compiled into this build."""
    return bool(torch.ops.flash_mha.built_with_cuda())


__all__ = [
    "attention",
    "attention_fwd",
    "scaled_dot_product_attention",
    "FlashAttention",
    "FlashMHA",
    "MultiheadAttention",
    "reference",
    "built_with_cuda",
]
