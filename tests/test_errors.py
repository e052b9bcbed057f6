"""Bad input raises a Python exception whose message names the argument and the problem.

Each case states the call and a loose regex of what the message must mention. Device mismatch
is tested against the meta device, so it runs without CUDA too.
"""
from __future__ import annotations

import pytest
import torch

import flash_mha
from conftest import DEVICES, TOL, assert_close, randn, requires_cuda
from flash_mha import reference


def qkv(b=2, h=4, h_kv=2, n_q=5, n_k=6, d=8, d_v=8, dtype=torch.float32, device="cpu", **kw):
    return (randn(b, h, n_q, d, dtype=dtype, device=device, **kw),
            randn(b, h_kv, n_k, d, dtype=dtype, device=device, **kw),
            randn(b, h_kv, n_k, d_v, dtype=dtype, device=device, **kw))


# (id, function of the default (q, k, v) returning call args/kwargs, exception types, message regex)
ATTENTION_CASES = [
    ("dtype_mismatch_k", lambda q, k, v: ((q, k.double(), v), {}), (TypeError, RuntimeError, ValueError),
     r"dtype"),
    ("dtype_mismatch_v", lambda q, k, v: ((q, k, v.half()), {}), (TypeError, RuntimeError, ValueError), r"dtype"),
    ("int_q", lambda q, k, v: ((q.long(), k.long(), v.long()), {}), (TypeError, RuntimeError, ValueError),
     r"float|dtype"),
    ("int_v", lambda q, k, v: ((q, k, v.int()), {}), (TypeError, RuntimeError, ValueError), r"float|dtype"),
    ("bool_q", lambda q, k, v: ((q > 0, k, v), {}), (TypeError, RuntimeError, ValueError), r"float|dtype"),
    ("complex_q", lambda q, k, v: ((q.to(torch.complex64), k, v), {}), (TypeError, RuntimeError, ValueError),
     r"float|dtype"),
    ("device_mismatch_meta_k", lambda q, k, v: ((q, k.to("meta"), v), {}), (ValueError, RuntimeError),
     r"device"),
    ("q_3d", lambda q, k, v: ((q[0], k, v), {}), (ValueError, RuntimeError), r"4-d|dim|rank"),
    ("k_5d", lambda q, k, v: ((q, k.unsqueeze(0), v), {}), (ValueError, RuntimeError), r"4-d|dim|rank"),
    ("heads_not_divisible", lambda q, k, v: ((q[:, :3], k, v), {}), (ValueError, RuntimeError), r"head"),
    ("kv_heads_differ", lambda q, k, v: ((q, k, v[:, :1]), {}), (ValueError, RuntimeError), r"head"),
    ("kv_length_mismatch", lambda q, k, v: ((q, k, v[:, :, :4]), {}), (ValueError, RuntimeError),
     r"length|seq"),
    ("batch_mismatch", lambda q, k, v: ((q, k[:1], v[:1]), {}), (ValueError, RuntimeError), r"batch"),
    ("qk_head_dim_mismatch", lambda q, k, v: ((q, k[..., :4], v), {}), (ValueError, RuntimeError),
     r"head.?dim"),
    ("head_dim_over_256", lambda q, k, v: ((torch.randn(2, 4, 5, 257), torch.randn(2, 2, 6, 257), v), {}),
     (ValueError, RuntimeError), r"head.?dim.*256|256"),
    ("value_head_dim_over_256", lambda q, k, v: ((q, k, torch.randn(2, 2, 6, 300)), {}),
     (ValueError, RuntimeError), r"head.?dim.*256|256"),
    ("head_dim_zero", lambda q, k, v: ((q[..., :0], k[..., :0], v), {}), (ValueError, RuntimeError),
     r"head.?dim"),
    ("dropout_negative", lambda q, k, v: ((q, k, v), {"dropout_p": -0.1}), (ValueError, RuntimeError),
     r"dropout_p"),
    ("dropout_one", lambda q, k, v: ((q, k, v), {"dropout_p": 1.0}), (ValueError, RuntimeError), r"dropout_p"),
    ("dropout_above_one", lambda q, k, v: ((q, k, v), {"dropout_p": 1.5}), (ValueError, RuntimeError),
     r"dropout_p"),
    ("dropout_nan", lambda q, k, v: ((q, k, v), {"dropout_p": float("nan")}), (ValueError, RuntimeError),
     r"dropout_p"),
    ("mask_not_bool_float", lambda q, k, v: ((q, k, v), {"mask": torch.ones(5, 6)}), (TypeError, ValueError),
     r"mask.*bool|bool.*mask"),
    ("mask_not_bool_int", lambda q, k, v: ((q, k, v), {"mask": torch.ones(5, 6, dtype=torch.int64)}),
     (TypeError, ValueError), r"mask.*bool|bool.*mask"),
    ("mask_not_bool_uint8", lambda q, k, v: ((q, k, v), {"mask": torch.ones(5, 6, dtype=torch.uint8)}),
     (TypeError, ValueError), r"mask.*bool|bool.*mask"),
    ("mask_not_broadcastable", lambda q, k, v: ((q, k, v), {"mask": torch.ones(5, 7, dtype=torch.bool)}),
     (ValueError, RuntimeError), r"mask.*(broadcast|shape)"),
    ("mask_heads_not_broadcastable",
     lambda q, k, v: ((q, k, v), {"mask": torch.ones(2, 2, 5, 6, dtype=torch.bool)}),
     (ValueError, RuntimeError), r"mask.*(broadcast|shape)"),
    ("mask_5d", lambda q, k, v: ((q, k, v), {"mask": torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)}),
     (ValueError, RuntimeError), r"mask.*(dim|broadcast|shape)"),
    ("mask_device", lambda q, k, v: ((q, k, v), {"mask": torch.ones(5, 6, dtype=torch.bool, device="meta")}),
     (ValueError, RuntimeError), r"mask.*device|device.*mask|meta"),
    ("bias_not_broadcastable", lambda q, k, v: ((q, k, v), {"bias": torch.zeros(4, 6)}),
     (ValueError, RuntimeError), r"bias.*(broadcast|shape)"),
    ("bias_batch_not_broadcastable", lambda q, k, v: ((q, k, v), {"bias": torch.zeros(3, 1, 5, 6)}),
     (ValueError, RuntimeError), r"bias.*(broadcast|shape)"),
    ("bias_5d", lambda q, k, v: ((q, k, v), {"bias": torch.zeros(1, 1, 4, 5, 6)}), (ValueError, RuntimeError),
     r"bias.*(dim|broadcast|shape)"),
    ("bias_bool", lambda q, k, v: ((q, k, v), {"bias": torch.ones(5, 6, dtype=torch.bool)}),
     (TypeError, ValueError), r"bias"),
    ("bias_int", lambda q, k, v: ((q, k, v), {"bias": torch.ones(5, 6, dtype=torch.int32)}),
     (TypeError, ValueError), r"bias"),
    ("bias_device", lambda q, k, v: ((q, k, v), {"bias": torch.zeros(5, 6, device="meta")}),
     (ValueError, RuntimeError), r"bias.*device|device.*bias|meta"),
    ("causal_bad_string", lambda q, k, v: ((q, k, v), {"causal": "lower"}), (ValueError, TypeError), r"causal"),
    ("causal_bad_int", lambda q, k, v: ((q, k, v), {"causal": 3}), (ValueError, TypeError), r"causal"),
    ("scale_nan", lambda q, k, v: ((q, k, v), {"scale": float("nan")}), (ValueError, RuntimeError), r"scale"),
    ("scale_inf", lambda q, k, v: ((q, k, v), {"scale": float("inf")}), (ValueError, RuntimeError), r"scale"),
    ("q_not_tensor", lambda q, k, v: ((q.tolist(), k, v), {}), (TypeError,), r"\bq\b.*[Tt]ensor"),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_bad_input(case):
    _, make, exc, pattern = case
    args, kwargs = make(*qkv())
    with pytest.raises(exc, match=pattern):
        flash_mha.attention(*args, **kwargs)


