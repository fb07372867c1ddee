"""Several processes on CPU (gloo): the same numbers as one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from slm.checkpoint import load_checkpoint
from slm.train import run_training
from tests.conftest import small_config

SETTINGS = ["training.max_steps=12", "training.warmup_steps=2", "training.eval_every=6", "training.eval_batches=4",
            "training.checkpoint_every=6", "training.log_every=1", "training.device=cpu", "model.dropout=0.0",
            "model.n_layers=2", "model.n_heads=2", "model.d_model=64", "model.d_ff=256", "model.context_length=64",
            "training.gradient_accumulation_steps=2"]


def losses(run_dir, key="train/loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def run_processes(args, timeout=300):
    """Run a launcher (torchrun, ``slm train --gpus``) with one thread per process. If it hangs, fail with what
    it printed so far: a bare TimeoutExpired shows none of it (one CI-like run hung here once, unexplained)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        said = [b.decode(errors="replace") if isinstance(b, bytes) else b or "" for b in (e.stdout, e.stderr)]
        pytest.fail(f"no exit after {timeout}s: {' '.join(args[1:6])} ...\nstdout: {said[0][-2000:]}\n"
                    f"stderr: {said[1][-3000:]}")


def torchrun(n, data, out, *extra):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "slm",
            "train", "--set", f"data.dir={data}", "--set", f"training.out_dir={out}", "--set", "training.batch_size=4"]
    for s in SETTINGS:
        args += ["--set", s]
    result = run_processes(args + list(extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_process(data, out, steps=12, resume=False):
    cfg = small_config(data, out)
    from slm.config import apply_overrides  # apply the same settings as the torchrun runs

    values = cfg.to_dict()
    apply_overrides(values, SETTINGS + ["training.batch_size=8", f"training.max_steps={steps}"])
    from slm.config import config_from_dict

    return run_training(config_from_dict(values), resume=resume, progress=False)


@pytest.fixture(scope="module")
def two_process_run(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun(2, sample_data, out)
    return out, result


def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run, sample_data, tmp_path):
    out, result = two_process_run
    assert "4 x 2 accumulation x 2 processes x 64 tokens" in result.stdout + result.stderr
    one_process(sample_data, tmp_path / "one")
    a, b = losses(out), losses(tmp_path / "one")
    assert sorted(a) == list(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=2e-5), step
    assert losses(out, "val/loss")[12] == pytest.approx(losses(tmp_path / "one", "val/loss")[12], abs=2e-5)


def test_only_rank_zero_writes_and_checkpoints_resume_on_one_process(two_process_run, sample_data, tmp_path):
    out, _ = two_process_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"train/loss"' in line]) == 12  # one writer, not two
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 12 and not any(k.startswith("module.") for k in state["model"])
    # a checkpoint written by 2 processes continues on 1, on the same curve as a 1-process run
    (tmp_path / "cont").mkdir()
    (tmp_path / "cont" / "last.pt").write_bytes((out / "last.pt").read_bytes())
    one_process(sample_data, tmp_path / "cont", steps=16, resume=True)
    one_process(sample_data, tmp_path / "ref", steps=12)  # the same two legs, both on one process
    one_process(sample_data, tmp_path / "ref", steps=16, resume=True)
    a, b = losses(tmp_path / "cont"), losses(tmp_path / "ref")
    for step in range(13, 17):
        assert a[step] == pytest.approx(b[step], abs=1e-4), step


def test_fsdp_matches_one_process_and_its_checkpoint_loads_anywhere(sample_data, tmp_path):
    # FSDP with the fused output layer + loss (as the GPU configs run), against one plain process
    torchrun(2, sample_data, tmp_path / "fsdp", "--set", "training.parallelism=fsdp", "--set", "training.loss_chunk=100")
    one_process(sample_data, tmp_path / "one")
    a, b = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    for step in range(1, 13):
        assert a[step] == pytest.approx(b[step], abs=1e-4), step
    from slm.generate import load_model

    lm = load_model(tmp_path / "fsdp" / "best.pt", "cpu")  # full tensors, not shards
    assert lm.model.count_parameters() > 0 and lm.step == 12


def test_slm_train_gpus_launches_torchrun(sample_data, tmp_path):
    args = [sys.executable, "-m", "slm", "train", "--gpus", "2", "--set", f"data.dir={sample_data}",
            "--set", f"training.out_dir={tmp_path / 'g'}", "--set", "training.batch_size=2"]
    for s in SETTINGS:
        args += ["--set", s.replace("max_steps=12", "max_steps=4").replace("eval_every=6", "eval_every=4")]
    result = run_processes(args)
    assert result.returncode == 0, result.stderr[-2000:]
    launch = result.stdout.splitlines()[0]
    assert launch.startswith("launching: torchrun --standalone --nproc_per_node=2 -m slm train") and "--gpus" not in launch
    assert "2 processes" in result.stdout + result.stderr and sorted(losses(tmp_path / "g")) == [1, 2, 3, 4]
