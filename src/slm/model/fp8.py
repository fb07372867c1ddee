"""FP8 training matmuls (``training.fp8``): twice the tensor-core rate of bf16 on an H100 or H200.

Matmul operands are cast to 8-bit floats with scales computed from their absolute maxima at every call
("dynamic scaling"); the tensor cores accumulate in float32 and hand back bf16. Master weights, optimizer
state and everything outside the matmuls stay as they were. Two recipes:

- the output layer (inside the fused loss, loss.py): one scale per tensor, inputs and weights as e4m3
  (more precision), gradients as e5m2 (more range), all three matmuls in FP8;
- block Linear layers (``_FP8Linear``, fp8_mlp.py): one e4m3 scale per row (per token for activations and
  gradients, per feature for weights), forward and input-gradient matmuls in FP8, the weight gradient in bf16.

    training.fp8: none   every matmul in bf16 (the default)
    training.fp8: head   only the output layer, the largest matmul of a small model
    training.fp8: mlp    the output layer and every block's MLP (fc -> GELU -> proj, casts fused into the GELU)
    training.fp8: all    and also the attention's Linear layers (qkv through fp8_qkv.py, proj)

It pays where the matmuls are large enough to outweigh the casts around them. On an H100 the output layer
gained 11% of the step at 30M and 6.5% at 124M; on an H200 the MLPs gain another 3.7% at 124M
(micro-batch 32: 566k tokens/s against 546k) and the attention's Linear layers 1.0-1.7% more, with the
validation loss of 100 steps unchanged (benchmarks/RESULTS.md). The attention's gain needs fp8_qkv.py:
with the bias as a pass of its own and torch.compile's cast of the assembled qkv gradient, it was -2.9%.

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
              out_dtype: torch.dtype, fast_accum: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(a * a_inv) @ (b * b_inv) (+ ``bias``, in ``out_dtype``) from fp8 ``a`` (row-major) and ``b`` (column-major).

    ``fast_accum``: let the tensor cores keep their own (lower-precision) running sums instead of adding
    them into float32 every few steps: 4-15% faster on an H100 for the output layer's matmuls, whose error
    (relative, against float32 sums of the same fp8 inputs) goes from 1.7e-3 to at most 2.9e-3
    (benchmarks/fp8_matmul.py, RESULTS.md). torchao uses it for forward matmuls too."""
    if a.device.type == "cpu":  # the same product from the same fp8 values, in float32: PyTorch's CPU _scaled_mm
        # takes no per-row scales or bias up to 2.11, and in 2.13 took 1.2 s for a 256x64x4096 product on a Xeon
        # with AMX (this: 17 ms), so the tests' FP8 training ran 40x slower than bf16
        out = (a.float() * a_inv) @ (b.float() * b_inv)
        return (out if bias is None else out + bias.float()).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major (a copy unless it already is)."""
    return t.t().contiguous().t()


def to_fp8_rows(t: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D ``t`` cast row by row, each row scaled to the format's range; and the inverse scales, (rows, 1).

    One scale per row is computed from that row alone, so under torch.compile the amax and the cast fuse
    into the kernel that makes ``t`` (a LayerNorm, GELU or attention output, a gradient) instead of
    costing two more passes over it as one scale per tensor does."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = top / amax
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` on the FP8 tensor cores, in ``x``'s dtype: x scaled per row (token), the
    weight per output feature, the bias added in the matmul's epilogue (the forward of a block Linear)."""
    x8, x_inv = to_fp8_rows(x)
    w8, w_inv = to_fp8_rows(weight)
    return scaled_mm(x8, x_inv, w8.t(), w_inv.t(), x.dtype, fast_accum=True,
                     bias=None if bias is None else bias.to(x.dtype))


