"""A small set of CUDA attention calls, forward and backward, checked against the float64 reference.

Meant to run under compute-sanitizer (benchmarks/sanitize.sh): odd lengths, causal both ways,
broadcast bias with gradient, boolean masks, dropout, GQA, every dtype. Exits non-zero on a mismatch.
"""
import faulthandler
import os
import sys

import torch

import flash_mha
from flash_mha import reference

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel(a, b):
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(dtype, b, h, h_kv, n_q, n_k, d, d_v, causal, bias_shape, mask_shape, dropout_p, deterministic=False,
         path="auto"):
    torch.use_deterministic_algorithms(deterministic)
    try:
        with flash_mha.force_kernel(path):
            return _case(dtype, b, h, h_kv, n_q, n_k, d, d_v, causal, bias_shape, mask_shape, dropout_p, deterministic,
                         path)
    finally:
        torch.use_deterministic_algorithms(False)


def _case(dtype, b, h, h_kv, n_q, n_k, d, d_v, causal, bias_shape, mask_shape, dropout_p, deterministic, path):
    dev = "cuda"
    q = torch.randn(b, h, n_q, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h_kv, n_k, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h_kv, n_k, d_v, device=dev, dtype=dtype, requires_grad=True)
    bias = torch.randn(*bias_shape, device=dev, dtype=dtype, requires_grad=True) if bias_shape else None
    mask = (torch.rand(*mask_shape, device=dev) > 0.25) if mask_shape else None
    out, _, rng = flash_mha.attention_fwd(q, k, v, bias, mask, None, causal, dropout_p)
    ref = reference.attention(q, k, v, bias, mask, None, causal, dropout_p, rng)
    g = torch.randn_like(out)
    leaves = [t for t in (q, k, v, bias) if t is not None]
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    errs = [rel(out, ref)] + [rel(a, r) for a, r in zip(grads, ref_grads)]
    ok = all(e < TOL[dtype] for e in errs)
    print(f"{'ok  ' if ok else 'FAIL'} {str(dtype):15s} b{b} h{h}/{h_kv} n{n_q}x{n_k} d{d}/{d_v} causal={causal} "
          f"bias={bias_shape} mask={mask_shape} p={dropout_p}{' deterministic' if deterministic else ''}"
          f"{'' if path == 'auto' else ' path=' + path}: "
          + " ".join(f"{e:.1e}" for e in errs))
    return ok


