"""nn.Module front ends: FlashAttention, FlashMHA and a drop-in nn.MultiheadAttention.

The modules only project, reshape and translate mask conventions; the attention itself is
always `flash_mha.attention` (the fused kernels). Two exceptions, both plain torch:
`FlashAttention(flash=False)` runs the plain math definition, as the original README
documents, and `MultiheadAttention(need_weights=True)` recomputes the returned weights in a
separate softmax pass (the output still comes from the kernel).

Mask conventions (see the README's table):
- `FlashAttention`: `mask` is boolean, True = attend; `attn_bias` is added to the scores.
- `FlashMHA` and `MultiheadAttention`: nn.MultiheadAttention's conventions, boolean True =
  NOT allowed, float = added to the scores. They are translated, never materialised as an
  additive -inf matrix: a boolean mask becomes the kernel's `mask`, a float mask its `bias`.

One deliberate difference from torch: a query row that can attend to no key returns zeros
(torch returns NaN), as everywhere in flash_mha.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .ops import attention

__all__ = ["FlashAttention", "FlashMHA", "MultiheadAttention"]


# ---------------------------------------------------------------------------------------------
# FlashAttention: attention over already split heads.
# ---------------------------------------------------------------------------------------------
class FlashAttention(nn.Module):
    """Scaled dot-product attention over per-head tensors.

    Args:
        causal: mask keys "in the future" of each query. Bottom-right aligned when
            n_q != n_k (query i sees keys j <= i + n_k - n_q), as in FlashAttention 2.1+ and
            key-value caches.
        dropout: dropout probability on the attention weights, applied in training mode only.
        flash: True runs flash_mha's fused kernels; False (the README's default) runs the
            plain math definition in the input dtype (materialises the n_q x n_k scores).

    Inputs:
        q (b, h, n_q, d), k (b, h_kv, n_k, d), v (b, h_kv, n_k, d_v) with h % h_kv == 0.
        mask: optional boolean tensor, True = attend, broadcastable to (b, h, n_q, n_k).
        attn_bias: optional additive float tensor broadcastable to (b, h, n_q, n_k); it may be
            combined with `mask`.

    Output:
        (b, h, n_q, d_v). The original README says "(batch_size, query_length, embed_dim)",
        which contradicts its own per-head inputs: heads are kept, merge them with
        `out.transpose(1, 2).flatten(2)`.
    """

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = False) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FlashAttention: dropout must be in [0, 1), got {dropout}")
        self.causal = causal
        self.dropout = dropout
        self.flash = flash

    def extra_repr(self) -> str:
        return f"causal={self.causal}, dropout={self.dropout}, flash={self.flash}"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None) -> Tensor:
        _check_heads_layout(q, k, v)
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"FlashAttention: mask must be a bool tensor (True = attend), got "
                            f"{mask.dtype}; pass an additive mask as attn_bias")
        if attn_bias is not None:
            if not torch.is_floating_point(attn_bias):
                raise TypeError(f"FlashAttention: attn_bias must be a floating point tensor, "
                                f"got {attn_bias.dtype}")
            attn_bias = attn_bias.to(q.dtype)
        causal = "bottom_right" if self.causal else None
        dropout_p = self.dropout if self.training else 0.0
        if self.flash:
            return attention(q, k, v, bias=attn_bias, mask=mask, causal=causal, dropout_p=dropout_p)
        return _math_attention(q, k, v, attn_bias, mask, causal, dropout_p)


def _check_heads_layout(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"FlashAttention: {name} must be a 4-d tensor (batch, heads, length, "
                             f"head_dim), got {shape}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"FlashAttention: q, k, v must have the same batch size, got "
                         f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"FlashAttention: k and v must have the same heads and length, got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"FlashAttention: q's heads ({q.shape[1]}) must be a multiple of k's "
                         f"heads ({k.shape[1]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"FlashAttention: q and k must have the same head_dim, got "
                         f"{q.shape[3]} and {k.shape[3]}")


def _math_attention(q, k, v, bias, mask, causal, dropout_p):
    """softmax(q k^T / sqrt(d) + bias, masked) @ v in the input dtype: FlashAttention(flash=False).

    Same definition as flash_mha.reference (a row that sees no key gives zeros), with torch's
    own dropout.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    n_q, n_k = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[3]) if q.shape[3] else 1.0)
    if bias is not None:
        s = s + bias
    allowed = mask
    if causal is not None:
        i = torch.arange(n_q, device=q.device).view(n_q, 1)
        j = torch.arange(n_k, device=q.device).view(1, n_k)
        visible = j <= i + (n_k - n_q)
        allowed = visible if allowed is None else allowed & visible
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if n_k == 0:
        return s.new_zeros(s.shape[:-1] + (v.shape[-1],))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    return p @ v


