"""PyTorch ``Dataset`` / ``DataLoader`` views of text, for code that wants the familiar torch API.

``slm train`` itself samples random windows with ``BatchLoader``; these classes are for notebooks and
custom loops (and keep the reference project's examples working):

    loader = create_dataloader(dataset_name="roneneldan/TinyStories", split="train", batch_size=16, context_length=1024)
    dataset = TextDataset(["Your custom text here...", "More text..."], get_tokenizer(), context_length=128)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slm.data.loader import open_tokens
from slm.data.shards import prepare
from slm.data.tokenizer import Tokenizer, get_tokenizer
from slm.errors import DataError


class _Windows(Dataset):
    """Consecutive (x, y) windows of ``context_length`` tokens over one or more 1-D token arrays (shards)."""

    def __init__(self, shards: list, context_length: int, stride: int | None = None):
        self.shards, self.context_length = shards, context_length
        self.stride = stride or context_length
        counts = [max(0, (len(s) - context_length - 1) // self.stride + 1) for s in shards]
        if sum(counts) == 0:
            raise DataError(f"only {max(len(s) for s in shards)} tokens in a shard: need at least "
                            f"context_length + 1 = {context_length + 1}")
        self._first = np.concatenate([[0], np.cumsum(counts)])  # window index where each shard starts

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self._first, i, side="right") - 1)
        start = (i - int(self._first[shard])) * self.stride
        chunk = self.shards[shard][start : start + self.context_length + 1]
        window = torch.from_numpy(np.asarray(chunk, dtype=np.int64))
        return window[:-1], window[1:]


class TextDataset(_Windows):
    """Windows over a list of texts, tokenized in memory; documents are joined with <|endoftext|>."""

    def __init__(self, texts: list[str], tokenizer: Tokenizer | None = None, context_length: int = 1024,
                 stride: int | None = None):
        tokenizer = tokenizer or get_tokenizer()
        ids: list[int] = []
        for doc in tokenizer.encode_batch(list(texts)):
            ids.extend(doc)
            ids.append(tokenizer.eot_id)
        super().__init__([np.array(ids, dtype=np.int64)], context_length, stride)


class TokenFileDataset(_Windows):
    """Windows over a prepared ``train.bin`` / ``val.bin`` (memory-mapped, nothing loaded up front)."""

    def __init__(self, data_dir: str | Path, split: str = "train", context_length: int = 1024,
                 stride: int | None = None):
        super().__init__(open_tokens(data_dir, split), context_length, stride)


def create_dataloader(dataset_name: str | None = None, split: str = "train", batch_size: int = 16,
                      context_length: int = 1024, num_workers: int = 0, texts: list[str] | None = None,
                      dataset_path: str | None = None, data_dir: str | None = None, tokenizer: str = "gpt2",
                      shuffle: bool | None = None) -> DataLoader:
    """A torch DataLoader from a Hugging Face dataset id, a local file/folder, or a list of texts.

    Hub and file sources are prepared once into ``data_dir`` (default ``data/<name>``) and memory-mapped.
    ``split`` is ``train`` or ``validation``/``val``.
    """
    if texts is not None:
        dataset: Dataset = TextDataset(texts, get_tokenizer(tokenizer), context_length)
    else:
        source = dataset_name or dataset_path
        if source is None:
            raise DataError("create_dataloader needs dataset_name, dataset_path or texts")
        data_dir = data_dir or str(Path("data") / re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("_"))
        if not (Path(data_dir) / "meta.json").exists():
            prepare(source, data_dir, tokenizer)
        part = "val" if split in ("val", "validation", "valid", "test") else "train"
        dataset = TokenFileDataset(data_dir, part, context_length)
    if shuffle is None:
        shuffle = split == "train"
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=True)