def input_grad_fp8(g8: torch.Tensor, g_inv: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Linear's input gradient ``g @ weight`` from the FP8 rows of ``g``, the weight scaled per input feature."""
    wt8, wt_inv = to_fp8_rows(weight.t())
    return scaled_mm(g8, g_inv, wt8.contiguous().t(), wt_inv.t(), dtype)


class _FP8Linear(torch.autograd.Function):
    """A block Linear's matmuls: output and input gradient in FP8 with rowwise scales, weight gradient in bf16.

    The forward matmul and the input gradient run on the FP8 tensor cores (e4m3, one scale per row of
    each operand: per token for activations and gradients, per output feature for the weight). The weight
    gradient, a sum over tokens, would need both the gradient and the input transposed and re-cast; it
    stays in the compute dtype, from the input kept for it. torchao calls this recipe "rowwise with
    high-precision grad_weight"."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # x: (M, K) in the compute dtype; weight: (N, K), bias: (N,) or None: master weights (float32 under autocast)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear_fp8(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K): grad scaled per token
            grad_x = input_grad_fp8(*to_fp8_rows(grad), weight, grad.dtype)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K) in the compute dtype
            grad_w = (grad.t() @ x).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.float().sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on, else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def tokens_fit(x: torch.Tensor) -> bool:
    """Whether ``x``'s token count (all dimensions but the last) suits the FP8 kernels, which need every
    dimension, tokens too, in multiples of 16; where it does not, the FP8 functions run their plain form."""
    return (x.numel() // x.size(-1)) % 16 == 0


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its matmuls in FP8 (dimensions must be multiples of 16)."""
    dtype = compute_dtype(x)
    if not tokens_fit(x):
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    with torch.autocast(x.device.type, enabled=False):
        return _FP8Linear.apply(x.reshape(-1, x.size(-1)).to(dtype), weight, bias).view(*x.shape[:-1], weight.size(0))


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 or newer (Ada L4/L40, Hopper H100/H200, Blackwell).

    CPUs gain nothing from it (PyTorch's ``_scaled_mm`` ran 2-70x slower than their float32 matmuls, and
    ``scaled_mm`` takes a float32 product there), so a config's ``fp8`` is not applied there; the tests
    exercise that path on the CPU by patching this. ROCm
    builds are left out too: AMD's FP8 formats (the "fnuz" variants) are not the ones used here."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


_ROWWISE: dict[str, bool] = {}


def rowwise_fp8_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` takes one scale per row on this GPU (``training.fp8: mlp/all`` need it).

    It depends on the GPU and the PyTorch build (Hopper: yes; Ada from PyTorch 2.7; some Blackwell cards
    answer CUBLAS_STATUS_NOT_SUPPORTED), so a tiny product is tried once per device."""
    key = str(device)
    if key not in _ROWWISE:
        try:
            a = torch.zeros(16, 32, device=device).to(E4M3)
            b = torch.zeros(16, 32, device=device).to(E4M3).t()
            ones = torch.ones(16, 1, device=device)
            torch._scaled_mm(a, b, scale_a=ones, scale_b=ones.t(), out_dtype=torch.bfloat16)
            _ROWWISE[key] = True
        except RuntimeError:
            _ROWWISE[key] = False
    return _ROWWISE[key]


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose training matmuls run in FP8 (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return fp8_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_fp8(model: nn.Module, which: str) -> int:
    """Switch ``model`` (a GPT) to FP8 matmuls: ``which`` is none, head, mlp or all. Returns the layers switched.

    Only Linear layers whose sizes are multiples of 16 (what the FP8 tensor cores need) are switched. A
    block's MLP runs through fp8_mlp.py when both its Linears are plain; under LoRA the frozen Linear inside
    each adapter becomes an FP8Linear instead (the adapters' small matmuls stay as they are).
    """
    model.fp8_head = which in ("head", "mlp", "all")
    switched = int(model.fp8_head)
    for block in model.blocks:
        for part in {"mlp": (block.mlp,), "all": (block.mlp, block.attn)}.get(which, ()):
            if part is block.mlp and all(type(m) is nn.Linear and _fits(m) for m in (part.fc, part.proj)):
                part.fp8 = True  # fc and proj together, the casts fused into the GELU
                switched += 2
                continue
            if part is block.attn and type(part.qkv) is nn.Linear and _fits(part.qkv):
                part.fp8 = True  # q, k and v out of one FP8 matmul, their gradients cast in one pass (fp8_qkv.py)
                switched += 1
            for module in part.modules():  # the attention's proj, or the Linears inside LoRA adapters
                if type(module) is nn.Linear and _fits(module) and module is not getattr(part, "qkv", None):
                    module.__class__ = FP8Linear
                    switched += 1
    return switched


def _fits(linear: nn.Linear) -> bool:
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0
