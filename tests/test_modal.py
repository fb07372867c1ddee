"""modal_app.py and slm.cloud: the Modal app's settings and function bodies, checked locally (no Modal servers)."""

import importlib.util
import socket
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from slm import cloud
from slm.config import load_config
from slm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def make_config(**modal):
    overrides = {"data.source": "sample", "data.dir": "data/sample-4k", "data.tokenizer": "tinystories-4k",
                 "training.out_dir": "runs/tiny-cloud", **{f"modal.{k}": v for k, v in modal.items()}}
    return load_config("tiny", [f"{k}={v}" for k, v in overrides.items()])


# -- plain helpers --------------------------------------------------------------------------------------------------

def test_volume_config_moves_data_and_run_onto_the_volume():
    cfg = make_config()
    vol = cloud.volume_config(cfg, "/vol")
    assert vol.data.dir == "/vol/data/sample-4k"
    assert vol.training.out_dir == "/vol/runs/tiny-cloud"
    assert cfg.data.dir == "data/sample-4k" and cfg.training.out_dir == "runs/tiny-cloud"  # input untouched
    assert cloud.volume_config(vol, "/vol").data.dir == "/vol/data/sample-4k"  # already on the volume: kept
    assert cloud.volume_config(cfg, "/vol", run_name="exp2").training.out_dir == "/vol/runs/exp2"
    nested = load_config("tiny", ["data.dir=/abs/x/tinystories/", "training.out_dir=a/b/c"])
    moved = cloud.volume_config(nested, "/mnt/v/")
    assert (moved.data.dir, moved.training.out_dir) == ("/mnt/v/data/tinystories", "/mnt/v/runs/c")


def test_config_travels_as_yaml_text():
    cfg = load_config("tiny", ["model.vocab_size=auto", "modal.gpu=H100", "modal.wandb_secret=wandb"])
    back = cloud.config_from_yaml(cloud.config_to_yaml(cfg))
    assert back == cfg


def test_gpu_string_and_timeout_come_from_the_config():
    assert cloud.gpu_spec(make_config(gpu="H100")) == "H100"
    assert cloud.gpu_spec(make_config(gpu="H100", gpu_count=2)) == "H100:2"
    assert cloud.gpu_spec(make_config(gpu="A100-80GB:4")) == "A100-80GB:4"
    assert cloud.gpu_spec(make_config(gpu="H100:2", gpu_count=2)) == "H100:2"
    with pytest.raises(ConfigError, match="modal.gpu"):
        cloud.gpu_spec(make_config(gpu="H100:2", gpu_count=4))
    settings = cloud.function_settings(make_config(gpu="L4", gpu_count=2, timeout=3600, volume="v1"))
    assert settings == {"gpu": "L4:2", "timeout": 3600, "volume": "v1", "secret": None}


def test_train_command_single_process_and_torchrun():
    one = cloud.train_command(make_config(gpu="H100"), "/tmp/c.yaml")
    assert one == [sys.executable, "-m", "slm", "train", "--config", "/tmp/c.yaml"]
    two = cloud.train_command(make_config(gpu="H100", gpu_count=2), "/tmp/c.yaml", resume=True)
    assert two == ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "slm", "train", "--config",
                   "/tmp/c.yaml", "--resume"]


def test_should_resume(tmp_path):
    assert not cloud.should_resume(tmp_path, resume=True)  # nothing to resume: start fresh
    (tmp_path / "last.pt").write_bytes(b"x")
    assert cloud.should_resume(tmp_path, resume=True)
    assert not cloud.should_resume(tmp_path, resume=False)  # slm train refuses to overwrite it
    (tmp_path / cloud.CALL_MARKER).write_text("fc-1\n")
    assert cloud.should_resume(tmp_path, resume=False, call_id="fc-1")  # Modal restarted the call that started it
    assert not cloud.should_resume(tmp_path, resume=False, call_id="fc-2")


