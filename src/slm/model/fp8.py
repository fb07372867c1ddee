"""FP8 training matmuls (``training.fp8``): twice the tensor-core rate of bf16 on an H100.

A Linear layer's three matmuls (forward, gradient of the input, gradient of the weight) run in 8-bit
floats with one scale per tensor, computed from the tensor's absolute maximum at every call ("dynamic
tensorwise scaling"): inputs and weights as e4m3 (more precision), gradients as e5m2 (more range). The
tensor cores accumulate in float32 (with their fast accumulation, see ``scaled_mm``, in the forward matmuls
and all of the output layer's); outputs come back in bf16 (the weight gradient in float32). Master
weights, optimizer state and everything outside the matmuls stay as they were.

    training.fp8: none   every matmul in bf16 (the default)
    training.fp8: head   only the output layer, the largest matmul of a small model (inside the fused loss)
    training.fp8: all    the output layer and every Linear layer of the blocks

It pays where the matmuls are large enough to outweigh the casts and transposes around them: on an H100
the output layer gains 11% of the step at 30M and 6.5% at 124M (its gradient written in both layouts by
softmax_grad.py's kernels); in the blocks of these models FP8 is slower (benchmarks/RESULTS.md).

FP8 is used while training only; evaluation, generation and export run the same weights in bf16.
``torch._scaled_mm`` wants its first operand row-major and its second column-major (both with the
reduced dimension contiguous), which is why some operands are transposed on the way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` scaled so its largest magnitude is the format's largest value, cast; and the inverse scale."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """(a * a_inv) @ (b * b_inv) from fp8 ``a`` (row-major) and ``b`` (column-major).

    ``fast_accum``: let the tensor cores keep their own (lower-precision) running sums instead of adding
    them into float32 every few steps: 4-15% faster on an H100 for the output layer's matmuls, whose error
    (relative, against float32 sums of the same fp8 inputs) goes from 1.7e-3 to at most 2.9e-3
    (benchmarks/fp8_matmul.py, RESULTS.md). torchao uses it for forward matmuls too."""
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)


def col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major (a copy unless it already is)."""
    return t.t().contiguous().t()


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        # x: (M, K) any float dtype; weight: (N, K)
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.weight_dtype = weight.dtype
        return scaled_mm(x8, x_inv, w8.t(), w_inv, out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_mm(g8, g_inv, col_major(w8), w_inv, grad.dtype)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = scaled_mm(g8.t().contiguous(), g_inv, col_major(x8), x_inv, torch.float32)  # (N, M) @ (M, K)
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_x, grad_w, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on, else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its matmuls in FP8 (dimensions must be multiples of 16)."""
    dtype = compute_dtype(x)
    if (x.numel() // x.size(-1)) % 16:  # the FP8 kernels need every dimension, tokens too, in multiples of 16
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8Linear.apply(x.reshape(-1, x.size(-1)), weight, dtype)
        y = y.view(*x.shape[:-1], weight.size(0))
        return y if bias is None else y + bias.to(dtype)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 or newer (Ada L4/L40, Hopper H100/H200, Blackwell).

    CPUs run ``_scaled_mm`` too, but slower than their float32 matmuls (the 30M output layer: 2x), so a
    config's ``fp8`` is not applied there; the tests exercise that path on the CPU by patching this. ROCm
    builds are left out too: AMD's FP8 formats (the "fnuz" variants) are not the ones used here."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose training matmuls run in FP8 (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return fp8_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_fp8(model: nn.Module, which: str) -> int:
    """Switch ``model`` (a GPT) to FP8 matmuls: ``which`` is off, head or all. Returns the layers switched.

    Only plain Linear layers whose sizes are multiples of 16 (what the FP8 tensor cores need) are switched.
    """
    model.fp8_head = which in ("head", "all")
    switched = int(model.fp8_head)
    if which == "all":
        for module in model.blocks.modules():
            if type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0:
                module.__class__ = FP8Linear
                switched += 1
    return switched
