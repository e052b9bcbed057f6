"""python -m flash_mha: a short demo on whatever device is present.

Runs the original FlashMHA README example, checks FlashMHA against torch.nn.MultiheadAttention
with the same weights (outputs and gradients), and times both (training step: forward+backward).
"""
import argparse
import time

import torch

import flash_mha
from flash_mha import FlashMHA


def _time_ms(fn, device, reps):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"flash_mha {flash_mha.__version__} | torch {torch.__version__} | device: {device} ({name}) | "
          f"CUDA kernels built: {flash_mha.built_with_cuda()}")

    # 1. The original README example, verbatim.
    model = FlashMHA(embed_dim=512, num_heads=8, bias=True, batch_first=True, dropout=0.0, causal=False)
    query = torch.randn(10, 32, 512)
    key = torch.randn(10, 32, 512)
    value = torch.randn(10, 32, 512)
    output = model(query, key, value)
    print(f"README example: output shape {tuple(output.shape)}")

    # 2. Same weights as nn.MultiheadAttention: outputs and gradients agree.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    embed, heads, batch, seqlen = 1024, 16, 4, 1024 if device.type == "cuda" else 512
    ours = FlashMHA(embed, heads, batch_first=True, device=device, dtype=dtype)
    theirs = torch.nn.MultiheadAttention(embed, heads, batch_first=True, device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, seqlen, embed, device=device, dtype=dtype, requires_grad=True)
    y_ours = ours(x, x, x)
    (g_ours,) = torch.autograd.grad(y_ours.float().square().mean(), x)
    y_theirs, _ = theirs(x, x, x, need_weights=False)
    (g_theirs,) = torch.autograd.grad(y_theirs.float().square().mean(), x)
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    print(f"vs nn.MultiheadAttention ({dtype}, {batch}x{seqlen}x{embed}, {heads} heads): "
          f"output rel. error {rel(y_ours, y_theirs):.2e}, input-gradient rel. error {rel(g_ours, g_theirs):.2e}")

    # 3. Training-step time, same process, same device.
    def step(module, **kw):
        def run():
            out = module(x, x, x, **kw)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()
        return run
    t_ours = _time_ms(step(ours), device, args.reps)
    t_theirs = _time_ms(step(theirs, need_weights=False), device, args.reps)
    t_theirs_w = _time_ms(step(theirs), device, args.reps)
    print(f"training step (forward+backward) on {name}: FlashMHA {t_ours:.2f} ms | nn.MultiheadAttention "
          f"need_weights=False {t_theirs:.2f} ms ({t_theirs / t_ours:.2f}x) | default need_weights=True "
          f"{t_theirs_w:.2f} ms ({t_theirs_w / t_ours:.2f}x)")


if __name__ == "__main__":
    main()
