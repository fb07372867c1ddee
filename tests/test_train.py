import json
import math

import numpy as np
import pytest
import torch

from slm.cli import main
from slm.data import open_tokens
from slm.errors import CheckpointError, ConfigError
from slm.model import GPT
from slm.train import lr_at, run_training
from tests.conftest import small_config


def metrics(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def unigram_loss(data_dir):
    """Cross-entropy of the val split under the train split's token frequencies (add-one smoothed)."""
    train, val = (np.concatenate(open_tokens(data_dir, split)) for split in ("train", "val"))
    counts = np.bincount(train, minlength=4096) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = small_config(".", ".", max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1).training
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_training_beats_the_unigram_baseline(trained_run, sample_data):
    run_dir, cfg, result = trained_run
    baseline = unigram_loss(sample_data)
    val = metrics(run_dir, "val/loss")
    assert 5.5 < baseline < 7.0
    assert result["best_val_loss"] < baseline - 1.0, (result, baseline)  # perplexity under 37% of the baseline's
    assert val[300] < val[100]
    assert (run_dir / "best.pt").exists() and (run_dir / "last.pt").exists()
    first = metrics(run_dir, "train/loss")
    assert first[1] > math.log(4096) - 0.5  # starts near uniform


def test_metrics_file_has_the_expected_series(trained_run):
    run_dir, _, _ = trained_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"train/loss", "train/lr", "train/tokens_seen", "val/loss", "model/parameters"} <= keys


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a CUDA checkpoint maps its RNG states onto the GPU"))])
def test_resume_continues_the_same_loss_curve(sample_data, tmp_path, device):
    overrides = dict(max_steps=30, checkpoint_every=100, eval_every=10, device=device, compile=False)
    cfg_a = small_config(sample_data, tmp_path / "a", **overrides)
    cfg_a.model.dropout = 0.1  # dropout draws random numbers: resume must restore the RNG too
    reference = run_training(cfg_a, progress=False)

    cfg_b = small_config(sample_data, tmp_path / "b", **overrides)
    cfg_b.model.dropout = 0.1
    run_training(cfg_b, progress=False, stop_after=13)
    with pytest.raises(ConfigError, match="--resume"):
        run_training(cfg_b, progress=False)
    resumed = run_training(cfg_b, resume=True, progress=False)

    a, b = metrics(tmp_path / "a", "train/loss"), metrics(tmp_path / "b", "train/loss")
    exact = device == "cpu"  # GPU kernels may sum in another order from run to run
    assert [a[s] for s in range(14, 31)] == pytest.approx([b[s] for s in range(14, 31)], abs=0 if exact else 1e-4)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], abs=0 if exact else 1e-4)


def test_resume_without_a_checkpoint_is_an_error(sample_data, tmp_path):
    with pytest.raises(CheckpointError, match="drop --resume"):
        run_training(small_config(sample_data, tmp_path / "none"), resume=True, progress=False)


def test_model_vocab_smaller_than_the_tokenizer_is_an_error(sample_data, tmp_path):
    cfg = small_config(sample_data, tmp_path / "v")
    cfg.model.vocab_size = 1000
    with pytest.raises(ConfigError, match="model.vocab_size"):
        run_training(cfg, progress=False)


