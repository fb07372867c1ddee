"""Batches for training: random windows of a memory-mapped token file.

The batch for (step, micro_step) is a pure function of the seed, so a resumed run reads exactly the
batches the uninterrupted run would have read, with no sampler state to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slm.data.prepare import META
from slm.errors import DataError

SPLIT_KEYS = {"train": 0, "val": 1}


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META
    if not path.is_file():
        raise DataError(f"{path} not found: run `slm prepare --out {data_dir}` first (or set data.source)")
    try:
        meta = json.loads(path.read_text())
        meta["vocab_size"], meta["dtype"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is corrupt ({e}); delete {data_dir} and run `slm prepare` again") from None
    return meta


def open_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The token ids of one split as a read-only memmap, after checking the file against meta.json."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} not found: run `slm prepare --out {data_dir}` again")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path} is truncated ({size} bytes is not a multiple of {dtype.itemsize}); prepare it again")
    expected = meta.get(f"{split}_tokens")
    if expected is not None and size // dtype.itemsize != expected:
        raise DataError(
            f"{path} holds {size // dtype.itemsize:,} tokens but meta.json says {expected:,}; prepare it again"
        )
    if size == 0:
        raise DataError(f"{path} is empty; prepare it again with more text")
    return np.memmap(path, dtype=dtype, mode="r")


class BatchLoader:
    """``get_batch(step, micro_step)`` -> (x, y), each (batch_size, context_length) int64 on ``device``."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        context_length: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
    ):
        self.tokens = open_tokens(data_dir, split)
        if len(self.tokens) <= context_length + 1:
            raise DataError(
                f"{data_dir}/{split}.bin has {len(self.tokens)} tokens, fewer than one window of "
                f"context_length={context_length} + 1; use more text or a shorter context"
            )
        self.split, self.batch_size, self.context_length = split, batch_size, context_length
        self.device = torch.device(device)
        self.seed, self.rank = seed, rank
        self._offsets = np.arange(context_length + 1)

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, SPLIT_KEYS.get(self.split, 2), step, micro_step, self.rank])
        starts = rng.integers(0, len(self.tokens) - self.context_length - 1, size=self.batch_size)
        window = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        else:
            window = window.to(self.device)
        return window[:, :-1], window[:, 1:]
