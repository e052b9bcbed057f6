"""GPU reliability (issue 7): CUDA graphs, streams, devices, and inputs past 2^31 elements.

Everything here needs CUDA and is skipped without it.
"""
from __future__ import annotations

import pytest
import torch

import flash_mha
from conftest import GRAD_FLOOR, GRAD_TOL, TOL, as_double_leaf, assert_close, randn
from flash_mha import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(dtype=torch.float16, b=2, h=4, h_kv=2, n_q=70, n_k=90, d=64):
    q = randn(b, h, n_q, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, h_kv, n_k, d, dtype=dtype, device="cuda", requires_grad=True)
    bias = randn(1, h, n_q, n_k, dtype=dtype, device="cuda", requires_grad=True)
    mask = torch.rand(b, 1, 1, n_k, device="cuda") < 0.8
    dout = randn(b, h, n_q, d, dtype=dtype, device="cuda")
    return q, k, v, bias, mask, dout


def _step(q, k, v, bias, mask, dout, p):
    out = flash_mha.attention(q, k, v, bias=bias, mask=mask, causal="bottom_right", dropout_p=p)
    return (out,) + torch.autograd.grad(out, (q, k, v, bias), dout)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_graph_replay_equals_eager(p):
    """Forward + backward (with dropout) captured once; each replay after torch.manual_seed(s)
    gives what eager gives after torch.manual_seed(s)."""
    q, k, v, bias, mask, dout = _inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        for _ in range(2):
            _step(q, k, v, bias, mask, dout, p)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _step(q, k, v, bias, mask, dout, p)

    replays = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in static]
        torch.manual_seed(seed)
        eager = _step(q, k, v, bias, mask, dout, p)
        # The forward is deterministic; gradients may be reduced in another order (atomics), so
        # they get the dtype's tolerance, far below what a different dropout mask would give.
        assert torch.equal(replayed[0], eager[0]), f"replay vs eager output (seed {seed})"
        for name, a, b in zip(("dq", "dk", "dv", "dbias"), replayed[1:], eager[1:]):
            assert_close(a, b, GRAD_TOL[torch.float16], f"replay vs eager {name} (seed {seed})", GRAD_FLOOR)
        replays.append(replayed)
    assert torch.equal(replays[0][0], replays[2][0]), "the same seed must replay the same mask"
    if p > 0:
        assert not torch.equal(replays[0][0], replays[1][0]), "another seed must give another mask"
        # Without re-seeding, consecutive replays draw fresh masks.
        graph.replay()
        first = static[0].clone()
        graph.replay()
        assert not torch.equal(first, static[0])


def test_cuda_graph_replay_matches_reference_with_rng_state():
    """Inside a graph, attention_fwd's rng_state output is the one the kernel used."""
    q, k, v, bias, mask, _ = _inputs(dtype=torch.float32, n_q=33, n_k=47, d=32)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            flash_mha.attention_fwd(q, k, v, bias, mask, None, "top_left", 0.3)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _, rng = flash_mha.attention_fwd(q, k, v, bias, mask, None, "top_left", 0.3)
        for seed in (5, 6):
            torch.manual_seed(seed)
            graph.replay()
            torch.cuda.synchronize()
            ref = reference.attention(q, k, v, bias=bias, mask=mask, causal="top_left", dropout_p=0.3,
                                      rng_state=rng.clone())
            assert_close(out, ref, TOL[torch.float32])


def test_runs_on_current_stream_without_sync():
    """The op runs on the current (non-default) stream: inputs written on that stream after a
    long sleep are read correctly, and forward + backward return before that stream finishes."""
    q0, k0, v0, bias, mask, dout = _inputs(dtype=torch.float32, n_q=64, n_k=64, d=32)
    q0, k0, v0, bias = (t.detach() for t in (q0, k0, v0, bias))
    stream = torch.cuda.Stream()

    def step():
        q = (q0 * 1.0).requires_grad_()  # written on the current stream
        out = flash_mha.attention(q, k0, v0, bias=bias, mask=mask, causal="top_left")
        (dq,) = torch.autograd.grad(out, q, dout)
        return out, dq

    # Warm up on the same stream: module loading, and the allocator's blocks for this stream
    # (a cudaMalloc would synchronize the device and hide a stray synchronization).
    with torch.cuda.stream(stream):
        step()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000_000)  # about half a second of GPU cycles on `stream` only
        out, dq = step()
        pending = not stream.query()
    stream.synchronize()
    assert pending, "forward/backward on a side stream waited for that stream (stray synchronization)"
    q64 = q0.double().requires_grad_()
    ref = reference.attention(q64, k0, v0, bias=bias, mask=mask, causal="top_left")
    assert_close(out, ref, TOL[torch.float32])
    (rdq,) = torch.autograd.grad(ref, q64, dout.double())
    assert_close(dq, rdq, GRAD_TOL[torch.float32], "dq", GRAD_FLOOR)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("current", [0, 1])
