"""Faults and bad input: crashes, NaNs, corrupt files, malicious checkpoints. Each error is one clear line."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from slm.checkpoint import load_checkpoint, save_checkpoint
from slm.cli import main
from slm.errors import CheckpointError, TrainingDiverged
from slm.train import run_training
from tests.conftest import small_config


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(params=["scaler", "fused"])
def step_path(request, monkeypatch):
    """Both ways a step is clipped and skipped: through the GradScaler (fp16, unfused optimizers), or inside
    a fused AdamW (bf16/fp32 on a GPU; fused AdamW runs on the CPU too). Yields whether the fold was used."""
    from slm.model import GPT
    from slm.train.trainer import Trainer

    if request.param == "fused":
        real = GPT.configure_optimizer
        monkeypatch.setattr(GPT, "configure_optimizer", lambda self, *a, fused=None: real(self, *a, fused=True))
    used = []
    real_can = Trainer._can_fold_clip
    monkeypatch.setattr(Trainer, "_can_fold_clip", lambda self: used.append(real_can(self)) or used[-1])
    yield used
    assert used and all(used) == (request.param == "fused")


def test_folded_clip_steps_like_clip_grad_norm(sample_data, tmp_path, monkeypatch):
    from slm.model import GPT
    from slm.train.trainer import Trainer

    real = GPT.configure_optimizer
    monkeypatch.setattr(GPT, "configure_optimizer", lambda self, *a, fused=None: real(self, *a, fused=True))
    folded = run_training(small_config(sample_data, tmp_path / "a", max_steps=12, grad_clip=0.05), progress=False)
    monkeypatch.setattr(Trainer, "_can_fold_clip", lambda self: False)
    plain = run_training(small_config(sample_data, tmp_path / "b", max_steps=12, grad_clip=0.05), progress=False)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys() and a[12] < a[1]
    assert all(a[k] == pytest.approx(b[k], rel=1e-4) for k in a)
    assert folded["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)


def test_nan_step_is_skipped_and_counted(sample_data, tmp_path, monkeypatch, step_path):
    from slm.model import GPT

    real_forward, calls = GPT.forward, {"n": 0}

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 6:  # step 6 gets a NaN loss
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    cfg = small_config(sample_data, tmp_path / "nan", max_steps=10, eval_every=10)
    result = run_training(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r}
    assert skipped[5] == 0 and skipped[6] == 1 and skipped[10] == 1
    assert np.isfinite(result["val_loss"])


def test_training_stops_after_too_many_bad_steps(sample_data, tmp_path, monkeypatch, step_path):
    from slm.model import GPT

    real_forward = GPT.forward

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if targets is not None and self.training and forward.step >= 12:
            loss = loss * float("inf")
        return logits, loss

    forward.step = 0
    monkeypatch.setattr(GPT, "forward", forward)
    cfg = small_config(sample_data, tmp_path / "inf", max_steps=40, checkpoint_every=10, max_bad_steps=5)
    import slm.train.trainer as trainer_module

    real_lr = trainer_module.lr_at

    def lr_at(step, tc):
        forward.step = step
        return real_lr(step, tc)

    monkeypatch.setattr(trainer_module, "lr_at", lr_at)
    with pytest.raises(TrainingDiverged, match=r"step 17: 5 steps in a row .* last good checkpoint is .*last\.pt"):
        run_training(cfg, progress=False)
    state = load_checkpoint(tmp_path / "inf" / "last.pt")
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_crafted_pickle_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "slm-checkpoint/1", "model": Exploit()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["model"]["w"].shape == (1000,)


KILL_SCRIPT = """
import sys
from tests.conftest import small_config
from slm.train import run_training
cfg = small_config(sys.argv[1], sys.argv[2], max_steps=30, checkpoint_every=1, eval_every=10)
cfg.model.dropout = 0.1
run_training(cfg, resume=sys.argv[3] == "resume", progress=False)
"""


def test_sigkill_at_random_points_never_loses_the_run(sample_data, tmp_path):
    """Kill a training process at random moments; the run folder always loads and resumes onto the same curve."""
    ref_dir = tmp_path / "ref"
    cfg = small_config(sample_data, ref_dir, max_steps=30, checkpoint_every=1, eval_every=10)
    cfg.model.dropout = 0.1
    run_training(cfg, progress=False)
    reference = losses(ref_dir)

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    rng = np.random.default_rng(0)
    killed_at = []  # the step of last.pt after each kill: where the next process resumed
    for attempt in range(3):
        mode = "resume" if (run_dir / "last.pt").exists() else "fresh"
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(sample_data), str(run_dir), mode], env=env)
        time.sleep(float(rng.uniform(3.0, 6.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (run_dir / "last.pt").exists():
            state = load_checkpoint(run_dir / "last.pt")  # never torn
            assert 0 < state["step"] <= 30
            killed_at.append(state["step"])
    mode = "resume" if (run_dir / "last.pt").exists() else "fresh"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(sample_data), str(run_dir), mode], env=env, check=True)
    resumed = losses(run_dir)
    differ = {s: (resumed.get(s), reference[s]) for s in range(1, 31) if resumed.get(s) != reference[s]}
    assert not differ, f"resumed at steps {killed_at}; (resumed, uninterrupted) loss differs at {differ}"


def test_cuda_requested_but_absent(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--set", "training.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training.device: 'cuda' requested but CUDA is not available") and err.count("\n") == 1


def copy_data(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("damage, message", [
    ("delete_bin", r"train_000\.bin not found: run `slm prepare"),
    ("odd_size", r"truncated \(\d+ bytes is not a multiple of 2\)"),
    ("short", r"holds [\d,]+ tokens but meta\.json says"),
    ("big_id", r"holds token id 65535, but the model's vocab_size is 4096"),
    ("bad_meta", r"meta\.json is corrupt"),
    ("no_meta", r"nowhere\.txt: no such file or folder"),  # unprepared data is prepared from data.source
])
def test_damaged_data_gives_one_clear_line(sample_data, tmp_path, capsys, damage, message):
    data = copy_data(sample_data, tmp_path / "data")
    if damage == "delete_bin":
        (data / "train_000.bin").unlink()
    elif damage == "odd_size":
        with open(data / "train_000.bin", "ab") as f:
            f.write(b"\x00")
    elif damage == "short":
        with open(data / "train_000.bin", "r+b") as f:
            f.truncate(2000)
    elif damage == "big_id":
        ids = np.memmap(data / "train_000.bin", dtype=np.uint16, mode="r+")
        ids[:] = 65535
        ids.flush()
    elif damage == "bad_meta":
        (data / "meta.json").write_text("{not json")
    elif damage == "no_meta":
        (data / "meta.json").unlink()
    args = ["train", "--set", f"data.dir={data}", "--set", f"training.out_dir={tmp_path / 'run'}",
            "--set", "training.max_steps=2", "--set", "training.warmup_steps=0", "--set", "data.source=nowhere.txt"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), err


def test_checkpoint_from_another_architecture_is_refused(trained_run, tmp_path, capsys):
    run_dir, cfg, _ = trained_run
    out = tmp_path / "other"
    out.mkdir()
    (out / "last.pt").write_bytes((run_dir / "last.pt").read_bytes())
    args = ["train", "--resume", "--set", f"data.dir={cfg.data.dir}", "--set", f"training.out_dir={out}",
            "--set", "model.n_layers=3", "--set", "model.d_model=64", "--set", "model.n_heads=2",
            "--set", "model.context_length=64", "--set", "model.d_ff=256"]
    assert main(args) == 2
    assert "use the config it was trained with" in capsys.readouterr().err


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()])
def test_out_of_memory_suggests_a_smaller_micro_batch(sample_data, tmp_path, monkeypatch, capsys, error):
    from slm.model import GPT

    def forward(self, idx, targets=None, cache=None):
        raise error

    monkeypatch.setattr(GPT, "forward", forward)
    args = ["train", "--set", f"data.dir={sample_data}", "--set", f"training.out_dir={tmp_path / 'oom'}",
            "--set", "training.max_steps=2", "--set", "training.warmup_steps=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]
    assert len(errors) == 1 and "out of" in errors[0] and "training.batch_size" in errors[0]
    assert "gradient_accumulation_steps" in errors[0] and "Traceback" not in err


def test_finetune_cannot_change_the_model_shape(trained_run, tmp_path, capsys):
    run_dir, cfg, _ = trained_run
    args = ["finetune", "--checkpoint", str(run_dir / "best.pt"), "--data", str(cfg.data.dir), "--out",
            str(tmp_path / "ft"), "--set", "model.context_length=128"]
    assert main(args) == 2
    assert "keeps the base model's shape" in capsys.readouterr().err
