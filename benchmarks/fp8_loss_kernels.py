"""The FP8 loss's kernels alone: slm's Gluon kernels (Hopper) against its Triton ones, per chunk of tokens.

``linear_softmax_grad_fp8`` (src/slm/model/softmax_grad.py) computes the logits x @ W.T tile by tile twice,
once for each row's log-sum-exp and once for the gradient G (stored with its transpose), and never stores
them. This times each pass and the whole op with ``triton.testing.do_bench``, and checks that both sets of
kernels give the same loss and G:

    python benchmarks/fp8_loss_kernels.py                        # 8,192 tokens x d_model 384, vocabulary 50,257
    python benchmarks/fp8_loss_kernels.py --shape 8192x256 --vocab 32000
    python benchmarks/fp8_loss_kernels.py --shape 8192x768              # GPT-2 small (tiles of 64 columns)

It also times what the loss does where no kernel computes the logits: cuBLAS writes them (bf16), then two
passes read them (``softmax_grad_fp8``).

Needs an NVIDIA GPU with FP8 tensor cores; the Gluon kernels need a Hopper one (H100, H200).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from slm.model import GPTConfig, softmax_grad, softmax_grad_gluon  # noqa: E402
from slm.model.fp8 import E4M3, scaled_mm, to_fp8  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x384", help="TOKENSxD_MODEL (one chunk of the fused loss)")
    p.add_argument("--vocab", type=int, default=50257)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; these kernels run on NVIDIA GPUs only")
    import triton
    from triton.testing import do_bench

    m, k = (int(v) for v in args.shape.split("x"))
    v = GPTConfig(vocab_size=args.vocab, vocab_multiple=64).padded_vocab_size
    torch.manual_seed(0)
    x8, x_inv = to_fp8(torch.randn(m, k, device="cuda"), E4M3)
    w8, w_inv = to_fp8(torch.randn(v, k, device="cuda") * 0.02 * k**0.5, E4M3)
    y = torch.randint(0, args.vocab, (m,), device="cuda")
    scale = 2.0**15
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{m} x {k} tokens, vocabulary {args.vocab} (padded {v})")

    out, times = {}, {}
    # what loss.py does where no kernel computes the logits: cuBLAS writes them in bf16, two passes read them
    times["whole op, stored logits"] = do_bench(lambda: softmax_grad.softmax_grad_fp8(
        scaled_mm(x8, x_inv, w8.t(), w_inv, torch.bfloat16, fast_accum=True), y, args.vocab, scale))
    for gluon in (False, True):
        softmax_grad_gluon.enabled = gluon
        if gluon and not softmax_grad_gluon.available(x8, w8, args.vocab):
            print("the Gluon kernels do not run here (not a Hopper GPU, or d_model not a multiple of 128 up to "
                  f"{softmax_grad_gluon.MAX_K})")
            break
        out[gluon] = softmax_grad.linear_softmax_grad_fp8(x8, x_inv, w8, w_inv, y, args.vocab, scale)
        times[f"whole op, {'Gluon' if gluon else 'Triton'} kernels"] = do_bench(
            lambda: softmax_grad.linear_softmax_grad_fp8(x8, x_inv, w8, w_inv, y, args.vocab, scale))
    if True in out:
        (g0, _, l0), (g1, g1_t, l1) = out[False], out[True]
        differ = (g0.view(torch.uint8) != g1.view(torch.uint8)).float().mean().item()
        print(f"loss: largest difference {(l0 - l1).abs().max().item():.2e} (mean loss {l0.mean().item():.3f}); "
              f"G: {differ:.1e} of its bytes differ; G.T is G transposed: "
              f"{torch.equal(g1_t.view(torch.uint8), g1.view(torch.uint8).t())}")
        lse = torch.full((m,), 20.0, device="cuda")  # the gradient pass's speed does not depend on it
        g, g_t = torch.empty_like(g1), torch.empty_like(g1_t)
        times["log-sum-exp pass, Gluon"] = do_bench(
            lambda: softmax_grad_gluon.lse_parts(x8, x_inv, w8, w_inv, args.vocab))
        times["gradient pass, Gluon"] = do_bench(
            lambda: softmax_grad_gluon.grad(x8, x_inv, w8, w_inv, lse, y, g, g_t, args.vocab, scale))
    flop = 2 * m * v * k  # one pass's logits
    for name, ms in times.items():
        print(f"{name:32s} {ms * 1e3:8.1f} us   ({flop / ms / 1e9:5.0f} TFLOP/s per pass of logits)")


if __name__ == "__main__":
    main()