# ---------------------------------------------------------------------------------------------
# Shared multi-head attention: projections, mask translation, kernel call, output projection.
# Works on any module with nn.MultiheadAttention's attributes (embed_dim, num_heads, in_proj_*,
# q/k/v_proj_weight, bias_k, bias_v, add_zero_attn, dropout, out_proj, training).
# ---------------------------------------------------------------------------------------------
def _check_embed_heads(who: str, embed_dim: int, num_heads: int) -> None:
    if embed_dim <= 0 or num_heads <= 0:
        raise ValueError(f"{who}: embed_dim and num_heads must be > 0, got embed_dim={embed_dim} "
                         f"and num_heads={num_heads}")
    if embed_dim % num_heads != 0:
        raise ValueError(f"{who}: embed_dim ({embed_dim}) must be divisible by num_heads "
                         f"({num_heads})")


def _split_mask(mask: Optional[Tensor], name: str, who: str, dtype: torch.dtype):
    """nn.MultiheadAttention mask (bool True = not allowed, or float added) -> (allowed, bias)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return ~mask, None
    if torch.is_floating_point(mask):
        return None, mask.to(dtype)
    raise TypeError(f"{who}: {name} must be a bool or floating point tensor, got {mask.dtype}")


def _and(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a & b


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(b, n, E) -> (b, n, h, E/h), a view."""
    return x.unflatten(-1, (num_heads, x.shape[-1] // num_heads))


def _project(m, query: Tensor, key: Tensor, value: Tensor, self_attn: bool, kv_same: bool):
    """In-projections of batch-first (b, n, E*) inputs -> q, k, v as (b, n, h, head_dim) views.

    Self-attention runs one fused (3E) projection and cross-attention with key is value one
    (2E) projection; q, k, v are then strided views of that output (no copy).
    """
    E, h = m.embed_dim, m.num_heads
    w, b = m.in_proj_weight, m.in_proj_bias
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    if w is None:
        return (_heads(F.linear(query, m.q_proj_weight, b_q), h),
                _heads(F.linear(key, m.k_proj_weight, b_k), h),
                _heads(F.linear(value, m.v_proj_weight, b_v), h))
    if self_attn:
        q, k, v = F.linear(query, w, b).unflatten(-1, (3, h, E // h)).unbind(2)
        return q, k, v
    w_q, w_k, w_v = w.chunk(3)
    q = _heads(F.linear(query, w_q, b_q), h)
    if kv_same:
        k, v = F.linear(key, w[E:], None if b is None else b[E:]).unflatten(
            -1, (2, h, E // h)).unbind(2)
        return q, k, v
    return q, _heads(F.linear(key, w_k, b_k), h), _heads(F.linear(value, w_v, b_v), h)


def _attention_weights(q, k, scale, allowed, bias, causal, average):
    """softmax(q k^T * scale + bias, masked) in plain torch, for need_weights=True.

    Two (b, h, n_q, n_k) buffers at peak (scores, updated in place, and softmax), as torch's.
    """
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        s.add_(bias)
    if causal is not None:
        n_q, n_k = s.shape[-2:]
        i = torch.arange(n_q, device=s.device).view(n_q, 1)
        j = torch.arange(n_k, device=s.device).view(1, n_k)
        visible = j <= i + (0 if causal == "top_left" else n_k - n_q)
        allowed = _and(allowed, visible)
    if allowed is not None:
        s.masked_fill_(~allowed, float("-inf"))
    w = torch.softmax(s, dim=-1)
    return w.mean(dim=1) if average else w


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _multi_head_forward(m, who: str, query: Tensor, key: Tensor, value: Tensor,
                        key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], *,
                        need_weights: bool, average_attn_weights: bool,
                        causal: Optional[str]):
    """nn.MultiheadAttention's computation with flash_mha's kernel; returns (out, weights)."""
    self_attn = query is key and key is value
    kv_same = key is value
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
    if query.dim() not in (2, 3):
        raise ValueError(f"{who}: query must be 3-d (batched) or 2-d (unbatched), got shape "
                         f"{tuple(query.shape)}")
    batched = query.dim() == 3
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{who}: for a {query.dim()}-d query, {name} must be "
                             f"{query.dim()}-d too, got shape {tuple(t.shape)}")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise ValueError(f"{who}: key_padding_mask must be {query.dim() - 1}-d for a "
                         f"{query.dim()}-d query, got shape {tuple(key_padding_mask.shape)}")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ValueError(f"{who}: attn_mask must be 2-d (L, S) or 3-d (N*num_heads, L, S), got "
                         f"shape {tuple(attn_mask.shape)}")

    # Everything below is batch-first (b, n, feature).
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    b, n_q, e_q = query.shape
    n_k = key.shape[1]
    E, h = m.embed_dim, m.num_heads
    for name, t, width in (("query", query, E), ("key", key, m.kdim), ("value", value, m.vdim)):
        if t.shape[-1] != width:
            raise ValueError(f"{who}: {name}'s feature size must be {width}, got shape "
                             f"{tuple(t.shape)}")
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(f"{who}: query, key and value must have the same batch size, got "
                         f"{b}, {key.shape[0]}, {value.shape[0]}")
    if value.shape[1] != n_k:
        raise ValueError(f"{who}: key and value must have the same sequence length, got "
                         f"{n_k} and {value.shape[1]}")

    # nn.MultiheadAttention's masks -> the kernel's boolean mask (True = attend) and bias.
    kpm_allowed, kpm_bias = _split_mask(key_padding_mask, "key_padding_mask", who, query.dtype)
    am_allowed, am_bias = _split_mask(attn_mask, "attn_mask", who, query.dtype)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (b, n_k):
            want = (b, n_k) if batched else (n_k,)
            raise ValueError(f"{who}: key_padding_mask must have shape {want}, got "
                             f"{tuple(key_padding_mask.shape[int(not batched):])}")
        kpm_allowed, kpm_bias = (None if t is None else t.view(b, 1, 1, n_k)
                                 for t in (kpm_allowed, kpm_bias))
    if attn_mask is not None:
        want = (n_q, n_k) if attn_mask.dim() == 2 else (b * h, n_q, n_k)
        if tuple(attn_mask.shape) != want:
            raise ValueError(f"{who}: attn_mask must have shape {want}, got "
                             f"{tuple(attn_mask.shape)}")
        view = (1, 1, n_q, n_k) if attn_mask.dim() == 2 else (b, h, n_q, n_k)
        am_allowed, am_bias = (None if t is None else t.view(view) for t in (am_allowed, am_bias))
    allowed, bias = _and(kpm_allowed, am_allowed), _add(kpm_bias, am_bias)

    q, k, v = _project(m, query, key, value, self_attn, kv_same)  # (b, n, h, head_dim)

    # Extra keys of add_bias_kv / add_zero_attn: every query may see them.
    extra = []
    if m.bias_k is not None:
        extra.append((m.bias_k.view(1, 1, h, -1).expand(b, 1, h, -1),
                      m.bias_v.view(1, 1, h, -1).expand(b, 1, h, -1)))
    if m.add_zero_attn:
        zeros = k.new_zeros(b, 1, h, k.shape[-1])
        extra.append((zeros, zeros))
    if extra:
        k = torch.cat([k] + [ek for ek, _ in extra], dim=1)
        v = torch.cat([v] + [ev for _, ev in extra], dim=1)
        pad = (0, len(extra))
        allowed = None if allowed is None else F.pad(allowed, pad, value=True)
        bias = None if bias is None else F.pad(bias, pad, value=0.0)

    q, k, v = (_last_dim_contiguous(t.transpose(1, 2)) for t in (q, k, v))  # (b, h, n, head_dim)
    dropout_p = m.dropout if m.training else 0.0
    out = attention(q, k, v, bias=bias, mask=allowed, causal=causal, dropout_p=dropout_p)
    out = F.linear(out.transpose(1, 2).reshape(b, n_q, E), m.out_proj.weight, m.out_proj.bias)

    weights = None
    if need_weights:
        weights = _attention_weights(q, k, 1.0 / math.sqrt(E // h), allowed, bias, causal,
                                     average_attn_weights)
        if not batched:
            weights = weights.squeeze(0)
    if not batched:
        out = out.squeeze(0)
    elif not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _init_like_torch_mha(m: nn.Module, embed_dim, num_heads, dropout, bias, add_bias_kv,
                         add_zero_attn, kdim, vdim, batch_first, device, dtype) -> None:
    """nn.MultiheadAttention.__init__'s attributes and parameters, created in the same order
    (so the same seed gives the same initial weights and the state-dict keys are identical)."""
    factory_kwargs = {"device": device, "dtype": dtype}
    m.embed_dim = embed_dim
    m.kdim = kdim if kdim is not None else embed_dim
    m.vdim = vdim if vdim is not None else embed_dim
    m._qkv_same_embed_dim = m.kdim == embed_dim and m.vdim == embed_dim
    m.num_heads = num_heads
    m.dropout = dropout
    m.batch_first = batch_first
    m.head_dim = embed_dim // num_heads
    if not m._qkv_same_embed_dim:
        m.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
        m.k_proj_weight = nn.Parameter(torch.empty((embed_dim, m.kdim), **factory_kwargs))
        m.v_proj_weight = nn.Parameter(torch.empty((embed_dim, m.vdim), **factory_kwargs))
        m.register_parameter("in_proj_weight", None)
    else:
        m.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
        m.register_parameter("q_proj_weight", None)
        m.register_parameter("k_proj_weight", None)
        m.register_parameter("v_proj_weight", None)
    if bias:
        m.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
    else:
        m.register_parameter("in_proj_bias", None)
    m.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
    if add_bias_kv:
        m.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        m.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
    else:
        m.bias_k = m.bias_v = None
    m.add_zero_attn = add_zero_attn
    # nn.MultiheadAttention._reset_parameters
    if m._qkv_same_embed_dim:
        xavier_uniform_(m.in_proj_weight)
    else:
        xavier_uniform_(m.q_proj_weight)
        xavier_uniform_(m.k_proj_weight)
        xavier_uniform_(m.v_proj_weight)
    if m.in_proj_bias is not None:
        constant_(m.in_proj_bias, 0.0)
        constant_(m.out_proj.bias, 0.0)
    if m.bias_k is not None:
        xavier_normal_(m.bias_k)
        xavier_normal_(m.bias_v)


# ---------------------------------------------------------------------------------------------
# FlashMHA: the original README's module.
# ---------------------------------------------------------------------------------------------
class FlashMHA(nn.Module):
    """Multi-head attention with input/output projections, on flash_mha's kernels.

    Parameters and state-dict keys are exactly nn.MultiheadAttention's for the same
    configuration (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
    ``out_proj.bias``; ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` instead of
    ``in_proj_weight`` when kdim or vdim differ from embed_dim), initialised the same way, so
    checkpoints load in both directions with ``strict=True``.

    Args:
        embed_dim: model width E; must be divisible by num_heads.
        num_heads: number of heads.
        bias: learn additive biases in the in/out projections.
        batch_first: inputs and output are (batch, seq, feature) if True, else (seq, batch,
            feature). Unbatched (seq, feature) inputs are accepted too.
        dropout: dropout on the attention weights, in training mode only.
        causal: query i sees keys j <= i + n_k - n_q (bottom-right aligned; top-left when
            n_q == n_k), combined with any masks.
        kdim, vdim: feature sizes of key and value (default embed_dim).

    forward(query, key, value, key_padding_mask=None, attn_mask=None) -> output of query's
    shape. Masks follow nn.MultiheadAttention: key_padding_mask (N, S), attn_mask (L, S) or
    (N * num_heads, L, S); boolean True = not allowed, float = added to the scores. Passing the
    same tensor as query, key and value (self-attention) runs one fused 3E projection.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = True,
                 dropout: float = 0.0, causal: bool = False, device=None, dtype=None, *,
                 kdim: Optional[int] = None, vdim: Optional[int] = None) -> None:
        _check_embed_heads("FlashMHA", embed_dim, num_heads)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FlashMHA: dropout must be in [0, 1), got {dropout}")
        super().__init__()
        _init_like_torch_mha(self, embed_dim, num_heads, dropout, bias, False, False, kdim, vdim,
                             batch_first, device, dtype)
        self.causal = causal

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}, causal={self.causal}")

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        out, _ = _multi_head_forward(
            self, "FlashMHA", query, key, value, key_padding_mask, attn_mask,
            need_weights=False, average_attn_weights=False,
            causal="bottom_right" if self.causal else None)
        return out


# ---------------------------------------------------------------------------------------------
# MultiheadAttention: drop-in for torch.nn.MultiheadAttention.
# ---------------------------------------------------------------------------------------------
def _keep_module_forward(module, args):
    """A no-op forward pre-hook; see MultiheadAttention.__init__."""
    return None


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with its attention computed by flash_mha's kernels.

    Same constructor, parameters, state dict and forward contract as torch's (including
    add_bias_kv, add_zero_attn, kdim/vdim, batch_first, unbatched inputs, is_causal and
    need_weights/average_attn_weights); use it anywhere torch's module is used, e.g. as
    ``self_attn``/``multihead_attn`` of nn.TransformerEncoderLayer / nn.TransformerDecoderLayer.

    Differences from torch:
    - need_weights=True returns weights from a separate plain softmax pass; in training mode
      with dropout > 0 they are the weights before dropout (torch returns the dropped ones,
      drawn from its own RNG).
    - A query row that sees no key gives zeros instead of NaN.
    - Errors are ValueError/TypeError naming the argument (torch raises AssertionError).
    - torch's fused inference kernels (the module's and nn.TransformerEncoderLayer's "fast
      path") are never taken: attention always runs in flash_mha.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None) -> None:
        _check_embed_heads("MultiheadAttention", embed_dim, num_heads)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias,
                         add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim,
                         vdim=vdim, batch_first=batch_first, device=device, dtype=dtype)
        # nn.TransformerEncoderLayer.forward runs torch's fused kernel
        # (torch._transformer_encoder_layer_fwd) instead of calling self_attn in inference mode
        # unless some submodule has a forward hook. This no-op hook keeps the layer on its
        # Python path, which calls our forward.
        self.register_forward_pre_hook(_keep_module_forward)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, attn_mask,
                                        need_weights, is_causal)
        causal = None
        if is_causal:
            # torch 2.13: is_causal is a hint that attn_mask is causal. Without a key padding
            # mask and weights, torch drops attn_mask and runs SDPA's top-left causal mode.
            if attn_mask is None:
                raise RuntimeError(
                    "Need attn_mask if specifying the is_causal hint. You may use the "
                    "Transformer module method `generate_square_subsequent_mask` to create "
                    "this mask.")
            if key_padding_mask is None and not need_weights:
                attn_mask, causal = None, "top_left"
        return _multi_head_forward(
            self, "MultiheadAttention", query, key, value, key_padding_mask, attn_mask,
            need_weights=need_weights, average_attn_weights=average_attn_weights, causal=causal)

    def _nested_forward(self, query, key, value, key_padding_mask, attn_mask, need_weights,
                        is_causal):
        """Self-attention on a nested (ragged) batch, as nn.TransformerEncoder passes it in
        inference mode with a src_key_padding_mask: pad, mask the padding, re-nest."""
        if not (query is key and key is value) or key_padding_mask is not None or need_weights:
            raise ValueError("MultiheadAttention: nested tensor inputs are supported only for "
                             "self-attention (query is key is value) without key_padding_mask "
                             "and with need_weights=False")
        if not self.batch_first:
            raise ValueError("MultiheadAttention: nested tensor inputs need batch_first=True")
        lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
        padded = query.to_padded_tensor(0.0)
        padding = torch.arange(padded.shape[1], device=query.device) >= lengths.unsqueeze(1)
        out, _ = self.forward(padded, padded, padded, key_padding_mask=padding,
                              need_weights=False, attn_mask=attn_mask, is_causal=is_causal)
        return torch._nested_tensor_from_mask(out, ~padding, mask_check=False), None
