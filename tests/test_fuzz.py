"""Property-based fuzzing against flash_mha/reference.py, and the numerics corners (issue 7).

Hypothesis draws random valid calls of flash_mha.attention (and attention_fwd when dropout is
on, for the rng_state it used) and flash_mha.scaled_dot_product_attention: batch, heads, GQA
ratio, lengths 0..~100 (and tile edges up to 1025), head dims 1..256, d_v, dtype, strided views, mask and bias of random
broadcast shapes (fewer dims, stride-0 expands), causal alignment, scale and dropout, and
compares outputs and gradients with the float64 reference.

Budget: a fixed seed (derandomize=True) and FLASH_MHA_FUZZ_EXAMPLES examples on the CPU
(default 150), FLASH_MHA_FUZZ_EXAMPLES_CUDA on a GPU (default 2000); the SDPA fuzzer runs a
third of those. FLASH_MHA_FUZZ_RANDOM=1 draws fresh examples instead of the fixed ones.
A failure found here becomes a plain regression test in test_attention.py.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import flash_mha
from conftest import (ALL_DTYPES, DEVICES, GRAD_FLOOR, GRAD_TOL, HAS_CUDA, LAYOUTS, TOL, as_double_leaf,
                      assert_close, randn, strided_copy)
from flash_mha import reference

try:  # the GPU machine may lack hypothesis: the numerics tests below still run there
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    st = None
requires_hypothesis = pytest.mark.skipif(st is None, reason="needs hypothesis (pip install hypothesis)")

CPU_EXAMPLES = int(os.environ.get("FLASH_MHA_FUZZ_EXAMPLES", "150"))
CUDA_EXAMPLES = int(os.environ.get("FLASH_MHA_FUZZ_EXAMPLES_CUDA", "2000"))
HEAD_DIMS = [1, 2, 3, 7, 8, 16, 31, 32, 33, 48, 64, 80, 96, 100, 128, 160, 192, 224, 256]
# Longest sequence drawn, and a cap on b * h * n_q * n_k * (d + d_v) that keeps one example's
# float64 reference cheap (2 CPU cores in CI; the GPU runs the reference on the GPU).
MAX_LEN = {"cpu": 100, "cuda": 300}
MAX_WORK = {"cpu": 3_000_000, "cuda": 200_000_000}


def _composite(fn):
    return st.composite(fn) if st is not None else fn


@_composite
def broadcast_shape(draw, full):
    """A shape broadcastable to `full` (4-d): any dims set to 1, leading 1s maybe dropped."""
    shape = [1 if draw(st.booleans()) else n for n in full]
    drop = 0
    while drop < 4 and shape[drop] == 1 and draw(st.booleans()):
        drop += 1
    return tuple(shape[drop:])


@_composite
def configs(draw, device="cpu", sdpa=False):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    b = draw(st.sampled_from([1, 2, 3, 2, 1, 2, 3, 1, 2, 3, 2, 0]))
    h_kv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2, 3, 4]))
    h = h_kv * group
    # Tile edges of the kernels (CPU: 128 x 512 forward, 64 x 128 backward; CUDA: 64 / 128).
    edges = [1, 63, 64, 65, 127, 128, 129, 511, 512, 513, 1025]
    n_q, n_k = (draw(st.one_of(st.integers(1, MAX_LEN[device]), st.sampled_from(edges))) for _ in range(2))
    # Empty lengths in about one example in twelve (the integer strategies favour small values).
    if draw(st.sampled_from([False] * 23 + [True])):
        n_q = 0
    if draw(st.sampled_from([False] * 23 + [True])):
        n_k = 0
    d = draw(st.one_of(st.sampled_from(HEAD_DIMS), st.integers(1, 256)))
    d_v = draw(st.one_of(st.just(d), st.sampled_from(HEAD_DIMS), st.integers(1, 256)))
    # Shrink lengths until the example is cheap (keeps hypothesis's shrinking well-behaved).
    while b * h * n_q * n_k * (d + d_v) > MAX_WORK[device]:
        if n_q >= n_k:
            n_q //= 2
        else:
            n_k //= 2
    full = (b, h, n_q, n_k)
    cfg = dict(dtype=dtype, b=b, h=h, h_kv=h_kv, n_q=n_q, n_k=n_k, d=d, d_v=d_v,
               layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3)),
               seed=draw(st.integers(0, 2**31 - 1)))
    cfg["mask"] = draw(st.none() | broadcast_shape(full))
    cfg["bias"] = draw(st.none() | broadcast_shape(full))
    cfg["bias_grad"] = draw(st.booleans())
    cfg["expand"] = draw(st.booleans())  # pass mask/bias as stride-0 expanded full-size views
    cfg["mask_density"] = draw(st.sampled_from([0.05, 0.5, 0.9, 1.0]))
    # scale = factor / sqrt(d); |factor| >= 1e-3 (or exactly 0) keeps gradients representable
    # in half precision (they are proportional to scale).
    factor = draw(st.one_of(st.none(), st.just(0.0), st.floats(1e-3, 2.0), st.floats(-2.0, -1e-3)))
    cfg["scale"] = None if factor is None else factor / math.sqrt(d)
    cfg["dropout_p"] = draw(st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.5, 0.9]))
    cfg["dout_expanded"] = draw(st.sampled_from([False, False, False, True]))
    if sdpa:
        # torch's signature: one attn_mask (bool or float), top-left is_causal without a mask.
        if cfg["mask"] is not None and cfg["bias"] is not None:
            cfg["bias"] = None
        cfg["causal"] = None
        if cfg["mask"] is None and cfg["bias"] is None and draw(st.booleans()):
            cfg["causal"] = "top_left"
        cfg["enable_gqa"] = group > 1 or draw(st.booleans())
    else:
        cfg["causal"] = draw(st.sampled_from([None, "top_left", "bottom_right"]))
    return cfg


def make_inputs(cfg, device):
    torch.manual_seed(cfg["seed"])
    dt = cfg["dtype"]
    b, h, h_kv, n_q, n_k, d, d_v = (cfg[x] for x in ("b", "h", "h_kv", "n_q", "n_k", "d", "d_v"))
    full = (b, h, n_q, n_k)
    raw = [randn(b, h, n_q, d, dtype=dt, device=device), randn(b, h_kv, n_k, d, dtype=dt, device=device),
           randn(b, h_kv, n_k, d_v, dtype=dt, device=device)]
    q, k, v = (strided_copy(t, lay).requires_grad_() for t, lay in zip(raw, cfg["layouts"]))
    mask = bias = bias_leaf = None
    if cfg["mask"] is not None:
        mask = (torch.rand(cfg["mask"]) < cfg["mask_density"]).to(device)
        if cfg["expand"]:
            mask = mask.expand(full)
    if cfg["bias"] is not None:
        bias_leaf = randn(*cfg["bias"], dtype=dt, device=device, requires_grad=cfg["bias_grad"])
        bias = bias_leaf.expand(full) if cfg["expand"] else bias_leaf
    return q, k, v, mask, bias, bias_leaf


def rounding_scales(cfg, q, k, v, bias, mask, ref_out, dout):
    """Norms of |.|-versions of each gradient: the size of the rounding they can carry.

    dq, dk and dbias come from dS = P * (dP - rowsum(dO * O)), a difference of nearly equal
    terms (exactly equal when a row sees one key, and a bias summed over keys cancels to
    zero); dv = P^T dO sums signed rows. Rounding in those terms is of order eps times the
    same expressions with every factor replaced by its absolute value, so a gradient's error
    is measured against max(||its value||, ||its absolute-value version||).
    """
    b, h, h_kv, n_q, n_k = (cfg[x] for x in ("b", "h", "h_kv", "n_q", "n_k"))
    group, keep_scale = h // h_kv, 1.0 / (1.0 - cfg["dropout_p"])
    scale = abs(cfg["scale"]) if cfg["scale"] is not None else 1.0 / math.sqrt(cfg["d"])
    q, k, v, dout, ref_out = (t.detach().double() for t in (q, k, v, dout, ref_out))
    eye = torch.eye(n_k, dtype=torch.float64, device=q.device).expand(b, h_kv, n_k, n_k)
    p = reference.attention(q, k, eye, bias=None if bias is None else bias.detach().double(), mask=mask,
                            scale=cfg["scale"], causal=cfg["causal"])            # [b, h, n_q, n_k]
    k_rep, v_rep = k.repeat_interleave(group, 1).abs(), v.repeat_interleave(group, 1).abs()
    abs_dp = dout.abs() @ v_rep.transpose(-1, -2) * keep_scale
    abs_d = (dout.abs() * ref_out.abs()).sum(-1, keepdim=True)
    ds = p * (abs_dp + abs_d)
    scales = {
        "dq": scale * ds @ k_rep,
        "dk": (scale * ds.transpose(-1, -2) @ q.abs()).unflatten(1, (h_kv, group)).sum(2),
        "dv": (keep_scale * p.transpose(-1, -2) @ dout.abs()).unflatten(1, (h_kv, group)).sum(2),
        "dbias": ds,
    }
    return {name: torch.linalg.vector_norm(t).item() for name, t in scales.items()}


def check_against_reference(cfg, device, call):
    """call(q, k, v, mask, bias) -> (out, rng_state or None); compares out and grads."""
    q, k, v, mask, bias, bias_leaf = make_inputs(cfg, device)
    dt = cfg["dtype"]
    out, rng = call(q, k, v, mask, bias)
    assert out.shape == (cfg["b"], cfg["h"], cfg["n_q"], cfg["d_v"]) and out.dtype == dt

    q64, k64, v64, bias64 = (as_double_leaf(t) for t in (q, k, v, bias_leaf))
    full = (cfg["b"], cfg["h"], cfg["n_q"], cfg["n_k"])
    bias64_full = bias64.expand(full) if bias64 is not None else None
    ref = reference.attention(q64, k64, v64, bias=bias64_full, mask=mask, scale=cfg["scale"], causal=cfg["causal"],
                              dropout_p=cfg["dropout_p"], rng_state=rng)
    assert_close(out, ref, TOL[dt], "output")

    leaves = [q, k, v] + ([bias_leaf] if bias_leaf is not None and bias_leaf.requires_grad else [])
    leaves64 = [q64, k64, v64] + ([bias64] if len(leaves) == 4 else [])
    dout = torch.randn(out.shape, dtype=torch.float64).to(out.device, dt)  # the reference gets the same values
    if cfg["dout_expanded"]:  # what loss = (out * w).sum() sends: stride 0 on b, h, n_q
        dout = dout[:1, :1, :1].expand(out.shape) if out.numel() else dout
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, leaves64, dout.double(), allow_unused=True)
    scales = rounding_scales(cfg, q, k, v, bias_leaf, mask, ref, dout)
    for name, t, g, rg in zip(("dq", "dk", "dv", "dbias"), leaves, grads, ref_grads):
        g = torch.zeros_like(t) if g is None else g
        rg = torch.zeros_like(t, dtype=torch.float64) if rg is None else rg
        assert_close(g, rg, GRAD_TOL[dt], name, ref_norm=scales[name])


def call_attention(cfg):
    def call(q, k, v, mask, bias):
        kw = dict(bias=bias, mask=mask, scale=cfg["scale"], causal=cfg["causal"])
        if cfg["dropout_p"] > 0:
            out, _, rng = flash_mha.attention_fwd(q, k, v, dropout_p=cfg["dropout_p"], **kw)
            return out, rng
        return flash_mha.attention(q, k, v, **kw), None
    return call


def call_sdpa(cfg):
    def call(q, k, v, mask, bias):
        out = flash_mha.scaled_dot_product_attention(
            q, k, v, attn_mask=mask if mask is not None else bias, is_causal=cfg["causal"] == "top_left",
            scale=cfg["scale"], enable_gqa=cfg["enable_gqa"])
        return out, None
    return call


def _settings(examples):
    # FLASH_MHA_FUZZ_RANDOM=1 explores fresh examples (with pytest's --hypothesis-seed=N to replay).
    return settings(derandomize=os.environ.get("FLASH_MHA_FUZZ_RANDOM") != "1", max_examples=examples,
                    deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FUZZ_DEVICES = [pytest.param("cpu", id="cpu")] + [
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA"))]


@requires_hypothesis
@pytest.mark.parametrize("device", FUZZ_DEVICES)
def test_fuzz_attention(device):
    examples = CPU_EXAMPLES if device == "cpu" else CUDA_EXAMPLES

    @_settings(examples)
    @given(cfg=configs(device))
    def run(cfg):
        check_against_reference(cfg, device, call_attention(cfg))

    run()


@requires_hypothesis
@pytest.mark.parametrize("device", FUZZ_DEVICES)
def test_fuzz_sdpa(device):
    examples = max(CPU_EXAMPLES // 3, 1) if device == "cpu" else CUDA_EXAMPLES // 3

    @_settings(examples)
    @given(cfg=configs(device, sdpa=True).map(lambda c: {**c, "dropout_p": 0.0}))
    def run(cfg):
        check_against_reference(cfg, device, call_sdpa(cfg))

    run()


# ---------------------------------------------------------------------------------------------
# Numerics corners
# ---------------------------------------------------------------------------------------------
def _run(q, k, v, **kw):
    """Output and (dq, dk, dv[, dbias]) of flash_mha and of the reference; NaN checks by caller."""
    bias = kw.get("bias")
    out = flash_mha.attention(q, k, v, **kw)
    leaves = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    leaves64 = [as_double_leaf(t) for t in leaves]
    kw64 = dict(kw)
    if len(leaves) == 4:
        kw64["bias"] = leaves64[3]
    ref = reference.attention(*leaves64[:3], **kw64)
    dout = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, leaves64, dout.double())
    return out, ref, grads, ref_grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("via", ["scores", "bias", "shift"])
def test_large_logits(device, dtype, via):
    """Scores around 1e4 (from q.k with scale 1, from a random bias, or a constant 1e4 bias on
    top of O(1) scores, which leaves the softmax unchanged): no overflow, no NaN."""
    d = 16
    if via == "shift":
        q = randn(2, 2, 9, d, dtype=dtype, device=device, requires_grad=True)
        k = randn(2, 2, 12, d, dtype=dtype, device=device, requires_grad=True)
        bias = torch.full((1, 2, 9, 12), 1e4, dtype=dtype, device=device, requires_grad=True)
    elif via == "scores":
        q = randn(2, 2, 9, d, dtype=dtype, device=device, scale=25.0, requires_grad=True)
        k = randn(2, 2, 12, d, dtype=dtype, device=device, scale=25.0, requires_grad=True)
        bias = None
    else:
        q = randn(2, 2, 9, d, dtype=dtype, device=device, requires_grad=True)
        k = randn(2, 2, 12, d, dtype=dtype, device=device, requires_grad=True)
        bias = randn(1, 2, 9, 12, dtype=dtype, device=device, scale=1e4, requires_grad=True)
    v = randn(2, 2, 12, d, dtype=dtype, device=device, requires_grad=True)
    scale = 1.0 if via == "scores" else None
    out, ref, grads, ref_grads = _run(q, k, v, bias=bias, scale=scale, causal="bottom_right")
    scores = q.detach().double() @ k.detach().double().transpose(-1, -2)
    if via == "scores":
        assert scores.abs().max() > 3e3, "the test should reach scores of order 1e4"
    assert not out.isnan().any() and not ref.isnan().any()
    assert_close(out, ref, TOL[dtype])
    for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert not g.isnan().any() and not g.isinf().any(), name
        assert_close(g, rg, GRAD_TOL[dtype], name, GRAD_FLOOR)
    if via == "shift":
        no_shift = flash_mha.attention(q, k, v, causal="bottom_right")
        assert_close(out, no_shift, TOL[dtype], "softmax is shift invariant")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_bias_minus_inf(device, dtype):
    """-inf in the bias masks those scores; a row of -inf behaves like a fully masked row."""
    q = randn(2, 2, 6, 8, dtype=dtype, device=device, requires_grad=True)
    k = randn(2, 2, 10, 8, dtype=dtype, device=device, requires_grad=True)
    v = randn(2, 2, 10, 8, dtype=dtype, device=device, requires_grad=True)
    b0 = randn(2, 1, 6, 10, dtype=torch.float64)
    b0[torch.rand(b0.shape) < 0.3] = float("-inf")
    b0[..., 0] = 0.0
    b0[1, 0, 3] = float("-inf")  # a full row
    bias = b0.to(device, dtype).requires_grad_()
    out, ref, grads, ref_grads = _run(q, k, v, bias=bias)
    assert (out[1, :, 3] == 0).all()
    assert not out.isnan().any()
    assert_close(out, ref, TOL[dtype])
    for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert not g.isnan().any(), f"{name} has NaN"
        assert_close(g, rg, GRAD_TOL[dtype], name, GRAD_FLOOR)
    dbias = grads[3]
    assert (dbias[b0.to(device) == float("-inf")] == 0).all(), "dbias must be 0 where the bias is -inf"
    _, lse, _ = flash_mha.attention_fwd(q, k, v, bias=bias)
    assert torch.isinf(lse[1, :, 3]).all() and (lse[1, :, 3] > 0).all()


NONFINITE_CASES = ["nan_in_q", "nan_in_k", "nan_in_v", "nan_in_bias", "inf_in_bias", "nan_in_masked_key",
                   "nan_bias_row"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_nonfinite_inputs_propagate_like_reference(device, dtype, case):
    """NaN / +inf in an input: exactly the outputs that are NaN in the math definition are NaN
    (a NaN query row is NaN, not a row that "sees no key"); the other outputs are unaffected."""
    q = randn(1, 2, 5, 8, dtype=dtype, device=device)
    k = randn(1, 2, 7, 8, dtype=dtype, device=device)
    v = randn(1, 2, 7, 8, dtype=dtype, device=device)
    bias = randn(1, 1, 5, 7, dtype=dtype, device=device)
    mask = None
    nan, inf = float("nan"), float("inf")
    if case == "nan_in_q":
        q[0, 1, 2, 3] = nan
    elif case == "nan_in_k":
        k[0, 1, 2, 3] = nan
    elif case == "nan_in_v":
        v[0, 1, 2, 3] = nan
    elif case == "nan_in_bias":
        bias[0, 0, 3, 2] = nan
    elif case == "inf_in_bias":
        bias[0, 0, 4, 2] = inf
    elif case == "nan_in_masked_key":  # a masked score is -inf whatever k holds
        k[0, 1, 2, 3] = nan
        mask = torch.ones(5, 7, dtype=torch.bool, device=device)
        mask[:, 2] = False
    elif case == "nan_bias_row":
        bias[0, 0, 1] = nan
    out = flash_mha.attention(q, k, v, bias=bias, mask=mask)
    ref = reference.attention(q, k, v, bias=bias, mask=mask)
    ref_nan = ref.isnan()
    assert torch.equal(out.isnan().cpu(), ref_nan.cpu()), (
        f"NaN rows (b, h, i) differ: flash_mha {out.isnan().any(-1).nonzero().tolist()}, "
        f"reference {ref_nan.any(-1).nonzero().tolist()}")
    assert_close(out[~ref_nan], ref[~ref_nan], TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_all_equal_scores(device, dtype):
    """Equal scores give the mean of the visible values; gradients as the reference's."""
    q = torch.zeros(2, 2, 7, 16, dtype=dtype, device=device, requires_grad=True)
    k = randn(2, 1, 9, 16, dtype=dtype, device=device, requires_grad=True)
    v = randn(2, 1, 9, 8, dtype=dtype, device=device, requires_grad=True)
    out, ref, grads, ref_grads = _run(q, k, v, causal="bottom_right")
    assert_close(out, ref, TOL[dtype])
    last = out[:, :, -1]  # the last row sees every key
    assert_close(last, v.detach().double().mean(2).expand_as(last), TOL[dtype], "mean of values")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, GRAD_TOL[dtype], name, GRAD_FLOOR)
    # keys identical too: every score equal with random q
    q2 = randn(1, 2, 4, 16, dtype=dtype, device=device)
    k2 = randn(1, 2, 1, 16, dtype=dtype, device=device).expand(1, 2, 6, 16)
    v2 = randn(1, 2, 6, 8, dtype=dtype, device=device)
    out2 = flash_mha.attention(q2, k2, v2)
    assert_close(out2, v2.double().mean(2, keepdim=True).expand(1, 2, 4, 8), TOL[dtype], "identical keys")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_zero_length_keys(device, dtype, dropout_p):
    q = randn(2, 4, 5, 8, dtype=dtype, device=device, requires_grad=True)
    k = randn(2, 2, 0, 8, dtype=dtype, device=device, requires_grad=True)
    v = randn(2, 2, 0, 6, dtype=dtype, device=device, requires_grad=True)
    bias = randn(1, 4, 5, 0, dtype=dtype, device=device, requires_grad=True)
    out, lse, _ = flash_mha.attention_fwd(q, k, v, bias=bias, causal="bottom_right", dropout_p=dropout_p)
    assert out.shape == (2, 4, 5, 6) and (out == 0).all()
    assert torch.isinf(lse).all() and (lse > 0).all()
    dq, dk, dv, db = torch.autograd.grad(out, (q, k, v, bias), torch.randn_like(out))
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape and db.shape == bias.shape
