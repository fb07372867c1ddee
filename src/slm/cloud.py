"""Plain helpers behind ``modal_app.py`` (training on Modal's cloud GPUs), testable without Modal.

``modal_app.py`` keeps its Modal functions as thin wrappers around these:

    volume_config(cfg, "/vol")        data.dir -> /vol/data/<name>, training.out_dir -> /vol/runs/<name>
    gpu_spec(cfg)                     modal.gpu + modal.gpu_count -> "H100" or "H100:2"
    modal_function_options(cfg)       the @app.function / Function.with_options kwargs for training
    should_resume(run_dir, ...)       continue a run whose last.pt is on the volume (preemption, timeouts)
    train_command(cfg, path, resume)  python -m slm train ...   or   torchrun ... -m slm train ... (gpu_count > 1)
    prepare_on_volume / train_on_volume   what the remote functions run

Only ``modal_function_options`` imports ``modal`` (lazily); everything else is plain Python.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import yaml

from slm.config import Config, config_from_dict, load_config
from slm.errors import ConfigError

VOLUME_MOUNT = "/vol"  # where the modal.Volume is mounted in every container
DEFAULT_CONFIG = "configs/gpt_124m.yaml"
TRAIN_RETRIES = 3  # restarts after a failure or a timeout (each attempt gets a fresh modal.timeout)
PREPARE_CPUS = 8.0  # cores reserved for the CPU-only prepare function
PREPARE_TIMEOUT = 4 * 3600
COMMIT_EVERY = 600  # seconds between explicit volume commits while training (Modal also commits in the background)
CALL_MARKER = ".modal_call"  # run folder file naming the Modal function call that started the run


# -- configs ---------------------------------------------------------------------------------------------------------

def config_to_yaml(cfg: Config) -> str:
    """A resolved config as YAML text: what the local entrypoint sends to the remote functions."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_yaml(text: str) -> Config:
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ConfigError("config: expected a mapping of sections (model, data, training)")
    return config_from_dict(values)


def app_config(path: str | None = None, in_container: bool = False) -> Config:
    """The config ``modal_app.py`` reads at import time (``$SLM_CONFIG``, default configs/gpt_124m.yaml).

    Its ``modal`` section fixes the app name and the functions' default GPU, timeout, volume and secret. Inside a
    Modal container the file is usually absent (only the ``slm`` package is shipped) and the decorator arguments
    are not used there, so defaults stand in for it.
    """
    path = path or os.environ.get("SLM_CONFIG") or DEFAULT_CONFIG
    try:
        return load_config(path)
    except ConfigError:
        if in_container:
            return Config()
        raise


def _folder_name(path: str, fallback: str) -> str:
    name = PurePosixPath(str(path).replace("\\", "/").rstrip("/")).name
    return name if name not in ("", ".", "..") else fallback


def volume_config(cfg: Config, volume_root: str | os.PathLike = VOLUME_MOUNT, run_name: str | None = None) -> Config:
    """A copy of ``cfg`` whose prepared data and run folder live on the volume.

    ``data.dir: data/tinystories-gpt2`` -> ``<root>/data/tinystories-gpt2`` and ``training.out_dir: runs/gpt_124m``
    -> ``<root>/runs/gpt_124m`` (``run_name`` overrides the run folder's name). Paths already under the volume are
    kept.
    """
    root = str(volume_root).rstrip("/") or "/"
    out = copy.deepcopy(cfg)

    def on_volume(path: str) -> bool:
        return str(path) == root or str(path).startswith(root + "/")

    if not on_volume(out.data.dir):
        out.data.dir = f"{root}/data/{_folder_name(out.data.dir, 'default')}"
    if run_name is not None:
        out.training.out_dir = f"{root}/runs/{_folder_name(run_name, 'default')}"
    elif not on_volume(out.training.out_dir):
        out.training.out_dir = f"{root}/runs/{_folder_name(out.training.out_dir, 'default')}"
    return out