def test_cli_generate_streams_a_story(trained_run, capsys):
    run_dir, _, _ = trained_run
    args = ["generate", "--checkpoint", str(run_dir / "best.pt"), "--prompt", "once upon a time", "--seed", "1",
            "--max-new-tokens", "60"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("once upon a time") and len(first.split()) > 15
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same story


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config") and err.count("\n") == 1
    assert main(["generate", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--set", "model.n_heads=5"]) == 2
    assert capsys.readouterr().err.startswith("error: model.n_heads")


def test_speed_levers_keep_the_loss_curve_and_mfu_is_logged(sample_data, tmp_path, capsys):
    """Prefetching and the fused output layer change how fast a step runs, not what it computes."""
    steps = dict(max_steps=12, eval_every=6, checkpoint_every=100, log_every=3, gradient_accumulation_steps=2)
    plain = run_training(small_config(sample_data, tmp_path / "a", prefetch=0, **steps), progress=False)
    cfg = small_config(sample_data, tmp_path / "b", prefetch=3, loss_chunk=100, **steps)
    cfg.logging.peak_tflops = 0.01  # a CPU has no datasheet figure: give one so MFU is computed
    fast = run_training(cfg, progress=True)
    a, b = metrics(tmp_path / "a", "train/loss"), metrics(tmp_path / "b", "train/loss")
    assert a.keys() == b.keys() == {3, 6, 9, 12}
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    assert fast["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-4)
    mfu, speed = metrics(tmp_path / "b", "train/mfu"), metrics(tmp_path / "b", "train/tokens_per_sec")
    assert mfu.keys() == {3, 6, 9, 12} and "train/mfu" not in json.dumps(metrics(tmp_path / "a", "train/mfu"))
    n = GPT(cfg.model).count_parameters(non_embedding=True)
    for step in mfu:  # MFU = (6N + 12LHQT) x tokens/s / peak
        assert mfu[step] == pytest.approx((6 * n + 12 * 2 * 2 * 32 * 64) * speed[step] / 1e10, rel=1e-2)
    err = capsys.readouterr().err
    assert "MFU" in err and "| val - |" in err and "nan" not in err  # no val loss before the first evaluation


def test_auto_batch_size_picks_a_split_and_a_resume_keeps_it(sample_data, tmp_path, monkeypatch, capsys):
    """On a GPU the micro-batch is chosen from the free memory; a resumed run keeps the split it started with."""
    from slm.train import trainer

    cfg = small_config(sample_data, tmp_path / "run", batch_size=4, gradient_accumulation_steps=4,
                       auto_batch_size=True, max_steps=6, checkpoint_every=3, eval_every=3)
    monkeypatch.setattr(trainer, "auto_micro_batch", lambda cfg, device: (8, 2))  # what a GPU would answer
    run_training(cfg, stop_after=3)
    assert "auto_batch_size: micro-batch 8 x 2 accumulation steps (configured 4 x 4" in capsys.readouterr().out
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (8, 2)
    assert "batch_size: 8" in (tmp_path / "run" / "config.yaml").read_text()
    monkeypatch.setattr(trainer, "auto_micro_batch", lambda cfg, device: (16, 1))  # a bigger GPU this time
    cfg = small_config(sample_data, tmp_path / "run", batch_size=4, gradient_accumulation_steps=4,
                       auto_batch_size=True, max_steps=6, checkpoint_every=3, eval_every=3)
    result = run_training(cfg, resume=True, progress=False)
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (8, 2) and result["step"] == 6
    cfg = small_config(sample_data, tmp_path / "cpu", auto_batch_size=True, max_steps=2, warmup_steps=1)
    monkeypatch.setattr(trainer, "auto_micro_batch", lambda cfg, device: None)  # a CPU: keep the config
    run_training(cfg)
    assert "auto_batch_size: keeping micro-batch 8" in capsys.readouterr().out


def test_cuda_graphs_are_left_out_with_several_processes():
    from slm.train.trainer import compile_mode

    assert compile_mode("reduce-overhead", distributed=False) == "reduce-overhead"
    assert compile_mode("reduce-overhead", distributed=True) == "default"
    assert compile_mode("max-autotune", distributed=True) == "max-autotune-no-cudagraphs"
    assert compile_mode("default", distributed=True) == "default"


def test_bf16_residual_carries_the_stream_in_bf16_and_keeps_the_loss_curve(sample_data, tmp_path, capsys):
    """training.bf16_residual halves the residual stream's bytes: the blocks see bf16, the loss barely moves."""
    from slm.device import autocast

    steps = dict(max_steps=60, eval_every=30, checkpoint_every=100, log_every=10, dtype="bfloat16")
    base = run_training(small_config(sample_data, tmp_path / "a", **steps), progress=False)
    cfg = small_config(sample_data, tmp_path / "b", bf16_residual=True, **steps)
    half = run_training(cfg, progress=False)
    assert half["val_loss"] == pytest.approx(base["val_loss"], abs=0.05)
    assert half["val_loss"] < metrics(tmp_path / "b", "train/loss")[10]  # it learned

    model = GPT(cfg.model)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    idx = torch.zeros(2, 8, dtype=torch.long)
    for flag in (False, True):
        model.bf16_residual = flag
        with autocast(torch.device("cpu"), torch.bfloat16):
            model(idx, idx)
    assert seen == [torch.float32, torch.bfloat16]

    note = small_config(sample_data, tmp_path / "c", bf16_residual=True, max_steps=2, warmup_steps=1)
    run_training(note, progress=True)
    assert "bf16_residual applies to bfloat16 training" in capsys.readouterr().out
