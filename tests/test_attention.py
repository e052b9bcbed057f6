"""flash_mha.attention (and its ops) against the float64 math definition in flash_mha/reference.py.

The grid covers dtypes, head dims (odd ones included), d_v != d, n_q != n_k, GQA/MQA, every
broadcast shape of mask and bias, both causal alignments, rows that see no key, strided inputs,
scale, empty tensors, dropout (exact mask, reproducibility, mean), gradcheck, opcheck,
torch.compile and the torch-SDPA mirror.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import flash_mha
from flash_mha import reference
from conftest import (ALL_DTYPES, DEVICES, GRAD_FLOOR, GRAD_TOL, TOL, as_double_leaf, assert_close, check_both,
                      deterministic_algorithms, fused_qkv, randn, run_both, strided_copy, to_4d)

CAUSALS = [None, "top_left", "bottom_right"]


def qkv(b, h, h_kv, n_q, n_k, d, d_v=None, dtype=torch.float32, device="cpu", requires_grad=True):
    d_v = d if d_v is None else d_v
    q = randn(b, h, n_q, d, dtype=dtype, device=device, requires_grad=requires_grad)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device=device, requires_grad=requires_grad)
    v = randn(b, h_kv, n_k, d_v, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, k, v


def random_mask(shape, device, p_keep=0.7):
    return (torch.rand(shape) < p_keep).to(device)


# ---------------------------------------------------------------------------------------------
# Shapes and dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 3, 33, 64, 80, 96, 160, 256])
def test_head_dims(device, dtype, d):
    q, k, v = qkv(2, 2, 2, 9, 13, d, dtype=dtype, device=device)
    res = run_both(q, k, v)
    assert res["out"].dtype == dtype and res["out"].device.type == device
    assert res["out"].shape == (2, 2, 9, d)
    check_both(res, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("d,d_v", [(16, 40), (64, 8), (1, 7), (33, 256), (256, 1)])
def test_value_head_dim_differs(device, dtype, d, d_v):
    q, k, v = qkv(2, 2, 1, 11, 6, d, d_v, dtype=dtype, device=device)
    res = run_both(q, k, v, causal="bottom_right")
    assert res["out"].shape == (2, 2, 11, d_v)
    check_both(res, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (1, 37), (37, 1), (5, 64), (64, 5), (63, 65),
                                     (65, 129), (130, 17)])
def test_lengths(device, dtype, n_q, n_k):
    q, k, v = qkv(1, 2, 2, n_q, n_k, 24, 20, dtype=dtype, device=device)
    check_both(run_both(q, k, v), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_q,n_k", [(7, 513), (130, 1100), (1, 1537), (260, 300)])
@pytest.mark.parametrize("causal", [None, "bottom_right", "top_left"])
def test_many_key_and_query_blocks(device, dtype, n_q, n_k, causal):
    """Lengths past the kernels' tiles (CPU: 128 x 512 forward, 64 x 128 backward; CUDA: smaller),
    with the running max rising in a late key block and rows whose first key block is all masked,
    so the online softmax rescales from -inf and from a finite max."""
    q, k, v = qkv(1, 2, 1, n_q, n_k, 16, 8, dtype=dtype, device=device)
    bias = torch.zeros(1, 1, n_q, n_k, dtype=torch.float64)
    bias[..., n_k - 5:] = 6.0                           # the largest scores come last
    bias = bias.to(device, dtype).requires_grad_()
    mask = torch.ones(n_q, n_k, dtype=torch.bool)
    mask[::3, : min(n_k - 1, 600)] = False             # every third row: a masked first block
    res = run_both(q, k, v, bias=bias, mask=mask.to(device), causal=causal)
    check_both(res, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("h,h_kv", [(4, 1), (4, 2), (6, 3), (3, 3), (8, 2)])
def test_gqa_mqa(device, dtype, h, h_kv):
    q, k, v = qkv(2, h, h_kv, 7, 10, 16, dtype=dtype, device=device)
    bias = randn(1, h, 7, 10, dtype=dtype, device=device, requires_grad=True)
    res = run_both(q, k, v, bias=bias, causal="top_left")
    assert res["grads"]["dk"].shape == k.shape and res["grads"]["dv"].shape == v.shape
    check_both(res, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gqa_equals_repeated_kv(device):
    """GQA gives exactly what repeating k/v over each group of query heads gives."""
    q, k, v = qkv(2, 6, 2, 5, 9, 8, dtype=torch.float64, device=device, requires_grad=False)
    out = flash_mha.attention(q, k, v)
    out_rep = flash_mha.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    assert_close(out, out_rep, 1e-12, "GQA vs repeated k/v")


# ---------------------------------------------------------------------------------------------
# Mask and bias broadcasting
# ---------------------------------------------------------------------------------------------
B, H, NQ, NK = 2, 3, 5, 7
SUBSETS = list(itertools.product([False, True], repeat=4))  # True = that dim is broadcast (size 1)


def subset_id(s):
    return "".join("1" if bc else n for bc, n in zip(s, "bhqk"))


def bshape(subset):
    return tuple(1 if bc else n for bc, n in zip(subset, (B, H, NQ, NK)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("subset", SUBSETS, ids=subset_id)
def test_bias_broadcast(device, dtype, subset):
    q, k, v = qkv(B, H, H, NQ, NK, 8, dtype=dtype, device=device)
    bias = randn(*bshape(subset), dtype=dtype, device=device, requires_grad=True)
    res = run_both(q, k, v, bias=bias)
    assert res["grads"]["dbias"].shape == bias.shape, "dbias must have the bias's own shape"
    check_both(res, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("subset", [SUBSETS[i] for i in (1, 3, 6, 9, 12, 14, 15)], ids=subset_id)
def test_bias_broadcast_long(device, dtype, subset):
    """dbias reductions across many query and key blocks (and work split over key blocks)."""
    full = (2, 2, 200, 300)
    q, k, v = qkv(2, 2, 1, 200, 300, 8, dtype=dtype, device=device)
    bias = randn(*(1 if bc else n for bc, n in zip(subset, full)), dtype=dtype, device=device,
                 requires_grad=True)
    res = run_both(q, k, v, bias=bias, causal="bottom_right")
    assert res["grads"]["dbias"].shape == bias.shape
    check_both(res, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subset", SUBSETS, ids=subset_id)
def test_mask_broadcast(device, subset):
    q, k, v = qkv(B, H, H, NQ, NK, 8, dtype=torch.float64, device=device)
    mask = random_mask(bshape(subset), device)
    check_both(run_both(q, k, v, mask=mask), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_subset,bias_subset", [(SUBSETS[0], SUBSETS[15]), (SUBSETS[5], SUBSETS[10]),
                                                     (SUBSETS[12], SUBSETS[3]), (SUBSETS[9], SUBSETS[6])],
                         ids=lambda s: subset_id(s))
def test_mask_and_bias_together(device, dtype, mask_subset, bias_subset):
    q, k, v = qkv(B, H, 1, NQ, NK, 16, dtype=dtype, device=device)
    mask = random_mask(bshape(mask_subset), device)
    bias = randn(*bshape(bias_subset), dtype=dtype, device=device, requires_grad=True)
    for causal in CAUSALS:
        check_both(run_both(q, k, v, mask=mask, bias=bias, causal=causal), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(), (NK,), (1, NK), (NQ, NK), (NQ, 1), (H, NQ, NK), (H, 1, NK), (1, 1, 1)],
                         ids=str)
def test_fewer_dims_right_aligned(device, shape):
    q, k, v = qkv(B, H, H, NQ, NK, 8, dtype=torch.float64, device=device)
    bias = randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
    mask = random_mask(shape, device)
    res = run_both(q, k, v, bias=bias, mask=mask)
    assert res["grads"]["dbias"].shape == shape
    check_both(res, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base_shape", [(1, 1, NQ, NK), (B, 1, 1, NK), (1, H, NQ, 1), (1, 1, 1, 1)], ids=str)
def test_expanded_stride0_views(device, base_shape):
    """bias/mask given as stride-0 expanded views: the gradient reaching the base is the sum."""
    q, k, v = qkv(B, H, H, NQ, NK, 8, dtype=torch.float64, device=device)
    base = randn(*base_shape, dtype=torch.float64, device=device, requires_grad=True)
    mask = random_mask(base_shape, device).expand(B, H, NQ, NK)
    bias = base.expand(B, H, NQ, NK)
    out = flash_mha.attention(q, k, v, bias=bias, mask=mask)
    base64 = as_double_leaf(base)
    ref = reference.attention(q.detach(), k.detach(), v.detach(), bias=base64.expand(B, H, NQ, NK), mask=mask)
    assert_close(out, ref, TOL[torch.float64])
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, base, dout)
    (rg,) = torch.autograd.grad(ref, base64, dout)
    assert_close(g, rg, GRAD_TOL[torch.float64], "grad of the expanded bias's base", GRAD_FLOOR)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["view_of_leaf", "stride0_leaf"])
def test_grad_wrt_expanded_bias_view(device, kind):
    """The gradient with respect to a stride-0 tensor itself is per element, like any tensor's:
    autograd.grad on an expanded view, or .grad of a leaf that is an expanded tensor."""
    q, k, v = qkv(B, H, H, NQ, NK, 8, dtype=torch.float64, device=device)
    base = randn(1, 1, NQ, NK, dtype=torch.float64, device=device, requires_grad=kind == "view_of_leaf")
    bias = base.expand(B, H, NQ, NK)
    if kind == "stride0_leaf":
        bias.requires_grad_()
    out = flash_mha.attention(q, k, v, bias=bias)
    bias64 = bias.detach().clone().requires_grad_()
    ref = reference.attention(q.detach(), k.detach(), v.detach(), bias=bias64)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, bias, dout)
    (rg,) = torch.autograd.grad(ref, bias64, dout)
    assert_close(g, rg, GRAD_TOL[torch.float64], "grad wrt the expanded bias", GRAD_FLOOR)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_and_mask_arbitrary_strides(device):
    """Full-size bias and mask that are transposed / sliced views (no contiguous layout)."""
    q, k, v = qkv(B, H, H, NQ, NK, 8, dtype=torch.float64, device=device)
    bias_t = randn(B, H, NK, NQ, dtype=torch.float64, device=device).transpose(-1, -2).requires_grad_()
    mask_buf = random_mask((H, B, NQ, NK + 3), device)
    mask = mask_buf.transpose(0, 1)[..., 2:NK + 2]
    assert not bias_t.is_contiguous() and not mask.is_contiguous()
    res = run_both(q, k, v, bias=bias_t, mask=mask, causal="bottom_right")
    check_both(res, torch.float64)


# ---------------------------------------------------------------------------------------------
# Causal, rows that see nothing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("n_q,n_k", [(7, 7), (5, 12), (12, 5), (1, 9), (9, 1), (70, 33), (33, 70)])
def test_causal(device, dtype, causal, n_q, n_k):
    q, k, v = qkv(2, 2, 1, n_q, n_k, 16, dtype=dtype, device=device)
    res = run_both(q, k, v, causal=causal)
    check_both(res, dtype)
    out = res["out"]
    assert not out.isnan().any()
    if causal == "bottom_right" and n_q > n_k:  # the first n_q - n_k rows see no key
        assert (out[:, :, : n_q - n_k] == 0).all()
        assert (res["grads"]["dq"][:, :, : n_q - n_k] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_causal_top_left_equals_tril_mask(device):
    q, k, v = qkv(1, 2, 2, 6, 9, 8, dtype=torch.float64, device=device, requires_grad=False)
    tril = torch.ones(6, 9, dtype=torch.bool, device=device).tril()
    assert_close(flash_mha.attention(q, k, v, causal="top_left"), flash_mha.attention(q, k, v, mask=tril),
                 1e-13)
    br = torch.ones(6, 9, dtype=torch.bool, device=device).tril(9 - 6)
    assert_close(flash_mha.attention(q, k, v, causal="bottom_right"), flash_mha.attention(q, k, v, mask=br),
                 1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_fully_masked_rows(device, dtype):
    b, h, n_q, n_k = 2, 2, 6, 9
    q, k, v = qkv(b, h, h, n_q, n_k, 16, dtype=dtype, device=device)
    mask = random_mask((b, h, n_q, n_k), device)
    mask[0, 1, 2] = False                # one row of one head
    mask[1, :, 4] = False                # a row in every head
    mask[:, :, 0, 0] = True
    bias = randn(b, 1, n_q, n_k, dtype=dtype, device=device, requires_grad=True)
    res = run_both(q, k, v, mask=mask, bias=bias)
    check_both(res, dtype)
    dead = ~mask.any(-1)                 # [b, h, n_q]
    out, dq = res["out"], res["grads"]["dq"]
    assert (out[dead] == 0).all() and (dq[dead] == 0).all()
    assert (res["grads"]["dbias"][1, 0, 4] == 0).all()
    for t in [out] + list(res["grads"].values()):
        assert not t.isnan().any()
    _, lse, _ = flash_mha.attention_fwd(q, k, v, mask=mask)
    assert torch.isinf(lse[dead]).all() and (lse[dead] > 0).all()
    assert torch.isfinite(lse[~dead]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_everything_masked(device, dtype):
    q, k, v = qkv(1, 2, 2, 4, 5, 8, dtype=dtype, device=device)
    mask = torch.zeros(4, 5, dtype=torch.bool, device=device)
    res = run_both(q, k, v, mask=mask)
    assert (res["out"] == 0).all()
    for g in res["grads"].values():
        assert (g == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_lse_matches_reference(device, dtype):
    q, k, v = qkv(2, 4, 2, 9, 17, 16, dtype=dtype, device=device, requires_grad=False)
    bias = randn(2, 1, 9, 17, dtype=dtype, device=device)
    mask = random_mask((9, 17), device)
    out, lse, rng = flash_mha.attention_fwd(q, k, v, bias, mask, None, "top_left")
    assert lse.shape == (2, 4, 9)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _, ref_lse = reference.attention(q, k, v, bias=bias, mask=mask, causal="top_left", return_lse=True)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-3)
    assert_close(lse[finite], ref_lse[finite], tol, "lse")


# ---------------------------------------------------------------------------------------------
# Strided inputs, scale, empty tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layouts", [("bnhd", "bnhd", "bnhd"), ("padded_rows", "head_slice", "bnhd"),
                                     ("head_slice", "padded_rows", "contiguous"),
                                     ("contiguous", "bnhd", "padded_rows")], ids="-".join)
def test_strided_inputs(device, dtype, layouts):
    q0, k0, v0 = qkv(2, 4, 2, 10, 12, 24, 16, dtype=dtype, device=device, requires_grad=False)
    q, k, v = (strided_copy(t, lay).requires_grad_() for t, lay in zip((q0, k0, v0), layouts))
    assert [t.is_contiguous() for t in (q, k, v)] == [lay == "contiguous" for lay in layouts]
    check_both(run_both(q, k, v, causal="bottom_right"), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h,h_kv,d,d_v", [(4, 4, 16, 16), (4, 2, 8, 24), (3, 1, 1, 5)])
def test_fused_qkv_views(device, h, h_kv, d, d_v):
    """q, k, v sliced from one projection output: correct results and gradients into the buffer."""
    buf, q, k, v = fused_qkv(2, h, h_kv, 9, d, d_v, torch.float64, device, requires_grad=True)
    out = flash_mha.attention(q, k, v, causal="top_left")
    buf64 = buf.detach().clone().requires_grad_()
    q64 = buf64[..., : h * d].unflatten(-1, (h, d)).transpose(1, 2)
    k64 = buf64[..., h * d: (h + h_kv) * d].unflatten(-1, (h_kv, d)).transpose(1, 2)
    v64 = buf64[..., (h + h_kv) * d:].unflatten(-1, (h_kv, d_v)).transpose(1, 2)
    assert torch.equal(q64, q) and torch.equal(v64, v)
    ref = reference.attention(q64, k64, v64, causal="top_left")
    assert_close(out, ref, TOL[torch.float64])
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, buf, dout)
    (rg,) = torch.autograd.grad(ref, buf64, dout)
    assert_close(g, rg, GRAD_TOL[torch.float64], "grad into the fused buffer", GRAD_FLOOR)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_are_not_copied(device):
    """Views of a fused QKV projection reach the kernel as they are: no copy, clone or contiguous."""
    _, q, k, v = fused_qkv(2, 4, 2, 8, 16, 16, torch.float32, device)
    bias = randn(1, 4, 8, 8, device=device).transpose(-1, -2)
    mask = random_mask((8, 8), device)
    with torch.no_grad(), _RecordOps() as rec:
        flash_mha.attention(q, k, v, bias=bias, mask=mask, causal="bottom_right")
    copies = [op for op in rec.ops if any(c in op for c in ("copy", "clone", "contiguous", "_to_copy"))]
    assert not copies, f"strided inputs were copied: {copies} (all ops: {rec.ops})"
    assert any("flash_mha.fwd" in op for op in rec.ops)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["q", "k", "v", "all"])
def test_size1_dims_with_small_strides(device, which):
    """A size-1 dim may carry any stride: n_q == 1 or n_k == 1 views whose row stride is 1 < d
    (a transposed [..., d, 1] tensor) give the reference's result, not a rejected BLAS call."""
    n_q = 1 if which in ("q", "all") else 5
    n_k = 1 if which in ("k", "v", "all") else 6
    q0, k0, v0 = qkv(2, 2, 2, n_q, n_k, 4, 3, dtype=torch.float64, device=device, requires_grad=False)
    layouts = {"q": "size1_strides" if which in ("q", "all") else "contiguous",
               "k": "size1_strides" if which in ("k", "all") else "contiguous",
               "v": "size1_strides" if which in ("v", "all") else "contiguous"}
    q, k, v = (strided_copy(t, layouts[n]).requires_grad_() for t, n in zip((q0, k0, v0), "qkv"))
    check_both(run_both(q, k, v), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,h,n_q,d_v", [(1, 1, 1, 1), (1, 1, 2, 1), (2, 2, 5, 1), (1, 1, 3, 4), (2, 2, 5, 16)],
                         ids=str)
