"""The modules: FlashAttention, FlashMHA and the nn.MultiheadAttention drop-in.

The specification is torch itself: with the same weights (copied through load_state_dict),
flash_mha's modules give nn.MultiheadAttention's outputs, attention weights and gradients
(of the inputs and of every parameter), also inside nn.TransformerEncoderLayer /
nn.TransformerDecoderLayer. Tight checks run in float64 on the CPU; float32 on the CPU and
float16 / bfloat16 on CUDA are compared with torch in float64 under looser tolerances.
Masks never mask a whole row (torch gives NaN there, flash_mha zeros; tested separately).
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flash_mha.modules as modules
from flash_mha import FlashAttention, FlashMHA, MultiheadAttention, reference

_TORCH_SDPA = F.scaled_dot_product_attention
HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))
DEVICES = ["cpu", CUDA]
# (device, dtype) pairs for the low-precision runs, compared with torch in float64.
LOW_PRECISION = [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.float16, marks=CUDA.marks),
    pytest.param("cuda", torch.bfloat16, marks=CUDA.marks),
]
# Norm-wise relative tolerances (||a - b|| / ||b||); gradients get a larger budget.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 5e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    assert a64.shape == b64.shape, f"shape {tuple(a64.shape)} != expected {tuple(b64.shape)}"
    if a64.numel() == 0:
        return 0.0
    ref = torch.linalg.vector_norm(b64).item()
    diff = torch.linalg.vector_norm(a64 - b64).item()
    return diff / ref if ref > 0 else diff


def assert_close(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


@pytest.fixture(autouse=True)
def _no_torch_attention(monkeypatch):
    """flash_mha's modules never call torch's attention: make it fail if they do.

    Tests that run torch's own modules as the expected result call `torch_ref` to lift this.
    """
    def forbidden(*args, **kwargs):
        raise AssertionError("flash_mha called torch's scaled_dot_product_attention")

    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)


def torch_ref(fn, *args, **kwargs):
    """Run torch's modules (the expected values) with torch's attention available."""
    forbidden = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _TORCH_SDPA
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mixed bool/float masks are "deprecated" in torch
            return fn(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = forbidden


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the arguments of every flash_mha.attention call the modules make."""
    calls = []
    real = modules.attention

    def recording(q, k, v, **kw):
        calls.append(dict(q=q, k=k, v=v, **kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(modules, "attention", recording)
    return calls


def randomize_(module: nn.Module) -> nn.Module:
    """Non-zero values for every parameter (torch initialises the biases to zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def leaf(x: torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    return x.detach().to(device=device or x.device, dtype=dtype or x.dtype).requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# MultiheadAttention vs nn.MultiheadAttention over its options.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    ctor: dict = field(default_factory=dict)   # extra nn.MultiheadAttention kwargs
    inputs: str = "self"                        # "self" (x, x, x), "kv" (x, m, m), "cross" (x, k, v)
    batched: bool = True
    kpm: str | None = None                      # key_padding_mask: None, "bool", "float"
    attn: str | None = None                     # attn_mask: None, "2d_bool", "2d_float", "3d_bool", "3d_float", "causal"
    is_causal: bool = False
    need_weights: bool = True
    average: bool = True


CASES = [
    Case("self"),
    Case("self_seq_first", ctor=dict(batch_first=False)),
    Case("no_bias", ctor=dict(bias=False)),
    Case("kv_same", inputs="kv"),
    Case("cross", inputs="cross", ctor=dict(batch_first=False)),
    Case("kdim_vdim", inputs="cross", ctor=dict(kdim=12, vdim=20)),
    Case("kdim_vdim_seq_first", inputs="cross", ctor=dict(kdim=12, vdim=20, batch_first=False, bias=False)),
    Case("bias_kv", ctor=dict(add_bias_kv=True), kpm="bool", attn="2d_float"),
    Case("zero_attn", ctor=dict(add_zero_attn=True), inputs="kv", kpm="float", attn="3d_bool"),
    Case("bias_kv_zero_attn", ctor=dict(add_bias_kv=True, add_zero_attn=True), inputs="cross",
         attn="2d_bool", need_weights=False),
    Case("kpm_bool", kpm="bool"),
    Case("kpm_float", kpm="float", inputs="cross", need_weights=False),
    Case("attn_2d_bool", attn="2d_bool", inputs="kv"),
    Case("attn_2d_float", attn="2d_float", need_weights=False),
    Case("attn_3d_bool", attn="3d_bool", ctor=dict(batch_first=False), need_weights=False),
    Case("attn_3d_float", attn="3d_float", inputs="cross"),
    Case("kpm_bool_attn_float", kpm="bool", attn="3d_float"),
    Case("kpm_float_attn_bool", kpm="float", attn="2d_bool", ctor=dict(batch_first=False)),
    Case("kpm_bool_attn_bool", kpm="bool", attn="3d_bool", need_weights=False),
    Case("weights_per_head", attn="2d_float", kpm="bool", average=False),
    Case("is_causal_fast", attn="causal", is_causal=True, need_weights=False),
    Case("is_causal_kpm", attn="causal", is_causal=True, kpm="bool", need_weights=False),
    Case("is_causal_weights", attn="causal", is_causal=True, average=False),
    Case("is_causal_bias_kv", attn="causal", is_causal=True, need_weights=False,
         ctor=dict(add_bias_kv=True, batch_first=False)),
    Case("unbatched", batched=False, kpm="bool", attn="3d_float"),
    Case("unbatched_cross", batched=False, inputs="cross", ctor=dict(kdim=12, vdim=20),
         attn="2d_bool", average=False),
    Case("unbatched_causal", batched=False, attn="causal", is_causal=True, need_weights=False),
]
E, H, B, NQ, NK = 16, 4, 3, 5, 7


def make_inputs(case: Case, kdim: int, vdim: int):
    """float64 query/key/value and masks for a case, in the module's layout."""
    n_k = NQ if case.inputs == "self" else NK
    shape = lambda n, e: (n, e) if not case.batched else (  # noqa: E731
        (B, n, e) if case.ctor.get("batch_first", True) else (n, B, e))
    x = torch.randn(shape(NQ, E), dtype=torch.float64)
    if case.inputs == "self":
        q, k, v = x, x, x
    elif case.inputs == "kv":
        mem = torch.randn(shape(n_k, E), dtype=torch.float64)
        q, k, v = x, mem, mem
    else:
        q = x
        k = torch.randn(shape(n_k, kdim), dtype=torch.float64)
        v = torch.randn(shape(n_k, vdim), dtype=torch.float64)

    b = B if case.batched else 1
    kpm = None
    if case.kpm is not None:
        padded = torch.rand(b, n_k) < 0.3
        padded[:, 0] = False  # every row keeps a key
        kpm = padded if case.kpm == "bool" else torch.where(
            padded, float("-inf"), torch.randn(b, n_k, dtype=torch.float64))
        if not case.batched:
            kpm = kpm[0]
    attn = None
    if case.attn == "causal":
        attn = nn.Transformer.generate_square_subsequent_mask(NQ, dtype=torch.float64)
        if case.inputs != "self":
            raise ValueError("causal cases are self-attention")
    elif case.attn is not None:
        lead = () if case.attn.startswith("2d") else (b * H,)
        blocked = torch.rand(*lead, NQ, n_k) < 0.3
        blocked[..., 0] = False
        attn = blocked if case.attn.endswith("bool") else torch.where(
            blocked, float("-inf"), torch.randn(*lead, NQ, n_k, dtype=torch.float64))
    return q, k, v, kpm, attn


def run_mha(module, q, k, v, kpm, attn, case: Case, dtype, device):
    """Forward + backward of `module` on copies of the inputs in (dtype, device).

    Keeps `query is key is value` identities; returns (out, weights, input grads, param grads).
    """
    uniq = {}
    for t in (q, k, v):
        if id(t) not in uniq:
            uniq[id(t)] = leaf(t, dtype, device)
    qq, kk, vv = uniq[id(q)], uniq[id(k)], uniq[id(v)]
    conv = lambda m: None if m is None else m.to(device=device, dtype=(  # noqa: E731
        m.dtype if m.dtype == torch.bool else dtype))
    out, weights = module(qq, kk, vv, key_padding_mask=conv(kpm), attn_mask=conv(attn),
                          need_weights=case.need_weights, average_attn_weights=case.average,
                          is_causal=case.is_causal)
    # Fixed, dtype-independent upstream gradients, so every dtype sees the same loss.
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
            .view(out.shape)).sum()
    if weights is not None:
        loss = loss + (weights * torch.linspace(2, -1, weights.numel(), dtype=out.dtype,
                                                device=out.device).view(weights.shape)).sum()
    loss.backward()
    grads = {f"d_{n}": uniq[id(t)].grad for n, t in (("query", q), ("key", k), ("value", v))}
    grads.update({f"d_{n}": p.grad for n, p in module.named_parameters()})
    return out, weights, grads


def check_case(case: Case, device, dtype, module_cls=MultiheadAttention):
    kw = dict(embed_dim=E, num_heads=H, dropout=0.0, batch_first=True)
    kw.update(case.ctor)
    expected_mha = randomize_(nn.MultiheadAttention(**kw, dtype=torch.float64))
    ours = module_cls(**kw, device=device, dtype=dtype)
    ours.load_state_dict(expected_mha.state_dict(), strict=True)
    q, k, v, kpm, attn = make_inputs(case, expected_mha.kdim, expected_mha.vdim)

    torch.manual_seed(0)
    exp_out, exp_w, exp_grads = torch_ref(run_mha, expected_mha, q, k, v, kpm, attn, case,
                                          torch.float64, "cpu")
    torch.manual_seed(0)
    out, w, grads = run_mha(ours, q, k, v, kpm, attn, case, dtype, device)

    assert out.dtype == dtype and out.device.type == device
    assert_close(out, exp_out, TOL[dtype], "output")
    if case.need_weights:
        assert w is not None and w.dtype == dtype
        assert_close(w, exp_w, TOL[dtype], "attention weights")
    else:
        assert w is None and exp_w is None
    assert set(grads) == set(exp_grads)
    for name, g in exp_grads.items():
        assert g is not None and grads[name] is not None, name
        assert_close(grads[name], g, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_multihead_attention_matches_torch_float64(case):
    check_case(case, "cpu", torch.float64)


LOW_PRECISION_CASES = [c for c in CASES if c.name in (
    "self", "cross", "kdim_vdim", "bias_kv_zero_attn", "kpm_bool_attn_float", "is_causal_fast",
    "is_causal_weights", "unbatched")]


@pytest.mark.parametrize("device,dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=lambda c: c.name)
def test_multihead_attention_matches_torch_low_precision(case, device, dtype):
    check_case(case, device, dtype)


@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_multihead_attention_has_torch_signature(method):
    ours = inspect.signature(getattr(MultiheadAttention, method)).parameters
    theirs = inspect.signature(getattr(nn.MultiheadAttention, method)).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == [
        (p.name, p.default, p.kind) for p in theirs.values()]
    assert issubclass(MultiheadAttention, nn.MultiheadAttention)


@pytest.mark.parametrize("device", DEVICES)
def test_multihead_attention_runs_flash_kernel_on_fused_projection(device, kernel_calls):
    """Self-attention: one fused projection, q/k/v handed to the kernel as views of it."""
    mha = MultiheadAttention(E, H, batch_first=True, device=device, dtype=torch.float32)
    x = torch.randn(B, NQ, E, device=device)
    mha(x, x, x, need_weights=False)
    assert len(kernel_calls) == 1
    call = kernel_calls[0]
    ptrs = {call[n].untyped_storage().data_ptr() for n in ("q", "k", "v")}
    assert len(ptrs) == 1, "q, k, v are not views of one projection"
    assert call["q"].shape == (B, H, NQ, E // H)


def test_multihead_attention_eval_no_grad_matches_torch_fast_path(kernel_calls):
    """In inference mode torch takes its fused fast path; ours still runs flash_mha."""
    expected_mha = randomize_(nn.MultiheadAttention(E, H, batch_first=True)).eval()
    ours = MultiheadAttention(E, H, batch_first=True).eval()
    ours.load_state_dict(expected_mha.state_dict())
    x = torch.randn(B, NQ, E)
    kpm = torch.zeros(B, NQ, dtype=torch.bool)
    kpm[0, -2:] = True
    with torch.no_grad():
        expected, exp_w = torch_ref(expected_mha, x, x, x, key_padding_mask=kpm)
        out, w = ours(x, x, x, key_padding_mask=kpm)
    assert len(kernel_calls) == 1
    # Rows of the padding positions are arbitrary in torch's fast path; compare the rest.
    assert_close(out[:, :NQ - 2], expected[:, :NQ - 2], TOL[torch.float32], "output")
    assert_close(w, exp_w, TOL[torch.float32], "attention weights")


def test_multihead_attention_is_causal_needs_attn_mask():
    mha = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, NQ, E)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        mha(x, x, x, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        torch_ref(nn.MultiheadAttention(E, H, batch_first=True), x, x, x, is_causal=True,
                  need_weights=False)


def test_multihead_attention_dropout_training_only():
    torch.manual_seed(1)
    mha = randomize_(MultiheadAttention(E, H, dropout=0.5, batch_first=True))
    x = torch.randn(B, NQ, E)
    torch.manual_seed(7)
    a, _ = mha(x, x, x, need_weights=False)
    torch.manual_seed(7)
    a2, _ = mha(x, x, x, need_weights=False)
    b, _ = mha(x, x, x, need_weights=False)
    assert torch.equal(a, a2), "same seed must give the same dropout mask"
    assert not torch.allclose(a, b), "a fresh call must draw a fresh dropout mask"
    mha.eval()
    expected_mha = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True).eval()
    expected_mha.load_state_dict(mha.state_dict())
    e1, _ = mha(x, x, x, need_weights=False)
    e2, _ = mha(x, x, x, need_weights=False)
    expected = torch_ref(expected_mha, x, x, x, need_weights=False)[0]
    assert torch.equal(e1, e2)
    assert_close(e1, expected, TOL[torch.float32], "eval output")


def test_multihead_attention_fully_masked_row_gives_zero_attention():
    """A query that sees no key: torch gives NaN, flash_mha attends to nothing (output = out_proj.bias)."""
    mha = randomize_(MultiheadAttention(E, H, batch_first=True))
    x = torch.randn(B, NQ, E, requires_grad=True)
    attn = torch.zeros(NQ, NQ, dtype=torch.bool)
    attn[2] = True
    out, _ = mha(x, x, x, attn_mask=attn, need_weights=False)
    torch.testing.assert_close(out[:, 2], mha.out_proj.bias.expand(B, E))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# Transformer layers as clients.
# ---------------------------------------------------------------------------------------------
def swap_attention(layer: nn.Module, names) -> nn.Module:
    """A deep copy of `layer` with each named nn.MultiheadAttention replaced by ours (same weights)."""
    ours = copy.deepcopy(layer)
    for name in names:
        theirs = getattr(layer, name)
        mine = MultiheadAttention(theirs.embed_dim, theirs.num_heads, dropout=theirs.dropout,
                                  bias=theirs.in_proj_bias is not None,
                                  batch_first=theirs.batch_first, dtype=torch.float64)
        mine.load_state_dict(theirs.state_dict(), strict=True)
        setattr(ours, name, mine)
    return ours


def grads_of(module: nn.Module, *inputs):
    grads = {n: p.grad for n, p in module.named_parameters()}
    grads.update({f"input{i}": t.grad for i, t in enumerate(inputs)})
    return grads


def compare_modules(expected_mod, ours, make_args, tol=TOL[torch.float64], grad_tol=GRAD_TOL[torch.float64]):
    exp_inputs, exp_kwargs = make_args()
    our_inputs = [leaf(t) for t in exp_inputs]
    exp_inputs = [leaf(t) for t in exp_inputs]
    expected = torch_ref(expected_mod, *exp_inputs, **exp_kwargs)
    out = ours(*our_inputs, **exp_kwargs)
    assert_close(out, expected, tol, "output")
    w = torch.randn_like(expected)
    torch_ref(lambda: (expected * w).sum().backward())
    (out * w).sum().backward()
    exp_grads, grads = grads_of(expected_mod, *exp_inputs), grads_of(ours, *our_inputs)
    assert set(exp_grads) == set(grads)
    for name, g in exp_grads.items():
        assert grads[name] is not None, name
        assert_close(grads[name], g, grad_tol, name)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "causal", "causal_hint_kpm"])
def test_transformer_encoder_layer(batch_first, norm_first, masks, kernel_calls):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, dtype=torch.float64)
    randomize_(layer).train()
    ours = swap_attention(layer, ["self_attn"])
    n = 6

    def make_args():
        src = torch.randn((B, n, E) if batch_first else (n, B, E), dtype=torch.float64)
        kw = {}
        if masks != "none":
            kw["src_mask"] = nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)
            kw["is_causal"] = True
        if masks == "causal_hint_kpm":  # float, like src_mask (torch warns on mixed types)
            kpm = torch.zeros(B, n, dtype=torch.float64)
            kpm[1, -2:] = float("-inf")
            kw["src_key_padding_mask"] = kpm
        return [src], kw

    compare_modules(layer, ours, make_args)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_layer(batch_first, norm_first, kernel_calls):
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, dtype=torch.float64)
    randomize_(layer).train()
    ours = swap_attention(layer, ["self_attn", "multihead_attn"])
    n_t, n_m = 5, 8

    def make_args():
        shape = lambda n: (B, n, E) if batch_first else (n, B, E)  # noqa: E731
        tgt = torch.randn(shape(n_t), dtype=torch.float64)
        memory = torch.randn(shape(n_m), dtype=torch.float64)
        mkpm = torch.zeros(B, n_m, dtype=torch.bool)
        mkpm[0, -3:] = True
        return [tgt, memory], dict(
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(n_t, dtype=torch.float64),
            tgt_is_causal=True, memory_key_padding_mask=mkpm)

    compare_modules(layer, ours, make_args)
    assert len(kernel_calls) == 2


