"""Shared fixtures and helpers for flash_mha's op-level tests.

Every comparison is against `flash_mha.reference` in float64 on fresh random inputs; the
error measure is norm-wise, ||out - ref|| / ||ref||, so a handful of rounding-sized
element errors in a half type does not fail a test but a wrong row does.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from flash_mha import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Norm-wise relative tolerance of the forward output against the float64 reference computed
# from the same (rounded) inputs. float32 accumulates in float32; half types accumulate in
# float32 but round P and the output to their own precision (eps 2^-11 and 2^-8).
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
# Gradients go through one more rounding of dS = P * (dP - rowsum(dO * O)) and a difference
# of nearly equal terms; they get twice the forward's budget. Gradients of rms below GRAD_FLOOR
# (inputs here are O(1)) are compared in absolute terms against that floor.
GRAD_TOL = {dt: 2 * t for dt, t in TOL.items()}
GRAD_FLOOR = 1e-1


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0, ref_norm: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor * sqrt(numel), ref_norm) in float64; the plain norm of a - b
    where that denominator is zero.

    `floor` is the rms value below which a tensor counts as zero (k's gradient for n_k == 1 is
    exactly zero in exact math, only rounding is left of it). `ref_norm` is the norm of what b
    was summed from: the gradient of a broadcast bias sums dS over the broadcast dims and its
    rounding error grows like that of the unreduced dS, while its value may cancel to zero
    (rows of P * (dP - rowsum) sum to zero).

    NaN anywhere in a (or b) gives NaN, which fails every `< tol` comparison.
    """
    a64 = a.detach().to("cpu", torch.float64)
    b64 = b.detach().to("cpu", torch.float64)
    assert a64.shape == b64.shape, f"shape {tuple(a64.shape)} != reference {tuple(b64.shape)}"
    if a64.numel() == 0:
        return 0.0
    diff = torch.linalg.vector_norm(a64 - b64).item()
    ref = max(torch.linalg.vector_norm(b64).item(), floor * math.sqrt(b64.numel()), ref_norm)
    return diff / ref if ref > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "output",
                 floor: float = 0.0, ref_norm: float = 0.0):
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    err = rel_err(actual, expected, floor, ref_norm)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside the block, the previous setting after."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0):
    x = torch.randn(shape, dtype=torch.float64) * scale
    x = x.to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def as_double_leaf(x: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 leaf copy of x (same values) that requires grad, for the reference."""
    if x is None:
        return None
    return x.detach().to(torch.float64).requires_grad_(x.requires_grad)


# ---------------------------------------------------------------------------------------------
# Strided / non-contiguous views with a contiguous last dim.
# ---------------------------------------------------------------------------------------------
LAYOUTS = ["contiguous", "bnhd", "padded_rows", "head_slice", "size1_strides"]


def strided_copy(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with the values of x ([b, h, n, d]) and the strides of `layout`; last dim contiguous.

    - contiguous:  x itself (cloned)
    - bnhd:        the transpose of a [b, n, h, d] tensor (what a projection followed by
                   .view(b, n, h, d).transpose(1, 2) gives)
    - padded_rows: x[..., :d] of a [b, h, n, d + 5] buffer (row stride > d)
    - head_slice:  heads 1..h of a [b, h + 2, n, d] buffer (head stride > n * d, offset != 0)
    - size1_strides: contiguous, but every size-1 dim gets stride 1 (the stride of a size-1 dim
                   is arbitrary; a transposed [.., d, 1] tensor has row stride 1 < d)
    """
    b, h, n, d = x.shape
    if layout == "contiguous":
        out = x.detach().clone()
    elif layout == "bnhd":
        out = x.detach().transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "padded_rows":
        buf = torch.full((b, h, n, d + 5), float("nan"), dtype=x.dtype, device=x.device)
        buf[..., :d] = x.detach()
        out = buf[..., :d]
    elif layout == "head_slice":
        buf = torch.full((b, h + 2, n, d), float("nan"), dtype=x.dtype, device=x.device)
        buf[:, 1:h + 1] = x.detach()
        out = buf[:, 1:h + 1]
    elif layout == "size1_strides":
        base = x.detach().contiguous()
        strides = [1 if size == 1 else st for size, st in zip(base.shape, base.stride())]
        out = base.as_strided(base.shape, strides)
    else:
        raise ValueError(layout)
    assert out.stride(-1) == 1 or out.size(-1) <= 1
    return out.requires_grad_(x.requires_grad) if out.is_leaf else out


def fused_qkv(b, h, h_kv, n, d, d_v, dtype, device, requires_grad=False):
    """q, k, v as views into one [b, n, h*d + h_kv*d + h_kv*d_v] projection output, no copy.

    Returns (buf, q, k, v); buf is the leaf (gradients flow to it through the views).
    """
    width = h * d + h_kv * d + h_kv * d_v
    buf = randn(b, n, width, dtype=dtype, device=device, requires_grad=requires_grad)
    q = buf[..., : h * d].unflatten(-1, (h, d)).transpose(1, 2)
    k = buf[..., h * d: h * d + h_kv * d].unflatten(-1, (h_kv, d)).transpose(1, 2)
    v = buf[..., h * d + h_kv * d:].unflatten(-1, (h_kv, d_v)).transpose(1, 2)
    return buf, q, k, v


# ---------------------------------------------------------------------------------------------
# Running flash_mha and the reference side by side.
# ---------------------------------------------------------------------------------------------
def to_4d(x: torch.Tensor | None) -> torch.Tensor | None:
    """Right-align a broadcastable tensor to 4 dims (a view), as the op's schema requires."""
    if x is None:
        return None
    return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape)) if x.dim() < 4 else x


