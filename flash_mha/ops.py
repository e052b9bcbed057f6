"""Custom-op glue (fake kernels, autograd) and the functional API.

The C++ library (csrc/ops.cpp) defines torch.ops.flash_mha.fwd / .bwd for CPU and CUDA. Here:
fake (meta) kernels so torch.compile can trace them, autograd through the backward op, and the
two public functions `attention` (flash_mha's native layout) and `scaled_dot_product_attention`
(torch's signature). Nothing here computes attention: it validates, reshapes and calls the op.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (loads the library: runs the TORCH_LIBRARY registrations)

_CAUSAL = {None: 0, False: 0, "none": 0, True: 1, "top_left": 1, "bottom_right": 2}
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake kernels: output metadata only, for torch.compile / FakeTensor tracing.

@torch.library.register_fake("flash_mha::fwd")
def _fwd_fake(q, k, v, bias, mask, scale, causal, dropout_p, rng_state):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "flash_mha: q, k, v must be 4-d")
    b, h, n_q, _ = q.shape
    out = q.new_empty((b, h, n_q, v.shape[-1]))
    lse = q.new_empty((b, h, n_q), dtype=_lse_dtype(q.dtype))
    rng = rng_state.clone() if dropout_p > 0.0 else q.new_empty((0,), dtype=torch.int64)
    return out, lse, rng


@torch.library.register_fake("flash_mha::bwd")
def _bwd_fake(dout, q, k, v, out, lse, bias, mask, scale, causal, dropout_p, rng_state, bias_requires_grad):
    dbias = q.new_empty(bias.shape) if bias_requires_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


# ---------------------------------------------------------------------------------------------
# Autograd: fwd's is registered in C++ (csrc/ops.cpp, AttentionFunction: it saves q, k, v, out, lse
# and recomputes the probabilities in the bwd op). bwd itself has none: a double backward raises.

def _no_double_backward(ctx, *grads):
    raise RuntimeError("flash_mha: double backward (a gradient of the attention gradient, e.g. autograd.grad "
                       "with create_graph=True followed by another backward) is not supported; use "
                       "flash_mha.reference.attention for higher-order derivatives")


torch.library.register_autograd("flash_mha::bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# Functional API.

def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_mha: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"flash_mha: {name} must be float64, float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"flash_mha: {name} must be 4-d [batch, heads, seqlen, head_dim], got shape "
                             f"{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_mha: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_mha: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"flash_mha: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"flash_mha: k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"flash_mha: query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"flash_mha: key and value must have the same sequence length, got {k.shape[2]} "
                         f"and {v.shape[2]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"flash_mha: q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    for name, dim in (("head_dim", q.shape[3]), ("value head_dim", v.shape[3])):
        if not 1 <= dim <= 256:
            raise ValueError(f"flash_mha: {name} must be in [1, 256], got {dim}")


def _as_4d(t: torch.Tensor, name: str, full) -> torch.Tensor:
    """Right-aligns t to 4 dims and checks each dim is 1 or the full size of [b, h, n_q, n_k].

    A full-size dim of stride 0 (an expanded view) is kept as it is: the kernels read it without a
    copy, and its gradient is per element like any tensor's (autograd sums it into the expand's
    base). Pass the unexpanded size-1 tensor to get the reduced gradient directly.
    """
    if t.dim() > 4:
        raise ValueError(f"flash_mha: {name} must have at most 4 dims [b, h, n_q, n_k], got shape {tuple(t.shape)}")
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    for i, (s, f) in enumerate(zip(t.shape, full)):
        if s != 1 and s != f:
            raise ValueError(f"flash_mha: {name} of shape {tuple(t.shape)} is not broadcastable to "
                             f"[b, h, n_q, n_k] = {list(full)} (dim {i} must be 1 or {f})")
    return t


def _causal_code(causal) -> int:
    try:
        return _CAUSAL[causal]
    except (KeyError, TypeError):
        raise ValueError(f"flash_mha: causal must be None, 'top_left' or 'bottom_right', got {causal!r}") from None


def attention_fwd(q, k, v, bias=None, mask=None, scale: Optional[float] = None, causal=None,
                  dropout_p: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `attention`, but returns (out, lse, rng_state): the log-sum-exp per query row
    ([b, h, n_q], +inf for rows that see no key; not differentiable) and the dropout seed/offset
    actually used (int64 [2]; empty without dropout)."""
    _check_qkv(q, k, v)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_mha: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    code = _causal_code(causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not math.isfinite(scale):
        raise ValueError(f"flash_mha: scale must be finite, got {scale}")
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (q, k, v))
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"flash_mha: bias must be a floating-point tensor (added to the scores); got "
                            f"{getattr(bias, 'dtype', type(bias))}. Pass boolean masks as mask")
        if bias.device != q.device:
            raise ValueError(f"flash_mha: bias is on {bias.device} but q is on {q.device}")
        bias = _as_4d(bias.to(q.dtype), "bias", full)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"flash_mha: mask must be a bool tensor (True = attend), got "
                            f"{getattr(mask, 'dtype', type(mask))}; pass float masks as bias")
        if mask.device != q.device:
            raise ValueError(f"flash_mha: mask is on {mask.device} but q is on {q.device}")
        mask = _as_4d(mask, "mask", full)
    rng = None
    if dropout_p > 0.0:
        # Drawn from torch's generator for q's device: torch.manual_seed fixes it, and on CUDA the
        # draw is a kernel, so it is captured and replayed correctly by CUDA graphs.
        rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=q.device)
    return torch.ops.flash_mha.fwd(q, k, v, bias, mask, float(scale), code, float(dropout_p), rng)


