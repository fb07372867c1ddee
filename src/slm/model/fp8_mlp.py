"""The MLP block in FP8 (``training.fp8: mlp`` and ``all``): fc -> GELU -> proj, casts fused into the GELU.

    y = gelu(x @ W1.T + b1) @ W2.T        (b2 is added by the caller, outside)

Both matmuls and both input gradients run on the FP8 tensor cores with rowwise scales (fp8.py's recipe:
one e4m3 scale per token for activations and gradients, per feature for weights); the two weight
gradients, sums over tokens, stay in bf16. What makes FP8 pay at GPT-2 sizes is where the casts happen.
Cast as separate passes (or as torch.compile fuses them: a 3,072-wide row is too long for its one-pass
reductions, so it reads the row twice), the casts cost as much as the faster matmuls save. Here two Triton
kernels do them in passes that exist anyway:

- forward, ``bias_gelu_fp8``: reads fc's output once, adds b1, applies GELU, finds each row's largest
  magnitude and writes the FP8 row and its scale, the only form proj needs. The bf16 activation is never
  written (plain PyTorch writes it, and saves it for backward).
- backward, ``gelu_backward_fp8``: reads the gradient of the GELU's output and fc's saved output once,
  writes the gradient of fc's output in bf16 (for W1's gradient) and in FP8 (for x's), and the GELU's
  output again in bf16 (for W2's gradient), recomputed instead of kept from forward; b1's gradient, that
  gradient's sum over tokens, is added up on the way (per program, then the programs' sums).

Without a GPU (or Triton) the same functions run in PyTorch, which is also what the tests compare the
kernels against (on the CPU through Triton's interpreter).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from slm.model.fp8 import E4M3, compute_dtype, input_grad_fp8, linear_fp8, scaled_mm, to_fp8_rows, tokens_fit

try:  # Triton ships with the CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds
    triton = None

MAX_WIDTH = 16384  # the kernels hold a whole row in registers; wider MLPs run the PyTorch form


def _kernels(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on ``t``: on a GPU, or on the CPU under Triton's interpreter."""
    return (triton is not None and t.size(1) <= MAX_WIDTH
            and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


def _launch(m: int, width: int, per_thread: int, rows: int) -> dict:
    """Grid and block sizes: ``rows`` rows per program (fewer where ``m`` needs it), about ``per_thread`` values
    of a padded row per thread (at most 16 warps). FWD and BWD below were the fastest of 24 pairs on an H200 at
    32,768 x 3,072 (RESULTS.md): forward 105 us; backward 336 us with b1's gradient (288 + 67 us before,
    one row per program and the sum as a pass of its own). More rows per program mean fewer partial sums."""
    bf = triton.next_power_of_2(width)
    rows = math.gcd(m, rows)
    return dict(grid=(m // rows,), BF=bf, ROWS=rows, num_warps=max(1, min(16, bf // (32 * per_thread))))


FWD = dict(per_thread=32, rows=1)
BWD = dict(per_thread=8, rows=32)


@torch.library.custom_op("slm::bias_gelu_fp8", mutates_args=())
def bias_gelu_fp8(pre: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu(pre + bias) cast to e4m3 row by row: (values (M, F), inverse scales (M, 1) float32).

    pre: (M, F) fc's output without its bias, any float dtype; bias: (F,) or None. GELU is the tanh form.
    """
    if not _kernels(pre):
        return bias_gelu_fp8_torch(pre, bias)
    pre = pre.contiguous()
    f, launch = pre.size(1), _launch(*pre.shape, **FWD)
    h8, inv = _gelu_outputs(pre, bias)
    _bias_gelu_fp8_kernel[launch.pop("grid")](pre, pre if bias is None else bias, h8, inv, f,
                                              HAS_BIAS=bias is not None, FAST=pre.is_cuda, **launch)
    return h8, inv


@bias_gelu_fp8.register_fake
def _gelu_outputs(pre, bias):
    return pre.new_empty(pre.shape, dtype=E4M3), pre.new_empty((pre.size(0), 1), dtype=torch.float32)


@torch.library.custom_op("slm::gelu_backward_fp8", mutates_args=())
def gelu_backward_fp8(grad: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``bias_gelu_fp8``, given the gradient of its output (M, F).

    Returns (gradient of pre in grad's dtype, the same as e4m3 row by row, its inverse scales (M, 1),
    gelu(pre + bias) in grad's dtype, the bias's gradient (F,) float32: that gradient summed over rows).
    """
    if not _kernels(pre):
        return gelu_backward_fp8_torch(grad, pre, bias)
    grad, pre = grad.contiguous(), pre.contiguous()
    f, launch = pre.size(1), _launch(*pre.shape, **BWD)
    dz, dz8, inv, h, _ = _gelu_backward_outputs(grad, pre, bias)
    sums = pre.new_empty((launch["grid"][0], f), dtype=torch.float32)  # column sums of each program's rows
    _gelu_backward_fp8_kernel[launch.pop("grid")](grad, pre, pre if bias is None else bias, dz, dz8, inv, h, sums,
                                                  f, HAS_BIAS=bias is not None, FAST=pre.is_cuda, **launch)
    return dz, dz8, inv, h, sums.sum(0)


@gelu_backward_fp8.register_fake
def _gelu_backward_outputs(grad, pre, bias):
    return (torch.empty_like(grad), grad.new_empty(grad.shape, dtype=E4M3),
            grad.new_empty((grad.size(0), 1), dtype=torch.float32), torch.empty_like(grad),
            grad.new_empty(grad.size(1), dtype=torch.float32))


def bias_gelu_fp8_torch(pre: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``bias_gelu_fp8`` in PyTorch."""
    return to_fp8_rows(F.gelu(_add_bias(pre, bias), approximate="tanh"))


def gelu_backward_fp8_torch(grad: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gelu_backward_fp8`` in PyTorch."""
    z = _add_bias(pre, bias)
    dz = torch.ops.aten.gelu_backward(grad.float(), z, approximate="tanh")
    return dz.to(grad.dtype), *to_fp8_rows(dz), F.gelu(z, approximate="tanh").to(grad.dtype), dz.sum(0)


def _add_bias(pre: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return pre.float() if bias is None else pre.float() + bias.float()


class _FP8MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2):
        # x: (M, D) in the compute dtype; w1: (F, D), b1: (F,) or None, w2: (D, F): master weights
        pre = linear_fp8(x, w1)  # fc, its bias left to the GELU kernel
        h8, h_inv = bias_gelu_fp8(pre, b1)
        w2_8, w2_inv = to_fp8_rows(w2)
        ctx.save_for_backward(x, w1, b1, w2, pre)
        return scaled_mm(h8, h_inv, w2_8.t(), w2_inv.t(), x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, pre = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2 = ctx.needs_input_grad
        grad_x = grad_w1 = grad_w2 = None
        # torch.compile fuses this cast and b2's gradient (outside) into one pass
        grad_h = input_grad_fp8(*to_fp8_rows(grad), w2, grad.dtype)  # (M, D) @ (D, F)
        grad_pre, grad_pre8, grad_pre_inv, h, grad_b1 = gelu_backward_fp8(grad_h, pre, b1)
        if need_x:
            grad_x = input_grad_fp8(grad_pre8, grad_pre_inv, w1, grad.dtype)
        if need_w1:  # the weight gradients in the compute dtype
            grad_w1 = (grad_pre.t() @ x).to(w1.dtype)
        grad_b1 = grad_b1.to(b1.dtype) if need_b1 else None
        if need_w2:
            grad_w2 = (grad.t() @ h).to(w2.dtype)
        return grad_x, grad_w1, grad_b1, grad_w2


def fp8_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
            b2: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)`` with its matmuls in FP8.

    Sizes must be multiples of 16 (the FP8 tensor cores'); token counts that are not run the plain form.
    """
    dtype = compute_dtype(x)
    if not tokens_fit(x):
        w1, b1, w2, b2 = (None if t is None else t.to(dtype) for t in (w1, b1, w2, b2))
        return F.linear(F.gelu(F.linear(x.to(dtype), w1, b1), approximate="tanh"), w2, b2)
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8MLP.apply(x.reshape(-1, x.size(-1)).to(dtype), w1, b1, w2).view(*x.shape[:-1], w2.size(0))
        return y if b2 is None else y + b2.to(dtype)


if triton is not None:
    _K = tl.constexpr(math.sqrt(2 / math.pi))  # GELU's tanh form: 0.5 z (1 + tanh(K (z + C z^3)))
    _C = tl.constexpr(0.044715)
    _E4M3_MAX = tl.constexpr(448.0)

    @triton.jit
    def _tanh(u, FAST: tl.constexpr):
        if FAST:  # the GPU's own approximate tanh, one instruction (relative error ~2^-11, below bf16's)
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # +-1 at the extremes (exp overflowing to inf is fine)

    @triton.jit
    def _store_fp8_row(v, out_ptr, inv_ptr, row, offsets, inside):
        """The row ``v`` scaled so its largest magnitude is e4m3's largest value, cast and stored."""
        scale = _E4M3_MAX / tl.maximum(tl.max(tl.where(inside, tl.abs(v), 0.0), 0), 1e-12)
        v8 = tl.clamp(v * scale, -_E4M3_MAX, _E4M3_MAX).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, v8, mask=inside)
        tl.store(inv_ptr + row, 1.0 / scale)

    @triton.jit
    def _bias_gelu_fp8_kernel(pre_ptr, bias_ptr, h8_ptr, inv_ptr, F, HAS_BIAS: tl.constexpr, BF: tl.constexpr,
                              ROWS: tl.constexpr, FAST: tl.constexpr):
        """ROWS rows per program, each: gelu(pre + bias), cast with the row's own scale."""
        cols = tl.arange(0, BF)
        inside = cols < F
        b = tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        for r in range(ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            offsets = row * F + cols
            z = tl.load(pre_ptr + offsets, mask=inside, other=0.0).to(tl.float32) + b
            h = 0.5 * z * (1.0 + _tanh(_K * (z + _C * z * z * z), FAST))
            _store_fp8_row(h, h8_ptr, inv_ptr, row, offsets, inside)

    @triton.jit
    def _gelu_backward_fp8_kernel(grad_ptr, pre_ptr, bias_ptr, dz_ptr, dz8_ptr, inv_ptr, h_ptr, sums_ptr, F,
                                  HAS_BIAS: tl.constexpr, BF: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr):
        """ROWS rows per program, each: the GELU's output again, the gradient of its input, also cast; and the
        sum of those gradients over the program's rows (the bias's gradient, in parts)."""
        cols = tl.arange(0, BF)
        inside = cols < F
        b = tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        total = tl.zeros([BF], tl.float32)
        for r in range(ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            offsets = row * F + cols
            z = tl.load(pre_ptr + offsets, mask=inside, other=0.0).to(tl.float32) + b
            t = _tanh(_K * (z + _C * z * z * z), FAST)
            tl.store(h_ptr + offsets, (0.5 * z * (1.0 + t)).to(h_ptr.dtype.element_ty), mask=inside)
            slope = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _K * (1.0 + 3.0 * _C * z * z)
            dz = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32) * slope
            tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=inside)
            _store_fp8_row(dz, dz8_ptr, inv_ptr, row, offsets, inside)
            total += dz
        tl.store(sums_ptr + tl.program_id(0).to(tl.int64) * F + cols, total, mask=inside)
