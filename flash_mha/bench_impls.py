"""The implementations flash_mha.bench compares: flash_mha (default dispatch and forced kernel
paths), torch SDPA with each backend forced, FlexAttention, a naive baseline, and the module-level
comparison (FlashMHA / flash_mha.MultiheadAttention / nn.MultiheadAttention).

Each Impl prepares a forward closure on the bench's Inputs (q, k, v, bias, mask, scale, causal,
dropout_p, point) or raises, which the bench records as a refusal. Adding one is one line in IMPLS,
e.g. FlashMhaImpl("flash_mha_sm90", kernel="sm90", devices=("cuda",)).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Impl:
    name: str
    ours: bool = False
    materializes: bool = False  # builds the (n_q, n_k) matrix: skipped above --max-scores
    devices: tuple = ("cpu", "cuda")
    group: str = "attention"    # ratios compare impls of one group

    def context(self):
        return contextlib.nullcontext()

    def prepare(self, x) -> Callable[[], torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class FlashMhaImpl(Impl):
    ours: bool = True
    kernel: Optional[str] = None  # forced kernel path ("sm80", "sm90"); None = default dispatch

    def context(self):
        if self.kernel is None:
            return contextlib.nullcontext()
        import flash_mha
        force = getattr(flash_mha, "force_kernel", None)
        if force is None:
            raise RuntimeError(f"flash_mha has no force_kernel() to select kernel path {self.kernel!r}")
        return force(self.kernel)

    def prepare(self, x):
        import flash_mha
        causal = "bottom_right" if x.causal else None
        return lambda: flash_mha.attention(x.q, x.k, x.v, bias=x.bias, mask=x.mask, scale=x.scale,
                                           causal=causal, dropout_p=x.dropout_p)


@dataclass(frozen=True)
class SdpaImpl(Impl):
    backend: Optional[str] = None  # SDPBackend member name; None = torch's own choice

    def context(self):
        if self.backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([getattr(SDPBackend, self.backend)])

    def prepare(self, x):
        attn_mask = x.bias if x.bias is not None else x.mask
        is_causal = x.causal
        if x.causal and x.causal_shift:  # is_causal is top-left; this object is SDPA's bottom-right causal
            from torch.nn.attention.bias import causal_lower_right
            attn_mask, is_causal = causal_lower_right(x.q.shape[2], x.k.shape[2]), False
        gqa = {"enable_gqa": True} if x.q.shape[1] != x.k.shape[1] else {}
        if x.bias is not None and x.mask is not None:  # one attn_mask: the mask folded into the bias in the step
            return lambda: F.scaled_dot_product_attention(
                x.q, x.k, x.v, attn_mask=x.bias.masked_fill(~x.mask, float("-inf")), dropout_p=x.dropout_p,
                is_causal=is_causal, scale=x.scale, **gqa)
        return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=attn_mask, dropout_p=x.dropout_p,
                                                      is_causal=is_causal, scale=x.scale, **gqa)


_FLEX = None


def _compiled_flex():
    """torch.compile(flex_attention), static shapes, with dynamo's recompile limits raised so that no
    shape ever falls back to the unfused eager path (hitting the limit raises instead)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 4096))
        for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
            if hasattr(cfg, name):
                setattr(cfg, name, True)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


@dataclass(frozen=True)
class FlexImpl(Impl):
    def prepare(self, x):
        from torch.nn.attention.flex_attention import and_masks, create_block_mask
        if x.dropout_p > 0:
            raise NotImplementedError("flex_attention has no dropout")
        p = x.point
        score_mod = None
        if x.bias is not None:
            bias = x.bias if x.q.device.type != "cpu" else x.bias.detach()
            if bias.shape[0] == 1:
                score_mod = lambda s, b, h, i, j: s + bias[0, h, i, j]  # noqa: E731
            else:
                score_mod = lambda s, b, h, i, j: s + bias[b, h, i, j]  # noqa: E731
        mods = []
        if x.causal:
            shift = x.causal_shift
            mods.append(lambda b, h, i, j: j <= i + shift)
        if x.mask is not None:
            keep = x.mask[:, 0, 0, :]  # [b, n_k]
            mods.append(lambda b, h, i, j: keep[b, j])
        block_mask = None
        if mods:  # built once per shape, outside the timed region (its intended use)
            block_mask = create_block_mask(and_masks(*mods), p.batch if x.mask is not None else None, None,
                                           p.seqlen_q, p.seqlen_k, device=x.q.device)
        fn, gqa = _compiled_flex(), p.heads != p.heads_kv
        if x.q.device.type == "cpu":  # forward only there: it raises on inputs that require grad
            q, k, v = x.q.detach(), x.k.detach(), x.v.detach()
            fwd = lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=x.scale, enable_gqa=gqa)  # noqa: E731
            fwd.no_backward = "FlexAttention has no backward on CPU"
            return fwd
        return lambda: fn(x.q, x.k, x.v, score_mod=score_mod, block_mask=block_mask, scale=x.scale, enable_gqa=gqa)