def check_remote_inputs(cfg: Config, volume_root: str = VOLUME_MOUNT) -> None:
    """Fail early (on the laptop) when the config names local files that a Modal container cannot see."""
    from slm.data.sources import SAMPLE
    from slm.data.tokenizer import BUNDLED

    def local(path: str) -> bool:
        return not path.startswith(volume_root + "/") and (
            Path(path).expanduser().exists() or path.startswith((".", "/", "~")))

    source, tok = cfg.data.source, cfg.data.tokenizer
    if source != SAMPLE and local(source):
        name = _folder_name(source, "corpus")
        raise ConfigError(f"data.source: {source!r} is a local path, which the Modal container cannot read; upload it "
                          f"with `modal volume put {cfg.modal.volume} {source} sources/{name}` and set "
                          f"data.source={volume_root}/sources/{name}")
    if tok != "gpt2" and tok not in BUNDLED and local(tok):
        name = _folder_name(tok, "tokenizer")
        raise ConfigError(f"data.tokenizer: {tok!r} is a local folder, which the Modal container cannot read; upload "
                          f"it with `modal volume put {cfg.modal.volume} {tok} tokenizers/{name}` and set "
                          f"data.tokenizer={volume_root}/tokenizers/{name}")


# -- Modal function settings ----------------------------------------------------------------------------------------

def gpu_spec(cfg: Config) -> str:
    """Modal's GPU string: ``"H100"`` for one GPU, ``"H100:2"`` for two (``modal.gpu`` may carry the count too)."""
    gpu, count = cfg.modal.gpu.strip(), cfg.modal.gpu_count
    if ":" in gpu:
        gpu, _, written = gpu.partition(":")
        try:
            written_count = int(written)
        except ValueError:
            raise ConfigError(f"modal.gpu: {cfg.modal.gpu!r}: expected a GPU type such as H100, or H100:2") from None
        if count not in (1, written_count):
            raise ConfigError(f"modal.gpu: {cfg.modal.gpu!r} says {written_count} GPUs but modal.gpu_count is {count}; "
                              "give the count in one place")
        count = written_count
    if not gpu:
        raise ConfigError("modal.gpu: expected a GPU type such as T4, L4, A10G, A100, A100-80GB, H100, H200")
    return gpu if count == 1 else f"{gpu}:{count}"


def gpu_count(cfg: Config) -> int:
    spec = gpu_spec(cfg)
    return int(spec.partition(":")[2] or 1)


def function_settings(cfg: Config) -> dict:
    """The plain-data part of the training function's settings (what a change of config can change)."""
    return {"gpu": gpu_spec(cfg), "timeout": cfg.modal.timeout, "volume": cfg.modal.volume,
            "secret": cfg.modal.wandb_secret}


def modal_function_options(cfg: Config, volume_mount: str = VOLUME_MOUNT) -> dict:
    """kwargs for ``@app.function(...)`` / ``Function.with_options(...)`` that run ``cfg``'s training.

    GPU type and count, timeout, the persistent volume at ``/vol`` (created on first use), the W&B secret when
    ``modal.wandb_secret`` is set, and retries: after a failure or a timeout Modal starts the call again and it
    resumes from ``last.pt``. (Modal also restarts a preempted call on the same input by itself.)
    """
    import modal

    return {
        "gpu": gpu_spec(cfg),
        "timeout": cfg.modal.timeout,
        "volumes": {volume_mount: modal.Volume.from_name(cfg.modal.volume, create_if_missing=True)},
        "secrets": [modal.Secret.from_name(cfg.modal.wandb_secret)] if cfg.modal.wandb_secret else [],
        "retries": modal.Retries(max_retries=TRAIN_RETRIES, initial_delay=10.0, backoff_coefficient=1.0),
    }


# -- remote work ----------------------------------------------------------------------------------------------------

