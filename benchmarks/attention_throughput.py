"""Attention alone: slm's short-context kernel against PyTorch's SDPA kernels, forward + backward.

Both start from the qkv projection's output (B, T, 3C) and end with the heads side by side (B, T, C), as
MultiHeadAttention does, so the SDPA side includes its layout copies (compiled, so inductor fuses what it
can; slm's side is compiled too). On random bf16 inputs at the 30M model's shape by default:

    python benchmarks/attention_throughput.py                        # B 1024, T 128, 6 heads of 64
    python benchmarks/attention_throughput.py --shape 512x128x12x32 --dropout 0.1

Prints the GPU time of one forward + backward (all its kernels, layout copies included) and each side's
largest gradient difference from the float32 reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from slm.device import attention_kernel  # noqa: E402
from slm.model.short_attention import short_attention, supported  # noqa: E402


def sdpa(qkv: torch.Tensor, n_heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, n_heads, -1).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return y.transpose(1, 2).contiguous().view(B, T, C3 // 3)


def measure(fn, qkv: torch.Tensor, dy: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """GPU time of one forward + backward: the sum of its kernels' times (torch.profiler), so the Python
    overhead of launching them, which is larger than the kernels at this size, does not count."""
    def step():
        x = qkv.detach().requires_grad_()
        fn(x).backward(dy)
        return x.grad

    grad = step()
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return gpu_us / repeats / 1e3, grad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1024x128x6x64", help="batch x context x heads x head size")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout (the gradient check is skipped)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attention_throughput.py times GPU kernels: it needs a CUDA GPU")
    B, T, H, D = (int(n) for n in args.shape.split("x"))
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16)
    if not supported(qkv, H):
        sys.exit(f"shape {args.shape}: the short-context kernel does not take it (T <= 128, head size 16-128)")
    exact = qkv.float().requires_grad_()
    sdpa(exact, H).backward(dy.float())
    print(f"attention forward + backward, B {B}, T {T}, {H} heads of {D}, dropout {args.dropout}, bf16, "
          f"{torch.cuda.get_device_name()}")
    drop = args.dropout
    sides = [("slm short-context kernel", "auto", torch.compile(lambda x: short_attention(x, H, drop)))]
    sides += [(f"SDPA {name}", name, torch.compile(lambda x: sdpa(x, H, drop))) for name in ("sdpa", "cudnn", "flash")]
    for label, kernel, fn in sides:
        torch._dynamo.reset()
        with attention_kernel(kernel):
            ms, grad = measure(fn, qkv, dy, args.repeats)
        error = "" if drop else f"   max |grad - exact| {(grad.float() - exact.grad).abs().max():.3g}"
        print(f"  {label:26s} {ms:7.3f} ms{error}")


if __name__ == "__main__":
    main()