@pytest.mark.parametrize("source", ["row", "scalar"])
def test_dout_with_stride0_rows(device, b, h, n_q, d_v, source):
    """An expanded dout, as sum reductions send back: stride 0 on b, h, n_q ("row": the gradient of
    out.sum((0, 1, 2))) or on every dim ("scalar": of out.sum()). (1, 1, 2, 1) was found by the fuzzer."""
    q, k, v = qkv(b, h, h, n_q, 3, 4, d_v, dtype=torch.float64, device=device)
    seed = torch.randn(1, 1, 1, d_v if source == "row" else 1, dtype=torch.float64, device=device)
    dout = seed.as_strided((b, h, n_q, d_v), (0, 0, 0, 1 if source == "row" else 0))
    grads = torch.autograd.grad(flash_mha.attention(q, k, v), (q, k, v), dout)
    q64, k64, v64 = (as_double_leaf(t) for t in (q, k, v))
    ref_grads = torch.autograd.grad(reference.attention(q64, k64, v64), (q64, k64, v64), dout)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, GRAD_TOL[torch.float64], name, GRAD_FLOOR)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_v", [1, 2, 16])
def test_mean_pooled_loss(device, d_v):
    """loss on out.mean(2) sends a dout whose rows have stride 0 (an expanded [b, h, 1, d_v])."""
    q, k, v = qkv(2, 2, 1, 5, 7, 8, d_v, dtype=torch.float64, device=device)
    loss = flash_mha.attention(q, k, v, causal="top_left").mean(dim=2).square().sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = (as_double_leaf(t) for t in (q, k, v))
    ref_loss = reference.attention(q64, k64, v64, causal="top_left").mean(dim=2).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, (q64, k64, v64))
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, GRAD_TOL[torch.float64], name, GRAD_FLOOR)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_last_dim(device):
    """A last dim with stride != 1 is accepted (copied in Python) and gives the right result."""
    q0, k0, v0 = qkv(1, 2, 2, 5, 6, 8, dtype=torch.float64, device=device, requires_grad=False)
    q = q0.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    assert q.stride(-1) != 1
    check_both(run_both(q, k0.requires_grad_(), v0.requires_grad_()), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [0.0, 0.37, 2.5, -1.0, 1e-3])
