"""Configuration as data: typed dataclasses loaded from YAML.

    cfg = load_config("configs/tiny.yaml", overrides=["training.lr=3e-4"])

Numbers written as strings (``1e-4``, which YAML reads as text) are accepted. An unknown key, a wrong
type or an impossible value raises ``ConfigError`` with one line naming the key and what is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from slm.errors import ConfigError
from slm.model import GPTConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION = ("auto", "sdpa", "flash", "cudnn", "efficient", "math")
FP8 = ("none", "head", "mlp", "all")


@dataclass
class DataConfig:
    source: str = "sample"  # "sample", a file, a folder, or a Hugging Face dataset id
    dir: str = "data/sample"  # where train.bin / val.bin / meta.json are (prepared on first use)
    tokenizer: str = "gpt2"
    val_fraction: float = 0.05  # share of documents held out when the source has no validation split
    text_field: str = "text"  # field holding the text in .jsonl/.json files and Hugging Face datasets
    num_workers: int = 0  # tokenizer processes for prepare; 0 = one per CPU core

    _aliases = {"dataset": "source", "path": "dir"}

    def __post_init__(self):
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", "a number in [0, 1)", self.val_fraction)
        _check(self.num_workers >= 0, "num_workers", "0 (auto) or a positive integer", self.num_workers)


@dataclass
class TrainingConfig:
    batch_size: int = 16  # micro-batch per optimizer step and device
    gradient_accumulation_steps: int = 1  # effective batch = batch_size * gradient_accumulation_steps
    auto_batch_size: bool = False  # on a GPU: the largest micro-batch that fits, same effective batch
    max_steps: int = 1000
    lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss/gradient (they are skipped)
    dtype: str = "auto"  # auto = bfloat16 on GPUs that have it, else float16 on GPU, float32 on CPU
    device: str = "auto"  # auto = cuda if available, else mps, else cpu
    compile: bool = True  # torch.compile the model (skipped with a notice where it is unavailable)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    attention: str = "auto"  # auto (slm's kernel to 128 tokens, else SDPA) | sdpa | flash | cudnn | efficient | math
    loss_chunk: int = 0  # > 0: fused output layer + cross-entropy, this many tokens at a time (no full logits; GPU)
    fp8: str = "none"  # FP8 matmuls on GPUs that have them (H100, L4, ...): none | head | mlp (+ the MLPs) | all
    bf16_residual: bool = False  # with bfloat16: the residual stream between blocks in bf16 too (half its traffic)
    fused_optimizer: bool = True  # fused AdamW kernels on CUDA (one launch for all parameters); false = foreach
    prefetch: int = 2  # batches a background thread prepares ahead (pinned memory, async copy); 0 = inline
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    parallelism: str = "ddp"  # with several processes (torchrun): ddp (replicate) or fsdp (shard, FSDP2)
    eval_every: int = 250  # steps between validation runs (and best.pt updates)
    eval_batches: int = 20  # batches per validation run
    checkpoint_every: int = 500  # steps between last.pt saves
    log_every: int = 10  # steps between metrics lines
    seed: int = 1337
    out_dir: str = "runs/default"  # run directory: checkpoints and metrics.jsonl

    _aliases = {
        "learning_rate": "lr",
        "adam_beta1": "beta1",
        "adam_beta2": "beta2",
        "adam_eps": "eps",
        "micro_batch_size": "batch_size",
    }

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "eval_every", "eval_batches",
                     "checkpoint_every", "log_every", "max_bad_steps"):
            _check(getattr(self, name) > 0, name, "a positive integer", getattr(self, name))
        _check(self.lr > 0, "lr", "a positive number", self.lr)
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"a number between 0 and lr={self.lr}", self.min_lr)
        _check(0 <= self.warmup_steps <= self.max_steps, "warmup_steps", f"0..max_steps={self.max_steps}",
               self.warmup_steps)
        _check(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, name, "a number in [0, 1)", getattr(self, name))
        _check(self.eps > 0, "eps", "a positive number", self.eps)
        _check(self.grad_clip >= 0, "grad_clip", "a number >= 0 (0 disables clipping)", self.grad_clip)
        _check(self.dtype in DTYPES, "dtype", f"one of {', '.join(DTYPES)}", self.dtype)
        _check(self.parallelism in ("ddp", "fsdp"), "parallelism", "ddp or fsdp", self.parallelism)
        _check(self.compile_mode in COMPILE_MODES, "compile_mode", f"one of {', '.join(COMPILE_MODES)}",
               self.compile_mode)
        _check(self.attention in ATTENTION, "attention", f"one of {', '.join(ATTENTION)}", self.attention)
        _check(self.fp8 in FP8, "fp8", f"one of {', '.join(FP8)}", self.fp8)
        _check(self.loss_chunk >= 0, "loss_chunk", "0 (off) or a number of tokens, e.g. 8192", self.loss_chunk)
        _check(self.prefetch >= 0, "prefetch", "0 (off) or a number of batches, e.g. 2", self.prefetch)
        _check(self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda"), "device",
               "auto, cpu, cuda, cuda:N or mps", self.device)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "slm"
    name: str | None = None  # run name; default: the run folder's name
    tags: list[str] = field(default_factory=list)
    mode: str = "online"  # online | offline (no account or network needed) | disabled
    histogram_every: int = 100  # steps between gradient histograms; 0 = never

    def __post_init__(self):
        _check(self.mode in ("online", "offline", "disabled"), "mode", "online, offline or disabled", self.mode)
        _check(self.histogram_every >= 0, "histogram_every", "0 (never) or a positive integer", self.histogram_every)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False  # also write TensorBoard event files to <out_dir>/tensorboard
    plot: bool = True  # write <out_dir>/loss.png (train and val loss vs tokens) at the end of a run
    peak_tflops: float = 0.0  # for MFU: the GPU's bf16 peak in TFLOP/s; 0 = its datasheet figure when known

    def __post_init__(self):
        _check(self.peak_tflops >= 0, "peak_tflops", "a number >= 0 (0 = the GPU's datasheet figure)",
               self.peak_tflops)


@dataclass
class ModalConfig:
    """How `modal run modal_app.py --config X` runs this config on Modal's cloud GPUs."""

    gpu: str = "A100"  # T4, L4, A10G, A100, A100-80GB, H100, H200, ...
    gpu_count: int = 1
    timeout: int = 43200  # seconds before Modal stops the function (max 24 h)
    volume: str = "slm-data"  # persistent modal.Volume for prepared data, checkpoints and runs
    app_name: str = "slm"
    wandb_secret: str | None = None  # name of a modal.Secret holding WANDB_API_KEY, e.g. "wandb"

    def __post_init__(self):
        _check(self.gpu_count >= 1, "gpu_count", "a positive integer", self.gpu_count)
        _check(0 < self.timeout <= 86400, "timeout", "1..86400 seconds", self.timeout)


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    modal: ModalConfig = field(default_factory=ModalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _check(ok: bool, key: str, expected: str, got) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _coerce(value, tp, key: str):
    """Convert a YAML value to the field's type, or fail naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in a dataclass


def _build(cls, values, prefix: str):
    """Build dataclass ``cls`` from a mapping, checking every key and value."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    aliases = getattr(cls, "_aliases", {})
    kwargs = {}
    for raw_key, value in values.items():
        name = aliases.get(raw_key, raw_key)
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if name not in names:
            close = difflib.get_close_matches(str(raw_key), names + list(aliases), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{key}: unknown key{hint}")
        if cls is GPTConfig and name == "vocab_size" and value == "auto":
            value = 0  # taken from the data's tokenizer at training time
        if cls is TrainingConfig and name == "fp8" and value is False:
            value = "none"  # YAML reads "fp8: off" as false
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


def config_from_dict(values: dict) -> Config:
    return _build(Config, values, "")


def builtin_configs() -> dict[str, Path]:
    """The configs shipped with slm, by name (``tiny``, ``seed30m``, ``gpt_124m``, ...)."""
    folder = resources.files("slm") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith((".yaml", ".yml"))}


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """Apply ``section.key=value`` overrides to a config mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. training.lr=3e-4")
        key, raw = item.split("=", 1)
        _apply_override(values, key.strip(), raw)


def _apply_override(values: dict, dotted: str, raw: str) -> None:
    """Apply one override; the value is parsed as YAML (so 3e-4, true, [a, b] work)."""
    node = values
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (a path, or the name of a built-in config) and apply ``key=value`` overrides."""
    values: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            builtin = builtin_configs()
            if str(path) not in builtin:
                raise ConfigError(
                    f"config {str(path)!r} not found; give a YAML file or one of: {', '.join(sorted(builtin))}"
                )
            file = builtin[str(path)]
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: expected a mapping of sections (model, data, training)")
    apply_overrides(values, overrides)
    return config_from_dict(values)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
