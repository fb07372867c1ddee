"""RunLogger: metrics.jsonl, W&B (offline, never the network), TensorBoard and loss.png."""

import json
import sys
import time

import pytest
import torch

from slm.config import load_config
from slm.model import GPT, GPTConfig
from slm.train.logger import RunLogger, loss_curves, plot_losses

from tests.conftest import small_config


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No API key, no netrc, and every W&B / matplotlib file under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / "mpl"))


def config(*overrides):
    return load_config("tiny", ["logging.wandb.histogram_every=2", *overrides])


def tiny_model_with_grads():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=16, n_layers=1, n_heads=1, d_model=8, d_ff=16))
    x = torch.randint(0, 50, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    return model


def drive(logger, steps=4):
    """What the trainer does: parameters at step 0, then gradients and train records, then a val record."""
    model = tiny_model_with_grads()
    logger.log({"step": 0, "model/parameters": model.count_parameters()})
    for step in range(1, steps + 1):
        logger.log_gradients(model, step)
        logger.log({"step": step, "train/loss": 4.0 - 0.1 * step, "train/lr": 1e-3, "train/tokens_seen": 32 * step,
                    "train/grad_norm": 0.5, "train/skipped_steps": 0})
    logger.log({"step": steps, "val/loss": 3.7, "train/tokens_seen": 32 * steps})
    logger.finish()


def wandb_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_bytes(run):
    """The run's .wandb file, once W&B's service has written all of it: its writer runs in a process of its
    own and may still be flushing when ``finish()`` returns (a CI run once read the 7-byte header alone)."""
    import wandb

    wandb.teardown()  # stops the service after its pending work; the next wandb.init starts a new one
    (file,) = run.glob("run-*.wandb")
    return file.read_bytes()


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    run_dir = tmp_path / "run"
    drive(RunLogger(config("logging.wandb.enabled=true", "logging.wandb.mode=offline"), run_dir))
    (run,) = wandb_runs(run_dir)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run.name.endswith(run_id) and run_id.encode() in wandb_bytes(run)
    data = wandb_bytes(run)
    for key in ("train/loss", "train/lr", "val/loss", "model/parameters", "gradients/total_norm",
                "gradients/blocks.0.mlp.fc.weight", "_type"):
        assert key.encode() in data, key
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6


def test_wandb_online_without_key_falls_back_to_offline_and_keeps_its_id(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = config("logging.wandb.enabled=true", "logging.wandb.mode=online", "logging.plot=false")
    drive(RunLogger(cfg, run_dir), steps=1)
    notice = [line for line in capsys.readouterr().err.splitlines() if "W&B API key" in line]
    assert len(notice) == 1 and "offline" in notice[0]
    time.sleep(1.05)  # wandb names a run's folder by the second it starts: two in one second share a folder
    drive(RunLogger(cfg, run_dir), steps=1)  # resumed: the same W&B run
    runs = wandb_runs(run_dir)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert len(runs) == 2, runs
    for run in runs:
        assert run_id in run.name, (run_id, run.name)
        data = wandb_bytes(run)
        assert run_id.encode() in data, (run_id, run.name, len(data))


def test_tensorboard_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    drive(RunLogger(config("logging.tensorboard=true"), run_dir))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    for key in ("train/loss", "train/lr", "train/tokens_seen", "val/loss", "model/parameters", "gradients/total_norm"):
        assert key in tags["scalars"], key
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Histograms("gradients/blocks.0.mlp.fc.weight")] == [2, 4]  # histogram_every=2
    assert not (run_dir / "wandb").exists()


def test_loss_png_keeps_the_last_value_of_a_repeated_step(tmp_path):
    run_dir = tmp_path / "run"
    drive(RunLogger(config(), run_dir))
    png = (run_dir / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    metrics = run_dir / "metrics.jsonl"
    lines = [{"step": s, "train/loss": 5.0, "train/tokens_seen": 10 * s} for s in (1, 2, 3)]
    lines.append({"step": 2, "train/loss": 4.0, "train/tokens_seen": 20})  # a resumed run repeats step 2
    lines.append({"step": 2, "val/loss": 4.5, "train/tokens_seen": 20})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "train/lo')  # torn by a crash
    assert loss_curves(metrics) == {"train/loss": [(10, 5.0), (20, 4.0), (30, 5.0)], "val/loss": [(20, 4.5)]}
    assert plot_losses(metrics, tmp_path / "resumed.png")
    metrics.write_text(json.dumps({"step": 1, "train/loss": 5.0, "train/tokens_seen": 10}) + "\n")
    assert not plot_losses(metrics, tmp_path / "one.png") and not (tmp_path / "one.png").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config("logging.wandb.enabled=true", "logging.wandb.mode=offline", "logging.tensorboard=true")
    logger = RunLogger(cfg, run_dir, enabled=False)
    assert logger.histogram_every == 0
    drive(logger)
    assert not run_dir.exists()


def test_missing_packages_are_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run_dir = tmp_path / "run"
    cfg = config("logging.wandb.enabled=true", "logging.wandb.mode=offline", "logging.tensorboard=true")
    drive(RunLogger(cfg, run_dir))
    err = capsys.readouterr().err
    assert "pip install wandb" in err and "pip install tensorboard" in err
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "loss.png").exists()
    assert not (run_dir / "wandb").exists() and not (run_dir / "tensorboard").exists()


def test_gradients_cost_nothing_without_a_writer(tmp_path):
    class Untouchable:
        def named_parameters(self):
            raise AssertionError("log_gradients looked at the model")

    logger = RunLogger(config(), tmp_path / "run")
    for step in range(1, 5):
        logger.log_gradients(Untouchable(), step)


def test_training_writes_plot_tensorboard_and_wandb(sample_data, tmp_path):
    from slm.train import run_training

    out = tmp_path / "out"
    cfg = small_config(sample_data, out, max_steps=20, eval_every=10)
    cfg.logging.wandb.enabled, cfg.logging.wandb.mode, cfg.logging.wandb.histogram_every = True, "offline", 10
    cfg.logging.tensorboard = True
    run_training(cfg, progress=False)
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    (run,) = wandb_runs(out)
    data = wandb_bytes(run)
    assert b"train/loss" in data and b"val/loss" in data and b"gradients/total_norm" in data