@requires_cuda
@pytest.mark.parametrize("which", ["k", "v", "mask", "bias"])
def test_attention_cuda_device_mismatch(which):
    q, k, v = qkv(device="cuda")
    kwargs = {}
    if which == "k":
        k = k.cpu()
    elif which == "v":
        v = v.cpu()
    elif which == "mask":
        kwargs["mask"] = torch.ones(5, 6, dtype=torch.bool)
    else:
        kwargs["bias"] = torch.zeros(5, 6)
    with pytest.raises((ValueError, RuntimeError), match=r"device|cuda|cpu"):
        flash_mha.attention(q, k, v, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_of_another_float_dtype_is_cast_not_silently_wrong(device):
    """The lead's choice: a float bias of another dtype is cast to q's dtype (and its gradient
    comes back in the bias's own dtype); the result equals using the cast bias."""
    q, k, v = qkv(dtype=torch.float64, device=device)
    bias = randn(1, 4, 5, 6, dtype=torch.float32, device=device, requires_grad=True)
    out = flash_mha.attention(q, k, v, bias=bias)
    ref = reference.attention(q, k, v, bias=bias.detach().double())
    assert_close(out, ref, TOL[torch.float64])
    out.sum().backward()
    assert bias.grad is not None and bias.grad.dtype == torch.float32 and bias.grad.shape == bias.shape


# ---------------------------------------------------------------------------------------------
# The ops themselves (what torch.compile and users of torch.ops see)
# ---------------------------------------------------------------------------------------------
def _fwd_args(**over):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, bias=None, mask=None, scale=0.5, causal=0, dropout_p=0.0, rng_state=None)
    args.update(over)
    return args


def _call_fwd(a):
    return torch.ops.flash_mha.fwd(a["q"], a["k"], a["v"], a["bias"], a["mask"], a["scale"], a["causal"],
                                   a["dropout_p"], a["rng_state"])


