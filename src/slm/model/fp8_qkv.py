"""The attention's qkv Linear in FP8 (``training.fp8: all``): q, k, v out of one FP8 matmul, bias inside it.

    q, k, v = (x @ W.T + b).split(d_model)

The forward and input-gradient matmuls run on the FP8 tensor cores with fp8.py's rowwise recipe (one
e4m3 scale per token for x and the gradient, per feature for W); W's gradient stays in bf16. What makes
it pay at GPT-2 sizes, where a 768-wide matmul saves only ~60 us, is that nothing else gets slower:

- the bias is added inside the matmul (``_scaled_mm``'s epilogue), not as a pass over the (M, 3 d_model)
  output of its own;
- q, k and v come back as three outputs, so their gradients (which attention returns as three tensors)
  arrive separately: one Triton kernel, ``qkv_grad_fp8``, reads them once and writes the FP8 rows of the
  (M, 3 d_model) gradient with their scales and the bias's gradient, instead of a copy assembling the
  gradient followed by a cast and a sum that each read it again. W's gradient is three matmuls, one per part.

Without a GPU (or Triton) the same functions run in PyTorch, which is what the tests compare the kernel
against (on the CPU through Triton's interpreter).
"""

from __future__ import annotations

import math
import os

import torch

from slm.model.fp8 import compute_dtype, fp8_linear, input_grad_fp8, linear_fp8, to_fp8_rows, tokens_fit

try:  # Triton ships with the CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds
    triton = None

ROWS = 16  # rows per program of ``qkv_grad_fp8`` (16-32 were the fastest on an H200: 72-76 us at 32,768 x 3 x 768)


@torch.library.custom_op("slm::qkv_grad_fp8", mutates_args=())
def qkv_grad_fp8(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of qkv, ``cat([dq, dk, dv], 1)`` (each (M, D)), cast to e4m3 row by row.

    Returns (values (M, 3D), inverse scales (M, 1) float32, column sums (3D,) float32: the bias's gradient).
    """
    if triton is None or not (dq.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return qkv_grad_fp8_torch(dq, dk, dv)
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    (m, d), rows = dq.shape, math.gcd(dq.size(0), ROWS)
    g8, inv, _ = _qkv_grad_outputs(dq, dk, dv)
    sums = dq.new_empty((m // rows, 3 * d), dtype=torch.float32)
    _qkv_grad_fp8_kernel[(m // rows,)](dq, dk, dv, g8, inv, sums, d, ROWS=rows, BD=triton.next_power_of_2(d),
                                       num_warps=4)
    return g8, inv, sums.sum(0)


@qkv_grad_fp8.register_fake
def _qkv_grad_outputs(dq, dk, dv):
    m, d = dq.shape
    return (dq.new_empty((m, 3 * d), dtype=torch.float8_e4m3fn), dq.new_empty((m, 1), dtype=torch.float32),
            dq.new_empty(3 * d, dtype=torch.float32))


def qkv_grad_fp8_torch(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv_grad_fp8`` in PyTorch."""
    g = torch.cat([dq, dk, dv], dim=1).float()
    return *to_fp8_rows(g), g.sum(0)


class _FP8QKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        # x: (M, D) in the compute dtype; weight: (3D, D), bias: (3D,) or None: master weights
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear_fp8(x, weight, bias).split(x.size(1), dim=1)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, weight = ctx.saved_tensors
        dq, dk, dv = (torch.zeros_like(x) if g is None else g for g in (dq, dk, dv))
        g8, g_inv, grad_b = qkv_grad_fp8(dq, dk, dv)
        grad_x = input_grad_fp8(g8, g_inv, weight, x.dtype) if ctx.needs_input_grad[0] else None  # (M, 3D) @ (3D, D)
        grad_w = torch.cat([g.t() @ x for g in (dq, dk, dv)]).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, grad_b.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None


def fp8_qkv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.linear(x, weight, bias).split(d_model, -1)`` with its matmuls in FP8 (sizes multiples of 16)."""
    if not tokens_fit(x):
        return fp8_linear(x, weight, bias).split(x.size(-1), dim=-1)  # its plain form
    dtype = compute_dtype(x)  # autocast's, so asked before it is turned off below
    with torch.autocast(x.device.type, enabled=False):
        parts = _FP8QKV.apply(x.reshape(-1, x.size(-1)).to(dtype), weight, bias)
        return tuple(p.view(*x.shape) for p in parts)


if triton is not None:
    @triton.jit
    def _qkv_grad_fp8_kernel(dq_ptr, dk_ptr, dv_ptr, g8_ptr, inv_ptr, sums_ptr, D, ROWS: tl.constexpr,
                             BD: tl.constexpr):
        """ROWS rows per program, each: the three parts' rows, one scale for the three, cast side by side; and
        each column's sum over the program's rows."""
        cols = tl.arange(0, BD)
        inside = cols < D
        sq = tl.zeros([BD], tl.float32)
        sk = tl.zeros([BD], tl.float32)
        sv = tl.zeros([BD], tl.float32)
        for r in range(ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            q = tl.load(dq_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
            k = tl.load(dk_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
            v = tl.load(dv_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.maximum(tl.max(tl.abs(q), 0), tl.max(tl.abs(k), 0)), tl.max(tl.abs(v), 0))
            scale = 448.0 / tl.maximum(amax, 1e-12)  # e4m3's largest value over the row's largest magnitude
            out = g8_ptr + row * 3 * D + cols
            tl.store(out, tl.clamp(q * scale, -448.0, 448.0).to(g8_ptr.dtype.element_ty), mask=inside)
            tl.store(out + D, tl.clamp(k * scale, -448.0, 448.0).to(g8_ptr.dtype.element_ty), mask=inside)
            tl.store(out + 2 * D, tl.clamp(v * scale, -448.0, 448.0).to(g8_ptr.dtype.element_ty), mask=inside)
            tl.store(inv_ptr + row, 1.0 / scale)
            sq += q
            sk += k
            sv += v
        sums = sums_ptr + tl.program_id(0).to(tl.int64) * 3 * D + cols
        tl.store(sums, sq, mask=inside)
        tl.store(sums + D, sk, mask=inside)
        tl.store(sums + 2 * D, sv, mask=inside)
