"""``slm prepare``: text -> token ids on disk.

    source documents --(worker processes: tokenizer)--> uint16/uint32 ids, <|endoftext|> after each document
                     --> train.bin, val.bin (flat arrays, read later with np.memmap) + meta.json

Documents stream through a bounded window of worker tasks, so memory stays flat whatever the corpus size.
Files are written under a temporary name and renamed when complete: a killed run leaves no half file
behind that looks finished.
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
DOCS_PER_TASK = 256
VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic, well-spread choice of validation documents (a multiplicative hash of the index)."""
    return ((index * 2654435761) & 0xFFFFFFFF) < val_fraction * 2**32


def _encode_task(tokenizer_name: str, docs: list[str], to_val: list[bool]):
    """Worker: documents -> (train ids, val ids, utf-8 bytes read)."""
    tok = get_tokenizer(tokenizer_name)
    dtype = token_dtype(tok.vocab_size)
    out: dict[bool, list[int]] = {False: [], True: []}
    for ids, val in zip(tok.encode_batch(docs), to_val):
        out[val].extend(ids)
        out[val].append(tok.eot_id)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return np.array(out[False], dtype=dtype), np.array(out[True], dtype=dtype), n_bytes


def _tasks(streams: list[tuple[Iterator[str], bool | None]], val_fraction: float):
    """Group documents into tasks. Each stream is (documents, goes_to_val); None means split by val_fraction."""
    index = 0
    for docs, to_val in streams:
        batch, flags = [], []
        for doc in docs:
            batch.append(doc)
            flags.append(is_val_document(index, val_fraction) if to_val is None else to_val)
            index += 1
            if len(batch) == DOCS_PER_TASK:
                yield batch, flags
                batch, flags = [], []
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
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def prepare(
    source: str = "sample",
    out_dir: str | os.PathLike = "data/sample",
    tokenizer: str = "gpt2",
    val_fraction: float = 0.05,
    text_field: str = "text",
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize ``source`` into ``out_dir``/{train.bin,val.bin,meta.json}; returns the metadata."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer(tokenizer)
    num_workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 16)

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

    dtype = token_dtype(tok.vocab_size)
    counts = {"train": 0, "val": 0}
    tmp = {split: out / f"{split}.bin.tmp" for split in counts}
    started, n_bytes = time.time(), 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"prepare {source}", disable=not progress)
    with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
        for train_ids, val_ids, task_bytes in _run_tasks(tok.name, _tasks(streams, val_fraction), num_workers):
            train_ids.tofile(f_train)
            val_ids.tofile(f_val)
            counts["train"] += len(train_ids)
            counts["val"] += len(val_ids)
            n_bytes += task_bytes
            bar.update(task_bytes)
            bar.set_postfix(tokens=f"{counts['train'] + counts['val']:,}")
        for f in (f_train, f_val):
            f.flush()
            os.fsync(f.fileno())
    bar.close()
    if counts["train"] == 0:
        raise DataError(f"{source}: no text found (0 training tokens)")
    if counts["val"] == 0:
        raise DataError(f"{source}: no validation documents; raise val_fraction (now {val_fraction})")
    for split in counts:
        os.replace(tmp[split], out / f"{split}.bin")
    elapsed = time.time() - started
    meta = {
        "format": 1,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "source": source,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "text_bytes": n_bytes,
        "seconds": round(elapsed, 2),
    }
    _write_json_atomic(out / META, meta)
    if progress:
        print(
            f"prepared {counts['train']:,} train + {counts['val']:,} val tokens in {out} "
            f"({n_bytes / 1e6 / max(elapsed, 1e-9):.1f} MB/s, {(counts['train'] + counts['val']) / max(elapsed, 1e-9):,.0f} tokens/s)"
        )
    return meta