OP_FWD_CASES = [
    ("bias_3d", dict(bias=torch.zeros(4, 5, 6)), r"bias.*4-d|4-d"),
    ("mask_3d", dict(mask=torch.ones(4, 5, 6, dtype=torch.bool)), r"mask.*4-d|4-d"),
    ("bias_not_broadcastable", dict(bias=torch.zeros(1, 3, 5, 6)), r"bias.*(broadcast|shape|size)"),
    ("bias_dtype", dict(bias=torch.zeros(1, 1, 5, 6, dtype=torch.float64)), r"bias.*dtype|dtype"),
    ("mask_dtype", dict(mask=torch.ones(1, 1, 5, 6)), r"mask.*bool"),
    ("causal_3", dict(causal=3), r"causal"),
    ("dropout_without_rng", dict(dropout_p=0.5), r"rng_state"),
    ("rng_wrong_dtype", dict(dropout_p=0.5, rng_state=torch.zeros(2, dtype=torch.int32)), r"rng_state"),
    ("rng_wrong_numel", dict(dropout_p=0.5, rng_state=torch.zeros(3, dtype=torch.int64)), r"rng_state"),
    ("dropout_one", dict(dropout_p=1.0, rng_state=torch.zeros(2, dtype=torch.int64)), r"dropout_p"),
    ("scale_nan", dict(scale=float("nan")), r"scale"),
    ("q_last_dim_strided", dict(q=torch.randn(2, 4, 8, 5).transpose(-1, -2)), r"\bq\b.*(stride|contiguous)"),
    ("v_int", dict(v=torch.ones(2, 2, 6, 8, dtype=torch.int64)), r"dtype|float"),
    ("heads_not_divisible", dict(q=torch.randn(2, 3, 5, 8)), r"head"),
    ("kv_length_mismatch", dict(v=torch.randn(2, 2, 7, 8)), r"length|seq"),
]


@pytest.mark.parametrize("case", OP_FWD_CASES, ids=[c[0] for c in OP_FWD_CASES])
def test_op_fwd_bad_input(case):
    _, over, pattern = case
    with pytest.raises(RuntimeError, match=pattern):
        _call_fwd(_fwd_args(**over))


def test_op_bwd_bad_input():
    q, k, v = qkv()
    out, lse, _ = torch.ops.flash_mha.fwd(q, k, v, None, None, 0.5, 0, 0.0, None)
    dout = torch.randn_like(out)
    with pytest.raises(RuntimeError, match=r"bias"):
        torch.ops.flash_mha.bwd(dout, q, k, v, out, lse, None, None, 0.5, 0, 0.0, None, True)
    with pytest.raises(RuntimeError, match=r"lse"):
        torch.ops.flash_mha.bwd(dout, q, k, v, out, lse[:, :, :2], None, None, 0.5, 0, 0.0, None, False)
    with pytest.raises(RuntimeError, match=r"dout|out|shape"):
        torch.ops.flash_mha.bwd(dout[:, :, :3], q, k, v, out, lse, None, None, 0.5, 0, 0.0, None, False)
    with pytest.raises(RuntimeError, match=r"dtype|dout"):
        torch.ops.flash_mha.bwd(dout.double(), q, k, v, out, lse, None, None, 0.5, 0, 0.0, None, False)


# ---------------------------------------------------------------------------------------------
# The SDPA mirror
# ---------------------------------------------------------------------------------------------
SDPA_CASES = [
    ("mask_and_causal", lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(5, 6, dtype=torch.bool),
                                                     "is_causal": True}), r"attn_mask|is_causal"),
    ("gqa_without_flag", lambda q, k, v: ((q, k, v), {}), r"enable_gqa|head"),
    ("rank_mismatch", lambda q, k, v: ((q, k[0], v[0]), {"enable_gqa": True}), r"dim"),
    ("query_1d", lambda q, k, v: ((q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}), r"dim"),
    ("mask_not_broadcastable", lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.bool),
                                                            "enable_gqa": True}), r"attn_mask|broadcast"),
    ("mask_too_many_dims", lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(1, 1, 1, 5, 6),
                                                        "enable_gqa": True}), r"attn_mask|dim"),
    ("dropout_out_of_range", lambda q, k, v: ((q, k, v), {"dropout_p": 1.0, "enable_gqa": True}),
     r"dropout_p"),
    ("leading_dims_differ", lambda q, k, v: ((q.unsqueeze(0).expand(3, -1, -1, -1, -1),
                                              k.unsqueeze(0).expand(2, -1, -1, -1, -1),
                                              v.unsqueeze(0).expand(2, -1, -1, -1, -1)), {"enable_gqa": True}),
     r"batch|leading|dim"),
    ("not_tensor", lambda q, k, v: ((None, k, v), {}), r"query.*[Tt]ensor"),
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_bad_input(case):
    _, make, pattern = case
    args, kwargs = make(*qkv())
    with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
        flash_mha.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_errors_do_not_leave_state_behind(device):
    """A rejected call does not consume dropout randomness: the next call is reproducible."""
    q, k, v = qkv(device=device)
    torch.manual_seed(0)
    a = flash_mha.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    with pytest.raises((ValueError, RuntimeError)):
        flash_mha.attention(q, k, v[:, :, :4], dropout_p=0.5)
    b = flash_mha.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