def test_second_device(current):
    """Tensors on cuda:1 give results on cuda:1, whichever device is current."""
    with torch.cuda.device(1):
        q, k, v, bias, mask, dout = _inputs(dtype=torch.float32, n_q=20, n_k=30, d=16)
    q, k, v, bias, mask, dout = (t.to("cuda:1") for t in (q, k, v, bias, mask, dout))
    with torch.cuda.device(current):
        out = flash_mha.attention(q.detach(), k.detach(), v.detach(), bias=bias.detach(), mask=mask,
                                  dropout_p=0.0)
    assert out.device == torch.device("cuda:1")
    ref = reference.attention(q.detach(), k.detach(), v.detach(), bias=bias.detach(), mask=mask)
    assert_close(out, ref, TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Inputs past 2^31 elements: offsets must be computed in 64 bits. Checked on sampled rows.
# ---------------------------------------------------------------------------------------------
def needs_free_gib(gib):
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    return pytest.mark.skipif(free < gib * 2**30, reason=f"needs about {gib} GiB of free GPU memory")


@needs_free_gib(40)
def test_q_past_2pow31_elements():
    d, n_k = 128, 64
    n_q = 2**31 // (2 * d) + 64                # q [1, 2, n_q, d]: 2^31 + 2 * 64 * d elements
    q = torch.randn(1, 2, n_q, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert q.numel() > 2**31
    k = torch.randn(1, 1, n_k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 1, n_k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = flash_mha.attention(q, k, v)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    rows = torch.tensor([0, 1, n_q // 2, n_q - 65, n_q - 2, n_q - 1], device="cuda")
    for head in (0, 1):
        qs = q.detach()[:, head:head + 1, rows]
        qs64 = as_double_leaf(qs.requires_grad_())
        ref = reference.attention(qs64, k.detach(), v.detach())
        assert_close(out[:, head:head + 1, rows], ref, TOL[torch.bfloat16], f"out rows, head {head}")
        (rdq,) = torch.autograd.grad(ref, qs64, dout[:, head:head + 1, rows].double())
        assert_close(dq[:, head:head + 1, rows], rdq, GRAD_TOL[torch.bfloat16], f"dq rows, head {head}",
                     GRAD_FLOOR)
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@needs_free_gib(30)
def test_bias_past_2pow31_elements():
    n_q, n_k, d = 2**16 + 16, 2**15, 32     # bias [1, 1, n_q, n_k]: 2^31 + 2^19 elements
    q = torch.randn(1, 1, n_q, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, n_k, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 1, n_k, d, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1, 1, n_q, n_k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert bias.numel() > 2**31
    out = flash_mha.attention(q, k, v, bias=bias)
    dout = torch.randn_like(out)
    (dbias,) = torch.autograd.grad(out, bias, dout)
    rows = torch.tensor([0, n_q // 2, n_q - 17, n_q - 1], device="cuda")
    bs64 = as_double_leaf(bias.detach()[:, :, rows].requires_grad_())
    ref = reference.attention(q[:, :, rows], k, v, bias=bs64)
    assert_close(out[:, :, rows], ref, TOL[torch.bfloat16], "out rows")
    (rdb,) = torch.autograd.grad(ref, bs64, dout[:, :, rows].double())
    assert_close(dbias[:, :, rows], rdb, GRAD_TOL[torch.bfloat16], "dbias rows", GRAD_FLOOR)


@needs_free_gib(16)
def test_seqlen_128k_causal_forward_backward():
    n, h, d = 128 * 1024, 4, 128
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = flash_mha.attention(q, k, v, causal="top_left")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    rows = [0, 1, 4095, n // 2 + 3, n - 1]
    for i in rows:
        qs = q.detach()[:, :, i:i + 1]
        qs64 = as_double_leaf(qs.requires_grad_())
        # row i with top-left causal sees keys 0..i
        ref = reference.attention(qs64, k.detach()[:, :, : i + 1], v.detach()[:, :, : i + 1])
        assert_close(out[:, :, i:i + 1], ref, TOL[torch.bfloat16], f"out row {i}")
        (rdq,) = torch.autograd.grad(ref, qs64, dout[:, :, i:i + 1].double())
        assert_close(dq[:, :, i:i + 1], rdq, GRAD_TOL[torch.bfloat16], f"dq row {i}", GRAD_FLOOR)
    # the last key is seen only by the last query: its dk/dv come from one row
    last = n - 1
    k64 = as_double_leaf(k.detach()[:, :, last:].requires_grad_())
    v64 = as_double_leaf(v.detach()[:, :, last:].requires_grad_())
    ref = reference.attention(q.detach()[:, :, last:], torch.cat([k.detach()[:, :, :last].double(), k64], 2),
                              torch.cat([v.detach()[:, :, :last].double(), v64], 2))
    rdk, rdv = torch.autograd.grad(ref, (k64, v64), dout[:, :, last:].double())
    assert_close(dk[:, :, last:], rdk, GRAD_TOL[torch.bfloat16], "dk of the last key", GRAD_FLOOR)
    assert_close(dv[:, :, last:], rdv, GRAD_TOL[torch.bfloat16], "dv of the last key", GRAD_FLOOR)
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