def prepare_on_volume(cfg: Config, volume_root: str | os.PathLike = VOLUME_MOUNT, num_workers: int | None = None,
                      progress: bool = True) -> dict:
    """Prepare the config's data into ``<root>/data/<name>`` unless it is there already; returns its meta.json.

    An interrupted prepare (preemption) resumes where it stopped when this runs again.
    """
    from slm.data.loader import read_meta
    from slm.data.shards import prepare

    cfg = volume_config(cfg, volume_root)
    data_dir = Path(cfg.data.dir)
    if (data_dir / "meta.json").exists():
        if progress:
            print(f"{data_dir} is already prepared")
        return read_meta(data_dir)
    d = cfg.data
    return prepare(d.source, data_dir, d.tokenizer, d.val_fraction, d.text_field,
                   d.num_workers or num_workers or None, progress=progress)


def should_resume(run_dir: str | os.PathLike, resume: bool, call_id: str | None = None) -> bool:
    """Resume when ``last.pt`` is in the run folder and either ``resume`` is set or this very function call
    started the run (Modal restarted it after a preemption, a failure or a timeout)."""
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").exists():
        return False
    if resume:
        return True
    marker = run_dir / CALL_MARKER
    return bool(call_id) and marker.exists() and marker.read_text().strip() == call_id


def train_command(cfg: Config, config_path: str | os.PathLike, resume: bool = False) -> list[str]:
    """``slm train`` on every GPU of the container: one process, or torchrun with one process per GPU."""
    n = gpu_count(cfg)
    tail = ["-m", "slm", "train", "--config", str(config_path)] + (["--resume"] if resume else [])
    if n > 1:
        return ["torchrun", "--standalone", "--nproc_per_node", str(n), *tail]
    return [sys.executable, *tail]


def _periodic(action: Callable[[], None], every: float) -> Callable[[], None]:
    """Run ``action`` every ``every`` seconds in a daemon thread; returns a function that stops it."""
    stop = threading.Event()

    def loop():
        while not stop.wait(every):
            try:
                action()
            except Exception as e:  # a failed commit must not kill training; the next one may succeed
                print(f"volume commit failed: {e}", file=sys.stderr)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def cancel():
        stop.set()
        thread.join(timeout=5)

    return cancel


def train_on_volume(cfg: Config, volume_root: str | os.PathLike = VOLUME_MOUNT, resume: bool = True,
                    call_id: str | None = None, commit: Callable[[], None] | None = None,
                    commit_every: float = COMMIT_EVERY, run: Callable[..., object] = subprocess.run) -> dict:
    """Train ``cfg`` with data and run folder on the volume; what the remote ``train`` function does.

    Resumes from ``<root>/runs/<name>/last.pt`` when ``should_resume`` says so, writes the volume config to a
    temporary file and runs ``train_command`` (``run`` is ``subprocess.run``; tests pass a fake), committing the
    volume every ``commit_every`` seconds and at the end.
    """
    cfg = volume_config(cfg, volume_root)
    run_dir = Path(cfg.training.out_dir)
    resumed = should_resume(run_dir, resume, call_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resumed and call_id:
        (run_dir / CALL_MARKER).write_text(call_id + "\n")
    config_file = Path(tempfile.mkdtemp(prefix="slm-modal-")) / "config.yaml"
    config_file.write_text(config_to_yaml(cfg))
    command = train_command(cfg, config_file, resumed)
    print(("resuming " if resumed else "starting ") + f"{run_dir}: {' '.join(command)}", flush=True)

    import slm

    package_root = str(Path(slm.__file__).resolve().parents[1])  # so `-m slm` imports this copy of slm
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    cancel = _periodic(commit, commit_every) if commit is not None else (lambda: None)
    try:
        run(command, check=True, env=env, cwd=package_root)
    finally:
        cancel()
        if commit is not None:
            commit()
    return {"out_dir": str(run_dir), "resumed": resumed, "command": command,
            "checkpoints": sorted(p.name for p in run_dir.glob("*.pt"))}
