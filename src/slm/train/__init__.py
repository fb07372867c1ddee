"""Training: the loop (``trainer.py``) and ``run_training``, which ``slm train`` calls."""

from slm.train.trainer import Trainer, lr_at, run_training

__all__ = ["Trainer", "lr_at", "run_training"]
