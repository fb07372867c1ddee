"""Batches for training: random windows of a memory-mapped token file.

The batch for (step, micro_step) is a pure function of the seed, so a resumed run reads exactly the
batches the uninterrupted run would have read, with no sampler state to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slm.data.shards import META
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


def open_tokens(data_dir: str | Path, split: str) -> list[np.memmap]:
    """The token shards of one split as read-only memmaps, after checking each file against meta.json."""
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    names = meta.get("shards", {}).get(split) or [f"{split}.bin"]  # format 1: a single file per split
    expected = meta.get("shard_tokens", {}).get(split) or [meta.get(f"{split}_tokens")]
    shards = []
    for name, count in zip(names, expected):
        path = Path(data_dir) / name
        if not path.is_file():
            raise DataError(f"{path} not found: run `slm prepare --out {data_dir}` again")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(f"{path} is truncated ({size} bytes is not a multiple of {dtype.itemsize}); "
                            "prepare it again")
        if count is not None and size // dtype.itemsize != count:
            raise DataError(f"{path} holds {size // dtype.itemsize:,} tokens but meta.json says {count:,}; "
                            "prepare it again")
        if size:
            shards.append(np.memmap(path, dtype=dtype, mode="r"))
    if not shards:
        raise DataError(f"{data_dir}: the {split} split is empty; prepare it again with more text")
    return shards


class BatchLoader:
    """``get_batch(step, micro_step)`` -> (x, y), each (batch_size, context_length) int64 on ``device``.

    With ``world_size`` processes, each takes its own ``batch_size`` rows of the same global batch, so
    N processes see exactly the batches one process with an N times larger batch would see.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        context_length: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
        vocab_size: int | None = None,
        world_size: int = 1,
    ):
        self.shards = open_tokens(data_dir, split)
        windows = np.array([max(0, len(s) - context_length - 1) for s in self.shards], dtype=np.int64)
        if windows.sum() == 0:
            raise DataError(
                f"{data_dir}: the {split} split has no shard longer than context_length={context_length} + 1 "
                "tokens; use more text or a shorter context"
            )
        self._first_window = np.concatenate([[0], np.cumsum(windows)])  # window index where each shard starts
        self.split, self.batch_size, self.context_length = split, batch_size, context_length
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size, self.vocab_size = seed, rank, world_size, vocab_size
        self.data_dir = data_dir
        self._offsets = np.arange(context_length + 1)

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, SPLIT_KEYS.get(self.split, 2), step, micro_step])
        # the global batch (all processes) is drawn the same way everywhere; this process takes its rows
        picks = rng.integers(0, self._first_window[-1], size=self.batch_size * self.world_size)
        picks = picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        shard_of = np.searchsorted(self._first_window, picks, side="right") - 1
        rows = [self.shards[s][p - self._first_window[s] + self._offsets] for s, p in zip(shard_of, picks)]
        window = np.stack(rows).astype(np.int64)
        if self.vocab_size is not None and window.max() >= self.vocab_size:
            raise DataError(f"{self.data_dir}: the {self.split} data holds token id {window.max()}, but the model's "
                            f"vocab_size is {self.vocab_size}; the data was prepared with another tokenizer")
        window = torch.from_numpy(window)
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        else:
            window = window.to(self.device)
        return window[:, :-1], window[:, 1:]


class Prefetcher:
    """Prepares the next ``depth`` batches of a ``BatchLoader`` in a background thread.

    Batches are a pure function of (step, micro_step), so the ones that come next are known in advance:
    while the GPU runs step N, the thread gathers the rows of the following batches from the memory-mapped
    shards, pins them and starts their copy to the GPU. ``get_batch`` returns exactly what the loader would.
    """

    def __init__(self, loader: BatchLoader, micro_steps: int, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.loader, self.micro_steps, self.depth = loader, micro_steps, depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slm-prefetch")
        self._pending: dict[tuple[int, int], object] = {}

    def __getattr__(self, name):  # batch_size, context_length, split, ... of the loader
        return getattr(self.loader, name)

    def _next(self, step: int, micro: int) -> tuple[int, int]:
        return (step, micro + 1) if micro + 1 < self.micro_steps else (step + 1, 0)

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        key = (step, micro_step)
        future = self._pending.pop(key, None)
        if future is None:  # first call, or a jump (resume): start over from here
            self._cancel()
            future = self._pool.submit(self.loader.get_batch, *key)
        ahead = key
        for _ in range(self.depth):
            ahead = self._next(*ahead)
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self.loader.get_batch, *ahead)
        return future.result()

    def _cancel(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        self._cancel()
        self._pool.shutdown(wait=True)
