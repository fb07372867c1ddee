"""The output layer + loss alone: forward and backward of slm's fused ``linear_cross_entropy``, compiled.

Times the largest single piece of a small model's step (for the 30M model, over half of it) in bf16 and
with ``fp8=True`` (the FP8 output layer of ``training.fp8: head``), on random hidden states and targets:

    python benchmarks/loss_throughput.py                          # 30M (65,536 x 384) and 124M (16,384 x 768)
    python benchmarks/loss_throughput.py --shape 32768x1024 --chunk 16384
    python benchmarks/loss_throughput.py --device cpu --shape 64x32 --vocab 500 --chunk 32   # a quick check

Prints ms per forward + backward and the relative error of the loss and both gradients against the exact
(float32, unfused) cross-entropy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from slm.model import GPTConfig  # noqa: E402
from slm.model.loss import linear_cross_entropy  # noqa: E402


def measure(tokens: int, d: int, vocab: int, chunk: int, fp8: bool, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    padded = GPTConfig(vocab_size=vocab, vocab_multiple=64).padded_vocab_size  # as the shipped configs pad
    x = torch.randn(tokens, d, device=device).to(torch.bfloat16)
    w = (torch.randn(padded, d, device=device) * 0.02).to(torch.bfloat16)
    y = torch.randint(0, vocab, (tokens,), device=device)
    loss_fn = torch.compile(lambda x, w, y: linear_cross_entropy(x, w, y, chunk, vocab_size=vocab, fp8=fp8))

    def step():
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        loss = loss_fn(xg, wg, y)
        loss.backward()
        return loss, xg.grad, wg.grad

    t0 = time.perf_counter()
    loss, gx, gw = step()
    compile_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / repeats)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    exact = F.cross_entropy((xf @ wf.t())[:, :vocab], y)
    ex, ew = torch.autograd.grad(exact, (xf, wf))
    err = [((a.float() - b).norm() / b.norm()).item() for a, b in ((loss, exact), (gx, ex), (gw, ew))]
    return dict(ms=best * 1e3, compile_s=compile_s, err_loss=err[0], err_x=err[1], err_w=err[2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", default=["65536x384", "16384x768"], help="TOKENSxD_MODEL")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; pass --device cpu for a quick check")
    for shape in args.shape:
        tokens, d = (int(v) for v in shape.split("x"))
        for fp8 in (False, True):
            r = measure(tokens, d, args.vocab, args.chunk, fp8, args.device, args.repeats)
            print(f"{tokens:>6} x {d:<5} vocab {args.vocab} chunk {args.chunk} {'fp8 ' if fp8 else 'bf16'}: "
                  f"{r['ms']:8.2f} ms  (compile {r['compile_s']:.0f} s)  rel. error loss {r['err_loss']:.1e} "
                  f"grad x {r['err_x']:.3f} grad w {r['err_w']:.3f}", flush=True)


if __name__ == "__main__":
    main()
