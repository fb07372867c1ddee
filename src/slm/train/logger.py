"""Where training metrics go: metrics.jsonl always; W&B, TensorBoard and a loss-curve PNG when configured."""

from __future__ import annotations

import json
import netrc
import os
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.nn as nn

from slm.config import Config


def _notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _has_wandb_key() -> bool:
    """Whether W&B could log in without asking: an API key in the environment or in ~/.netrc (no network)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc").authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


class RunLogger:
    """``log(record)`` with a ``step`` key and metric keys such as ``train/loss``; ``finish()`` at the end.

    ``enabled=False`` (non-zero distributed ranks) makes every method a no-op that writes nothing.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, enabled: bool = True):
        self.cfg, self.run_dir, self.enabled = cfg, Path(run_dir), enabled
        self.wandb = self.tensorboard = None  # the W&B run and the SummaryWriter, when in use
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            wb = cfg.logging.wandb
            if wb.enabled and wb.mode != "disabled":
                self.wandb = self._start_wandb()
            if cfg.logging.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    _notice("TensorBoard logging is off: `pip install tensorboard` (or slm[tensorboard]) to use it")
                else:
                    self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        writers = self.wandb is not None or self.tensorboard is not None
        self.histogram_every = cfg.logging.wandb.histogram_every if writers else 0  # 0: log_gradients does nothing

    def _start_wandb(self):
        try:
            import wandb
        except ImportError:
            _notice("W&B logging is off: `pip install wandb` (or slm[wandb]) to use it")
            return None
        wb = self.cfg.logging.wandb
        mode = wb.mode
        if mode == "online" and not _has_wandb_key():
            _notice("no W&B API key (WANDB_API_KEY or `wandb login`): logging offline to "
                    f"{self.run_dir / 'wandb'}; upload later with `wandb sync`")
            mode = "offline"
        id_file = self.run_dir / "wandb_id.txt"  # the same W&B run when this run is resumed
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        try:
            return wandb.init(project=wb.project, name=wb.name or self.run_dir.resolve().name, tags=wb.tags,
                              mode=mode, config=self.cfg.to_dict(), dir=str(self.run_dir),
                              id=id_file.read_text().strip(), resume="allow")
        except Exception as e:  # e.g. W&B unreachable: metrics.jsonl still has everything
            reason = str(e).partition("\n")[0]
            _notice(f"W&B logging is off: wandb.init failed ({type(e).__name__}: {reason})")
            return None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        metrics = {k: v for k, v in record.items() if k != "step"}
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
            if "model/parameters" in metrics:
                self.wandb.summary["model/parameters"] = metrics["model/parameters"]
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def log_gradients(self, model: nn.Module, step: int) -> None:
        """Gradient histograms every ``histogram_every`` steps (called after backward, before the step)."""
        if not self.histogram_every or step % self.histogram_every:
            return
        # Under FSDP each rank holds a shard: rank 0 shows its own shard (gathering would need every rank).
        grads = {name: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).detach().float().cpu()
                 for name, p in model.named_parameters() if p.grad is not None}
        if not grads:
            return
        total_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
        grads = {name: g[g.isfinite()] for name, g in grads.items()}  # a skipped step may hold inf/NaN
        grads = {name: g for name, g in grads.items() if g.numel()}
        if self.wandb is not None:
            import wandb

            histograms = {f"gradients/{name}": wandb.Histogram(g.numpy()) for name, g in grads.items()}
            self.wandb.log({**histograms, "gradients/total_norm": total_norm}, step=step)
        if self.tensorboard is not None:
            for name, g in grads.items():
                self.tensorboard.add_histogram(f"gradients/{name}", g, step)
            self.tensorboard.add_scalar("gradients/total_norm", total_norm, step)

    def finish(self) -> None:
        """Close W&B and TensorBoard and draw loss.png (also called when training fails)."""
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if sys.exc_info()[0] else 0)  # inside an error: mark the run failed
            self.wandb = None
        if self.cfg.logging.plot:
            try:
                plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            except Exception as e:  # a plot is never worth failing (or hiding the error of) a run
                _notice(f"could not draw {self.run_dir / 'loss.png'}: {e}")


def loss_curves(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"train/loss": [(tokens_seen, loss), ...], "val/loss": [...]}`` from metrics.jsonl, in step order.

    A resumed run repeats the steps after its last checkpoint: the last value of a step wins.
    """
    curves: dict[str, dict[int, tuple[int, float]]] = {"train/loss": {}, "val/loss": {}}
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash
            continue
        for key, points in curves.items():
            if key in record and "train/tokens_seen" in record:
                points[record["step"]] = (record["train/tokens_seen"], record[key])
    return {key: [points[step] for step in sorted(points)] for key, points in curves.items()}


def plot_losses(metrics: Path, out: Path) -> bool:
    """Train and val loss vs tokens seen into a PNG; False (and no file) with fewer than 2 points."""
    curves = loss_curves(metrics)
    if sum(len(points) for points in curves.values()) < 2:
        return False

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # render with Agg: no display, no global pyplot state
    ax = fig.add_subplot()
    for key, label, style in (("train/loss", "train", "-"), ("val/loss", "val", "o-")):
        if curves[key]:
            ax.plot(*zip(*curves[key]), style, label=label, markersize=4)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.set_title(f"{out.parent.resolve().name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return True