def main():
    torch.manual_seed(0)
    cases = [
        (torch.bfloat16, 2, 4, 2, 77, 131, 64, 64, None, (1, 4, 77, 131), None, 0.0),
        (torch.float16, 1, 2, 1, 130, 65, 128, 128, "bottom_right", None, (1, 1, 1, 65), 0.0),
        (torch.bfloat16, 1, 2, 2, 65, 190, 128, 64, "top_left", (1, 2, 1, 190), (1, 2, 65, 190), 0.1),
        (torch.float16, 2, 2, 1, 33, 33, 96, 96, "top_left", None, None, 0.2),
        (torch.float32, 1, 3, 1, 45, 70, 33, 17, "bottom_right", (1, 3, 45, 70), (1, 1, 45, 1), 0.1),
        (torch.float64, 1, 2, 2, 20, 37, 8, 8, None, (1, 1, 1, 37), None, 0.0),
        (torch.bfloat16, 1, 1, 1, 1, 300, 256, 256, None, None, (1, 1, 1, 300), 0.0),
        # Hopper (sm90) shapes: no bias / mask / dropout, d 64 and 128, odd lengths, GQA.
        (torch.bfloat16, 2, 4, 2, 200, 333, 64, 64, "bottom_right", None, None, 0.0),
        (torch.float16, 1, 4, 1, 300, 129, 128, 128, "top_left", None, None, 0.0),
        (torch.bfloat16, 1, 2, 2, 257, 257, 128, 128, None, None, None, 0.0),
        # d = 128 forward with 176-key tiles (non-causal, n_k > 4096; the last tile partly past n_k).
        (torch.float16, 1, 2, 1, 130, 4200, 128, 128, None, None, None, 0.0),
        # ... and with a key mask (constant along the queries), per batch or per batch and head.
        (torch.bfloat16, 2, 4, 2, 200, 333, 64, 64, "top_left", None, (2, 4, 1, 333), 0.0),
        (torch.float16, 2, 2, 1, 129, 300, 128, 128, None, None, (2, 1, 1, 300), 0.0),
        # sm80 forward with the bias / mask staged in shared memory (n_k a multiple of 16).
        (torch.bfloat16, 2, 4, 2, 200, 256, 64, 64, "top_left", (1, 4, 200, 256), (2, 1, 1, 256), 0.0),
        (torch.float16, 2, 2, 2, 100, 160, 128, 128, None, (2, 2, 100, 160), (1, 1, 100, 160), 0.1),
        # Hopper general backward: dbias stored directly by the dbias writer warps (causal: after a
        # memset; GQA), and reduced into the float accumulator in 16-byte steps.
        (torch.bfloat16, 2, 2, 1, 150, 200, 128, 128, "bottom_right", (2, 2, 150, 200), None, 0.0),
        (torch.float16, 1, 2, 2, 130, 256, 64, 64, None, (1, 2, 130, 256), None, 0.0),
        (torch.bfloat16, 3, 2, 2, 70, 256, 128, 128, None, (1, 2, 70, 256), None, 0.0),
        # Hopper general backward at d = 64: bias tiles staged by TMA into one buffer, the dQ staging
        # tile in the idle dS^T buffer (several query tiles each); bias + key mask, the full kernel
        # (bias, a mask along the queries, dropout), deterministic mode.
        (torch.bfloat16, 2, 4, 2, 300, 256, 64, 64, "bottom_right", (1, 4, 300, 256), (2, 1, 1, 256), 0.0),
        (torch.float16, 2, 2, 1, 260, 264, 64, 64, "top_left", (2, 2, 260, 264), (1, 1, 260, 264), 0.1),
        (torch.bfloat16, 2, 4, 2, 300, 256, 64, 64, None, (1, 4, 300, 256), None, 0.0, True),
        # Deterministic mode on the Hopper backward: dQ in key-block order (flags between blocks),
        # a shared dbias stored whole and summed by the reduce kernel.
        (torch.bfloat16, 2, 4, 2, 300, 333, 64, 64, "top_left", None, None, 0.0, True),
        (torch.float16, 2, 2, 2, 200, 256, 128, 128, None, (2, 1, 1, 256), None, 0.0, True),
        (torch.bfloat16, 2, 2, 2, 130, 300, 64, 64, "bottom_right", (1, 2, 130, 300), None, 0.1, True),
        # float32 on the sm80 kernels (3xTF32): bias read per element and staged (n_k % 4 == 0),
        # mask, dropout, GQA, padded head dims (32 -> 64, d_v 96 -> 128).
        (torch.float32, 2, 4, 2, 77, 131, 64, 64, "bottom_right", (1, 4, 77, 131), (2, 1, 1, 131), 0.1),
        (torch.float32, 1, 2, 1, 130, 256, 128, 128, "top_left", (1, 2, 130, 256), None, 0.0),
        (torch.float32, 2, 2, 2, 100, 65, 128, 96, None, None, None, 0.0),
        (torch.float32, 1, 4, 2, 200, 333, 32, 32, "top_left", None, None, 0.0),
        # The sm80 kernels forced: a key mask alone (the plain kernels with the mask rows), the
        # backward's staged bias / mask tiles (two stages on sm_90), dbias from the dS fragments
        # (full) and by atomics (head-broadcast), warps skipping tiles the mask hides.
        (torch.bfloat16, 2, 4, 2, 200, 256, 64, 64, None, None, (2, 1, 1, 256), 0.0, False, "sm80"),
        (torch.float16, 2, 2, 1, 130, 256, 128, 128, "bottom_right", None, (2, 2, 1, 256), 0.0, False, "sm80"),
        (torch.bfloat16, 2, 2, 2, 130, 256, 128, 128, "bottom_right", (2, 2, 130, 256), (2, 2, 130, 256), 0.0,
         False, "sm80"),
        (torch.float16, 2, 4, 2, 200, 320, 64, 64, None, (1, 4, 200, 320), (2, 1, 1, 320), 0.1, False, "sm80"),
        # ... dropout on the plain kernels (kSm80FwdDropoutPlain, kSm80BwdDropoutPlain): alone (the
        # wide forward key tile, odd lengths), with key padding (the key-mask kernels at d 128 and 64).
        (torch.bfloat16, 2, 4, 2, 200, 333, 64, 64, "bottom_right", None, None, 0.15, False, "sm80"),
        (torch.float16, 2, 2, 1, 130, 256, 128, 128, None, None, (2, 1, 1, 256), 0.1, False, "sm80"),
        (torch.bfloat16, 1, 2, 1, 77, 320, 64, 64, "top_left", None, (1, 1, 1, 320), 0.2, False, "sm80"),
        # bias / mask rows 4-byte but not 16-byte aligned (n_k 300, 202): staged by 4-byte chunks
        # with kSm80StageChunks4, else read per element
        (torch.bfloat16, 2, 2, 1, 130, 300, 128, 128, "top_left", (1, 2, 130, 300), (2, 1, 130, 300), 0.0, False,
         "sm80"),
        (torch.float16, 1, 4, 2, 70, 202, 64, 64, None, (1, 4, 70, 202), None, 0.1, False, "sm80"),
        # key masks at n_k off a multiple of 16: the narrow key-mask kernels' byte staging
        (torch.bfloat16, 2, 2, 1, 130, 333, 128, 128, None, None, (2, 1, 1, 333), 0.0, False, "sm80"),
        (torch.float16, 2, 4, 2, 77, 203, 64, 64, "bottom_right", None, (2, 4, 1, 203), 0.1, False, "sm80"),
        (torch.bfloat16, 1, 2, 2, 70, 141, 128, 128, "top_left", None, (1, 1, 1, 141), 0.1, False, "sm80"),
        # ... a shared dbias (over batch and heads) from the dS fragments at d 128, causal.
        (torch.bfloat16, 2, 2, 2, 130, 256, 128, 128, "top_left", (1, 1, 130, 256), None, 0.0, False, "sm80"),
        # sm80 native head dims: 32 and 96 (d != d_v), the split backward over 192 and 256 columns
        # (d 160 -> 192; GQA, odd lengths, causal; a key mask alone).
        (torch.bfloat16, 2, 4, 2, 77, 131, 24, 32, "bottom_right", None, None, 0.0, False, "sm80"),
        (torch.float16, 2, 2, 1, 130, 200, 72, 96, "top_left", None, None, 0.0, False, "sm80"),
        (torch.bfloat16, 2, 4, 2, 100, 135, 160, 160, "bottom_right", None, None, 0.0, False, "sm80"),
        (torch.float16, 2, 2, 1, 70, 208, 256, 256, None, None, (2, 1, 1, 208), 0.0, False, "sm80"),
        # The general backward over 128 (split kernel, 256 columns, one Q / dO stage): bias and mask
        # staged (n_k % 16 == 0) with dropout; a broadcast bias read per element (odd n_k).
        (torch.bfloat16, 2, 4, 2, 100, 208, 256, 256, "bottom_right", (2, 4, 100, 208), (2, 1, 1, 208), 0.1, False,
         "sm80"),
        (torch.float16, 1, 2, 1, 90, 135, 160, 160, None, (1, 2, 1, 135), (1, 1, 90, 135), 0.0, False, "sm80"),
        # The sm80 backward in deterministic mode (the general kernel, dQ in key-block order): several
        # key blocks per head, causal GQA with a full bias; d 96 (padded to 128) with a key mask.
        (torch.bfloat16, 2, 4, 2, 150, 300, 128, 128, "bottom_right", (2, 4, 150, 300), None, 0.0, True, "sm80"),
        (torch.float16, 1, 2, 2, 70, 260, 96, 96, None, None, (1, 1, 1, 260), 0.1, True, "sm80"),
    ]
    # GPU_SMOKE_SELECT="sm80 dropout mask" keeps the cases forced onto sm80, with dropout, or with a
    # mask (any of the words), e.g. for a sanitizer run after a change to those kernels only.
    select = os.environ.get("GPU_SMOKE_SELECT", "").split()
    if select:
        picks = {"sm80": lambda c: c[13:14] == ("sm80",), "dropout": lambda c: c[11] > 0, "mask": lambda c: c[10] is not None}
        unknown = set(select) - set(picks)
        if unknown:
            raise SystemExit(f"GPU_SMOKE_SELECT: unknown words {sorted(unknown)}; use {sorted(picks)}")
        cases = [c for c in cases if any(picks[w](c) for w in select)]
    results = []
    for c in cases:
        try:
            results.append(case(*c))
        except Exception as e:  # report and go on: one bad case must not hide the others
            print(f"FAIL {c}: {type(e).__name__}: {e}")
            results.append(False)
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    # The script has aborted at exit a few times after every case passed ("terminate called without
    # an active exception", rc 134; NOTES.md): on SIGABRT print every thread's Python stack.
    faulthandler.enable()
    sys.exit(main())