def test_transformer_encoder_layer_inference_still_uses_flash(kernel_calls):
    """torch's encoder layer skips self_attn.forward in inference (fast path); ours must not."""
    layer = randomize_(nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True)).eval()
    ours = swap_attention(layer, ["self_attn"]).to(torch.float32).eval()
    src = torch.randn(B, 6, E)
    with torch.no_grad():
        expected = torch_ref(layer, src)
        out = ours(src)
    assert len(kernel_calls) == 1
    assert_close(out, expected, TOL[torch.float32], "output")


def test_transformer_encoder_nested_inference(kernel_calls):
    """nn.TransformerEncoder in inference with a padding mask passes nested tensors to the layers."""
    layer = randomize_(nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True))
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    ours = copy.deepcopy(encoder)
    for i, lay in enumerate(ours.layers):
        lay.self_attn = swap_attention(encoder.layers[i], ["self_attn"]).self_attn.float()
    src = torch.randn(B, 6, E)
    kpm = torch.zeros(B, 6, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[2, -1:] = True
    with torch.no_grad():
        expected = torch_ref(encoder, src, src_key_padding_mask=kpm)
        out = ours(src, src_key_padding_mask=kpm)
    assert len(kernel_calls) == 2
    assert_close(out, expected, TOL[torch.float32], "output")


# ---------------------------------------------------------------------------------------------
# FlashMHA.
# ---------------------------------------------------------------------------------------------
def test_readme_example():
    from flash_mha import FlashMHA

    # Initialize the model
    flash_mha = FlashMHA(embed_dim=512, num_heads=8, bias=True, batch_first=True, dropout=0.0, causal=False)

    # Create input tensors
    query = torch.randn(10, 32, 512)
    key = torch.randn(10, 32, 512)
    value = torch.randn(10, 32, 512)

    # Forward pass
    output = flash_mha(query, key, value)

    assert output.shape == (10, 32, 512)
    expected_mha = nn.MultiheadAttention(512, 8, batch_first=True)
    expected_mha.load_state_dict(flash_mha.state_dict())
    expected = torch_ref(expected_mha, query, key, value, need_weights=False)[0]
    assert_close(output, expected, TOL[torch.float32], "README example")


FLASH_MHA_CONFIGS = {
    "default": dict(),
    "no_bias": dict(bias=False),
    "seq_first": dict(batch_first=False),
    "kdim_vdim": dict(kdim=12, vdim=20),
}


@pytest.mark.parametrize("config", FLASH_MHA_CONFIGS, ids=str)
def test_flash_mha_init_and_state_dict_like_torch(config):
    """Same parameters, keys and initial values as nn.MultiheadAttention; loads both ways."""
    kw = FLASH_MHA_CONFIGS[config]
    torch.manual_seed(3)
    ours = FlashMHA(E, H, **kw)
    torch.manual_seed(3)
    theirs = nn.MultiheadAttention(E, H, batch_first=kw.get("batch_first", True), **{
        k: v for k, v in kw.items() if k != "batch_first"})
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for name in theirs_sd:
        assert torch.equal(ours_sd[name], theirs_sd[name]), f"initial {name} differs from torch's"
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for name, t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t)
    randomize_(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for name, t in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], t)