def attention(q, k, v, *, bias=None, mask=None, scale: Optional[float] = None, causal=None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Fused attention, softmax(q k^T * scale + bias, masked) @ v, in flash_mha's layout.

    q [b, h, n_q, d], k [b, h_kv, n_k, d], v [b, h_kv, n_k, d_v] (h % h_kv == 0 for GQA/MQA; any
    strides with a contiguous last dim). bias: float, added to the scores; mask: bool, True =
    attend; both broadcastable to [b, h, n_q, n_k]. causal: None, "top_left" (key j visible to
    query i iff j <= i) or "bottom_right" (j <= i + n_k - n_q). scale defaults to 1/sqrt(d).
    Rows that see no key return zeros. Differentiable in q, k, v and bias. Returns [b, h, n_q, d_v].
    """
    return attention_fwd(q, k, v, bias, mask, scale, causal, dropout_p)[0]


def _sdpa_to_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() < 2:
        raise ValueError(f"flash_mha: {name} must have at least 2 dims (..., seqlen, head_dim), got {t.dim()}")
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape((-1,) + tuple(t.shape[-3:])) if t.dim() > 4 else t


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, computed by flash_mha.

    query (..., L, E), key (..., S, E), value (..., S, Ev); attn_mask bool (True = takes part) or
    float (added), broadcastable to (..., L, S); is_causal is top-left aligned, as in torch.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_mha: {name} must be a torch.Tensor")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"flash_mha: query, key and value must have the same number of dims, got "
                         f"{query.dim()}, {key.dim()}, {value.dim()}")
    if attn_mask is not None and is_causal:
        raise ValueError("flash_mha: pass either attn_mask or is_causal=True, not both (as in torch)")
    if query.dim() >= 4 and (query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]):
        raise ValueError(f"flash_mha: query, key and value must share their leading batch dims, got "
                         f"{tuple(query.shape[:-3])}, {tuple(key.shape[:-3])}, {tuple(value.shape[:-3])}")
    if query.dim() >= 3 and key.shape[-3] != query.shape[-3] and not enable_gqa:
        raise ValueError(f"flash_mha: query has {query.shape[-3]} heads and key {key.shape[-3]}: "
                         "set enable_gqa=True for grouped-query attention")
    q, k, v = _sdpa_to_4d(query, "query"), _sdpa_to_4d(key, "key"), _sdpa_to_4d(value, "value")
    bias = mask = None
    if attn_mask is not None:
        full = tuple(query.shape[:-2]) + (query.shape[-2], key.shape[-2])
        if attn_mask.dim() > len(full):
            raise ValueError(f"flash_mha: attn_mask of shape {tuple(attn_mask.shape)} has more dims than "
                             f"(..., L, S) = {full}")
        m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
        for i, (s, f) in enumerate(zip(m.shape, full)):
            if s != 1 and s != f:
                raise ValueError(f"flash_mha: attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable "
                                 f"to (..., L, S) = {full}")
        if m.dim() > 4:  # fold leading batch dims like the inputs
            lead = m.shape[:-3]
            m = m.reshape((1,) + tuple(m.shape[-3:])) if all(s == 1 for s in lead) else \
                m.expand(full[:-3] + tuple(m.shape[-3:])).reshape((-1,) + tuple(m.shape[-3:]))
        if m.dtype == torch.bool:
            mask = m
        else:
            bias = m
    out = attention(q, k, v, bias=bias, mask=mask, scale=scale, causal="top_left" if is_causal else None,
                    dropout_p=dropout_p)
    return out.reshape(tuple(query.shape[:-1]) + (value.shape[-1],))
