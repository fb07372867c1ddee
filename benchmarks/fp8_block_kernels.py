"""A transformer block's FP8 pieces alone, at one micro-batch of GPT-2 small (32,768 tokens, d_model 768).

Times with ``triton.testing.do_bench``:

- matmuls: each Linear shape of a block (fc/proj forward and input gradients, qkv, attention proj) in bf16
  (cuBLAS), and through ``torch._scaled_mm`` with one scale per row (what slm runs) or per tensor, with and
  without fast accumulation; TFLOP/s and the error against the float32 product of the bf16 inputs;
- the bias inside ``_scaled_mm``'s epilogue against without it;
- the GELU kernels of fp8_mlp.py for every pair of launch settings (rows per program, values per thread);
- the qkv gradient's cast (fp8_qkv.py's ``qkv_grad_fp8``) against what torch.compile makes of the same
  cat + cast + sum, and W_qkv's gradient as one matmul or three.

    python benchmarks/fp8_block_kernels.py                  # GPT-2 small: 32,768 tokens, d_model 768
    python benchmarks/fp8_block_kernels.py --tokens 16384 --d-model 1024

Needs an NVIDIA GPU with FP8 tensor cores and per-row FP8 scales (H100, H200).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from slm.model import fp8_mlp, fp8_qkv  # noqa: E402
from slm.model.fp8 import E4M3, scaled_mm, to_fp8, to_fp8_rows  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--d-model", type=int, default=768)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; these kernels run on NVIDIA GPUs only")
    from triton.testing import do_bench

    def us(fn):
        return do_bench(fn, warmup=25, rep=200) * 1e3

    torch.manual_seed(0)
    m, d = args.tokens, args.d_model
    f = 4 * d
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {m:,} tokens, d_model {d}")
    bf16 = torch.bfloat16

    print("\nmatmuls (M x K @ K x N): microseconds, TFLOP/s, error against float32")
    shapes = {"fc forward, proj input grad": (m, d, f), "proj forward, fc input grad": (m, f, d),
              "qkv forward": (m, d, 3 * d), "qkv input grad": (m, 3 * d, d), "attention proj": (m, d, d)}
    for name, (rows, k, n) in shapes.items():
        a = torch.randn(rows, k, device="cuda", dtype=bf16)
        b = (torch.randn(n, k, device="cuda") * 0.02).to(bf16)  # (N, K), as a Linear's weight
        exact = a.float() @ b.float().t()
        a8, a_inv = to_fp8_rows(a)
        b8, b_inv = to_fp8_rows(b)
        ta8, ta_inv = to_fp8(a, E4M3)
        tb8, tb_inv = to_fp8(b, E4M3)
        cases = {"bf16 (cuBLAS)": lambda: a @ b.t()}
        for fast in (False, True):
            cases[f"FP8 per row, fast_accum={fast}"] = (
                lambda fast=fast: scaled_mm(a8, a_inv, b8.t(), b_inv.t(), bf16, fast_accum=fast))
            cases[f"FP8 per tensor, fast_accum={fast}"] = (
                lambda fast=fast: scaled_mm(ta8, ta_inv, tb8.t(), tb_inv, bf16, fast_accum=fast))
        for case, fn in cases.items():
            t = us(fn)
            err = ((fn().float() - exact).norm() / exact.norm()).item()
            print(f"  {name:28s} {case:32s} {t:7.1f} us {2 * rows * k * n / t / 1e6:6.0f} TFLOP/s  error {err:.1e}")

    x = torch.randn(m, d, device="cuda", dtype=bf16)
    w = torch.randn(3 * d, d, device="cuda") * 0.02
    bias = torch.randn(3 * d, device="cuda").to(bf16)
    x8, x_inv = to_fp8_rows(x)
    w8, w_inv = to_fp8_rows(w)
    with_bias = scaled_mm(x8, x_inv, w8.t(), w_inv.t(), bf16, True, bias=bias)
    added = scaled_mm(x8, x_inv, w8.t(), w_inv.t(), bf16, True).float() + bias.float()
    print(f"\nqkv forward with its bias in _scaled_mm's epilogue: "
          f"{us(lambda: scaled_mm(x8, x_inv, w8.t(), w_inv.t(), bf16, True, bias=bias)):.1f} us, without "
          f"{us(lambda: scaled_mm(x8, x_inv, w8.t(), w_inv.t(), bf16, True)):.1f} us "
          f"(largest difference to adding it after: {(with_bias.float() - added).abs().max().item():.3f})")

    print(f"\nGELU kernels at {m:,} x {f:,} (fp8_mlp.FWD / BWD; the backward includes b1's gradient)")
    pre = (torch.randn(m, f, device="cuda") * 2).to(bf16)
    grad = torch.randn(m, f, device="cuda").to(bf16)
    b1 = torch.randn(f, device="cuda") * 0.1
    shipped = dict(fp8_mlp.FWD), dict(fp8_mlp.BWD)
    for rows in (1, 4, 16, 32):
        for per_thread in (8, 32):
            fp8_mlp.FWD.update(rows=rows, per_thread=per_thread)
            fp8_mlp.BWD.update(rows=rows, per_thread=per_thread)
            mark = "  <- forward as shipped" if fp8_mlp.FWD == shipped[0] else ""
            mark += "  <- backward as shipped" if fp8_mlp.BWD == shipped[1] else ""
            forward = us(lambda: fp8_mlp.bias_gelu_fp8(pre, b1))
            backward = us(lambda: fp8_mlp.gelu_backward_fp8(grad, pre, b1))
            print(f"  rows {rows:2d}, per_thread {per_thread:2d}: forward {forward:6.1f} us, "
                  f"backward {backward:6.1f} us{mark}")
    fp8_mlp.FWD.update(shipped[0])
    fp8_mlp.BWD.update(shipped[1])
    column_sum = torch.compile(lambda t: t.float().sum(0))
    print(f"  b1's gradient as a pass of its own (torch.compile): {us(lambda: column_sum(grad)):.1f} us")

    print(f"\nqkv gradient at {m:,} x 3 x {d}")
    dq, dk, dv = (torch.randn(m, d, device="cuda").to(bf16) for _ in range(3))
    got, want = fp8_qkv.qkv_grad_fp8(dq, dk, dv), fp8_qkv.qkv_grad_fp8_torch(dq, dk, dv)
    same = (got[0].float() == want[0].float()).float().mean().item()
    t = us(lambda: fp8_qkv.qkv_grad_fp8(dq, dk, dv))
    print(f"  qkv_grad_fp8 (FP8 rows, scales, bias gradient; one pass): {t:.1f} us ({same:.1%} of the bytes as "
          f"PyTorch's)")

    def cast_and_sum(a, b, c):
        g = torch.cat([a, b, c], 1)
        return *to_fp8_rows(g), g.float().sum(0)

    compiled, cat = torch.compile(cast_and_sum), torch.compile(lambda a, b, c: torch.cat([a, b, c], 1))
    print(f"  torch.compile of cat + cast + sum: {us(lambda: compiled(dq, dk, dv)):.1f} us; the cat alone (what "
          f"fp8: mlp runs): {us(lambda: cat(dq, dk, dv)):.1f} us")
    g = torch.cat([dq, dk, dv], 1)
    print(f"  W_qkv's gradient: one (M, 3D) matmul {us(lambda: g.t() @ x):.1f} us, three (M, D) ones "
          f"{us(lambda: torch.cat([t.t() @ x for t in (dq, dk, dv)])):.1f} us")


if __name__ == "__main__":
    main()
