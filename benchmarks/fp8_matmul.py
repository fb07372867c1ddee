"""The FP8 output layer's three matmuls on one GPU, with and without fast accumulation.

For one chunk of tokens of the fused loss (loss.py, ``training.fp8: head``): the logits x @ W.T, the input
gradient G @ W and the weight gradient G.T @ x, each through ``torch._scaled_mm`` as slm calls it
(``slm.model.fp8.scaled_mm``), timed with ``use_fast_accum`` off and on. Reported: ms, TFLOP/s, and the
relative error (Frobenius norm) against the float32 product of the same fp8 inputs, i.e. the error the
accumulation adds on top of rounding the inputs to fp8. G is a softmax-like gradient held as e5m2, as in
training.

    python benchmarks/fp8_matmul.py                        # 8,192 tokens, vocabulary 50,304, d_model 384 and 768
    python benchmarks/fp8_matmul.py --tokens 16384 --d-model 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from slm.model.fp8 import E4M3, E5M2, col_major, scaled_mm, to_fp8  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="rows per chunk (training.loss_chunk)")
    p.add_argument("--vocab", type=int, default=50304, help="padded vocabulary size")
    p.add_argument("--d-model", type=int, nargs="+", default=[384, 768])
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("fp8_matmul.py needs a GPU with FP8 tensor cores (compute capability 8.9+: L4, H100, ...)")
    import triton  # ships with CUDA builds of PyTorch

    torch.manual_seed(0)
    m, v = args.tokens, args.vocab
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {m} tokens x vocabulary {v}")
    g8, g_inv = to_fp8(torch.softmax(torch.randn(m, v, device="cuda") * 3, dim=1), E5M2)
    g8_t = g8.t().contiguous()
    for d in args.d_model:
        x8, x_inv = to_fp8(torch.randn(m, d, device="cuda"), E4M3)
        w8, w_inv = to_fp8(torch.randn(v, d, device="cuda") * 0.02, E4M3)
        cases = {"logits x @ W.T": (x8, x_inv, w8.t(), w_inv),
                 "grad_x G @ W": (g8, g_inv, col_major(w8), w_inv),
                 "grad_w G.T @ x": (g8_t, g_inv, col_major(x8), x_inv)}
        for name, (a, a_inv, b, b_inv) in cases.items():
            exact = (a.float() * a_inv) @ (b.float() * b_inv)
            for fast in (False, True):
                def run():
                    return scaled_mm(a, a_inv, b, b_inv, torch.bfloat16, fast_accum=fast)
                ms = triton.testing.do_bench(run, warmup=25, rep=200)
                err = ((run().float() - exact).norm() / exact.norm()).item()
                flops = 2 * a.size(0) * a.size(1) * b.size(1)
                print(f"d_model {d:4d}  {name:15s} fast_accum={fast!s:5s}  {ms:.3f} ms  "
                      f"{flops / ms / 1e9:5.0f} TFLOP/s  rel. error {err:.2e}")


if __name__ == "__main__":
    main()
