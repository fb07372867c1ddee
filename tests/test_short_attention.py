"""slm's short-context attention kernel (model/short_attention.py) against PyTorch's attention.

The kernels are Triton: they run on a GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
which must be set before the kernels are defined, so test_kernels_under_the_triton_interpreter runs this
file again in a process of its own). The interpreter has no bfloat16 matmul: there float32 stands in."""

import importlib.util
import os

import pytest
import torch

from slm.device import attention_kernel
from slm.model import GPT, GPTConfig, short_attention
from slm.model.short_attention import _forward
from tests.conftest import run_under_triton_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # bf16 where the kernels run it
kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="needs a GPU or the Triton interpreter")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def reference(qkv: torch.Tensor, n_heads: int, keep: torch.Tensor | None = None, p: float = 0.0):
    """Causal attention in float32 from the (B, T, 3C) projection; ``keep``: (B, H, T, T) dropout mask."""
    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, n_heads, -1).transpose(1, 2) for t in qkv.float().split(C3 // 3, dim=2))
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return (probs @ v).transpose(1, 2).reshape(B, T, C3 // 3)


def test_cpu_inputs_are_not_supported_so_the_model_uses_sdpa():
    assert not short_attention.supported(torch.zeros(2, 16, 96), 2)


@kernels
@pytest.mark.parametrize("B,T,H,D", [(3, 128, 6, 64), (2, 37, 4, 32), (4, 1, 2, 16), (1, 100, 2, 128)])
@pytest.mark.parametrize("dtype", [LOW, torch.float16])
def test_output_and_gradient_match_pytorch(B, T, H, D, dtype):
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE, dtype=dtype, requires_grad=True)
    assert short_attention.supported(qkv, H) == (DEVICE == "cuda")
    y = short_attention.short_attention(qkv, H)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_qkv = qkv.detach().float().requires_grad_()
    ref = reference(ref_qkv, H)
    ref.backward(dy.float())
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(qkv.grad.float(), ref_qkv.grad, atol=5e-2, rtol=5e-2)
    assert (qkv.grad.float() - ref_qkv.grad).abs().mean() < 5e-3  # not only within tolerance at the edges


@kernels
def test_dropout_mask_is_drawn_once_and_used_by_forward_and_backward():
    B, T, H, p = 8, 32, 2, 0.25
    C = H * T  # head size T: with v = identity, each head's output row is its dropped-out probabilities
    seed = torch.tensor([1234], device=DEVICE, dtype=torch.int32)
    torch.manual_seed(0)
    probe = torch.randn(B, T, 3 * C, device=DEVICE, dtype=LOW)
    probe[:, :, 2 * C:] = torch.eye(T, device=DEVICE, dtype=LOW).repeat(1, H)
    dropped, _ = _forward(probe, H, p, seed)
    keep = (dropped.view(B, T, H, T).transpose(1, 2) != 0).float()  # (B, H, T, T)
    causal = torch.ones(T, T, device=DEVICE).tril().bool()
    kept = keep[..., causal].mean().item()
    assert 0.70 < kept < 0.80 and keep[..., ~causal].sum() == 0

    qkv = torch.randn(B, T, 3 * C, device=DEVICE, dtype=LOW, requires_grad=True)
    y, _ = _forward(qkv, H, p, seed)  # the same seed: the same mask, whatever the values
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_qkv = qkv.detach().float().requires_grad_()
    ref = reference(ref_qkv, H, keep, p)
    ref.backward(dy.float())
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(qkv.grad.float(), ref_qkv.grad, atol=8e-2, rtol=5e-2)

    torch.manual_seed(1)
    a = short_attention.short_attention(qkv, H, p)
    torch.manual_seed(1)
    b = short_attention.short_attention(qkv, H, p)
    c = short_attention.short_attention(qkv, H, p)
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded runs repeat; each call draws a new mask


@cuda
def test_compiled_model_trains_the_same_with_the_kernel_and_with_sdpa():
    config = GPTConfig(vocab_size=512, context_length=64, n_layers=2, n_heads=4, d_model=128, d_ff=512, dropout=0.0)
    x = torch.randint(0, 512, (8, 64), device="cuda")
    results = {}
    for name in ("auto", "sdpa"):
        torch.manual_seed(0)
        model = torch.compile(GPT(config).cuda())
        with attention_kernel(name), torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        results[name] = loss.item(), model.blocks[0].attn.qkv.weight.grad.clone()
    assert results["auto"][0] == pytest.approx(results["sdpa"][0], rel=1e-2)
    torch.testing.assert_close(results["auto"][1], results["sdpa"][1], atol=2e-3, rtol=5e-2)


def test_attention_kernel_turns_the_short_kernel_off_and_back_on():
    assert short_attention.enabled
    with attention_kernel("sdpa"):
        assert not short_attention.enabled
        with attention_kernel("auto"):
            assert short_attention.enabled
        assert not short_attention.enabled
    assert short_attention.enabled


@pytest.mark.skipif(INTERPRETED or DEVICE == "cuda" or importlib.util.find_spec("triton") is None,
                    reason="on a GPU the kernels are tested directly; without Triton there is no interpreter")
def test_kernels_under_the_triton_interpreter():
    run_under_triton_interpreter(__file__, "match_pytorch or dropout_mask", "9 passed")
