"""The plain math definition of flash_mha's attention, in float64.

Every test and benchmark compares against these functions. They materialise the full
(n_q, n_k) score matrix and are meant for small sizes only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

CAUSAL_MODES = {None: 0, "none": 0, "top_left": 1, "bottom_right": 2}

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a and a uint32-valued int64 tensor b."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_part, hi_part = a * b_lo, a * b_hi  # each < 2^48: no int64 overflow
    mid = lo_part + ((hi_part & 0xFFFF) << 16)
    return ((hi_part >> 16) + (mid >> 32)) & _U32, mid & _U32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 7):
    """Philox-4x32 (7 rounds) on int64 tensors holding uint32 values (matches csrc/philox.h)."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi1, lo1 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """16-bit threshold: a column is kept iff its 16 bits >= floor(p * 2^16) (csrc/philox.h)."""
    return int(p * 65536.0)


def dropout_keep_mask(rng_state: torch.Tensor, b: int, h: int, n_q: int, n_k: int, p: float) -> torch.Tensor:
    """Boolean [b, h, n_q, n_k]: True where flash_mha's dropout keeps the probability.

    csrc/philox.h: one Philox call per 8 elements of a [16, 16] block (rows i, i + 8, columns
    2 m, 2 m + 1, 2 m + 8, 2 m + 9); element (i, j) takes the 16-bit half j % 2 of word
    2 ((i / 8) % 2) + (j / 8) % 2."""
    seed, offset = (int(x) for x in rng_state.to("cpu", torch.int64).tolist())
    seed &= (1 << 64) - 1
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    bh = torch.arange(b * h, dtype=torch.int64).view(b * h, 1, 1)
    i = torch.arange(n_q, dtype=torch.int64).view(1, n_q, 1)
    j = torch.arange(n_k, dtype=torch.int64).view(1, 1, n_k)
    shape = (b * h, n_q, n_k)
    c0 = (((j >> 4) << 2) | ((j >> 1) & 3)).expand(shape)
    c1 = (((i >> 4) << 3) | (i & 7)).expand(shape)
    c2 = (bh & _U32).expand(shape)
    c3 = torch.full(shape, offset & _U32, dtype=torch.int64)
    words = torch.stack(philox4x32(c0, c1, c2, c3, k0, k1), dim=-1)  # [bh, n_q, n_k, 4]
    index = (2 * ((i >> 3) & 1) + ((j >> 3) & 1)).expand(shape)
    word = words.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    half = (word >> (16 * (j & 1))) & 0xFFFF
    return (half >= dropout_threshold(p)).view(b, h, n_q, n_k)


def causal_allowed(n_q: int, n_k: int, causal, device=None) -> Optional[torch.Tensor]:
    """Boolean [n_q, n_k] of visible keys for a causal mode, or None when not causal."""
    mode = CAUSAL_MODES[causal] if not isinstance(causal, int) else causal
    if mode == 0:
        return None
    i = torch.arange(n_q, device=device).view(n_q, 1)
    j = torch.arange(n_k, device=device).view(1, n_k)
    shift = 0 if mode == 1 else n_k - n_q
    return j <= i + shift


def attention(q, k, v, bias=None, mask=None, scale=None, causal=None, dropout_p: float = 0.0,
              rng_state=None, return_lse: bool = False):
    """softmax(q k^T * scale + bias, masked) @ v in float64.

    q [b, h, n_q, d], k [b, h_kv, n_k, d], v [b, h_kv, n_k, d_v] with h % h_kv == 0;
    bias (float) and mask (bool, True = attend) broadcastable to [b, h, n_q, n_k];
    causal in {None, "top_left", "bottom_right"}. A row that sees no key gives zeros
    (and log-sum-exp +inf). Dropout uses flash_mha's counter-based mask for rng_state.
    Differentiable in q, k, v and bias.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    group = h // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    allowed = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if mask is not None:
        allowed = allowed & mask.to(s.device, torch.bool)
    c = causal_allowed(n_q, n_k, causal, s.device)
    if c is not None:
        allowed = allowed & c
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach() if n_k > 0 else s.new_full((b, h, n_q, 1), float("-inf"))
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m_safe)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(rng_state, b, h, n_q, n_k, dropout_p).to(s.device)
        p = p * keep / (1.0 - dropout_p)
    out = p @ v
    if return_lse:
        lse = (torch.log(denom) + m_safe).squeeze(-1)
        lse = torch.where(denom.squeeze(-1) == 0, torch.full_like(lse, float("inf")), lse)
        return out, lse
    return out
