"""``slm prepare``: text -> token ids on disk.

    source documents --(worker processes: tokenizer)--> uint16/uint32 ids, <|endoftext|> after each document
                     --> train_000.bin, train_001.bin, ..., val_000.bin, ... (flat arrays, np.memmap later)
                     --> meta.json (tokenizer, dtype, shard list, token counts)

* Memory stays flat whatever the corpus size: documents stream through a bounded window of worker tasks
  and shards are written as they fill.
* A shard is closed at the first document boundary after ``shard_tokens`` tokens, fsynced and renamed into
  place; ``progress.json`` then records how far the source was read. A killed run, started again with the
  same arguments, keeps the finished shards, skips the documents they hold and produces identical output.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slm.data.sources import hub_splits, iter_documents, local_files
from slm.data.tokenizer import get_tokenizer
from slm.errors import DataError

META = "meta.json"
PROGRESS = "progress.json"
SPLITS = ("train", "val")
DOCS_PER_TASK = 256
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic, well-spread choice of validation documents (a multiplicative hash of the index)."""
    return ((index * 2654435761) & 0xFFFFFFFF) < val_fraction * 2**32


def shard_name(split: str, i: int) -> str:
    return f"{split}_{i:03d}.bin"


def _encode_task(tokenizer_name: str, docs: list[str], to_val: list[bool]):
    """Worker: documents -> (train ids, val ids, utf-8 bytes read)."""
    tok = get_tokenizer(tokenizer_name)
    dtype = token_dtype(tok.vocab_size)
    out: dict[bool, list[int]] = {False: [], True: []}
    for ids, val in zip(tok.encode_batch(docs), to_val):
        out[val].extend(ids)
        out[val].append(tok.eot_id)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return np.array(out[False], dtype=dtype), np.array(out[True], dtype=dtype), n_bytes, len(docs)


def _tasks(streams: list[tuple[Iterator[str], bool | None]], val_fraction: float, skip: int):
    """Group documents into tasks, skipping the first ``skip`` (already on disk).

    Each stream is (documents, goes_to_val); None means: choose by val_fraction.
    """
    index = 0
    for docs, to_val in streams:
        batch, flags = [], []
        for doc in docs:
            if index >= skip:
                batch.append(doc)
                flags.append(is_val_document(index, val_fraction) if to_val is None else to_val)
                if len(batch) == DOCS_PER_TASK:
                    yield batch, flags
                    batch, flags = [], []
            index += 1
        if batch:
            yield batch, flags


def _run_tasks(tokenizer_name: str, tasks, num_workers: int):
    """Encode tasks in order with at most 2 x num_workers in flight; in-process when num_workers <= 1."""
    if num_workers <= 1:
        for docs, flags in tasks:
            yield _encode_task(tokenizer_name, docs, flags)
        return
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        pending: deque = deque()
        for docs, flags in tasks:
            pending.append(pool.submit(_encode_task, tokenizer_name, docs, flags))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Appends ids of one split to ``<split>_NNN.bin.tmp``; closes a shard once it holds ``shard_tokens``."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype, state: dict):
        self.out, self.split, self.shard_tokens, self.dtype = out, split, shard_tokens, dtype
        self.shards: list[int] = state.get("shards", [])  # token counts of finished shards
        self.current = state.get("current", 0)  # tokens in the open shard (valid prefix of its tmp file)
        tmp = self._tmp()
        if self.current and (not tmp.exists() or tmp.stat().st_size < self.current * dtype.itemsize):
            raise DataError(f"{tmp} is missing or shorter than progress.json says; delete {out} and prepare again")
        self.file = open(tmp, "r+b" if tmp.exists() else "wb")
        self.file.truncate(self.current * dtype.itemsize)  # drop whatever was written after the last record
        self.file.seek(0, os.SEEK_END)

    def _tmp(self) -> Path:
        return self.out / (shard_name(self.split, len(self.shards)) + ".tmp")

    def write(self, ids: np.ndarray) -> bool:
        """Append ids (whole documents); returns True when this closed a shard."""
        ids.tofile(self.file)
        self.current += len(ids)
        if self.current < self.shard_tokens:
            return False
        self.close_shard()
        return True

    def close_shard(self) -> None:
        self.sync()
        self.file.close()
        os.replace(self._tmp(), self.out / shard_name(self.split, len(self.shards)))
        self.shards.append(self.current)
        self.current = 0
        self.file = open(self._tmp(), "wb")

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def finish(self) -> None:
        if self.current:
            self.close_shard()
        self.file.close()
        self._tmp().unlink(missing_ok=True)

    def state(self) -> dict:
        return {"shards": self.shards, "current": self.current}