def test_scale(device, dtype, scale):
    q, k, v = qkv(2, 2, 2, 7, 8, 12, dtype=dtype, device=device)
    bias = randn(1, 1, 7, 8, dtype=dtype, device=device, requires_grad=True)
    check_both(run_both(q, k, v, bias=bias, scale=scale, causal="top_left"), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_zero_gives_mean_of_values(device):
    q, k, v = qkv(1, 2, 2, 4, 6, 8, dtype=torch.float64, device=device, requires_grad=False)
    out = flash_mha.attention(q, k, v, scale=0.0)
    assert_close(out, v.mean(2, keepdim=True).expand_as(out), 1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("b,n_q,n_k", [(0, 4, 5), (2, 0, 5), (2, 4, 0), (0, 0, 0), (2, 0, 0)])
def test_empty(device, dtype, b, n_q, n_k):
    q, k, v = qkv(b, 2, 1, n_q, n_k, 8, 6, dtype=dtype, device=device)
    bias = randn(1, 2, n_q, n_k, dtype=dtype, device=device, requires_grad=True)
    mask = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    for causal in CAUSALS:
        res = run_both(q, k, v, bias=bias, mask=mask, causal=causal)
        out = res["out"]
        assert out.shape == (b, 2, n_q, 6) and out.dtype == dtype
        assert (out == 0).all(), "n_k == 0 must give zeros"
        for name, g in res["grads"].items():
            assert not g.isnan().any(), name
            assert (g == 0).all(), f"{name} of an empty attention must be zero"
        assert res["grads"]["dq"].shape == q.shape and res["grads"]["dbias"].shape == bias.shape


@pytest.mark.parametrize("device", DEVICES)
def test_empty_with_dropout(device):
    q, k, v = qkv(2, 2, 2, 3, 0, 8, dtype=torch.float32, device=device)
    out = flash_mha.attention(q, k, v, dropout_p=0.5)
    assert out.shape == (2, 2, 3, 8) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", ["q", "k", "v", "bias", "kv", "none"])
def test_partial_requires_grad(device, needs):
    q, k, v = qkv(2, 2, 1, 5, 7, 8, dtype=torch.float64, device=device, requires_grad=False)
    bias = randn(1, 2, 5, 7, dtype=torch.float64, device=device)
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in needs)
    bias.requires_grad_(needs == "bias")
    res = run_both(q, k, v, bias=bias, causal="top_left")
    assert res["out"].requires_grad == (needs != "none")
    check_both(res, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_inference_mode(device):
    q, k, v = qkv(2, 2, 1, 5, 7, 8, dtype=torch.float32, device=device)
    out = flash_mha.attention(q, k, v, causal="bottom_right")
    with torch.no_grad():
        out_ng = flash_mha.attention(q, k, v, causal="bottom_right")
    with torch.inference_mode():
        out_im = flash_mha.attention(q, k, v, causal="bottom_right")
    assert not out_ng.requires_grad and not out_im.requires_grad
    assert torch.equal(out_ng, out.detach()) and torch.equal(out_im, out.detach())


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------
GRADCHECK_CONFIGS = {  # bias shapes: "q" / "k" stand for n_q / n_k
    "plain": dict(h=2, h_kv=2, bias=None, mask=False, causal=None),
    "bias_full": dict(h=2, h_kv=2, bias=(2, 2, "q", "k"), mask=False, causal=None),
    "bias_bcast_mask": dict(h=2, h_kv=1, bias=(1, 1, 1, "k"), mask=True, causal=None),
    "causal_tl_gqa": dict(h=4, h_kv=2, bias=("q", "k"), mask=False, causal="top_left"),
    "causal_br_mask_bias": dict(h=2, h_kv=1, bias=(2, 1, "q", 1), mask=True, causal="bottom_right"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(GRADCHECK_CONFIGS))
@pytest.mark.parametrize("n_q,n_k", [(3, 4), (5, 3)])
def test_gradcheck(device, name, n_q, n_k):
    cfg = GRADCHECK_CONFIGS[name]
    h, h_kv = cfg["h"], cfg["h_kv"]
    q, k, v = qkv(2, h, h_kv, n_q, n_k, 3, 2, dtype=torch.float64, device=device)
    bias = None
    if cfg["bias"] is not None:
        shape = tuple({"q": n_q, "k": n_k}.get(s, s) for s in cfg["bias"])
        bias = randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
    mask = None
    if cfg["mask"]:
        mask = random_mask((2, 1, n_q, n_k), device)
        mask[..., 0] = True
        mask[0, 0, -1] = False  # one row that sees nothing
    inputs = (q, k, v) + ((bias,) if bias is not None else ())

    def fn(q, k, v, *rest):
        return flash_mha.attention(q, k, v, bias=rest[0] if rest else None, mask=mask, causal=cfg["causal"])

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_gradcheck_dropout(device, causal):
    """With the generator re-seeded inside the function, dropout is a fixed linear mask."""
    q, k, v = qkv(1, 2, 1, 4, 5, 3, 2, dtype=torch.float64, device=device)
    bias = randn(1, 2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)

    def fn(q, k, v, bias):
        with torch.random.fork_rng(devices=[] if device == "cpu" else None):
            torch.manual_seed(7)
            return flash_mha.attention(q, k, v, bias=bias, causal=causal, dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_op_with_rng_state(device):
    """torch.ops.flash_mha.fwd is itself differentiable, with a fixed rng_state."""
    q, k, v = qkv(1, 2, 2, 3, 6, 4, 3, dtype=torch.float64, device=device)
    bias = randn(1, 1, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    rng = torch.tensor([123456789, 42], dtype=torch.int64, device=device)

    def fn(q, k, v, bias):
        return torch.ops.flash_mha.fwd(q, k, v, bias, None, 0.5, 2, 0.25, rng)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradgrad_not_silently_wrong(device):
    """No double backward is promised; asking for one must raise, not return a wrong number."""
    q, k, v = qkv(1, 1, 1, 3, 4, 2, dtype=torch.float64, device=device)
    out = flash_mha.attention(q, k, v)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    try:
        (ggq,) = torch.autograd.grad(gq.sum(), q, allow_unused=True)
    except RuntimeError:
        return
    # If it does not raise, it must agree with the reference's double backward.
    q64, k64, v64 = (as_double_leaf(t) for t in (q, k, v))
    ref = reference.attention(q64, k64, v64)
    (rgq,) = torch.autograd.grad(ref.square().sum(), q64, create_graph=True)
    (rggq,) = torch.autograd.grad(rgq.sum(), q64)
    assert ggq is not None
    assert_close(ggq, rggq, 1e-8, "double backward")


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------
def _identity_values(b, h_kv, n_k, dtype, device, cols=None):
    """v = I (per head), or its columns `cols` (a slice; d_v is at most 256): then
    out[..., i, j] = P[i, j] * keep[i, j] / (1 - p) shows the mask."""
    eye = torch.eye(n_k, dtype=dtype, device=device)
    eye = eye if cols is None else eye[:, cols]
    return eye.expand(b, h_kv, *eye.shape).contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("rng", [(0, 0), (123456789, 7), (-(2**62) - 12345, 2**40 + 3), (2**33 + 1, -1)],
                         ids=["zero", "small", "big_seed", "neg_offset"])
@pytest.mark.parametrize("b,h,n_q,n_k", [(2, 4, 9, 19), (1, 2, 3, 600), (3, 8, 130, 5)], ids=str)
def test_dropout_mask_equals_reference(device, dtype, p, rng, b, h, n_q, n_k):
    h_kv = h // 2
    q, k, _ = qkv(b, h, h_kv, n_q, n_k, 8, dtype=dtype, device=device, requires_grad=False)
    rng_state = torch.tensor(rng, dtype=torch.int64, device=device)
    keep = reference.dropout_keep_mask(rng_state, b, h, n_q, n_k, p)
    for start in range(0, n_k, 256):  # the mask of keys start .. start + 255, one call each
        cols = slice(start, min(start + 256, n_k))
        v = _identity_values(b, h_kv, n_k, dtype, device, cols)
        out, _, rng_out = torch.ops.flash_mha.fwd(q, k, v, None, None, 0.5, 0, p, rng_state)
        assert torch.equal(rng_out.cpu(), rng_state.cpu())
        assert torch.equal((out != 0).cpu(), keep[..., cols]), (
            f"kernel dropout mask != reference.dropout_keep_mask (keys {cols.start}..{cols.stop - 1})")
        ref = reference.attention(q, k, v, scale=0.5, dropout_p=p, rng_state=rng_state)
        assert_close(out, ref, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", CAUSALS)
@pytest.mark.parametrize("n_q,n_k", [(11, 70), (140, 600)])
def test_dropout_forward_backward_match_reference(device, dtype, causal, n_q, n_k):
    """attention_fwd reports the rng_state it used; the reference with it gives out and grads."""
    b, h, h_kv = 2, 4, 2
    q, k, v = qkv(b, h, h_kv, n_q, n_k, 16, 12, dtype=dtype, device=device)
    bias = randn(1, h, n_q, n_k, dtype=dtype, device=device, requires_grad=True)
    mask = random_mask((b, 1, 1, n_k), device)
    torch.manual_seed(99)
    out, lse, rng = flash_mha.attention_fwd(q, k, v, bias, mask, None, causal, 0.2)
    assert rng.shape == (2,) and rng.dtype == torch.int64
    torch.manual_seed(99)
    out2 = flash_mha.attention(q, k, v, bias=bias, mask=mask, causal=causal, dropout_p=0.2)
    assert torch.equal(out, out2), "same seed must give the same dropout mask"
    q64, k64, v64, bias64 = (as_double_leaf(t) for t in (q, k, v, bias))
    ref = reference.attention(q64, k64, v64, bias=bias64, mask=mask, causal=causal, dropout_p=0.2, rng_state=rng)
    assert_close(out2, ref, TOL[dtype])
    dout = torch.randn_like(out2)
    grads = torch.autograd.grad(out2, (q, k, v, bias), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64, bias64), dout.double())
    for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert_close(g, rg, GRAD_TOL[dtype], name, GRAD_FLOOR)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_seeded_reproducible_and_fresh(device):
    q, k, v = qkv(2, 2, 2, 8, 16, 8, dtype=torch.float32, device=device)
    torch.manual_seed(5)
    o1 = flash_mha.attention(q, k, v, dropout_p=0.5)
    g1 = torch.autograd.grad(o1.sum(), (q, k, v))
    o2 = flash_mha.attention(q, k, v, dropout_p=0.5)  # no re-seed: a fresh mask
    torch.manual_seed(5)
    o3 = flash_mha.attention(q, k, v, dropout_p=0.5)
    g3 = torch.autograd.grad(o3.sum(), (q, k, v))
    assert torch.equal(o1, o3)
    assert all(torch.equal(a, b) for a, b in zip(g1, g3))
    assert not torch.equal(o1, o2), "consecutive calls must draw different masks"
    torch.manual_seed(6)
    assert not torch.equal(o1, flash_mha.attention(q, k, v, dropout_p=0.5)), "another seed, another mask"


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_zero_is_exact(device):
    q, k, v = qkv(1, 2, 2, 5, 6, 8, dtype=torch.float32, device=device, requires_grad=False)
    assert torch.equal(flash_mha.attention(q, k, v, dropout_p=0.0), flash_mha.attention(q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_keep_rate(device, p):
    """The kernel keeps a fraction 1 - p of the probabilities (binomial bound, 6 sigma)."""
    b, h, n_q, n_k = 2, 4, 32, 64
    q, k, _ = qkv(b, h, h, n_q, n_k, 8, dtype=torch.float32, device=device, requires_grad=False)
    v = _identity_values(b, h, n_k, torch.float32, device)
    out = flash_mha.attention(q, k, v, dropout_p=p)
    n = out.numel()
    kept = (out != 0).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 6 * sigma, f"kept {kept} of {n}, expected {n * (1 - p):.0f}"
    # kept probabilities are scaled by 1 / (1 - p)
    no_drop = flash_mha.attention(q, k, v)
    ratio = out[out != 0] / no_drop[out != 0]
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / (1 - p)), rtol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_pairs_independent(p):
    """One Philox call draws 8 elements of a [16, 16] block, 16 bits each (csrc/philox.h): the keep
    decisions of neighbours sharing a word (columns 1 apart), a call (columns 8 or rows 8 apart)
    or neither (columns 2 apart) are independent, and 1 - p are kept (binomial bounds, 6 sigma)."""
    rng_state = torch.randint(-(2**62), 2**62, (2,), dtype=torch.int64)
    keep = reference.dropout_keep_mask(rng_state, 2, 2, 128, 512, p).double()
    n = keep.numel()
    assert abs(keep.sum().item() - n * (1 - p)) < 6 * math.sqrt(n * p * (1 - p))
    for dim, gap in ((-1, 1), (-1, 2), (-1, 8), (-2, 8)):
        a, b = keep.narrow(dim, 0, keep.shape[dim] - gap), keep.narrow(dim, gap, keep.shape[dim] - gap)
        m, both = a.numel(), (1 - p) ** 2
        seen = (a * b).sum().item()
        assert abs(seen - m * both) < 6 * math.sqrt(m * both * (1 - both)), (
            f"elements {gap} apart along dim {dim} kept together {seen / m:.4f} of the time, expected {both:.4f}")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_unbiased_mean(device):
    """The mean over many seeds approaches the no-dropout output (z-scores per element)."""
    q, k, v = qkv(1, 2, 2, 6, 16, 8, dtype=torch.float64, device=device, requires_grad=False)
    p, runs = 0.3, 400
    ref = flash_mha.attention(q, k, v)
    outs = []
    for seed in range(runs):
        torch.manual_seed(seed)
        outs.append(flash_mha.attention(q, k, v, dropout_p=p))
    outs = torch.stack(outs)
    mean, std = outs.mean(0), outs.std(0)
    z = (mean - ref) / (std / math.sqrt(runs))
    assert z.abs().max() < 5.0, f"max |z| = {z.abs().max():.2f}"
    assert (z.square().mean() - 1).abs() < 0.5, f"mean z^2 = {z.square().mean():.2f}"


# ---------------------------------------------------------------------------------------------
# opcheck on the custom ops
# ---------------------------------------------------------------------------------------------
def _op_args(device, dtype, b=2, h=4, h_kv=2, n_q=5, n_k=7, d=8, d_v=6, bias_shape=None, mask_shape=None,
             causal=0, p=0.0, rg=True, strided=False):
    q, k, v = qkv(b, h, h_kv, n_q, n_k, d, d_v, dtype=dtype, device=device, requires_grad=rg)
    bias = randn(*bias_shape, dtype=dtype, device=device, requires_grad=rg) if bias_shape else None
    mask = random_mask(mask_shape, device) if mask_shape else None
    if strided:  # transposed / sliced q, k, v; a stride-0 expanded bias; a transposed mask
        q, k, v = (strided_copy(t, lay).requires_grad_(rg) for t, lay in
                   zip((q, k, v), ("bnhd", "padded_rows", "head_slice")))
        bias = bias.detach().expand(b, h, n_q, n_k).requires_grad_(rg)
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    rng = torch.tensor([2024, 3], dtype=torch.int64, device=device) if p > 0 else None
    return (q, k, v, bias, mask, 0.3, causal, p, rng)


OP_CONFIGS = {
    "plain": dict(),
    "bias_mask_br": dict(bias_shape=(1, 4, 5, 7), mask_shape=(2, 1, 1, 7), causal=2),
    "bias_bcast_tl": dict(bias_shape=(2, 1, 1, 7), causal=1),
    "mqa_f64": dict(h_kv=1, dtype=torch.float64),
    "dropout": dict(p=0.25, bias_shape=(1, 1, 5, 7)),
    "bf16_dropout_mask": dict(p=0.5, mask_shape=(1, 4, 5, 1), dtype=torch.bfloat16),
    "strided": dict(bias_shape=(1, 1, 5, 7), mask_shape=(2, 4, 5, 7), causal=2, strided=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_opcheck_fwd(device, name):
    cfg = dict(OP_CONFIGS[name])
    dtype = cfg.pop("dtype", torch.float32)
    args = _op_args(device, dtype, **cfg)
    torch.library.opcheck(torch.ops.flash_mha.fwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_opcheck_bwd(device, name):
    cfg = dict(OP_CONFIGS[name])
    dtype = cfg.pop("dtype", torch.float32)
    q, k, v, bias, mask, scale, causal, p, rng = _op_args(device, dtype, rg=False, **cfg)
    out, lse, rng_used = torch.ops.flash_mha.fwd(q, k, v, bias, mask, scale, causal, p, rng)
    dout = torch.randn_like(out)
    for bias_rg in ([False, True] if bias is not None else [False]):
        args = (dout, q, k, v, out, lse, bias, mask, scale, causal, p, rng_used if p > 0 else None, bias_rg)
        torch.library.opcheck(torch.ops.flash_mha.bwd.default, args)
        dq, dk, dv, dbias = torch.ops.flash_mha.bwd(*args)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert dbias.shape == (bias.shape if bias_rg else (0,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_shape,expand", [((NK,), False), ((1, H, 1, NK), False), ((B, 1, NQ, 1), False),
                                               ((1, 1, NQ, NK), True), ((B, H, NQ, NK), False)], ids=str)
def test_op_dbias_has_the_bias_shape(device, bias_shape, expand):
    """At the op level dbias has the 4-d bias's shape: summed over size-1 dims, per element on
    full-size dims (including stride-0 ones, which the op must not treat as broadcast)."""
    q, k, v = qkv(B, H, 1, NQ, NK, 8, dtype=torch.float64, device=device, requires_grad=False)
    bias = to_4d(randn(*bias_shape, dtype=torch.float64, device=device))
    if expand:
        bias = bias.expand(B, H, NQ, NK)
    out, lse, _ = torch.ops.flash_mha.fwd(q, k, v, bias, None, 0.4, 2, 0.0, None)
    dout = torch.randn_like(out)
    _, _, _, dbias = torch.ops.flash_mha.bwd(dout, q, k, v, out, lse, bias, None, 0.4, 2, 0.0, None, True)
    assert dbias.shape == bias.shape
    bias64 = bias.detach().clone().requires_grad_()  # a plain tensor of the 4-d shape
    ref = reference.attention(q, k, v, bias=bias64, scale=0.4, causal="bottom_right")
    (rdb,) = torch.autograd.grad(ref, bias64, dout)
    assert_close(dbias, rdb, GRAD_TOL[torch.float64], "dbias", GRAD_FLOOR)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
def _attn_fn(q, k, v, bias, mask):
    return flash_mha.attention(q, k, v, bias=bias, mask=mask, causal="bottom_right")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()
    q, k, v = qkv(2, 4, 2, 9, 12, 16, dtype=torch.float32, device=device)
    bias = randn(1, 4, 9, 12, device=device, requires_grad=True)
    mask = random_mask((2, 1, 1, 12), device)
    compiled = torch.compile(_attn_fn, fullgraph=True, backend=backend)
    out_c = compiled(q, k, v, bias, mask)
    out_e = _attn_fn(q, k, v, bias, mask)
    assert_close(out_c, out_e, 1e-6, "compiled output")
    dout = torch.randn_like(out_e)
    gc = torch.autograd.grad(out_c, (q, k, v, bias), dout)
    ge = torch.autograd.grad(out_e, (q, k, v, bias), dout)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), gc, ge):
        assert_close(a, b, 1e-6, f"compiled {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dropout_matches_eager(device):
    """aot_eager runs the same torch.randint draw as eager: same seed, same mask, same grads."""
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 2, 8, 10, 8, dtype=torch.float32, device=device)

    def fn(q, k, v):
        return flash_mha.attention(q, k, v, dropout_p=0.4)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    out_c = compiled(q, k, v)
    gc = torch.autograd.grad(out_c.sum(), (q, k, v))
    torch.manual_seed(3)
    out_e = fn(q, k, v)
    ge = torch.autograd.grad(out_e.sum(), (q, k, v))
    assert torch.equal(out_c, out_e)
    assert all(torch.equal(a, b) for a, b in zip(gc, ge))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_no_recompile(device):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")

    def fn(q, k, v, bias):
        return flash_mha.attention(q, k, v, bias=bias, causal="top_left")

    compiled = torch.compile(fn, backend=cnt, dynamic=True, fullgraph=True)
    frames = []
    for n_q, n_k in [(9, 12), (13, 21), (5, 7)]:  # distinct from b, h, d: no duck-size guards
        q, k, v = qkv(2, 2, 1, n_q, n_k, 8, dtype=torch.float64, device=device)
        bias = randn(1, 1, n_q, n_k, dtype=torch.float64, device=device, requires_grad=True)
        with torch._dynamo.config.patch(error_on_recompile=bool(frames)):
            res_c = compiled(q, k, v, bias)
        frames.append(cnt.frame_count)
        ref = reference.attention(q, k, v, bias=bias, causal="top_left")
        assert_close(res_c, ref, 1e-10)
        g = torch.autograd.grad(res_c.sum(), (q, bias))
        rg = torch.autograd.grad(ref.sum(), (q, bias))
        assert_close(g[0], rg[0], 1e-9, "dq")
        assert_close(g[1], rg[1], 1e-9, "dbias", GRAD_FLOOR)
    assert frames[0] >= 1 and frames[1:] == frames[:1] * 2, f"recompiled for new lengths: {frames}"


@pytest.mark.parametrize("device", DEVICES)
def test_compile_sdpa_fullgraph(device):
    torch._dynamo.reset()
    q, k, v = qkv(2, 4, 4, 6, 6, 8, dtype=torch.float32, device=device)
    mask = randn(6, 6, device=device)
    fn = lambda q, k, v: flash_mha.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    out_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    assert_close(out_c, fn(q, k, v), 1e-6)


# ---------------------------------------------------------------------------------------------
# The torch SDPA mirror
# ---------------------------------------------------------------------------------------------
def _sdpa_both(query, key, value, attn_mask=None, grad_mask=False, **kw):
    """flash_mha.scaled_dot_product_attention vs torch's, on float64 copies for torch."""
    out = flash_mha.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kw)
    leafs = [query, key, value] + ([attn_mask] if grad_mask else [])
    leafs64 = [as_double_leaf(t) for t in leafs]
    m64 = leafs64[3] if grad_mask else (attn_mask if attn_mask is None or attn_mask.dtype == torch.bool
                                        else attn_mask.double())
    ref = F.scaled_dot_product_attention(leafs64[0], leafs64[1], leafs64[2], attn_mask=m64, **kw)
    dout = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)
    grads = torch.autograd.grad(out, leafs, dout)
    ref_grads = torch.autograd.grad(ref, leafs64, dout.double())
    return out, ref, grads, ref_grads


SDPA_CASES = {
    "4d_plain": dict(shape=(2, 3), L=5, S=7),
    "4d_bool_bcast": dict(shape=(2, 3), L=5, S=7, mask=("bool", (1, 3, 1, 7))),
    "4d_float_2d": dict(shape=(2, 3), L=5, S=7, mask=("float", (5, 7))),
    "4d_float_grad": dict(shape=(2, 3), L=5, S=7, mask=("float", (2, 1, 5, 7)), grad_mask=True),
    "4d_float_grad_1d": dict(shape=(2, 3), L=5, S=7, mask=("float", (7,)), grad_mask=True),
    "causal_L<S": dict(shape=(2, 3), L=4, S=9, is_causal=True),
    "causal_L>S": dict(shape=(1, 2), L=9, S=4, is_causal=True),
    "scale": dict(shape=(2, 2), L=6, S=6, scale=0.123, mask=("bool", (6, 6))),
    "gqa": dict(shape=(2, 6), kv_heads=2, L=5, S=8, enable_gqa=True, mask=("float", (1, 6, 5, 8))),
    "gqa_causal": dict(shape=(1, 4), kv_heads=1, L=7, S=7, enable_gqa=True, is_causal=True),
    "3d": dict(shape=(4,), L=5, S=6, mask=("bool", (5, 6))),
    "3d_float_grad": dict(shape=(4,), L=5, S=6, mask=("float", (4, 5, 6)), grad_mask=True),
    "5d": dict(shape=(2, 3, 2), L=4, S=5, mask=("bool", (3, 1, 4, 5))),
    "5d_float_grad": dict(shape=(2, 3, 2), L=4, S=5, mask=("float", (2, 1, 1, 1, 5)), grad_mask=True),
    "5d_gqa": dict(shape=(2, 2, 4), kv_heads=2, L=3, S=5, enable_gqa=True),
    "dv_differs": dict(shape=(2, 2), L=5, S=6, Ev=11),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_torch(device, dtype, case):
    c = SDPA_CASES[case]
    lead, L, S, E, Ev = c["shape"], c["L"], c["S"], 8, c.get("Ev", 8)
    kv_lead = lead[:-1] + (c["kv_heads"],) if "kv_heads" in c else lead
    query = randn(*lead, L, E, dtype=dtype, device=device, requires_grad=True)
    key = randn(*kv_lead, S, E, dtype=dtype, device=device, requires_grad=True)
    value = randn(*kv_lead, S, Ev, dtype=dtype, device=device, requires_grad=True)
    attn_mask = None
    if "mask" in c:
        kind, mshape = c["mask"]
        if kind == "bool":
            attn_mask = random_mask(mshape, device)
            attn_mask[..., 0] = True  # torch's SDPA gives NaN for a row that sees nothing
        else:
            attn_mask = randn(*mshape, dtype=dtype, device=device, requires_grad=c.get("grad_mask", False))
    kw = {k: c[k] for k in ("is_causal", "scale", "enable_gqa") if k in c}
    out, ref, grads, ref_grads = _sdpa_both(query, key, value, attn_mask, c.get("grad_mask", False), **kw)
    assert out.shape == ref.shape
    assert_close(out, ref, TOL[dtype])
    for name, g, rg in zip(("dquery", "dkey", "dvalue", "dattn_mask"), grads, ref_grads):
        assert g.shape == rg.shape, name
        assert_close(g, rg, GRAD_TOL[dtype], name, GRAD_FLOOR)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_dropout_seeded(device):
    q, k, v = qkv(2, 2, 2, 5, 7, 8, dtype=torch.float32, device=device, requires_grad=False)
    torch.manual_seed(11)
    o1 = flash_mha.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(11)
    o2 = flash_mha.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    o3 = flash_mha.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)
    assert not torch.equal(o1, flash_mha.scaled_dot_product_attention(q, k, v))


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_bitwise(device):
    q, k, v = qkv(2, 8, 2, 150, 140, 32, dtype=torch.float32, device=device)
    bias = randn(1, 1, 150, 140, device=device, requires_grad=True)  # reduced over b and h
    dout = torch.randn(2, 8, 150, 32, device=device)
    runs = []
    with deterministic_algorithms():
        for _ in range(3):
            torch.manual_seed(0)
            out = flash_mha.attention(q, k, v, bias=bias, causal="top_left", dropout_p=0.1)
            runs.append((out,) + torch.autograd.grad(out, (q, k, v, bias), dout))
    for other in runs[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), runs[0], other):
            assert torch.equal(a, b), f"{name} differs between runs under deterministic algorithms"
