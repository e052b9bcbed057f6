"""SDPA peers (cuDNN, FLASH = FlashAttention-2) on the standard grid, for comparison with
benchmarks/sm90_harness.cu in the same device call. bf16, [b, h, n, d] contiguous, CUDA-event
median of 20 after warm-up. TFLOP/s = 4 b h n^2 d (/2 causal) / time."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
    print(f"{'d':5} {'causal':6} {'n':>6} {'b x h':>7} | {'cudnn':>8} {'flash':>8}")
    for d in (64, 128):
        for causal in (False, True):
            for n in (1024, 2048, 4096, 8192, 16384):
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flop = 4 * b * h * n * n * d / (2 if causal else 1)
                row = []
                for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                    try:
                        with sdpa_kernel(backend):
                            ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                        row.append(flop / ms / 1e9)
                    except RuntimeError:
                        row.append(float("nan"))
                print(f"{d:<5} {'yes' if causal else 'no':6} {n:>6} {b:>3}x{h:<3} | {row[0]:8.1f} {row[1]:8.1f}")


if __name__ == "__main__":
    main()
