"""Where text comes from. Every source is turned into a stream of documents (strings), read lazily
so a multi-GB corpus never has to fit in memory.

A source is one of:
  * ``sample``                  - the TinyStories sample bundled with slm (works offline)
  * a path to a file            - ``.txt`` (documents split on ``<|endoftext|>``, else on blank lines),
                                  ``.jsonl`` / ``.json`` (a ``text`` field); ``.gz`` / ``.xz`` / ``.bz2`` allowed
  * a path to a folder          - every supported file in it, recursively, in sorted order
  * a Hugging Face dataset id   - e.g. ``roneneldan/TinyStories``, streamed with ``datasets``
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from slm.data.tokenizer import EOT
from slm.errors import DataError

SAMPLE = "sample"
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def _suffixes(path: Path) -> tuple[str, str]:
    """('.txt', '.xz') for 'a.txt.xz', ('.txt', '') for 'a.txt'."""
    compression = path.suffix.lower() if path.suffix.lower() in _OPENERS else ""
    stem = path.with_suffix("") if compression else path
    return stem.suffix.lower(), compression


def _open_text(path: Path) -> io.TextIOBase:
    _, compression = _suffixes(path)
    opener = _OPENERS.get(compression, open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def is_supported_file(path: Path) -> bool:
    kind, _ = _suffixes(path)
    return kind in TEXT_SUFFIXES + JSON_SUFFIXES


def _text_documents(path: Path) -> Iterator[str]:
    """Split on <|endoftext|> lines if the file has them, else on blank lines; streamed line by line."""
    with _open_text(path) as f:
        head = f.read(1 << 20)
        separator = EOT if EOT in head else None
        f.seek(0)
        doc: list[str] = []
        for line in f:
            if separator is not None:
                if separator in line:
                    before, *rest = line.split(separator)
                    doc.append(before)
                    for part in rest:
                        text = "".join(doc).strip()
                        if text:
                            yield text
                        doc = [part]
                    continue
            elif not line.strip():
                text = "".join(doc).strip()
                if text:
                    yield text
                doc = []
                continue
            doc.append(line)
        text = "".join(doc).strip()
        if text:
            yield text


def _json_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        first = f.read(1)
        f.seek(0)
        if first == "[":  # a JSON array of records
            records = json.load(f)
        else:
            records = (json.loads(line) for line in f if line.strip())
        for n, record in enumerate(records, 1):
            if isinstance(record, str):
                text = record
            elif isinstance(record, dict) and isinstance(record.get(text_field), str):
                text = record[text_field]
            else:
                raise DataError(f"{path}: record {n} has no string field {text_field!r}; set data.text_field")
            if text.strip():
                yield text.strip()


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    kind, _ = _suffixes(path)
    if kind in JSON_SUFFIXES:
        yield from _json_documents(path, text_field)
    else:
        yield from _text_documents(path)


def sample_path() -> Path:
    """The bundled TinyStories sample (5,517 stories, lowercased, CDLA-Sharing-1.0)."""
    return Path(str(resources.files("slm.data") / "assets" / "tinystories_sample.txt.xz"))


def local_files(source: str) -> list[Path] | None:
    """The files a local source names, or None when the source is not a local path."""
    if source == SAMPLE:
        return [sample_path()]
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_supported_file(p))
        if not files:
            raise DataError(f"{path}: folder has no .txt/.jsonl/.json files")
        return files
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES:
        raise DataError(f"{source}: no such file or folder")
    return None  # treat as a Hugging Face dataset id


def iter_documents(source: str, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents of a source. ``split`` only matters for Hugging Face datasets."""
    files = local_files(source)
    if files is not None:
        for path in files:
            yield from _file_documents(path, text_field)
        return
    yield from _hub_documents(source, split, text_field)


def hub_splits(name: str) -> list[str]:
    """Split names of a Hugging Face dataset (needs the network, or the local HF cache)."""
    try:
        from datasets import get_dataset_split_names
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError("the 'datasets' package is needed for Hugging Face sources: pip install datasets") from e
    try:
        return list(get_dataset_split_names(name))
    except Exception as e:
        raise DataError(
            f"could not open Hugging Face dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "check the name and your network, or pass a local file or folder"
        ) from None


def _hub_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise DataError(
            f"could not open Hugging Face dataset {name!r} split {split!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); check the name and your network"
        ) from None
    for record in dataset:
        text = record.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{name}: records have no string field {text_field!r}; set data.text_field")
        if text.strip():
            yield text.strip()