@dataclass(frozen=True)
class NaiveImpl(Impl):
    """softmax(q k^T * scale + bias) @ v in plain torch ops (softmax in float32)."""
    materializes: bool = True

    def prepare(self, x):
        grp = x.q.shape[1] // x.k.shape[1]
        n_q, n_k = x.q.shape[2], x.k.shape[2]

        def fwd():
            k, v = (x.k, x.v) if grp == 1 else (x.k.repeat_interleave(grp, 1), x.v.repeat_interleave(grp, 1))
            s = (x.q @ k.transpose(-1, -2)) * x.scale
            if x.bias is not None:
                s = s + x.bias
            if x.mask is not None:
                s = s.masked_fill(~x.mask, float("-inf"))
            if x.causal:
                hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).triu(1 + x.causal_shift)
                s = s.masked_fill(hidden, float("-inf"))
            a = torch.softmax(s.float(), dim=-1).to(x.q.dtype)
            if x.dropout_p > 0:
                a = F.dropout(a, x.dropout_p)
            return a @ v
        return fwd


IMPLS = [
    FlashMhaImpl("flash_mha"),
    FlashMhaImpl("flash_mha_sm80", kernel="sm80", devices=("cuda",)),
    SdpaImpl("sdpa"),
    SdpaImpl("sdpa_flash", backend="FLASH_ATTENTION"),
    SdpaImpl("sdpa_cudnn", backend="CUDNN_ATTENTION", devices=("cuda",)),
    SdpaImpl("sdpa_efficient", backend="EFFICIENT_ATTENTION"),
    SdpaImpl("sdpa_math", backend="MATH", materializes=True),
    FlexImpl("flex"),
    NaiveImpl("naive"),
]


# Module level: a training step of one attention layer, projections included; x [b, n, E].
@dataclass(frozen=True)
class ModuleImpl(Impl):
    cls: str = "nn"               # "nn" (torch.nn.MultiheadAttention), "FlashMHA", "MultiheadAttention"
    need_weights: Optional[bool] = None

    def prepare(self, x):
        import flash_mha
        E, H = x.point.embed_dim, x.point.heads
        owner = torch.nn if self.cls == "nn" else flash_mha
        mod = getattr(owner, self.cls if self.cls != "nn" else "MultiheadAttention")
        m = mod(E, H, batch_first=True, device=x.q.device, dtype=x.q.dtype)
        m.load_state_dict(x.state_dict, strict=True)
        m.train()
        if self.need_weights is None:
            fwd = lambda: m(x.q, x.q, x.q)  # noqa: E731
        else:
            fwd = lambda: m(x.q, x.q, x.q, need_weights=self.need_weights)[0]  # noqa: E731
        fwd.params = list(m.parameters())
        return fwd


MODULE_IMPLS = [
    ModuleImpl("FlashMHA", ours=True, cls="FlashMHA", group="no_weights"),
    ModuleImpl("flash_mha.MHA", ours=True, cls="MultiheadAttention", need_weights=False, group="no_weights"),
    ModuleImpl("nn.MHA", cls="nn", need_weights=False, group="no_weights"),
    ModuleImpl("flash_mha.MHA+weights", ours=True, cls="MultiheadAttention", need_weights=True, group="weights"),
    ModuleImpl("nn.MHA+weights", cls="nn", need_weights=True, group="weights"),
]
