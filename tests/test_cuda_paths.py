"""Each CUDA kernel family, forced with flash_mha.force_kernel, against the float64 reference.

The default dispatch picks one family per call (sm90 on Hopper, else sm80, else SIMT), so a
family that is not the default on the test card would otherwise go untested there. A forced family
that does not take a call falls back down the chain, so every case below must pass on every path.
The GPU tests are skipped without CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

import flash_mha
from conftest import (GRAD_FLOOR, GRAD_TOL, TOL, as_double_leaf, assert_close, check_both, deterministic_algorithms,
                      randn, rel_err, run_both)
from flash_mha import reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PATHS = ["auto", "simt", "sm80", "sm90"]
HALF = [torch.float16, torch.bfloat16]
# The tensor-core dtypes: float32 runs on the sm80 kernels as 3xTF32 (sm90 falls back to them), to
# float32's tolerance (conftest.TOL: 1e-5, which tf32 alone misses by two orders of magnitude).
TC_DTYPES = HALF + [torch.float32]


@needs_cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 256, 256), (1, 8, 2, 1000, 777), (2, 4, 1, 130, 515), (1, 2, 2, 1, 64)],
                         ids=lambda s: "b{}h{}kv{}q{}k{}".format(*s))
def test_forced_path_matches_reference(path, dtype, d, causal, shape):
    b, h, h_kv, n_q, n_k = shape
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    with flash_mha.force_kernel(path):
        res = run_both(q, k, v, causal=causal)
    check_both(res, dtype)


@needs_cuda
@pytest.mark.parametrize("path", PATHS)
def test_forced_path_strided_views_and_lse(path):
    """q/k/v as views of one fused projection (row stride 3 * h * d), and the log-sum-exp."""
    b, n, h, d = 2, 300, 4, 64
    qkv = randn(b, n, 3, h, d, dtype=torch.bfloat16, device="cuda")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    with flash_mha.force_kernel(path):
        out, lse, _ = flash_mha.attention_fwd(q, k, v, causal="top_left")
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / d ** 0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.softmax(s, -1) @ v.double()
    assert (out.double() - ref).norm() / ref.norm() < 3e-2
    assert (lse.double() - ref_lse).abs().max() < 2e-2


# Forward configurations the default dispatch picks at d = 128 on Hopper (sm90_fwd.cu dispatch_dim),
# with the traits the profiler must see there: <dtype, d, key tile, consumers, ping-pong, ...>.
# (causal, n_q, n_k, key-padding mask, traits)
FWD_CONFIGS = {
    "wide_key_tile": (None, 300, 4500, False, ", 128, 176, 2, false, true"),  # non-causal, n_k > 4096
    # A key mask keeps the 128 tile (the 176 tile has no key-mask bits).
    "wide_key_tile_masked": (None, 300, 4500, True, ", 128, 128, 2, false, true"),
    "causal_pingpong": ("bottom_right", 700, 900, False, ", 128, 128, 2, true, true"),  # causal, n_q <= 1k
    "pingpong": (None, 700, 900, False, ", 128, 128, 2, true, true"),  # non-causal, n_q and n_k <= 1k
    "plain": (None, 1100, 900, False, ", 128, 128, 2, false, true"),
    "plain_long_keys": (None, 700, 1100, False, ", 128, 128, 2, false, true"),
}


@needs_cuda
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("config", list(FWD_CONFIGS))
@pytest.mark.parametrize("layout", ["bhnd", "fused"])
def test_default_forward_configs_d128(dtype, config, layout):
    """Each d = 128 forward configuration of the default dispatch against the reference (GQA, a key
    length that is no multiple of the key tile, views of a fused projection, a key-padding mask), and
    on a compute capability 9.0 card the profiler must see the configuration that was meant to run."""
    causal, n_q, n_k, key_padding, traits = FWD_CONFIGS[config]
    b, h, h_kv, d = 2, 4, 2, 128

    def make(heads, n):
        if layout == "bhnd":
            return randn(b, heads, n, d, dtype=dtype, device="cuda", requires_grad=True)
        x = randn(b, n, 3, heads, d, dtype=dtype, device="cuda")[:, :, 1].transpose(1, 2)
        return x.requires_grad_()

    q, k, v = make(h, n_q), make(h_kv, n_k), make(h_kv, n_k)
    mask = None
    if key_padding:
        mask = torch.rand(b, 1, 1, n_k, device="cuda") > 0.3
        mask[..., :1] = True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = run_both(q, k, v, mask=mask, causal=causal)
        torch.cuda.synchronize()
    check_both(res, dtype)
    if torch.cuda.get_device_capability() == (9, 0) and os.environ.get("FLASH_MHA_DISABLE_SM90") != "1":
        fwd = [e.name for e in prof.events() if "sm90_fwd_kernel" in e.name]
        assert fwd and all(traits in name for name in fwd), fwd


def _smem_optin():
    """Shared memory a block may opt in to on device 0."""
    props = torch.cuda.get_device_properties(0)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if smem is None:  # a torch without the field: sm_90 / sm_100 parts have 227 KiB
        smem = 232_448 if props.major in (9, 10) else 0
    return smem


# The float32 backward at d > 64 needs 213,504 bytes of shared memory per block (sm_90); devices
# with less run it on the SIMT kernels (sm80_bwd_supported).
F32_WIDE_BWD_SMEM = 213_504


@needs_cuda
@pytest.mark.parametrize("d", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_float32_runs_on_tensor_cores(d, causal):
    """float32 on the default path runs the sm80 kernels (3xTF32: tf32 tensor cores, each product as
    three) forward and backward, to float32's tolerance against the float64 reference, head dims
    padded to 64 / 128 included."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tensor-core path needs sm_80+")
    tc_bwd = d <= 64 or _smem_optin() >= F32_WIDE_BWD_SMEM
    b, h, h_kv, n_q, n_k = 2, 4, 2, 300, 283
    q = randn(b, h, n_q, d, dtype=torch.float32, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=torch.float32, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=torch.float32, device="cuda", requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = run_both(q, k, v, causal=causal)
        torch.cuda.synchronize()
    check_both(res, torch.float32)
    kernels = " ".join(e.name for e in prof.events())
    assert "sm80_fwd_kernel<float" in kernels and "simt_fwd_kernel" not in kernels, kernels[:500]
    if tc_bwd:
        assert "sm80_bwd_kernel<float" in kernels and "simt_dkdv_kernel" not in kernels, kernels[:500]
    else:
        assert "simt_dkdv_kernel" in kernels


@needs_cuda
def test_float32_wide_head_dim_stays_on_simt():
    """Head dims over 128 in float32 run on the SIMT kernels, forward and backward."""
    q, k, v = (randn(1, 2, 70, 160, dtype=torch.float32, device="cuda", requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = run_both(q, k, v)
        torch.cuda.synchronize()
    check_both(res, torch.float32)
    kernels = " ".join(e.name for e in prof.events())
    assert "sm80_fwd_kernel" not in kernels and "simt_fwd_kernel" in kernels
    assert "sm80_bwd_kernel" not in kernels and "simt_dkdv_kernel" in kernels


# The sm80 kernels' native head dims (16-bit): (d, d_v) -> the columns (kDn) the plain / key-mask
# forward and backward kernels must run over.
NATIVE_DIMS = {
    "d32": (32, 32, 32, 32),
    "d24_dv32": (24, 32, 32, 32),
    "d96": (96, 96, 96, 96),
    "d72_dv88": (72, 88, 96, 96),
    "d40_dv96": (40, 96, 96, 96),
    "d160": (160, 160, 160, 192),
    "d192_dv176": (192, 176, 192, 192),
    "d136": (136, 136, 160, 192),
    "d256": (256, 256, 256, 256),
    "d200_dv256": (200, 256, 256, 256),
}


def _native_cols(names, traits):
    """kDn of every `traits<...>` in the kernel names: FwdTraits<T, kD, wide, kDn>, BwdTraits<T, kD,
    key m-tiles, split, kDn, stages>."""
    import re
    at = {"FwdTraits": 3, "BwdTraits": 4}[traits]
    return {int(m.split(", ")[at]) for n in names for m in re.findall(traits + r"<([^<>]*)>", n)}


@needs_cuda
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("dims", list(NATIVE_DIMS))
@pytest.mark.parametrize("causal", [None, "bottom_right"])
@pytest.mark.parametrize("key_padding", [False, True])
def test_sm80_native_head_dims(dtype, dims, causal, key_padding):
    """Head dims between the tile widths (32, 96, 160, 192 and the multiples of 8 below them) run on
    the sm80 plain / key-mask kernels with that many columns, not padded to 64 / 128 / 256, forward and
    backward (the backward over 128 on the split kernels, with 192 or 256 columns) (GQA, lengths off
    the tiles, d != d_v), against the reference."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tensor-core path needs sm_80+")
    d, dv, fwd_cols, bwd_cols = NATIVE_DIMS[dims]
    b, h, h_kv, n_q, n_k = 2, 4, 2, 333, 304  # n_k % 16 == 0: the key-mask kernels take the padding
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, dv, dtype=dtype, device="cuda", requires_grad=True)
    mask = None
    if key_padding:
        mask = (torch.arange(n_k, device="cuda") < torch.tensor([200, 304], device="cuda")[:, None]).view(b, 1, 1, n_k)
    with flash_mha.force_kernel("sm80"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = run_both(q, k, v, mask=mask, causal=causal)
        torch.cuda.synchronize()
    check_both(res, dtype)
    names = [e.name for e in prof.events()]
    assert _native_cols([n for n in names if "sm80_fwd_kernel" in n], "FwdTraits") == {fwd_cols}, names
    bwd = [n for n in names if "sm80_bwd_kernel" in n]
    if max(d, dv) > 128 and _smem_optin() < 148_480:  # the d > 128 backward needs 145 KiB (one stage)
        assert not bwd and any("simt_dkdv_kernel" in n for n in names)
    else:
        assert _native_cols(bwd, "BwdTraits") == {bwd_cols}, bwd


# An A100's shared memory a block may opt in to (163 KiB).
A100_SMEM = 166_912
_A100_SCRIPT = """
import re, sys
import torch
import flash_mha
sys.path.insert(0, {tests!r})
from conftest import check_both, randn, run_both

torch.manual_seed(0)
names = []
for dtype in (torch.float16, torch.bfloat16):
    for d, dv, causal, pad in [(256, 256, None, False), (160, 160, "bottom_right", False),
                               (200, 256, "top_left", True), (128, 128, None, True), (96, 96, "bottom_right", False),
                               (256, 256, "bottom_right", "bias")]:
        q = randn(2, 4, 333, d, dtype=dtype, device="cuda", requires_grad=True)
        k = randn(2, 2, 304, d, dtype=dtype, device="cuda", requires_grad=True)
        v = randn(2, 2, 304, dv, dtype=dtype, device="cuda", requires_grad=True)
        mask = bias = None
        if pad:
            mask = (torch.arange(304, device="cuda") < torch.tensor([200, 304], device="cuda")[:, None]).view(2, 1, 1, 304)
        if pad == "bias":  # the general kernel, bias and mask staged beside the one Q / dO stage
            bias = randn(2, 4, 333, 304, dtype=dtype, device="cuda", requires_grad=True)
        with flash_mha.force_kernel("sm80"), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            res = run_both(q, k, v, bias=bias, mask=mask, causal=causal)
            torch.cuda.synchronize()
        check_both(res, dtype)
        names += [e.name for e in prof.events() if "sm80_" in e.name]
stages = [int(m) for n in names for m in re.findall(r"BwdTraits<[^<>]*, 256, 1, true, \\d+, (\\d)>", n)]
assert stages and set(stages) == {{1}}, names
assert any(re.search(r"BwdTraits<[^<>]*, 256, 1, true, 256, 1>, true, true, false(, false)*>", n) for n in names), names
assert not any(re.search(r"FwdTraits<[^<>]*, 128, true", n) for n in names), names
print("ok", len(names))
"""


@needs_cuda
def test_sm80_tiles_chosen_for_an_a100():
    """With FLASH_MHA_SMEM_LIMIT at an A100's 163 KiB (a fresh process: the limit is read once) the
    sm80 kernels take the tiles they take on an A100: the backward above head dim 128 with one Q / dO
    stage (145 KiB instead of 209; the general one with its bias / mask tiles beside it), the d = 128
    forward without its 64-key tiles; native and padded head dims, causal, a key mask, a bias with its
    gradient, GQA, against the reference."""
    if torch.cuda.get_device_capability() < (8, 0) or _smem_optin() < A100_SMEM:
        pytest.skip("needs an sm_80+ card with at least an A100's shared memory")
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FLASH_MHA_SMEM_LIMIT=str(A100_SMEM))
    r = subprocess.run([sys.executable, "-c", _A100_SCRIPT.format(tests=tests)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.stdout + r.stderr)[-3000:]


# Above head dim 128 the sm80 general backward (bias, its gradient, dropout, any mask, a scale it cannot
# fold) runs on the split kernel with 256 columns and one Q / dO stage, the bias / mask staged in shared
# memory where their rows allow it. name: (n_k, bias dims, mask dims, dropout_p, scale, staged)
GENERAL_OVER_128 = {
    "full-bias": (256, "bhqk", None, 0.0, None, True),
    "head-bias+keypad": (256, "1hqk", "b11k", 0.0, None, True),
    "row-bias+full-mask": (256, "b11k", "bhqk", 0.0, None, True),
    "query-mask": (256, None, "b1qk", 0.0, None, True),
    "bias+mask per element (nk 250)": (250, "1hqk", "b1qk", 0.0, None, False),
    "bias bh1k (atomic dbias, 4-byte chunks)": (250, "bh1k", None, 0.0, None, True),
    "dropout": (333, None, None, 0.15, None, False),
    "dropout+keypad+full-bias": (256, "bhqk", "b11k", 0.15, None, True),
    "scale 0": (250, None, None, 0.0, 0.0, False),
}


@needs_cuda
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("d", [160, 256])
@pytest.mark.parametrize("causal", [None, "bottom_right"])
@pytest.mark.parametrize("case", list(GENERAL_OVER_128))
def test_sm80_general_backward_over_128(dtype, d, causal, case):
    """The bias / mask / dropout backward above head dim 128 runs on the sm80 tensor-core kernel (split
    layout, two key m-tiles per warp, a query slice each), staged or per element as the layout allows,
    never on SIMT; out and every gradient (dbias: written once, or added with atomics where broadcast)
    against the reference, the dropout mask replayed from the forward's rng_state."""
    if torch.cuda.get_device_capability() < (8, 0) or _smem_optin() < 148_480:
        pytest.skip("the d > 128 tensor-core backward needs sm_80+ and 145 KiB of shared memory")
    import re
    n_k, bias_dims, mask_dims, p_drop, scale, staged = GENERAL_OVER_128[case]
    b, h, h_kv, n_q = 2, 4, 2, 200
    full = {"b": b, "h": h, "q": n_q, "k": n_k}
    shape = lambda dims: tuple(full[c] if c in "bhqk" else 1 for c in dims)  # noqa: E731
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = randn(*shape(bias_dims), dtype=dtype, device="cuda", requires_grad=True) if bias_dims else None
    mask = None
    if mask_dims:
        mask = torch.rand(shape(mask_dims), device="cuda") > 0.3
        mask[..., :1] = True  # no row without a visible key under bottom-right causal
    with flash_mha.force_kernel("sm80"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        if p_drop:
            out, _, rng = flash_mha.attention_fwd(q, k, v, bias, mask, scale, causal, p_drop)
            dout = torch.randn_like(out)
            inputs = [t for t in (q, k, v, bias) if t is not None]
            grads = torch.autograd.grad(out, inputs, dout)
        else:
            res = run_both(q, k, v, bias=bias, mask=mask, scale=scale, causal=causal)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    flags = [m for n in names
             for m in re.findall(r"sm80_bwd_kernel<.*BwdTraits<[^<>]*>, (\w+), (\w+), \w+(?:, \w+)*>", n)]
    assert flags and set(flags) == {("true", "true" if staged else "false")}, names
    assert not any("simt_dkdv_kernel" in n for n in names), names
    if p_drop:
        leaves = [as_double_leaf(t) for t in inputs]
        q64, k64, v64 = leaves[:3]
        bias64 = leaves[3] if bias is not None else None
        ref = reference.attention(q64, k64, v64, bias=bias64, mask=mask, scale=scale, causal=causal,
                                  dropout_p=p_drop, rng_state=rng)
        assert_close(out, ref, TOL[dtype])
        ref_grads = torch.autograd.grad(ref, leaves, dout.double())
        for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
            assert_close(g, rg, GRAD_TOL[dtype], name, GRAD_FLOOR)
    else:
        check_both(res, dtype)


def _bias_mask_inputs(dtype, d, n_q, n_k, bias_dims, mask_dims, view_offset):
    """q, k, v (2 batches, 4 query heads over 2 kv heads) and a bias / mask of the given dims ("bhqk":
    full there, 1 elsewhere; None: none), requiring grad but the mask. view_offset > 0: the bias is a
    view at that element offset of rows of n_k + 24 (a query stride != n_k). Every mask row keeps key
    0 visible (no row without one under bottom-right causal)."""
    b, h, h_kv = 2, 4, 2
    full = {"b": b, "h": h, "q": n_q, "k": n_k}
    shape = lambda dims: tuple(full[c] if c in "bhqk" else 1 for c in dims)  # noqa: E731
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = mask = None
    if bias_dims:
        s = shape(bias_dims)
        if view_offset:
            bias = randn(*s[:-1], n_k + 24, dtype=dtype, device="cuda")[..., view_offset:view_offset + n_k]
            bias = bias.detach().requires_grad_(True)
        else:
            bias = randn(*s, dtype=dtype, device="cuda", requires_grad=True)
    if mask_dims:
        mask = torch.rand(shape(mask_dims), device="cuda") > 0.3
        mask[..., :1] = True
    return q, k, v, bias, mask


# Bias / mask rows 4-byte but not 16-byte aligned: staged by the kChunks4 kernels (kSm80StageChunks4,
# 16-bit), not read per element. name: (n_k, bias dims, mask dims, bias as a view at this element
# offset of rows of n_k + 24 (0: a tensor of its own)), whether the float32 forward stages it (no
# kChunks4 kernels: 16-byte chunks or none).
CHUNKS4_CASES = {
    "bias nk 300": ((300, "bhqk", None, 0), True),
    "head bias + query mask nk 300": ((300, "1hqk", "b1qk", 0), False),
    "head bias + key padding nk 1004": ((1004, "1hqk", "b11k", 0), False),
    "bias view at offset 2": ((256, "11qk", None, 2), False),
}


@needs_cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128, 160])
@pytest.mark.parametrize("case", list(CHUNKS4_CASES))
def test_sm80_staged_4byte_chunks(dtype, d, case):
    """A bias / mask whose rows are 4-byte but not 16-byte aligned (n_k = 300: 600-byte bias rows,
    300-byte mask rows; a bias view 4 bytes off a 16-byte boundary) is staged in shared memory by the
    kChunks4 kernels, forward and backward (16-bit; float32 has none); out and every gradient against
    the reference. The kernel choice is asserted on cards with an H100's shared memory (elsewhere the
    staged tiles may not fit beside the backward's, which then reads them per element)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the tensor-core kernels need sm_80+")
    if d > 128 and (dtype == torch.float32 or _smem_optin() < 148_480):
        pytest.skip("float32 tops out at head dim 128; the d > 128 backward needs 145 KiB of shared memory")
    import re
    inputs, f32_staged = CHUNKS4_CASES[case]
    q, k, v, bias, mask = _bias_mask_inputs(dtype, d, 150, *inputs)
    with flash_mha.force_kernel("sm80"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = run_both(q, k, v, bias=bias, mask=mask)
        torch.cuda.synchronize()
    check_both(res, dtype)
    names = [e.name for e in prof.events()]
    fwd = [m for n in names for m in re.findall(r"sm80_fwd_kernel<[^<>]*FwdTraits<[^<>]*>((?:, \w+)*)>", n)]
    bwd = [m for n in names for m in re.findall(r"sm80_bwd_kernel<[^<>]*BwdTraits<[^<>]*>((?:, \w+)*)>", n)]
    if _smem_optin() < 232_448:
        return
    if dtype == torch.float32:  # no kChunks4 kernels: 16-byte chunks where they fit, else per element
        want = ", true, true" if f32_staged else ", true, false"
        assert fwd and set(fwd) == {want + ", false, false, false"}, names
        assert bwd and (f32_staged or all(f.startswith(", true, false,") for f in bwd)), names
    else:
        assert fwd and set(fwd) == {", true, true, false, false, true"}, names
        # the general form, or its bias-only / fragment-walk twin (kSm80BwdChunks4BiasForms)
        assert bwd and all(f.startswith(", true, true, false, false,") and f.endswith(", true") for f in bwd), names


def test_force_kernel_rejects_unknown_path():
    with pytest.raises(ValueError, match="kernel path"):
        with flash_mha.force_kernel("sm70"):
            pass


@needs_cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_forced_path_nan_propagates_like_reference(path, d, where):
    """A NaN in q (one row), k (one key: every row that sees it) or v (one key, one column) makes
    exactly the outputs NaN that are NaN in the math definition, on every kernel family.
    Non-causal: a NaN in v of a key a row cannot see would poison it tile-dependently on every
    GPU path (P = 0 times NaN), which the math definition does not do."""
    b, h, n_q, n_k = 1, 2, 150, 200
    q = randn(b, h, n_q, d, dtype=torch.bfloat16, device="cuda")
    k = randn(b, h, n_k, d, dtype=torch.bfloat16, device="cuda")
    v = randn(b, h, n_k, d, dtype=torch.bfloat16, device="cuda")
    {"q": q, "k": k, "v": v}[where][0, 1, 7, 5] = float("nan")
    with flash_mha.force_kernel(path):
        out = flash_mha.attention(q, k, v)
    ref = flash_mha.reference.attention(q.double(), k.double(), v.double())
    assert torch.equal(out.isnan(), ref.isnan()), (
        f"NaN pattern differs: {int(out.isnan().sum())} NaN outputs vs {int(ref.isnan().sum())} in the reference")
    ok = ~ref.isnan()
    assert (out.double()[ok] - ref[ok]).norm() / ref[ok].norm() < 3e-2


# The sm80 forward stages a bias / mask in shared memory when its rows come in whole 16-byte chunks
# (unit key stride, n_k and the other strides multiples of 8 elements for the bias, 16 for the
# mask), or 4-byte ones (16-bit: the kChunks4 kernels); otherwise it reads them per element. Every
# way, with every broadcast that matters. The
# sm90 general forward (kSm90FwdGeneral) reads a bias pair as one word where the row is contiguous,
# the query stride even and the slice 4-byte aligned, else per element ("odd-offset bias view":
# odd query stride and base, odd n_k); with that flag off, forced sm90 falls back to sm80.
STAGED_CONFIGS = {
    # name: (n_k, bias shape or None, mask shape or None, bias as a view at this element offset of
    # rows of n_k + 24 (0: a tensor of its own))
    "full-bias": (256, "bhqk", None, 0),
    "head-bias+keypad": (256, "1hqk", "b11k", 0),
    "row-bias+full-mask": (256, "b11k", "bhqk", 0),
    "bias-view": (256, "11qk", None, 8),
    "nk%16!=0 (4-byte chunks, for the mask rows)": (264, "bhqk", "b11k", 0),
    "nk=250 (per element)": (250, "1hqk", "b1qk", 0),
    "odd-offset bias view, odd nk": (251, "bhqk", None, 1),
}


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm90", "sm80"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "bottom_right"])
@pytest.mark.parametrize("config", list(STAGED_CONFIGS), ids=str)
def test_bias_and_mask_staged_or_not(path, dtype, d, causal, config):
    q, k, v, bias, mask = _bias_mask_inputs(dtype, d, 200, *STAGED_CONFIGS[config])
    with flash_mha.force_kernel(path):
        res = run_both(q, k, v, bias=bias, mask=mask, causal=causal)
    check_both(res, dtype)


# Masks that hide whole tiles: the sm80 kernels skip a warp's key tile (forward) or key rows
# (backward) that a staged mask hides entirely, and a block its dQ step; the result must not change.
SKIP_MASKS = ["padding", "head-padding", "block-sparse", "padding+full-bias", "block-sparse+head-bias"]


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm80"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "bottom_right"])
@pytest.mark.parametrize("kind", SKIP_MASKS)
def test_masked_tiles_skipped_exactly(path, dtype, d, causal, kind):
    b, h, h_kv, n_q, n_k = 2, 4, 2, 300, 512
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    if kind.startswith("padding"):  # batch 1 sees 64 keys: most of its key tiles are hidden
        lengths = torch.tensor([300, 64], device="cuda")
        mask = (torch.arange(n_k, device="cuda") < lengths[:, None]).view(b, 1, 1, n_k)
    elif kind == "head-padding":  # a key mask per (batch, head): lengths 1 .. n_k, one head all hidden
        lengths = torch.randint(1, n_k + 1, (b, h), device="cuda")
        lengths[1, 2] = 0
        mask = (torch.arange(n_k, device="cuda") < lengths[..., None]).view(b, h, 1, n_k)
    else:  # 32 x 32 blocks on or off, per (batch, head): whole warp tiles hidden
        blocks = torch.rand(b, h, (n_q + 31) // 32, n_k // 32, device="cuda") > 0.5
        mask = blocks.repeat_interleave(32, 2).repeat_interleave(32, 3)[:, :, :n_q].contiguous()
    bias = None
    if "bias" in kind:
        dims = (b, h, n_q, n_k) if "full" in kind else (1, h, n_q, n_k)
        bias = randn(*dims, dtype=dtype, device="cuda", requires_grad=True)
    with flash_mha.force_kernel(path):
        res = run_both(q, k, v, bias=bias, mask=mask, causal=causal)
    check_both(res, dtype)
    if kind.startswith("padding"):  # hidden keys get exactly no gradient
        off = ~mask.reshape(b, n_k)
        for name in ("dk", "dv"):
            assert res["grads"][name].permute(0, 2, 1, 3)[off].abs().max() == 0, f"{name} of hidden keys"
    if "full-bias" in kind:  # and hidden scores exactly none
        assert res["grads"]["dbias"].masked_select(~mask.expand(b, h, n_q, n_k)).abs().max() == 0


@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_bias_ring_over_many_tiles(d, causal):
    """More query tiles than SMs and several key tiles each: the Hopper forward's persistent blocks
    walk several tiles, and the bias tiles it stages in shared memory go round their ring (one stage
    at d = 128, two at d = 64) many times; a stale or early read would show in the output."""
    dtype = torch.bfloat16
    b, h, n_q, n_k = 4, 8, 520, 648
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, 2, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, 2, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = (4 * randn(1, h, n_q, n_k, dtype=torch.float32, device="cuda")).to(dtype).requires_grad_(True)
    with flash_mha.force_kernel("sm90"):
        res = run_both(q, k, v, bias=bias, causal=causal)
    check_both(res, dtype)


@needs_cuda
@pytest.mark.parametrize("causal", [None, "top_left"])
@pytest.mark.parametrize("kind", ["head-bias+keypad", "full-bias"])
def test_bias_forward_three_warpgroups(causal, kind):
    """d = 64 with a bias and n_q past 2048: the Hopper forward's bias kernel with 3 consumer
    warpgroups in ping-pong (192-row tiles, kFwdBias3WG), more units than SMs, a ragged last tile
    and key tile, and the bias ring reused across units."""
    dtype, d = torch.bfloat16, 64
    b, h, h_kv, n_q, n_k = 4, 8, 2, 2500, 700
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    dims = (1, h, n_q, n_k) if kind.startswith("head") else (b, h, n_q, n_k)
    bias = (2 * randn(*dims, dtype=torch.float32, device="cuda")).to(dtype).requires_grad_(True)
    mask = None
    if "keypad" in kind:
        lengths = torch.tensor([700, 333, 64, 1], device="cuda")
        mask = (torch.arange(n_k, device="cuda") < lengths[:, None]).view(b, 1, 1, n_k)
    with flash_mha.force_kernel("sm90"):
        res = run_both(q, k, v, bias=bias, mask=mask, causal=causal)
    check_both(res, dtype)


@needs_cuda
@pytest.mark.parametrize("case", ["nq1000", "nq1030", "nq50", "causal-nq2500", "bias-nq2200"])
def test_last_query_tile_with_idle_warpgroups(case):
    """d = 64 on the Hopper forward's 3-warpgroup kernels (192-row query tiles): in the short last
    tile of each head, one or two consumer warpgroups have no row below n_q (1000: two; 1030: one;
    50: two in the only tile; 2500 causal: two, in a pair with a full tile; 2200 with a bias: one).
    Their rows must not be stored, and the tile's last P V carried into the next tile must not mix
    them in. More units than SMs, so every block walks full and short tiles in turn. (Written for
    a trial that let the idle warpgroups skip their GEMMs; NOTES.md, 2026-11-29 11:35.)"""
    dtype, d, h, h_kv = torch.bfloat16, 64, 8, 2
    n_q = int(case.rsplit("nq", 1)[1])
    b = 4 if n_q >= 1000 else 64
    n_k = 700
    causal = "top_left" if case.startswith("causal") else None
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = mask = None
    if case.startswith("bias"):
        bias = (2 * randn(1, h, n_q, n_k, dtype=torch.float32, device="cuda")).to(dtype)
        lengths = torch.tensor([700, 333, 64, 1], device="cuda")
        mask = (torch.arange(n_k, device="cuda") < lengths[:, None]).view(b, 1, 1, n_k)
    with flash_mha.force_kernel("sm90"):
        res = run_both(q, k, v, bias=bias, mask=mask, causal=causal)
    check_both(res, dtype)


@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_q", [1000, 4100], ids=lambda n: f"nq{n}")
def test_empty_query_tiles_between_busy_ones(d, n_q):
    """Bottom-right causal with n_q >> n_k: the first n_q - n_k rows see no key, so many query tiles
    see nothing. The Hopper forward's persistent blocks walk more units than there are SMs (each a
    pair of a busy and an often empty tile) and carry a tile's last P V into their next tile; an
    empty tile in between must write zeros and lse = +inf without disturbing it. n_q = 4100 at
    d = 64 takes the 3-warpgroup ping-pong kernel, whose turn barriers must stay balanced."""
    dtype = torch.bfloat16
    b, h, n_k = 4, 16, 300  # 256 to 1,088 work units: more than the SMs
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    with flash_mha.force_kernel("sm90"):
        out, lse, _ = flash_mha.attention_fwd(q, k, v, causal="bottom_right")
        res = run_both(q, k, v, causal="bottom_right")
    blind = n_q - n_k  # rows that see no key
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.isinf(lse[:, :, :blind]).all() and (lse[:, :, :blind] > 0).all()
    assert torch.isfinite(out[:, :, blind:]).all() and torch.isfinite(lse[:, :, blind:]).all()
    check_both(res, dtype)
    # The rows that do see keys, on their own (the zero rows would dilute a norm-wise error).
    assert_close(res["out"][:, :, blind:], res["ref"][:, :, blind:], TOL[dtype], "output of the seeing rows")


@needs_cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_size1_dims_with_odd_strides(path, d, causal):
    """A single query of one batch and head whose size-1 dims carry odd strides (any stride is legal
    there): ops.cpp gives those dims regular strides, so every family may take the call."""
    dtype = torch.bfloat16
    q = torch.empty(4 * d, dtype=dtype, device="cuda").as_strided((1, 1, 1, d), (7, 5, 3, 1))
    q.copy_(randn(1, 1, 1, d, dtype=dtype, device="cuda"))
    q.requires_grad_(True)
    k = randn(1, 1, 300, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(1, 1, 300, d, dtype=dtype, device="cuda", requires_grad=True)
    with flash_mha.force_kernel(path):
        res = run_both(q, k, v, causal=causal)
    check_both(res, dtype)


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm90", "sm80"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bias_dims", ["bhqk", "1hqk", "b1qk", "11qk", "bh1k", "bhq1", "1h11"])
def test_tensor_core_bias_gradient_every_broadcast(path, dtype, d, bias_dims):
    """dbias of a float16 / bfloat16 / float32 bias with every kind of broadcast (reduced over the broadcast
    dims): elements reached by one thread, or by many blocks / threads (the sm80 backward adds those
    with atomics when kAtomicSharedDbias is on, else they take the SIMT backward)."""
    b, h, h_kv, n_q, n_k = 2, 4, 2, 130, 200
    full = {"b": b, "h": h, "q": n_q, "k": n_k}
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = randn(*(full[c] if c in full else 1 for c in bias_dims), dtype=dtype, device="cuda", requires_grad=True)
    with flash_mha.force_kernel(path):
        res = run_both(q, k, v, bias=bias, causal="top_left")
    assert res["grads"]["dbias"].shape == bias.shape
    check_both(res, dtype)


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm80"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bias_dims", ["11qk", "111k"])
def test_broadcast_dbias_long_sum_accuracy(path, dtype, d, bias_dims):
    """A 16-bit dbias summed over the batch, heads (and queries): up to b h n_q = 16,384 terms per
    element, added in float by atomics. Its error against the float64 reference, relative to the
    reduced dbias itself (not to the unreduced dS, as check_both's floor allows), stays within 2.5x
    that of rounding the exact sum to the dtype once (the sm80 backward adds 16-bit dS terms: ~1.4x)."""
    b, h, n_q, n_k = 4, 8, 512, 256
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    shape = (1, 1, n_q if bias_dims == "11qk" else 1, n_k)
    bias = randn(*shape, dtype=dtype, device="cuda", requires_grad=True)
    with flash_mha.force_kernel(path):
        res = run_both(q, k, v, bias=bias)
    ref = res["ref_grads"]["dbias"]
    floor = rel_err(ref.to(dtype), ref)
    assert rel_err(res["grads"]["dbias"], ref) < 2.5 * floor


# Key masks (constant along the queries: key padding) run on the Hopper kernels as well; every other
# mask shape on sm80. name: (mask shape letters, how to build it)
KEY_MASKS = ["b11k", "1h1k", "bh1k", "b11k key-stride view", "b11k offset view", "b11k aligned rows",
             "b11k padding suffix", "b11k one batch all masked", "b1qk (not a key mask)"]


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm80"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-46, 1e-4])
@pytest.mark.parametrize("key_padding", [False, True], ids=["plain", "key_padding"])
def test_any_scale(path, dtype, d, scale, key_padding):
    """Scales the plain kernels' softmax cannot take (it takes the row maximum of the raw scores and
    scales it after: scale > 0, and not 0 once rounded to float, 1e-46) and a tiny one, without and
    with a key-padding mask, against the reference: a negative scale makes the smallest raw score
    the heaviest."""
    b, h, n_q, n_k = 2, 2, 150, 272
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    mask = None
    if key_padding:
        mask = (torch.arange(n_k, device="cuda") < torch.tensor([200, 48], device="cuda")[:, None]).view(b, 1, 1, n_k)
    with flash_mha.force_kernel(path):
        res = run_both(q, k, v, mask=mask, scale=scale, causal="top_left")
    check_both(res, dtype)


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm90", "sm80"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("kind", KEY_MASKS)
def test_key_mask(path, dtype, d, causal, kind):
    """Forward and backward with a boolean key mask (GQA, n_q and n_k off the tile sizes), against
    the reference: masked keys get no weight and no gradient; rows with no visible key give zeros."""
    b, h, h_kv, n_q, n_k = 2, 4, 2, 200, 333
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    dims = kind.split()[0]
    full = {"b": b, "h": h, "q": n_q, "k": n_k}
    shape = tuple(full[c] if c in full else 1 for c in dims)
    if "key-stride" in kind:  # every other key of a wider mask: key stride 2
        mask = (torch.rand(*shape[:-1], 2 * n_k, device="cuda") > 0.3)[..., ::2]
    elif "offset" in kind:  # rows starting one byte into a wider mask: not 4-byte aligned
        mask = (torch.rand(*shape[:-1], n_k + 5, device="cuda") > 0.3)[..., 1:n_k + 1]
    elif "aligned" in kind:  # every row starts 4-byte aligned (row stride 336), n_k still odd
        mask = (torch.rand(*shape[:-1], n_k + 3, device="cuda") > 0.3)[..., :n_k]
    elif "suffix" in kind:  # padding: the last keys of each batch masked, different lengths
        lengths = torch.tensor([250, 70], device="cuda")
        mask = (torch.arange(n_k, device="cuda") < lengths[:, None]).view(b, 1, 1, n_k)
    else:
        mask = torch.rand(shape, device="cuda") > 0.3
        mask[..., :1] = True  # key 0 visible: every row sees a key under both causal alignments
        if "all masked" in kind:
            mask[1] = False
    with flash_mha.force_kernel(path):
        res = run_both(q, k, v, mask=mask, causal=causal)
    check_both(res, dtype)
    if dims == "b11k":  # a key masked for a batch gets exactly no gradient (element-wise, not a norm)
        off = ~mask.reshape(b, n_k)
        for name in ("dk", "dv"):
            g = res["grads"][name].permute(0, 2, 1, 3)  # [b, n_k, h_kv, d]
            if off.any():
                assert g[off].abs().max() == 0, f"{name} of masked keys is not zero"
    if "all masked" in kind:
        assert res["out"][1].abs().max() == 0 and res["grads"]["dq"][1].abs().max() == 0


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm90", "sm80"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "bottom_right"])
@pytest.mark.parametrize("bias_grad", [False, True], ids=["bias", "bias+grad"])
@pytest.mark.parametrize("n_k", [333, 336])
def test_bias_with_key_mask(path, dtype, d, causal, bias_grad, n_k):
    """nn.MultiheadAttention's float attn_mask beside its key_padding_mask: a head-broadcast bias and
    a (b, 1, 1, n_k) key mask, with and without the bias gradient (GQA, lengths off the tiles, one
    batch with every key masked), against the reference; masked keys get exactly no gradient. The
    Hopper kernels read the bias by TMA (rows of a multiple of 8 elements): n_k = 336 takes them, on a
    compute capability 9.0 card the backward's bias-with-key-mask kernel (kBwdBiasKeyMask; at d = 64
    with the gradient too, kBwdDbiasD64); n_k = 333 goes to the sm80 kernels there."""
    b, h, h_kv, n_q = 3, 4, 2, 200
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = randn(1, h, n_q, n_k, dtype=dtype, device="cuda").requires_grad_(bias_grad)
    lengths = torch.tensor([n_k, 70, 0], device="cuda")  # the last batch sees no key
    mask = (torch.arange(n_k, device="cuda") < lengths[:, None]).view(b, 1, 1, n_k)
    with flash_mha.force_kernel(path), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = run_both(q, k, v, bias=bias, mask=mask, causal=causal)
        torch.cuda.synchronize()
    check_both(res, dtype)
    if path != "sm80" and n_k % 8 == 0 and torch.cuda.get_device_capability() == (9, 0):
        import re
        kernels = " ".join(e.name for e in prof.events())
        # <T, traits, kPersistent, kGeneral, kKeyMask, kFull, kDropout>: the general kernel without
        # the mask bits and dropout, with the key-mask rows.
        assert re.search(r"sm90_bwd_kernel<[^<>]*Sm90BwdTraits<[^<>]*>, false, true, true, false, false>", kernels), \
            kernels[:800]
    off = ~mask.reshape(b, n_k)
    for name in ("dk", "dv"):
        g = res["grads"][name].permute(0, 2, 1, 3)  # [b, n_k, h_kv, d]
        assert g[off].abs().max() == 0, f"{name} of masked keys is not zero"
    assert res["out"][2].abs().max() == 0 and res["grads"]["dq"][2].abs().max() == 0


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm90", "sm80"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("key_mask", [False, True])
def test_dropout_tensor_core_paths(path, dtype, d, causal, key_mask):
    """Dropout at the tensor-core head dims (16-bit dtypes on a compute capability 9.0 card: the
    Hopper plain kernels with the dropout draws, which the profiler must see; sm80 forced: the sm80
    plain kernels with the draws, likewise): out and grads against the reference with the
    rng_state the forward used, so the mask must be the same Philox words on every path; GQA,
    lengths off the tile sizes, key masks."""
    b, h, h_kv, n_q, n_k = 2, 4, 2, 200, 333
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    mask = None
    if key_mask:
        mask = torch.rand(b, 1, 1, n_k, device="cuda") > 0.3
        mask[..., :1] = True
    with flash_mha.force_kernel(path), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, _, rng = flash_mha.attention_fwd(q, k, v, None, mask, None, causal, 0.15)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
    if path != "sm80" and dtype != torch.float32 and torch.cuda.get_device_capability() == (9, 0):
        import re
        kernels = " ".join(e.name for e in prof.events())
        # The plain kernels with the dropout draws (kFwdDropoutPlain: <T, plain traits, kGeneral
        # false, kFull true>; kBwdDropoutPlain: <T, plain traits, false, false, true, true, true>).
        assert re.search(r"sm90_fwd_kernel<[^<>]*Sm90FwdTraits<[^<>]*false>, false, true>", kernels), kernels[:800]
        assert re.search(r"sm90_bwd_kernel<[^<>]*Sm90BwdTraits<[^<>]*false>, false, false, true, true, true>",
                         kernels), kernels[:800]
    if path == "sm80" and dtype != torch.float32:
        import re
        kernels = " ".join(e.name for e in prof.events())
        # The sm80 plain kernels with kDropout (kSm80FwdDropoutPlain, kSm80BwdDropoutPlain: <T, traits,
        # kGeneral false, kStaged false, kKeyMask, ..., kDropout true>). The forward's narrow key-mask
        # kernel stages the mask rows by bytes (kSm80FwdKeyMaskBytes), so n_k = 333 takes it too.
        km = "true" if key_mask else "false"
        assert re.search(rf"sm80_fwd_kernel<[^<>]*FwdTraits<[^<>]*>, false, false, {km}, true(, false)*>", kernels), \
            kernels[:800]
        assert re.search(r"sm80_bwd_kernel<[^<>]*BwdTraits<[^<>]*>, false, false, (?:true|false), false, false, false, "
                         r"true(, false)*>", kernels), kernels[:800]
    q64, k64, v64 = (as_double_leaf(t) for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, mask=mask, causal=causal, dropout_p=0.15, rng_state=rng)
    assert_close(out, ref, TOL[dtype])
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, GRAD_TOL[dtype], name, GRAD_FLOOR)


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "sm80"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("key_mask", [False, True])
def test_dropout_mask_tensor_core_kernels(path, dtype, d, key_mask):
    """The keep mask of the tensor-core dropout kernels (the plain ones with the draws on either
    path) equals reference.dropout_keep_mask bit for bit: with v the identity's columns, out[i, j] is
    nonzero exactly where key j is kept (and visible). d columns of the identity a call."""
    b, h, h_kv, n_q, n_k, p = 2, 4, 2, 200, 333, 0.3
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", scale=0.1)  # small scores: no P underflows
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda")
    mask = None
    visible = torch.ones(b, 1, 1, n_k, dtype=torch.bool)
    if key_mask:
        mask = torch.rand(b, 1, 1, n_k, device="cuda") > 0.3
        mask[..., :1] = True
        visible = mask.cpu()
    rng_state = torch.tensor([987654321, 5], dtype=torch.int64, device="cuda")
    keep = reference.dropout_keep_mask(rng_state, b, h, n_q, n_k, p) & visible
    eye = torch.eye(n_k, dtype=dtype, device="cuda")
    with flash_mha.force_kernel(path):
        for start in range(0, n_k, d):
            cols = min(d, n_k - start)
            v = torch.zeros(n_k, d, dtype=dtype, device="cuda")
            v[:, :cols] = eye[:, start:start + cols]
            v = v.expand(b, h_kv, n_k, d).contiguous()
            out, _, _ = torch.ops.flash_mha.fwd(q, k, v, None, mask, 0.5, 0, p, rng_state)
            assert torch.equal((out[..., :cols] != 0).cpu(), keep[..., start:start + cols]), (
                f"dropout mask != reference.dropout_keep_mask (keys {start}..{start + cols - 1})")


def _repeated_deterministic_grads(q, k, v, bias, mask, causal, dropout_p, dout, repeats, path="auto"):
    """Forward and backward `repeats` times under torch.use_deterministic_algorithms(True) on `path`,
    the same dropout seed each time; asserts the gradients of (q, k, v[, bias]) are bitwise equal
    over the runs. Returns the last out, rng_state, the profile of the last backward and the first
    run's gradients."""
    inputs = [t for t in (q, k, v, bias) if t is not None]
    runs = []
    with deterministic_algorithms(), flash_mha.force_kernel(path):
        for _ in range(repeats):
            torch.manual_seed(1)
            out, _, rng = flash_mha.attention_fwd(q, k, v, bias, mask, None, causal, dropout_p)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                grads = torch.autograd.grad(out, inputs, dout)
                torch.cuda.synchronize()
            runs.append(grads)
    for other in runs[1:]:
        for name, a, b_ in zip(("dq", "dk", "dv", "dbias"), runs[0], other):
            assert torch.equal(a, b_), f"{name} differs between runs under deterministic algorithms"
    return out, rng, prof, runs[0]