def test_train_on_volume_builds_the_run_and_resumes(tmp_path):
    calls, commits = [], []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        written = yaml.safe_load(Path(command[command.index("--config") + 1]).read_text())
        assert written["data"]["dir"] == f"{tmp_path}/data/sample-4k"
        assert written["training"]["out_dir"] == f"{tmp_path}/runs/tiny-cloud"
        assert kwargs["check"] and str(Path(cloud.__file__).parents[1]) in kwargs["env"]["PYTHONPATH"]

    cfg = make_config(gpu="H100", gpu_count=2)
    result = cloud.train_on_volume(cfg, tmp_path, resume=True, call_id="fc-1", commit=lambda: commits.append(1),
                                   run=fake_run)
    assert not result["resumed"] and "--resume" not in calls[0][0] and calls[0][0][0] == "torchrun"
    run_dir = tmp_path / "runs" / "tiny-cloud"
    assert (run_dir / cloud.CALL_MARKER).read_text().strip() == "fc-1"
    assert commits == [1]  # committed at the end

    (run_dir / "last.pt").write_bytes(b"x")  # as if preempted after a checkpoint; Modal runs the same call again
    result = cloud.train_on_volume(cfg, tmp_path, resume=False, call_id="fc-1", run=fake_run)
    assert result["resumed"] and calls[1][0][-1] == "--resume" and result["checkpoints"] == ["last.pt"]


def test_periodic_commit_runs_while_training(tmp_path):
    commits = []

    def slow_run(command, **kwargs):
        import time
        time.sleep(0.35)

    cloud.train_on_volume(make_config(), tmp_path, commit=lambda: commits.append(1), commit_every=0.1, run=slow_run)
    assert len(commits) >= 3  # at least two periodic ones and the final one


def test_local_paths_are_refused_with_an_upload_hint(tmp_path):
    cloud.check_remote_inputs(make_config())  # the bundled sample works anywhere
    cloud.check_remote_inputs(load_config("gpt_124m"))  # a Hugging Face dataset id
    text = tmp_path / "stories.txt"
    text.write_text("once upon a time\n")
    with pytest.raises(ConfigError, match="modal volume put slm-data .*stories.txt sources/stories.txt"):
        cloud.check_remote_inputs(load_config("tiny", [f"data.source={text}"]))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        cloud.check_remote_inputs(load_config("tiny", [f"data.tokenizer={tmp_path}"]))


# -- modal_app.py, with modal installed -----------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def modal_app(tmp_path, monkeypatch, no_network):
    """modal_app.py imported with $SLM_CONFIG pointing to a temporary config."""
    pytest.importorskip("modal", reason="modal is not installed (pip install -e '.[modal]')")
    config = tmp_path / "cloud.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "sample", "dir": "data/sample-4k", "tokenizer": "tinystories-4k", "num_workers": 1},
        "training": {"out_dir": "runs/cloud-test"},
        "modal": {"gpu": "H100", "gpu_count": 2, "timeout": 7200, "volume": "slm-test-vol", "app_name": "slm-test",
                  "wandb_secret": "wandb"},
    }))
    monkeypatch.setenv("SLM_CONFIG", str(config))
    spec = importlib.util.spec_from_file_location("modal_app_under_test", ROOT / "modal_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.config_file = config
    return module


def test_app_functions_carry_the_configured_gpu_timeout_and_volume(modal_app):
    assert modal_app.app.name == "slm-test"
    info = modal_app.train.info()  # definition-time info: no server round trip
    assert info.gpus == [("H100", 2)]
    assert info.timeout == 7200
    assert info.max_retries == cloud.TRAIN_RETRIES
    assert list(info.volumes) == [cloud.VOLUME_MOUNT] and info.volumes[cloud.VOLUME_MOUNT].name == "slm-test-vol"
    assert any("wandb" in s for s in info.secrets)
    prep = modal_app.prepare_data.info()
    assert prep.gpus == [] and prep.cpu == cloud.PREPARE_CPUS and prep.volumes[cloud.VOLUME_MOUNT].name == "slm-test-vol"
    # the entrypoint defaults to the same config and lets --config change GPU and timeout at call time
    assert modal_app.CONFIG_PATH == str(modal_app.config_file)
    other = make_config(gpu="A100", gpu_count=1, timeout=600, volume="other-vol")
    variant = modal_app.train.with_options(**cloud.modal_function_options(other)).info()
    assert (variant.gpus, variant.timeout, variant.volumes[cloud.VOLUME_MOUNT].name) == ([("A100", 1)], 600, "other-vol")


def test_prepare_function_body_runs_locally_into_a_volume_folder(modal_app, tmp_path, monkeypatch):
    volume = tmp_path / "volume"
    monkeypatch.setenv("SLM_VOLUME_ROOT", str(volume))
    text = cloud.config_to_yaml(load_config(modal_app.config_file))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will not have access to the mounted Volume.*")
        meta = modal_app.prepare_data.local(text)
        assert meta["train_tokens"] > 0 and meta["tokenizer"] == "tinystories-4k"
        assert (volume / "data" / "sample-4k" / "meta.json").exists()
        assert modal_app.prepare_data.local(text) == meta  # prepared already: nothing is redone
