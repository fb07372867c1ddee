"""The output layer and its cross-entropy in one pass over chunks of tokens: the full logits never exist.

The plain way, ``F.cross_entropy(x @ W.T, y)``, holds a (tokens x vocabulary) logits tensor for backward
and makes a gradient of the same size: for the 30M model at micro-batch 512 that is 65,536 x 50,257
values, over 6 GB in bfloat16. ``linear_cross_entropy`` walks over the tokens ``chunk`` at a time. For
each chunk it computes the logits, their log-sum-exp in float32 and the loss, and right away the gradient
(softmax minus one-hot) with respect to the chunk's hidden states and to the weight; then the chunk's
logits are dropped. Backward only scales the gradients kept from forward. The head's memory falls from
O(tokens x vocabulary) to O(chunk x vocabulary), so larger micro-batches fit.

The result equals ``F.cross_entropy`` (ids < 0 are ignored, the loss is the mean over the others);
tests/test_model.py checks the loss and both gradients against it.
"""

from __future__ import annotations

import torch

from slm.model import softmax_grad_gluon
from slm.model.fp8 import E4M3, col_major, compute_dtype, scaled_mm, to_fp8
from slm.model.softmax_grad import linear_softmax_grad_fp8, softmax_grad, softmax_grad_fp8


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk: int, fp8: bool):
        # x: (N, d); weight: (V, d), both in the compute dtype; targets: (N,) ids, < 0 = ignore.
        # Rows of weight from vocab_size on are padding: their logits are masked out, not sliced off, so the
        # matmuls keep the padded (aligned) width and the padding rows get a zero gradient.
        acc = torch.promote_types(x.dtype, torch.float32)  # softmax, loss and weight gradient: float32 or better
        n_valid = (targets >= 0).sum().clamp(min=1).to(acc)
        grad_x = torch.empty_like(x)
        want_w = ctx.needs_input_grad[1]  # False when the output layer is frozen (LoRA fine-tuning)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        loss = torch.zeros((), dtype=acc, device=x.device)
        if fp8:  # the three matmuls in FP8 (fp8.py); the softmax-minus-one-hot gradient, in [-1, 1], as e5m2
            # written row-major for grad_x and transposed for grad_w in one pass (softmax_grad.py)
            x8, x_inv = to_fp8(x, E4M3)
            w8, w_inv = to_fp8(weight, E4M3)
            w8_cols = col_major(w8)
            x8_t = x8.t().contiguous() if want_w else None  # grad_w's operand, only when it is wanted
            g_inv = 1.0 / (GRAD_SCALE * n_valid.float())
            recompute = x.size(1) % 32 == 0 and (  # logits made inside the kernels
                x.size(1) <= RECOMPUTE_MAX_D or softmax_grad_gluon.takes(x.size(1), x.device))
        for start in range(0, x.size(0), chunk):
            end = min(start + chunk, x.size(0))
            xc, yc = x[start:end], targets[start:end]
            if not fp8:
                g, row_loss = softmax_grad(xc @ weight.t(), yc, vocab_size)
                g = (g / n_valid).to(x.dtype)
                grad_x[start:end] = g @ weight
                if want_w:
                    grad_w += (g.t() @ xc).to(acc)
            else:
                if recompute:  # G and G.T
                    g8, g8_t, row_loss = linear_softmax_grad_fp8(x8[start:end], x_inv, w8, w_inv, yc, vocab_size,
                                                                 GRAD_SCALE)
                else:  # logits in bf16 whatever x's dtype: the kernels are verified on GPUs with bf16 logits
                    # (from float32 ones their transposed copy of G once came out wrong: benchmarks/RESULTS.md)
                    logits = scaled_mm(x8[start:end], x_inv, w8.t(), w_inv, torch.bfloat16, fast_accum=True)
                    g8, g8_t, row_loss = softmax_grad_fp8(logits, yc, vocab_size, GRAD_SCALE)
                # fast accumulation here too: G's e5m2 rounding (2 mantissa bits) dwarfs its error
                grad_x[start:end] = scaled_mm(g8, g_inv, w8_cols, w_inv, x.dtype, fast_accum=True)
                if want_w:
                    grad_w += scaled_mm(g8_t, g_inv, x8_t[:, start:end].t(), x_inv, acc, fast_accum=True)
            loss = loss + row_loss.sum()
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if want_w else torch.zeros(()))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss if ctx.needs_input_grad[1] else None, None, None, None, None


GRAD_SCALE = 2.0**15  # FP8 head: the gradient (softmax - one-hot, within [-1, 1]) times this fills e5m2's range
# FP8 head: up to this d_model the logits are computed inside the loss kernels, twice, instead of stored and
# read back (softmax_grad.py; on an H100 that is 13% faster at d_model 384 and 10% slower at 768 with the
# Triton kernels); on Hopper GPUs the Gluon kernels do it up to softmax_grad_gluon.MAX_K
RECOMPUTE_MAX_D = 512


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 8192,
                         vocab_size: int | None = None, fp8: bool = False):
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (ids < 0 ignored), ``chunk`` tokens at a time.

    x: (N, d) hidden states; weight: (V, d) output layer, of which only the first ``vocab_size`` rows are
    real tokens (the rest is padding, default: none). Under autocast the matmuls run in the autocast
    dtype (the softmax always in float32), as they would in the plain path. Compiled, each chunk's softmax
    and gradient become one fused kernel (measured on an H100: ~2.2 TB/s, 1.1 ms per 8,192 x 50,304 chunk).
    ``fp8`` runs the three matmuls in FP8 (see fp8.py) where the GPU's FP8 matmuls take the shapes: the
    number of tokens, the chunk, d_model and the (padded) vocabulary multiples of 16; elsewhere the exact path.
    """
    dtype = compute_dtype(x)
    fp8 = fp8 and x.size(0) % 16 == 0 and chunk % 16 == 0 and x.size(1) % 16 == 0 and weight.size(0) % 16 == 0
    with torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x.to(dtype), weight.to(dtype), targets, vocab_size or weight.size(0), chunk,
                                         fp8)