def _check_grads_against_reference(q, k, v, bias, mask, causal, dropout_p, rng, out, dout, grads):
    """out and the gradients of (q, k, v[, bias]) against the float64 reference, the dropout mask
    replayed from rng. The expanded bias is a node of the reference's graph: its gradient (the
    unreduced dS) scales dbias's error."""
    dtype = q.dtype
    q64, k64, v64, bias64 = (as_double_leaf(t) for t in (q, k, v, bias))
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    bias64_full = bias64.expand(full) if bias is not None else None
    ref = reference.attention(q64, k64, v64, bias=bias64_full, mask=mask, causal=causal, dropout_p=dropout_p,
                              rng_state=rng if dropout_p else None)
    assert_close(out, ref, TOL[dtype])
    inputs64 = [t for t in (q64, k64, v64, bias64) if t is not None]
    ref_grads = torch.autograd.grad(ref, inputs64, dout.double(), retain_graph=bias is not None)
    ds_norm = 0.0
    if bias is not None:
        ds_norm = torch.linalg.vector_norm(torch.autograd.grad(ref, bias64_full, dout.double())[0]).item()
    for name, g, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert_close(g, rg, GRAD_TOL[dtype], name, GRAD_FLOOR, ds_norm if name == "dbias" else 0.0)