def run_both(q, k, v, *, bias=None, mask=None, scale=None, causal=None, grad=True,
             dout=None, **kw):
    """flash_mha.attention and reference.attention on the same values.

    Returns a dict with 'out', 'ref' and, when grad=True, 'grads' / 'ref_grads': dicts keyed
    "dq", "dk", "dv", "dbias" for those of (q, k, v, bias) that require grad.
    """
    import flash_mha

    out = flash_mha.attention(q, k, v, bias=bias, mask=mask, scale=scale, causal=causal, **kw)
    q64, k64, v64, bias64 = (as_double_leaf(t) for t in (q, k, v, bias))
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    # The expanded bias is a node of the reference's graph: its gradient is the unreduced dS.
    bias64_full = bias64.expand(full) if bias64 is not None else None
    ref = reference.attention(q64, k64, v64, bias=bias64_full, mask=mask, scale=scale, causal=causal)
    res = {"out": out, "ref": ref}
    if not grad:
        return res
    if dout is None:
        dout = torch.randn(out.shape, dtype=torch.float64).to(out.device, out.dtype)
    names = [n for n, t in zip(("dq", "dk", "dv", "dbias"), (q, k, v, bias))
             if t is not None and t.requires_grad]
    inputs = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    inputs64 = [t for t in (q64, k64, v64, bias64) if t is not None and t.requires_grad]
    res["grads"], res["ref_grads"] = {}, {}
    if inputs:
        grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, inputs64, dout.double(), allow_unused=True,
                                        retain_graph=bias64_full is not None and bias64_full.requires_grad)
        if bias64_full is not None and bias64_full.requires_grad and ref.numel() > 0:
            (ds,) = torch.autograd.grad(ref, bias64_full, dout.double())
            res["dbias_full_norm"] = torch.linalg.vector_norm(ds).item()
        for n, g, rg in zip(names, grads, ref_grads):
            # allow_unused gives None for an input with no path (e.g. an empty tensor).
            res["grads"][n] = torch.zeros_like(inputs[names.index(n)]) if g is None else g
            res["ref_grads"][n] = torch.zeros_like(inputs64[names.index(n)]) if rg is None else rg
    return res


def check_both(res, dtype, out_tol=None, grad_tol=None):
    """Assert output and every gradient of a run_both result are within the dtype's tolerance."""
    assert_close(res["out"], res["ref"], out_tol or TOL[dtype], "output")
    for name, rg in res.get("ref_grads", {}).items():
        ref_norm = res.get("dbias_full_norm", 0.0) if name == "dbias" else 0.0
        assert_close(res["grads"][name], rg, grad_tol or GRAD_TOL[dtype], name, GRAD_FLOOR, ref_norm)


@pytest.fixture(autouse=True)
def _seed_each_test():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(1234)
    yield
