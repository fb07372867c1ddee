import os
import subprocess
import sys

import pytest
import torch

from slm.config import load_config
from slm.data.shards import prepare

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The bundled sample, prepared once with the small tokenizer."""
    out = tmp_path_factory.mktemp("sample-4k")
    prepare("sample", out, "tinystories-4k", progress=False, num_workers=1)
    return out


def small_config(data_dir, out_dir, **training):
    """A model small enough to train for a few hundred steps in seconds on a CPU."""
    overrides = {
        "model.n_layers": 2, "model.n_heads": 2, "model.d_model": 64, "model.d_ff": 256, "model.context_length": 64,
        "data.dir": str(data_dir), "training.out_dir": str(out_dir), "training.batch_size": 8,
        "training.max_steps": 40, "training.warmup_steps": 5, "training.lr": 3e-3, "training.min_lr": 3e-4,
        "training.eval_every": 20, "training.eval_batches": 4, "training.checkpoint_every": 20,
        "training.log_every": 1, "training.device": "cpu",
    }
    overrides.update({f"training.{k}": v for k, v in training.items()})
    return load_config("tiny", [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="session")
def trained_run(sample_data, tmp_path_factory):
    """One short training run shared by the tests that need a trained model."""
    from slm.train import run_training

    out = tmp_path_factory.mktemp("run")
    cfg = small_config(sample_data, out, max_steps=300, eval_every=100, checkpoint_every=100, batch_size=16,
                       eval_batches=16)
    result = run_training(cfg, progress=False)
    return out, cfg, result


def run_under_triton_interpreter(test_file: str, select: str, expect: str) -> None:
    """Run the tests of ``test_file`` matching ``select`` (-k) in a fresh process with TRITON_INTERPRET=1,
    so Triton kernels run on the CPU; assert they all ran and passed (``expect``: e.g. "9 passed")."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", test_file, "-k", select],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert expect in run.stdout, run.stdout[-2000:]
