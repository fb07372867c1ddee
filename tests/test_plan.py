import pytest

from slm.config import load_config
from slm.errors import SlmError
from slm.plan import GPUS, PRICES, format_plan, plan


def test_gpt_124m_parameters_and_flops():
    r = plan("gpt_124m", "A100")
    assert r["parameters"] == 124_439_808
    n = 124_439_808 - 1024 * 768  # without the position table
    assert r["non_embedding_parameters"] == n
    L, H, Q, T = 12, 12, 64, 1024
    assert r["flops_per_token"] == 6 * n + 12 * L * H * Q * T
    assert r["tokens"] == 50_000 * 16 * 2 * 1024  # max_steps x batch_size x grad_accum x context_length
    assert r["total_flops"] == r["flops_per_token"] * r["tokens"]
    assert r["mfu"] == 0.35 and r["mfu_source"] == "assumed"


def test_time_and_cost():
    r = plan("gpt_124m", "H100", tokens=10**9, mfu=0.4)
    assert r["tokens"] == 10**9 and r["mfu"] == 0.4
    assert r["hours"] == pytest.approx(r["total_flops"] / (GPUS["H100"]["tflops"] * 1e12 * 0.4) / 3600)
    assert r["cost"] == pytest.approx(r["hours"] * r["price_per_hour"])
    assert r["price_per_hour"] == PRICES["H100"]
    assert plan("gpt_124m", "H100", tokens=10**9, mfu=0.4, price=1.0)["cost"] == pytest.approx(r["hours"])


def test_measured_mfu_is_used_for_the_measured_model():
    r = plan("seed30m", "H100")
    assert r["mfu_source"].startswith("measured")
    assert r["tokens_per_sec"] == pytest.approx(1.5e6)
    assert 0.1 < r["mfu"] < 0.5


def test_memory_grows_with_micro_batch():
    plain = load_config("gpt_124m", ["training.loss_chunk=0"])  # the full-logits path the test measured
    mem = [plan(plain, "H100", micro_batch=b) for b in (1, 4, 16)]
    assert mem[0]["memory_gb"] < mem[1]["memory_gb"] < mem[2]["memory_gb"]
    assert mem[0]["memory_state_gb"] == mem[2]["memory_state_gb"] == pytest.approx(16 * 124_439_808 / 2**30)
    assert mem[2]["memory_activations_gb"] == pytest.approx(16 * mem[0]["memory_activations_gb"])
    # measured on an H100: 17.9 GiB at micro-batch 16 (eager); the estimate should be in that range
    assert 14 < mem[2]["memory_gb"] < 22


def test_fused_loss_lowers_the_memory_estimate():
    # measured on an H100 with the fused loss (loss_chunk 8192, compiled): 9.2 / 16.1 GiB at micro-batch 16 / 32
    for batch, measured in [(16, 9.2), (32, 16.1)]:
        fused = plan("gpt_124m", "H100", micro_batch=batch)
        assert measured < fused["memory_gb"] < 1.4 * measured
        plain = plan(load_config("gpt_124m", ["training.loss_chunk=0"]), "H100", micro_batch=batch)
        assert fused["memory_gb"] < plain["memory_gb"] - 4


def test_warns_when_memory_does_not_fit():
    big = plan("gpt_124m", "T4", micro_batch=64)
    assert not big["fits"] and "micro-batch" in big["warning"] and "gradient_accumulation_steps" in big["warning"]
    assert "warning" in format_plan(big)
    fitting = plan("gpt_124m", "H200", micro_batch=8)
    assert fitting["fits"] and fitting["warning"] is None and "warning" not in format_plan(fitting)


def test_config_object_and_auto_vocab():
    cfg = load_config("tiny")  # vocab_size: auto -> the tinystories-4k tokenizer
    r = plan(cfg, "l4")
    assert r["gpu"] == "L4" and r["parameters"] > 0
    assert cfg.model.vocab_size == 0  # the caller's config is left as it was
    assert "MFLOPs/token" in format_plan(r)


def test_unknown_gpu():
    with pytest.raises(SlmError, match="H100") as e:
        plan("gpt_124m", "RTX9090")
    assert "RTX9090" in str(e.value) and "\n" not in str(e.value)


def test_bad_values():
    for kwargs in ({"mfu": 0}, {"mfu": 1.5}, {"tokens": 0}, {"micro_batch": 0}):
        with pytest.raises(SlmError):
            plan("gpt_124m", "H100", **kwargs)


def test_fit_micro_batch_keeps_the_effective_batch():
    from slm.plan import GIB, fit_micro_batch, memory_estimate

    cfg = load_config("gpt_124m").model
    n = plan("gpt_124m", "H100")["parameters"]
    need = {m: memory_estimate(cfg, n, m, 8192)["total"] for m in (8, 12, 16, 24, 48)}
    assert fit_micro_batch(cfg, n, 48, 8192, need[16] + 1) == 16  # 24 does not fit; 16 divides 48
    assert fit_micro_batch(cfg, n, 48, 8192, need[24]) == 24
    assert fit_micro_batch(cfg, n, 48, 8192, 1000 * GIB) == 48  # never more than the effective batch
    assert fit_micro_batch(cfg, n, 48, 8192, 1 * GIB) == 0  # the model state alone does not fit


def test_auto_micro_batch_uses_the_free_gpu_memory(monkeypatch):
    import torch

    from slm.plan import auto_micro_batch

    cfg = load_config("gpt_124m", ["training.batch_size=8", "training.gradient_accumulation_steps=8"])
    assert auto_micro_batch(cfg, torch.device("cpu")) is None  # sizes are chosen on a GPU only
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    big = auto_micro_batch(cfg, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * 2**30, 24 * 2**30))
    small = auto_micro_batch(cfg, torch.device("cuda"))
    assert big[0] * big[1] == small[0] * small[1] == 64
    assert big[0] > small[0] >= 8 and big[0] in (32, 64)
    for (m, _), free in ((big, 80), (small, 24)):  # with room for the estimate's error
        assert 1.5 * plan(cfg, "H100", micro_batch=m)["memory_gb"] < 0.9 * free
