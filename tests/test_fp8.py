"""FP8 training matmuls (training.fp8): close to the exact result, same parameters, errors for bad setups.

On the CPU the FP8 code path runs with the same casts and scales, its products taken in float32 from the
fp8 values (fp8.scaled_mm), so the path itself is checked here; its speed is measured on H100s and H200s
in benchmarks/RESULTS.md.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slm.config import load_config
from slm.errors import ConfigError
from slm.model import GPT, GPTConfig
from slm.model.fp8 import E4M3, FP8Linear, fp8_linear, fp8_supported, to_fp8, use_fp8
from slm.model.loss import linear_cross_entropy
from slm.model.softmax_grad import linear_softmax_grad_fp8, softmax_grad_fp8
from tests.conftest import run_under_triton_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fp8_linear_is_close_to_the_exact_matmuls():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    w = (torch.randn(48, 64) * 0.05).requires_grad_()
    b = torch.randn(48, requires_grad=True)
    ref = F.linear(x, w, b)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, w, b), grad)
    out = fp8_linear(x, w, b)
    grads = torch.autograd.grad(out, (x, w, b), grad)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert 0 < rel_err(out, ref) < 0.08  # e4m3 keeps 3 mantissa bits: a few percent, not exact
    assert 0 < rel_err(grads[0], ref_grads[0]) < 0.1
    torch.testing.assert_close(grads[1], ref_grads[1])  # the weight gradient runs in the compute dtype
    torch.testing.assert_close(grads[2], ref_grads[2])  # the bias's gradient: the gradient summed, exactly
    # token counts that are not a multiple of 16 fall back to the exact matmul
    odd = torch.randn(3, 5, 64)
    torch.testing.assert_close(fp8_linear(odd, w, b), F.linear(odd, w, b))


def test_fp8_linear_scales_each_row_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    x[0] *= 1e4  # one token far larger than the rest: with one scale per tensor the others would round to 0
    w = torch.randn(48, 64) * 0.05
    out, ref = fp8_linear(x, w), F.linear(x, w)
    assert rel_err(out[1:], ref[1:]) < 0.06 and rel_err(out[:1], ref[:1]) < 0.06


def assert_fp8_close(got, want):
    """The same bytes, but where float rounding differs: the interpreter's e4m3 cast is off by a step where it
    rounds up to a power of 2: a few values one step apart, none further."""
    got, want = got.float(), want.float()
    assert (got == want).float().mean() > 0.95
    assert ((got - want).abs() <= 0.5 * want.abs() + 2**-9).all()


def mlp_inputs(rows=64, d=64, f=256, bias=True):
    torch.manual_seed(0)
    x = torch.randn(rows, d, requires_grad=True)
    w1 = (torch.randn(f, d) * 0.05).requires_grad_()
    w2 = (torch.randn(d, f) * 0.05).requires_grad_()
    b1, b2 = ((torch.randn(f) * 0.1).requires_grad_(), torch.randn(d, requires_grad=True)) if bias else (None, None)
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_mlp_is_close_to_the_exact_mlp(bias):
    from slm.model.fp8_mlp import fp8_mlp

    x, w1, b1, w2, b2 = mlp_inputs(bias=bias)
    x.data[3] *= 1e3  # rowwise scales: one large token does not drown the others
    params = [t for t in (x, w1, b1, w2, b2) if t is not None]
    ref = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, grad)
    out = fp8_mlp(x, w1, b1, w2, b2)
    grads = torch.autograd.grad(out, params, grad)
    assert out.shape == ref.shape and 0 < rel_err(out, ref) < 0.08  # two layers of e4m3 rounding
    assert 0 < rel_err(out[4:], ref[4:]) < 0.08
    for g, r in zip(grads[:4], ref_grads[:4]):  # each through one or two FP8 matmuls: 3 mantissa bits
        assert 0 < rel_err(g, r) < 0.12
    if bias:
        torch.testing.assert_close(grads[-1], ref_grads[-1])  # b2 is added outside
    odd = torch.randn(3, 5, 64)  # token counts that are not a multiple of 16: the exact MLP
    torch.testing.assert_close(fp8_mlp(odd, w1, b1, w2, b2),
                               F.linear(F.gelu(F.linear(odd, w1, b1), approximate="tanh"), w2, b2))


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_qkv_is_close_to_the_exact_linear(bias):
    from slm.model.fp8_qkv import fp8_qkv

    torch.manual_seed(0)
    x = torch.randn(2, 32, 64, requires_grad=True)
    w = (torch.randn(192, 64) * 0.05).requires_grad_()
    b = torch.randn(192, requires_grad=True) if bias else None
    params = [t for t in (x, w, b) if t is not None]
    ref = F.linear(x, w, b).split(64, dim=-1)
    grads_out = [torch.randn_like(r) for r in ref]
    ref_grads = torch.autograd.grad(ref, params, grads_out)
    out = fp8_qkv(x, w, b)
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert all(0 < rel_err(o, r) < 0.06 for o, r in zip(out, ref))  # e4m3 inputs, the bias added exactly
    grads = torch.autograd.grad(out, params, grads_out)
    assert 0 < rel_err(grads[0], ref_grads[0]) < 0.1  # through the FP8 input-gradient matmul
    torch.testing.assert_close(grads[1], ref_grads[1])  # W's gradient in the compute dtype
    if bias:
        torch.testing.assert_close(grads[2], ref_grads[2])
    q_only = torch.autograd.grad(fp8_qkv(x, w, b)[0].sum(), x)[0]  # k and v unused: their gradients are zeros
    assert 0 < rel_err(q_only, torch.autograd.grad(F.linear(x, w, b)[..., :64].sum(), x)[0]) < 0.1
    odd = torch.randn(3, 5, 64)  # token counts that are not a multiple of 16: the exact matmul
    for o, r in zip(fp8_qkv(odd, w, b), F.linear(odd, w, b).split(64, dim=-1)):
        torch.testing.assert_close(o, r)


def test_fp8_layers_compute_in_autocasts_dtype():
    """Under bf16 autocast each FP8 layer hands back bf16 from a float32 input (a LayerNorm's output), as
    F.linear would: asking the dtype after autocast is turned off inside gave float32, which _scaled_mm
    refuses on a GPU once a bias is added in its epilogue ("Bias is not supported when out_dtype is Float32")."""
    from slm.model.fp8 import fp8_linear
    from slm.model.fp8_mlp import fp8_mlp
    from slm.model.fp8_qkv import fp8_qkv

    x, w1, b1, w2, b2 = mlp_inputs()
    w3, b3 = torch.randn(192, 64) * 0.05, torch.randn(192)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [fp8_linear(x, w1, b1), fp8_mlp(x, w1, b1, w2, b2), *fp8_qkv(x, w3, b3)]
    assert [o.dtype for o in outs] == [torch.bfloat16] * 5


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or the Triton interpreter (test_fp8_kernels_under_the_triton_interpreter)")
def test_qkv_grad_fp8_kernel_matches_pytorch():
    from slm.model import fp8_qkv

    torch.manual_seed(0)
    rows, d = 100, 768  # 16 rows per program: 4 (what divides 100); the width padded to 1024 inside
    parts = [(torch.randn(rows, d, device=DEVICE) * s).to(torch.bfloat16) for s in (1, 3, 0.5)]
    parts[1][7] *= 100  # one row's largest value in k: the row's q and v use that scale too
    for got, want in zip(fp8_qkv.qkv_grad_fp8(*parts), fp8_qkv.qkv_grad_fp8_torch(*parts)):
        assert got.shape == want.shape and got.dtype == want.dtype
        if got.dtype == torch.float8_e4m3fn:
            assert_fp8_close(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or the Triton interpreter (see the next test)")
@pytest.mark.parametrize("bias,rows_per_program", [(True, 1), (False, 1), (True, 8)])
def test_gelu_fp8_kernels_match_pytorch(bias, rows_per_program, monkeypatch):
    from slm.model import fp8_mlp

    for launch in ("FWD", "BWD"):
        monkeypatch.setitem(getattr(fp8_mlp, launch), "rows", rows_per_program)
    torch.manual_seed(0)
    rows, width = 100, 3072  # 8 rows per program: 4 (what divides 100); the width padded to 4096 inside
    pre = (torch.randn(rows, width, device=DEVICE) * 2).to(torch.bfloat16)
    grad = torch.randn(rows, width, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(width, device=DEVICE) * 0.1 if bias else None
    assert fp8_mlp._kernels(pre)
    for kernel, torch_form, args in ((fp8_mlp.bias_gelu_fp8, fp8_mlp.bias_gelu_fp8_torch, (pre, b)),
                                     (fp8_mlp.gelu_backward_fp8, fp8_mlp.gelu_backward_fp8_torch, (grad, pre, b))):
        for got, want in zip(kernel(*args), torch_form(*args)):
            assert got.shape == want.shape and got.dtype == want.dtype
            if got.dtype == torch.float8_e4m3fn:  # the GPU's fast tanh rounds differently
                assert_fp8_close(got, want)
            else:
                # bf16 outputs to bf16 precision; the float32 inverse scales come from row maxima that the
                # GPU's fast tanh moves by ~1e-5 (relative); the bias's gradient sums 100 rows of them
                exact = got.dtype == torch.float32 and got.dim() == 2
                torch.testing.assert_close(got.float(), want.float(), rtol=1e-3 if exact else 1e-2,
                                           atol=0 if exact else 1e-2)


@pytest.mark.skipif(DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
                    or importlib.util.find_spec("triton") is None,
                    reason="on a GPU the kernels are tested directly; without Triton there is no interpreter")
def test_fp8_kernels_under_the_triton_interpreter():
    run_under_triton_interpreter(__file__, "gelu_fp8_kernels_match or qkv_grad_fp8_kernel", "4 passed")


@pytest.mark.parametrize("recompute", [True, False], ids=["logits-in-kernel", "logits-stored"])
def test_fp8_fused_loss_is_close_to_the_exact_loss_and_gradients(recompute, monkeypatch):
    from slm.model import loss as loss_module

    used = []
    for name in ("linear_softmax_grad_fp8", "softmax_grad_fp8"):
        op = getattr(loss_module, name)
        monkeypatch.setattr(loss_module, name, lambda *a, op=op, name=name: used.append(name) or op(*a))
    monkeypatch.setattr(loss_module, "RECOMPUTE_MAX_D", 512 if recompute else 0)
    torch.manual_seed(1)
    x = torch.randn(256, 64, requires_grad=True)
    w = (torch.randn(512, 64) * 0.1).requires_grad_()
    y = torch.randint(0, 500, (256,))
    y[:7] = -1  # ignored positions
    logits = (x @ w.t()).masked_fill(torch.arange(512) >= 500, float("-inf"))
    ref = F.cross_entropy(logits, y, ignore_index=-1)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w))
    loss = linear_cross_entropy(x, w, y, 64, vocab_size=500, fp8=True)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == pytest.approx(ref.item(), rel=5e-3) and loss.item() != ref.item()
    assert rel_err(gx, gx_ref) < 0.06 and rel_err(gw, gw_ref) < 0.06
    assert not gw[500:].any()  # padding rows still get no gradient
    assert set(used) == {"linear_softmax_grad_fp8" if recompute else "softmax_grad_fp8"}
    # shapes the FP8 kernels cannot take (chunk or vocabulary not a multiple of 16) run the exact path
    exact = linear_cross_entropy(x, w, y, 50, vocab_size=500, fp8=True)
    torch.testing.assert_close(exact, ref)
    unpadded = linear_cross_entropy(x, w[:500], y, 64, fp8=True)  # model.vocab_multiple: 1 with fp8 on
    torch.testing.assert_close(unpadded, F.cross_entropy(x @ w[:500].t(), y, ignore_index=-1))


def exact_gradient(logits, y, vocab=300):
    """Each row's loss and (softmax - one-hot) * 2**15 (0 on ignored rows and padding columns), in float32."""
    loss = F.cross_entropy(logits.double()[:, :vocab], y, ignore_index=-1, reduction="none").float()
    g = (torch.softmax(logits.float()[:, :vocab], 1) - F.one_hot(y.clamp(min=0), vocab).float()) * (y >= 0)[:, None]
    return loss, F.pad(g, (0, logits.size(1) - vocab)) * 2.0**15


def check_gradient(g, g_t, y, exact, vocab=300):
    m, v = exact.shape
    assert g.dtype == g_t.dtype == torch.float8_e5m2 and g.shape == (m, v) and g_t.shape == (v, m)
    assert g_t.is_contiguous() and torch.equal(g_t.float(), g.float().t())
    assert rel_err(g.float(), exact) < 0.1  # e5m2 keeps 2 mantissa bits
    assert not g[y < 0].float().any() and not g[:, vocab:].float().any()  # ignored rows, padding columns
    assert (g.float()[torch.arange(m), y.clamp(min=0)][y >= 0] < 0).all()  # p - 1 at every target


def targets(m, device):
    y = torch.randint(0, 300, (m,), device=device)  # 300 real tokens; the vocabulary is padded to 320
    y[5] = -1  # an ignored row
    return y


on_both = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton kernels need a GPU"))])


@on_both
def test_softmax_grad_fp8_writes_the_gradient_and_its_transpose(device):
    torch.manual_seed(2)
    logits = (torch.randn(96, 320, device=device) * 3).to(torch.bfloat16)
    y = targets(96, device)
    exact_loss, exact = exact_gradient(logits, y)
    g, g_t, loss = softmax_grad_fp8(logits, y, 300, 2.0**15)
    torch.testing.assert_close(loss, exact_loss)
    check_gradient(g, g_t, y, exact)


@on_both
@pytest.mark.parametrize("rows, d", [(200, 64), (208, 64), (208, 128), (208, 768)])
def test_linear_softmax_grad_fp8_computes_the_logits_itself(device, rows, d):
    # rows: not a multiple of the tiles; on Hopper 208 x 64 takes the TMA kernel, 208 x 128 and 208 x 768
    # the Gluon ones (tiles of 128 and 64 columns)
    torch.manual_seed(3)
    x8, x_inv = to_fp8(torch.randn(rows, d, device=device), E4M3)
    w8, w_inv = to_fp8(torch.randn(320, d, device=device) * 0.4 * (64 / d) ** 0.5, E4M3)
    y = targets(rows, device)
    exact_loss, exact = exact_gradient((x8.double() * x_inv) @ (w8.double() * w_inv).t(), y)
    g, g_t, loss = linear_softmax_grad_fp8(x8, x_inv, w8, w_inv, y, 300, 2.0**15)
    tol = 1e-3 * max(1, d / 128)  # Hopper's FP8 tensor cores sum in fewer than 24 bits: more error with more terms
    torch.testing.assert_close(loss, exact_loss, rtol=tol, atol=tol)
    check_gradient(g, g_t, y, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a GPU")
@pytest.mark.parametrize("d", [384, 768])
def test_linear_softmax_grad_fp8_walks_many_tiles_per_program(d):
    """Each program of the Gluon kernels walks a run of W's tiles through its ring of buffers (the tests
    above give each program one tile); d_model 384 is the 30M model's (tiles of 128 columns), 768 GPT-2
    small's (tiles of 64)."""
    from slm.model import softmax_grad, softmax_grad_gluon

    torch.manual_seed(4)
    vocab, padded = 5100, 5120  # 40 or 80 tiles, the last one with padding
    x8, x_inv = to_fp8(torch.randn(2048, d, device="cuda"), E4M3)
    w8, w_inv = to_fp8(torch.randn(padded, d, device="cuda") * 0.15 * (384 / d) ** 0.5, E4M3)
    y = torch.randint(0, vocab, (2048,), device="cuda")
    y[::97] = -1
    logits = (x8.double() * x_inv) @ (w8.double() * w_inv).t()
    exact_loss, exact = exact_gradient(logits, y, vocab)
    g, g_t, loss = linear_softmax_grad_fp8(x8, x_inv, w8, w_inv, y, vocab, 2.0**15)
    # Hopper's FP8 tensor cores sum in less than float32: with K = 384 the loss is off by ~1e-3 of itself
    assert (loss - exact_loss).abs().max() < 3e-3 * (d / 384) ** 0.5 * exact_loss.abs().max()
    check_gradient(g, g_t, y, exact, vocab)
    if torch.cuda.get_device_capability()[0] == 9:  # Hopper: it was the Gluon kernels, several tiles each
        bn = softmax_grad_gluon.tile_n(d)
        assert softmax_grad._CHECKED[(2048, padded, d, "gluon")]
        assert softmax_grad_gluon._splits(2048, padded, bn, x8.device) < padded // bn


def test_use_fp8_keeps_the_parameters_and_the_eval_path():
    cfg = GPTConfig(vocab_size=100, context_length=16, n_layers=2, n_heads=2, d_model=32, d_ff=64, dropout=0.0,
                    vocab_multiple=16)
    torch.manual_seed(0)
    plain = GPT(cfg)
    fp8 = GPT(cfg)
    fp8.load_state_dict(plain.state_dict())
    assert use_fp8(fp8, "head") == 1 and fp8.fp8_head and not any(isinstance(m, FP8Linear) for m in fp8.modules())
    assert use_fp8(fp8, "mlp") == 1 + 2 * cfg.n_layers and all(b.mlp.fp8 for b in fp8.blocks)  # + fc, proj
    assert not any(isinstance(m, FP8Linear) for m in fp8.modules())
    assert use_fp8(fp8, "all") == 1 + 4 * cfg.n_layers  # the head, and qkv, proj, fc, proj in each block
    assert all(b.attn.fp8 and type(b.attn.proj) is FP8Linear for b in fp8.blocks)
    assert fp8.state_dict().keys() == plain.state_dict().keys()
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():  # evaluation and generation stay exact
        torch.testing.assert_close(fp8(x, x)[1], plain(x, x)[1])
    loss8, loss = fp8(x, x)[1], plain(x, x)[1]  # training: FP8, close
    assert loss8.item() == pytest.approx(loss.item(), rel=2e-2) and loss8.item() != loss.item()
    loss8.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fp8.parameters())
    assert use_fp8(GPT(cfg), "none") == 0


def test_fp8_config_values():
    assert load_config("tiny", ["training.fp8=head"]).training.fp8 == "head"
    assert load_config("tiny", ["training.fp8=off"]).training.fp8 == "none"  # YAML reads off as false
    with pytest.raises(ConfigError, match="training.fp8: expected one of none, head, mlp, all"):
        load_config("tiny", ["training.fp8=fast"])


def test_fp8_on_a_gpu_without_fp8_tensor_cores_trains_in_bf16_with_a_note(sample_data, tmp_path, monkeypatch,
                                                                          capsys):
    from slm.train import run_training
    from slm.train import trainer
    from tests.conftest import small_config

    monkeypatch.setattr(trainer, "fp8_supported", lambda device: False)
    cfg = small_config(sample_data, tmp_path / "run", fp8="all", max_steps=2, warmup_steps=1)
    run_training(cfg)
    assert "note: training.fp8=all needs FP8 tensor cores" in capsys.readouterr().out


def test_fp8_mlp_without_rowwise_scaling_keeps_the_fp8_head_with_a_note(sample_data, tmp_path, monkeypatch,
                                                                         capsys):
    """Where PyTorch's _scaled_mm refuses per-row scales (some GPU and build pairs), mlp/all fall back to head."""
    from slm.model import fp8
    from slm.train import run_training
    from slm.train import trainer
    from tests.conftest import small_config

    def refuse(*args, **kwargs):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(fp8, "_ROWWISE", {})
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    assert not fp8.rowwise_fp8_supported(torch.device("cpu"))  # what the GPU answered, kept for this device
    monkeypatch.setattr(trainer, "fp8_supported", lambda device: True)
    switched = []
    monkeypatch.setattr(trainer, "use_fp8", lambda model, which: switched.append(which))
    run_training(small_config(sample_data, tmp_path / "run", fp8="mlp", max_steps=2, warmup_steps=1))
    assert "note: training.fp8=mlp needs per-row FP8 scales" in capsys.readouterr().out
    assert switched == ["head"]


def test_fp8_is_not_applied_on_a_cpu(sample_data, tmp_path, capsys):
    from slm.train import run_training
    from tests.conftest import small_config

    assert not fp8_supported(torch.device("cpu"))  # CPUs run _scaled_mm slower than float32 matmuls
    run_training(small_config(sample_data, tmp_path / "run", fp8="head", max_steps=2, warmup_steps=1))
    assert "note: training.fp8=head needs FP8 tensor cores" in capsys.readouterr().out


def test_training_with_fp8_learns_like_bf16(sample_data, tmp_path, monkeypatch):
    from slm.model import fp8 as fp8_module
    from slm.train import run_training
    from slm.train import trainer
    from tests.conftest import small_config

    monkeypatch.setattr(trainer, "fp8_supported", lambda device: True)  # the FP8 path, run on the CPU
    switched = []
    monkeypatch.setattr(trainer, "use_fp8", lambda model, which: switched.append(fp8_module.use_fp8(model, which)))
    steps = dict(max_steps=40, eval_every=40, checkpoint_every=100, log_every=10)
    plain = run_training(small_config(sample_data, tmp_path / "a", **steps), progress=False)
    fp8 = run_training(small_config(sample_data, tmp_path / "b", fp8="all", loss_chunk=256, **steps), progress=False)
    assert fp8["val_loss"] < 0.8 * 8.32  # well below the uniform guess, ln(4096)
    assert fp8["val_loss"] == pytest.approx(plain["val_loss"], rel=0.03)
    assert switched and switched[0] > 1  # the output layer and the blocks' Linears did train in FP8


COMPILE_FOR_HOPPER = r"""
import os, subprocess, sys, torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import __file__ as nvidia_dir
from triton.runtime import driver


class Hopper:  # compile-only stand-in for the CUDA driver: kernels are built for sm_90a, never launched
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


driver.set_active(Hopper())
from slm.model import softmax_grad_gluon as sgg

m, v = 8192, 50304
g, g_t = torch.empty(m, v, dtype=torch.float8_e5m2), torch.empty(v, m, dtype=torch.float8_e5m2)
inv, rows = torch.ones(()), torch.empty(m)
ptxas = os.path.join(os.path.dirname(nvidia_dir), "bin", "ptxas")
for k in (384, sgg.MAX_K):  # 128-column tiles, and the widest x, whose tiles are 64 columns
    bn = sgg.tile_n(k)
    x8, w8 = torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.empty(v, k, dtype=torch.float8_e4m3fn)
    x_desc, w_desc = sgg._descriptors(x8, w8, bn)
    kernels = {
        "lse": sgg._lse_parts_kernel.warmup(x_desc, w_desc, inv, inv, rows, rows, m, v, 50257, 2, K=k, BN=bn,
                                            STAGES=2, num_warps=sgg.NUM_WARPS, grid=(1,)),
        "grad": sgg._grad_kernel.warmup(x_desc, w_desc, sgg._desc(g, [sgg.BM, bn]), sgg._desc(g_t, [bn, sgg.BM]),
                                        inv, inv, rows, torch.empty(m, dtype=torch.int64), m, v, 50257, 2, 1.0,
                                        K=k, BN=bn, STAGES=2, num_warps=sgg.NUM_WARPS, grid=(1,)),
    }
    for name, kernel in kernels.items():
        with open(f"{sys.argv[1]}/{name}{k}.ptx", "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        spills = " 0 bytes spill stores" not in log.stderr + log.stdout
        print(f"{name}{k}", kernel.metadata.shared, "spills" if spills else "ok")
"""


def test_gluon_loss_kernels_compile_for_hopper_without_spills(tmp_path):
    """The Gluon kernels only run on Hopper GPUs; here they are compiled for one (sm_90a) on any machine,
    so a Triton whose Gluon changed, a kernel that no longer fits in shared memory (227 KiB on an H100) or
    one that spills registers is caught without a GPU."""
    from slm.model import softmax_grad_gluon

    if softmax_grad_gluon.gluon is None:
        pytest.skip("needs Triton with Gluon (3.6+)")
    src = str(Path(__file__).resolve().parent.parent / "src")
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": src}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()[-4:]  # "<kernel><d_model> <bytes of shared memory> ok|spills"
    assert [line.split()[0] for line in lines] == ["lse384", "grad384", "lse768", "grad768"], out.stdout[-2000:]
    for line in lines:
        name, shared, spills = line.split()
        assert int(shared) <= 227 * 1024 and spills == "ok", line
