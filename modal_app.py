"""Train slm models on Modal's cloud GPUs.

    modal run modal_app.py --config configs/gpt_124m.yaml                  # prepare the data, then train
    modal run modal_app.py --config configs/gpt_124m.yaml --prepare-only   # only tokenize (CPU)
    modal run --detach modal_app.py --config configs/gpt_350m.yaml         # keeps running when the laptop sleeps

Prepared data lives on a persistent modal.Volume (``modal.volume`` in the config) at ``/vol/data/<name>`` and runs at
``/vol/runs/<name>``. A run whose ``last.pt`` is on the volume is continued, so Modal's restart after a preemption,
a retry after a failure or timeout, and running the same command again all resume it (``--no-resume`` starts fresh
and is refused over an existing run).

Why GPU settings come from two places: Modal reads ``@app.function(gpu=..., timeout=...)`` when this module is
imported, before the local entrypoint parses ``--config``. The decorators therefore use ``$SLM_CONFIG`` (default
configs/gpt_124m.yaml). When ``--config`` asks for other GPU, timeout, volume or secret settings, ``main`` calls the
function through ``Function.with_options(...)`` with that config's settings, so ``--config`` alone is enough;
``SLM_CONFIG=X modal run modal_app.py`` also works (and names the app after X's ``modal.app_name``).

The function bodies are thin wrappers around plain functions in ``slm.cloud`` (tested without Modal).
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

from slm import cloud
from slm.config import load_config

ROOT = Path(__file__).resolve().parent
IN_CONTAINER = not modal.is_local()


def _config_path(path: str) -> str:
    """A config path as given, else relative to this file (so `modal run path/to/modal_app.py` works too)."""
    return path if Path(path).exists() or not (ROOT / path).exists() else str(ROOT / path)


CONFIG_PATH = _config_path(os.environ.get("SLM_CONFIG") or cloud.DEFAULT_CONFIG)
CFG = cloud.app_config(CONFIG_PATH, in_container=IN_CONTAINER)  # read now: the decorators below need it

app = modal.App(CFG.modal.app_name)

image = (
    modal.Image.debian_slim(python_version="3.11")
    # the project's dependencies (and the W&B / TensorBoard extras the logging section can use), read at build time
    .pip_install_from_pyproject(str(ROOT / "pyproject.toml"), optional_dependencies=["wandb", "tensorboard"])
    .add_local_python_source("slm", ignore=lambda p: "__pycache__" in Path(p).parts or Path(p).suffix == ".pyc")
)
TRAIN_OPTIONS = cloud.modal_function_options(CFG)  # gpu "H100" / "H100:2", timeout, volume at /vol, secrets, retries
volume = TRAIN_OPTIONS["volumes"][cloud.VOLUME_MOUNT]


def _volume_root() -> str:
    """/vol in a container; running a body locally (``.local()``) needs $SLM_VOLUME_ROOT, a local folder."""
    root = os.environ.get("SLM_VOLUME_ROOT")
    if root:
        return root
    if modal.is_local():
        raise RuntimeError("set SLM_VOLUME_ROOT to a local folder to run this function locally")
    return cloud.VOLUME_MOUNT


def _committer(cfg):
    """Commits the config's volume (so other containers see the files); nothing to do when running locally."""
    if modal.is_local():
        return None
    return modal.Volume.from_name(cfg.modal.volume).commit


@app.function(image=image, cpu=cloud.PREPARE_CPUS, timeout=cloud.PREPARE_TIMEOUT, retries=2,
              volumes={cloud.VOLUME_MOUNT: volume})
def prepare_data(config_yaml: str) -> dict:
    """Tokenize the config's data into /vol/data/<name> (skipped when prepared; an interrupted run resumes)."""
    cfg = cloud.config_from_yaml(config_yaml)
    commit = _committer(cfg)
    try:
        return cloud.prepare_on_volume(cfg, _volume_root(), num_workers=int(cloud.PREPARE_CPUS))
    finally:
        if commit is not None:
            commit()


@app.function(image=image, **TRAIN_OPTIONS)
def train(config_yaml: str, resume: bool = True) -> dict:
    """`slm train` (torchrun over all GPUs when modal.gpu_count > 1) with data and run folder on the volume."""
    cfg = cloud.config_from_yaml(config_yaml)
    return cloud.train_on_volume(cfg, _volume_root(), resume, modal.current_function_call_id(), _committer(cfg))


@app.local_entrypoint()
def main(config: str = CONFIG_PATH, resume: bool = True, prepare_only: bool = False):
    cfg = load_config(_config_path(config))
    cloud.check_remote_inputs(cfg)
    text = cloud.config_to_yaml(cfg)
    prepare_fn, train_fn = prepare_data, train
    wanted, baked = cloud.function_settings(cfg), cloud.function_settings(CFG)
    if wanted != baked:
        if not hasattr(train, "with_options"):  # modal < 1.5
            raise SystemExit(f"error: {config} needs {wanted} but the functions were defined with {baked}, and this "
                             f"modal has no Function.with_options; run SLM_CONFIG={config} modal run modal_app.py "
                             "or pip install -U 'modal>=1.5'")
        options = cloud.modal_function_options(cfg)
        prepare_fn = prepare_data.with_options(volumes=options["volumes"])
        train_fn = train.with_options(**options)
        changed = ", ".join(f"{k}={wanted[k]}" for k in wanted if wanted[k] != baked[k])
        print(f"{config}: using {changed} (the decorators were set from {CONFIG_PATH})")
    if cfg.modal.app_name != CFG.modal.app_name:
        print(f"note: the app is named {CFG.modal.app_name!r} after {CONFIG_PATH}; run with SLM_CONFIG={config} "
              f"to name it {cfg.modal.app_name!r}")
    on_volume = cloud.volume_config(cfg)
    meta = prepare_fn.remote(text)
    print(f"data: {on_volume.data.dir} on volume {cfg.modal.volume!r} ({meta['train_tokens']:,} train + "
          f"{meta['val_tokens']:,} val tokens)")
    if prepare_only:
        return
    call = train_fn.spawn(text, resume)
    print(f"training on {cloud.gpu_spec(cfg)}: function call {call.object_id}, run folder {on_volume.training.out_dir} "
          f"(with --detach it goes on if this terminal closes)")
    result = call.get()
    print(f"done: {result['out_dir']} holds {', '.join(result['checkpoints']) or 'no checkpoints'}; download with "
          f"`modal volume get {cfg.modal.volume} {result['out_dir'].removeprefix(cloud.VOLUME_MOUNT + '/')}`")
