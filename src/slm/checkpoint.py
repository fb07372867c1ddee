"""Checkpoints: written atomically, read without unpickling arbitrary code.

A checkpoint is a plain dict of tensors and builtins: ``model`` (state dict), ``config`` (the full run
config as a dict), ``tokenizer``, ``step``, ``tokens_seen``, ``best_val_loss`` and, in ``last.pt``, the
optimizer, grad-scaler and RNG states needed to resume exactly.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from slm.errors import CheckpointError

FORMAT = "slm-checkpoint/1"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems do not allow fsync on folders
        pass


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with ``weights_only=True``: a checkpoint that tries to run code is refused."""
    path = Path(path)
    if not path.is_file():
        hint = f" (files there: {', '.join(sorted(p.name for p in path.parent.glob('*.pt')))})" if path.parent.is_dir() else ""
        raise CheckpointError(f"checkpoint {path} not found{hint}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain data, which could run code "
            f"({str(e).splitlines()[0][:160]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: {str(e)[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an slm checkpoint (no '{FORMAT}' marker)")
    return state