@pytest.mark.parametrize("ctor", [dict(), dict(add_bias_kv=True), dict(kdim=12, vdim=20, bias=False)],
                         ids=["default", "bias_kv", "kdim_vdim"])
def test_multihead_attention_state_dict_round_trip(ctor):
    theirs = randomize_(nn.MultiheadAttention(E, H, **ctor))
    ours = MultiheadAttention(E, H, **ctor)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    randomize_(ours)
    back = nn.MultiheadAttention(E, H, **ctor)
    back.load_state_dict(ours.state_dict(), strict=True)
    for name, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)


FLASH_MHA_CASES = [
    ("self", dict(), "self", None, None),
    ("self_seq_first_masks", dict(batch_first=False), "self", "bool", "2d_float"),
    ("kv_same_no_bias", dict(bias=False), "kv", "float", "3d_bool"),
    ("cross_kdim_vdim", dict(kdim=12, vdim=20), "cross", "bool", "3d_float"),
    ("unbatched", dict(), "cross", "bool", "2d_bool"),
]


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64)] + LOW_PRECISION)
@pytest.mark.parametrize("name,ctor,inputs,kpm,attn", FLASH_MHA_CASES, ids=[c[0] for c in FLASH_MHA_CASES])
def test_flash_mha_matches_torch(name, ctor, inputs, kpm, attn, device, dtype):
    """FlashMHA(q, k, v, key_padding_mask, attn_mask) == nn.MultiheadAttention(...)[0]."""
    case = Case(name, ctor=ctor, inputs=inputs, kpm=kpm, attn=attn, need_weights=False,
                batched=name != "unbatched")

    class Adapter(FlashMHA):  # FlashMHA's forward under MultiheadAttention's call signature
        def forward(self, q, k, v, key_padding_mask=None, attn_mask=None, **_):
            return super().forward(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask), None

    check_case(case, device, dtype, module_cls=lambda embed_dim, num_heads, dropout, **kw: Adapter(
        embed_dim, num_heads, dropout=dropout, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_q,n_k", [(6, 6), (4, 9)])
def test_flash_mha_causal_is_bottom_right(device, n_q, n_k, kernel_calls):
    """causal=True equals torch with an explicit bottom-right mask (top-left when n_q == n_k)."""
    torch.manual_seed(5)
    ours = randomize_(FlashMHA(E, H, causal=True, dtype=torch.float64, device=device))
    theirs = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(B, n_q, E, dtype=torch.float64)
    mem = torch.randn(B, n_k, E, dtype=torch.float64)
    blocked = torch.ones(n_q, n_k, dtype=torch.bool).triu(n_k - n_q + 1)
    expected = torch_ref(theirs, x, mem, mem, attn_mask=blocked, need_weights=False)[0]
    out = ours(x.to(device), mem.to(device), mem.to(device))
    assert_close(out, expected, TOL[torch.float64], "causal output")
    assert kernel_calls[-1]["causal"] == "bottom_right" and kernel_calls[-1]["mask"] is None


def test_flash_mha_dropout_training_only():
    mha = randomize_(FlashMHA(E, H, dropout=0.5))
    x = torch.randn(B, NQ, E)
    a, b = mha(x, x, x), mha(x, x, x)
    assert not torch.allclose(a, b), "training mode must apply dropout"
    mha.eval()
    assert torch.equal(mha(x, x, x), mha(x, x, x)), "eval mode must not apply dropout"


# ---------------------------------------------------------------------------------------------
# FlashAttention.
# ---------------------------------------------------------------------------------------------
FA_CASES = [
    # name, (b, h, h_kv, n_q, n_k, d, d_v), causal, mask shape, bias shape
    ("plain", (2, 3, 3, 5, 7, 8, 8), False, None, None),
    ("mask_and_bias", (2, 4, 4, 6, 6, 16, 16), False, (2, 1, 6, 6), (1, 4, 1, 6)),
    ("causal_bottom_right", (1, 2, 2, 3, 8, 4, 6), True, None, (3, 8)),
    ("causal_square", (2, 2, 2, 5, 5, 8, 8), True, (2, 1, 1, 5), None),
    ("gqa", (2, 4, 2, 5, 6, 8, 4), False, None, (2, 4, 5, 6)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dims,causal,mask_shape,bias_shape", FA_CASES, ids=[c[0] for c in FA_CASES])
def test_flash_attention_flash_and_math_match_reference(name, dims, causal, mask_shape, bias_shape, device):
    b, h, h_kv, n_q, n_k, d, d_v = dims
    q = torch.randn(b, h, n_q, d, dtype=torch.float64, device=device)
    k = torch.randn(b, h_kv, n_k, d, dtype=torch.float64, device=device)
    v = torch.randn(b, h_kv, n_k, d_v, dtype=torch.float64, device=device)
    mask = None if mask_shape is None else torch.rand(mask_shape, device=device) > 0.3
    if mask is not None:
        mask[..., -1] = True  # the last key is visible to every row, causal or not
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=torch.float64, device=device)

    qr, kr, vr, br = (None if t is None else leaf(t) for t in (q, k, v, bias))
    expected = reference.attention(qr, kr, vr, bias=br, mask=mask,
                                   causal="bottom_right" if causal else None)
    dout = torch.randn_like(expected)
    expected.backward(dout)
    for flash in (True, False):
        qq, kk, vv, bb = (None if t is None else leaf(t) for t in (q, k, v, bias))
        out = FlashAttention(causal=causal, flash=flash)(qq, kk, vv, mask=mask, attn_bias=bb)
        assert out.shape == (b, h, n_q, d_v)
        assert_close(out, expected, 1e-10, f"flash={flash} output")
        out.backward(dout)
        for n, t, r in (("dq", qq, qr), ("dk", kk, kr), ("dv", vv, vr), ("dbias", bb, br)):
            if t is not None:
                assert_close(t.grad, r.grad, 1e-9, f"flash={flash} {n}")


@pytest.mark.parametrize("device,dtype", LOW_PRECISION)
def test_flash_attention_low_precision(device, dtype):
    q, k, v = (torch.randn(2, 4, 9, 32, device=device, dtype=dtype) for _ in range(3))
    bias = torch.randn(1, 4, 9, 9, device=device, dtype=dtype)
    expected = reference.attention(q, k, v, bias=bias, causal="bottom_right")
    for flash in (True, False):
        out = FlashAttention(causal=True, flash=flash)(q, k, v, attn_bias=bias)
        assert out.dtype == dtype
        assert_close(out, expected, TOL[dtype], f"flash={flash}")


@pytest.mark.parametrize("flash", [True, False])
def test_flash_attention_row_without_keys_is_zero(flash):
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    out = FlashAttention(flash=flash)(q, k, v, mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("flash", [True, False])
def test_flash_attention_dropout_training_only(flash):
    fa = FlashAttention(dropout=0.5, flash=flash)
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    a, b = fa(q, k, v), fa(q, k, v)
    assert not torch.allclose(a, b), "training mode must apply dropout"
    fa.eval()
    assert_close(fa(q, k, v), reference.attention(q, k, v), 1e-5, "eval output")


# ---------------------------------------------------------------------------------------------
# torch.compile and empty inputs.
# ---------------------------------------------------------------------------------------------
def test_modules_compile_fullgraph():
    mha = randomize_(MultiheadAttention(E, H, batch_first=True))
    fmha = FlashMHA(E, H, causal=True)
    fmha.load_state_dict(mha.state_dict())
    x = torch.randn(B, NQ, E)
    kpm = torch.zeros(B, NQ, dtype=torch.bool)
    kpm[0, -2:] = True
    for module, kwargs in ((mha, dict(key_padding_mask=kpm)), (fmha, dict())):
        xe, xc = leaf(x), leaf(x)
        eager = module(xe, xe, xe, **kwargs)
        compiled = torch.compile(module, fullgraph=True)(xc, xc, xc, **kwargs)
        eager, compiled = (r[0] + r[1].sum() if isinstance(r, tuple) else r for r in (eager, compiled))
        assert_close(compiled, eager, 1e-6, f"compiled {type(module).__name__}")
        eager.sum().backward()
        compiled.sum().backward()
        assert_close(xc.grad, xe.grad, 1e-5, f"compiled {type(module).__name__} grad")


@pytest.mark.parametrize("b,n_q", [(0, 5), (2, 0)])
def test_empty_inputs(b, n_q):
    x, m = torch.randn(b, n_q, E), torch.randn(b, NK, E)
    assert FlashMHA(E, H)(x, m, m).shape == (b, n_q, E)
    out, w = MultiheadAttention(E, H, batch_first=True)(x, m, m)
    assert out.shape == (b, n_q, E) and w.shape == (b, n_q, NK)


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [FlashMHA, MultiheadAttention])
def test_heads_must_divide_embed_dim(cls):
    with pytest.raises(ValueError, match=r"embed_dim \(10\).*num_heads \(3\)"):
        cls(10, 3)


def test_flash_mha_bad_inputs():
    mha = FlashMHA(E, H)
    x = torch.randn(B, NQ, E)
    m = torch.randn(B, NK, E)
    cases = [
        ((torch.randn(1, B, NQ, E), x, x), {}, ValueError, "query"),
        ((x, torch.randn(NK, E), m), {}, ValueError, "key"),
        ((x, torch.randn(B, NK, E + 1), m), {}, ValueError, "key"),
        ((x, m, torch.randn(B, NK + 1, E)), {}, ValueError, "value"),
        ((x, m, torch.randn(B + 1, NK, E)), {}, ValueError, "batch size"),
        ((x, m, m), dict(key_padding_mask=torch.zeros(B, NQ, dtype=torch.bool)), ValueError, "key_padding_mask"),
        ((x, m, m), dict(attn_mask=torch.zeros(NK, NQ, dtype=torch.bool)), ValueError, "attn_mask"),
        ((x, m, m), dict(attn_mask=torch.zeros(B, NQ, NK, dtype=torch.bool)), ValueError, "attn_mask"),
        ((x, m, m), dict(attn_mask=torch.zeros(NQ, NK, dtype=torch.int64)), TypeError, "attn_mask"),
        ((x, m, m), dict(key_padding_mask=torch.zeros(B, NK, dtype=torch.int32)), TypeError,
         "key_padding_mask"),
    ]
    for args, kwargs, exc, word in cases:
        with pytest.raises(exc, match=word):
            mha(*args, **kwargs)


def test_multihead_attention_bad_inputs():
    mha = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, NQ, E)
    with pytest.raises(ValueError, match="query"):
        mha(x[0, 0], x[0, 0], x[0, 0])
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(B, NQ, NQ, dtype=torch.bool))


def test_flash_attention_bad_inputs():
    fa = FlashAttention(flash=True)
    q = torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match="q must be a 4-d"):
        fa(q[0], q, q)
    with pytest.raises(ValueError, match="heads"):
        fa(q, q[:, :3], q[:, :3])
    with pytest.raises(TypeError, match="mask must be a bool"):
        fa(q, q, q, mask=torch.ones(5, 5))
    with pytest.raises(ValueError, match="dropout"):
        FlashAttention(dropout=1.0)