def prepare(
    source: str = "sample",
    out_dir: str | os.PathLike = "data/sample",
    tokenizer: str = "gpt2",
    val_fraction: float = 0.05,
    text_field: str = "text",
    num_workers: int | None = None,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Tokenize ``source`` into shards in ``out_dir``; returns the metadata also written to meta.json."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer(tokenizer)
    num_workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 32)
    dtype = token_dtype(tok.vocab_size)
    settings = {"source": source, "tokenizer": tok.name, "val_fraction": val_fraction, "text_field": text_field,
                "shard_tokens": shard_tokens}

    # resume: keep finished shards when the settings are the same
    state: dict = {}
    if (out / PROGRESS).exists():
        state = json.loads((out / PROGRESS).read_text())
        if state.get("settings") != settings:
            raise DataError(f"{out} holds an unfinished prepare with other settings ({state.get('settings')}); "
                            "use another --out folder or delete this one")
    elif (out / META).exists():
        (out / META).unlink()  # preparing again from scratch
    if not state:
        for stale in [*out.glob("*.bin"), *out.glob("*.bin.tmp")]:
            stale.unlink()
    skip = state.get("documents", 0)

    files = local_files(source)
    if files is not None:
        streams = [(iter_documents(source, text_field=text_field), None)]
        compressed = any(f.suffix.lower() in (".gz", ".xz", ".bz2") for f in files)
        total = None if compressed else sum(f.stat().st_size for f in files)
    else:  # Hugging Face: use the dataset's own validation split when it has one
        splits = hub_splits(source)
        if "train" not in splits:
            raise DataError(f"{source}: no 'train' split (splits: {splits})")
        val_split = next((s for s in VAL_SPLIT_NAMES if s in splits), None)
        streams = [(iter_documents(source, "train", text_field), None if val_split is None else False)]
        if val_split is not None:
            streams.append((iter_documents(source, val_split, text_field), True))
        total = None

    writers = {split: _ShardWriter(out, split, shard_tokens, dtype, state.get(split, {})) for split in SPLITS}
    n_docs, n_bytes, n_tokens = skip, state.get("text_bytes", 0), 0
    started = time.time()
    if skip and progress:
        print(f"resuming: {skip:,} documents already in {sum(len(w.shards) for w in writers.values())} shards")
    bar = tqdm(total=total, initial=n_bytes if total else 0, unit="B", unit_scale=True, desc=f"prepare {source}",
               disable=not progress)

    def record() -> None:
        for w in writers.values():
            w.sync()
        _write_json_atomic(out / PROGRESS, {"settings": settings, "documents": n_docs, "text_bytes": n_bytes,
                                            **{split: w.state() for split, w in writers.items()}})

    for train_ids, val_ids, task_bytes, task_docs in _run_tasks(tok.name, _tasks(streams, val_fraction, skip),
                                                                num_workers):
        closed = writers["train"].write(train_ids)
        closed = writers["val"].write(val_ids) or closed
        n_docs += task_docs
        n_bytes += task_bytes
        n_tokens += len(train_ids) + len(val_ids)
        if closed:
            record()
        bar.update(task_bytes)
        bar.set_postfix(tokens=f"{n_tokens:,}")
    bar.close()
    for w in writers.values():
        w.finish()

    counts = {split: sum(w.shards) for split, w in writers.items()}
    if counts["train"] == 0:
        raise DataError(f"{source}: no text found (0 training tokens)")
    if counts["val"] == 0:
        raise DataError(f"{source}: no validation documents; raise val_fraction (now {val_fraction})")
    elapsed = time.time() - started
    meta = {
        "format": 2,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "source": source,
        "documents": n_docs,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "shards": {split: [shard_name(split, i) for i in range(len(w.shards))] for split, w in writers.items()},
        "shard_tokens": {split: w.shards for split, w in writers.items()},
        "text_bytes": n_bytes,
        "seconds": round(elapsed, 2),
    }
    _write_json_atomic(out / META, meta)
    (out / PROGRESS).unlink(missing_ok=True)
    if progress:
        rate_mb = (n_bytes - state.get("text_bytes", 0)) / 1e6 / max(elapsed, 1e-9)
        print(f"prepared {counts['train']:,} train + {counts['val']:,} val tokens in {out} "
              f"({len(meta['shards']['train'])}+{len(meta['shards']['val'])} shards, {rate_mb:.1f} MB/s, "
              f"{n_tokens / max(elapsed, 1e-9):,.0f} tokens/s)")
    return meta