SM80_DETERMINISTIC_CASES = ["causal", "gqa", "key_padding", "dropout+full-bias", "bias_bh1k"]


@needs_cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("case", SM80_DETERMINISTIC_CASES)
def test_deterministic_backward_sm80(dtype, d, case):
    """torch.use_deterministic_algorithms(True) on the forced sm80 backward (the general kernel with
    kOrdered): the key blocks add their dQ parts in key-block order (BwdWorkspace::dq_order), so the
    gradients are bitwise equal over repeated runs, with several key blocks per head and query tiles
    per block (key padding: blocks that see no key still take their turns). A dbias that blocks
    share (bh1k) would need atomics: SIMT, as float32 above 128 and cards without the shared memory."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tensor-core path needs sm_80+")
    b, h, n_q, n_k = 2, 4, 300, 600
    h_kv = 2 if case == "gqa" else h
    causal = "bottom_right" if case in ("causal", "gqa") else None
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = mask = None
    if case == "key_padding":  # batch 1 sees 100 keys: its later key blocks see none
        mask = (torch.arange(n_k, device="cuda") < torch.tensor([600, 100], device="cuda")[:, None]).view(b, 1, 1, n_k)
    if case == "dropout+full-bias":
        bias = randn(b, h, n_q, n_k, dtype=dtype, device="cuda", requires_grad=True)
    if case == "bias_bh1k":
        bias = randn(b, h, 1, n_k, dtype=dtype, device="cuda", requires_grad=True)
    dropout_p = 0.15 if "dropout" in case else 0.0
    dout = randn(b, h, n_q, d, dtype=dtype, device="cuda")
    out, rng, prof, grads = _repeated_deterministic_grads(q, k, v, bias, mask, causal, dropout_p, dout, 3, "sm80")
    smem_needed = F32_WIDE_BWD_SMEM if dtype == torch.float32 and d > 64 else 148_480 if d > 128 else 0
    on_sm80 = case != "bias_bh1k" and not (dtype == torch.float32 and d > 128) and _smem_optin() >= smem_needed
    kernels = " ".join(e.name for e in prof.events())
    assert ("sm80_bwd_kernel" in kernels) == on_sm80 and ("simt_dkdv_kernel" in kernels) != on_sm80, kernels
    if on_sm80:  # the general kernel with the ordered dQ (kOrdered), unstaged
        import re
        assert re.search(r"sm80_bwd_kernel<.*BwdTraits<[^<>]*>, true, false, false, true(, false)*>", kernels), kernels
    _check_grads_against_reference(q, k, v, bias, mask, causal, dropout_p, rng, out, dout, grads)


DETERMINISTIC_CASES = ["plain", "gqa", "key_mask", "dropout", "bias_bhqk", "bias_1hqk", "bias_bh1k", "bias_11qk",
                       "bias_bhq1"]


@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("case", DETERMINISTIC_CASES)
def test_deterministic_backward_default_path(d, causal, case):
    """torch.use_deterministic_algorithms(True) on the default path (bfloat16, several key blocks
    and query tiles): the gradients are bitwise equal over repeated runs and match the reference.
    On a compute capability 9.0 card the Hopper backward must be the one that ran (the profiler's
    kernel names): dQ added in key-block order, and a dbias that blocks share (bias_1hqk: over the
    batch, bh1k: over the queries, 11qk: both) stored whole and summed by the reduce kernel; but a
    dbias broadcast over the keys (bhq1: its sums cancel) goes to the SIMT backward."""
    b, h, n_q, n_k = 2, 4, 700, 600
    h_kv = 2 if case == "gqa" else h
    dtype = torch.bfloat16
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = mask = None
    if case.startswith("bias_"):
        full = {"b": b, "h": h, "q": n_q, "k": n_k}
        bias = randn(*(full[c] if c in full else 1 for c in case[5:]), dtype=dtype, device="cuda",
                     requires_grad=True)
    if case == "key_mask":
        mask = torch.rand(b, 1, 1, n_k, device="cuda") > 0.3
        mask[..., :1] = True
    dropout_p = 0.15 if case == "dropout" else 0.0
    dout = randn(b, h, n_q, d, dtype=dtype, device="cuda")
    out, rng, prof, grads = _repeated_deterministic_grads(q, k, v, bias, mask, causal, dropout_p, dout, 4)
    if torch.cuda.get_device_capability() == (9, 0):
        kernels = " ".join(e.name for e in prof.events())
        if case == "bias_bhq1":
            assert "sm90_bwd_kernel" not in kernels and "simt_dkdv_kernel" in kernels
        else:
            assert "sm90_bwd_kernel" in kernels, "deterministic backward did not run on the Hopper kernels"
        if case in ("bias_1hqk", "bias_bh1k", "bias_11qk"):
            assert "sm90_bwd_dbias_reduce_kernel" in kernels
    _check_grads_against_reference(q, k, v, bias, mask, causal, dropout_p, rng, out, dout, grads)
