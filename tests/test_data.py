import json

import numpy as np
import torch
import pytest

from slm.data import BatchLoader, TextDataset, create_dataloader, get_tokenizer, iter_documents, open_tokens, prepare
from slm.data.shards import is_val_document
from slm.errors import DataError

DOCS = ["Once upon a time there was a cat.", "The dog ran to the park.\nIt was happy.", "héllo wörld 😀 — done!"]


def decode_docs(data_dir, split, tokenizer):
    ids = np.concatenate(open_tokens(data_dir, split)).tolist()
    docs, current = [], []
    for i in ids:
        if i == tokenizer.eot_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    assert not current, "every document ends with <|endoftext|>"
    return docs


def test_gpt2_tokenizer_is_bundled_and_exact():
    tok = get_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    for text in DOCS:
        assert tok.decode(tok.encode(text)) == text


def test_small_tokenizer_round_trips():
    tok = get_tokenizer("tinystories-4k")
    assert tok.vocab_size == 4096
    for text in DOCS:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("tokenizer", ["gpt2", "tinystories-4k"])
def test_prepare_round_trips_text(tmp_path, tokenizer):
    src = tmp_path / "stories.txt"
    docs = [f"story number {i}. {DOCS[i % 3]}" for i in range(60)]
    src.write_text("\n<|endoftext|>\n".join(docs))
    meta = prepare(str(src), tmp_path / "out", tokenizer, val_fraction=0.2, progress=False, num_workers=1)
    tok = get_tokenizer(tokenizer)
    train, val = decode_docs(tmp_path / "out", "train", tok), decode_docs(tmp_path / "out", "val", tok)
    assert train == [d for i, d in enumerate(docs) if not is_val_document(i, 0.2)]
    assert val == [d for i, d in enumerate(docs) if is_val_document(i, 0.2)]
    assert meta["train_tokens"] + meta["val_tokens"] == sum(
        len(s) for split in ("train", "val") for s in open_tokens(tmp_path / "out", split))
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["tokenizer"] == tokenizer


def test_parallel_prepare_equals_serial(tmp_path):
    serial = prepare("sample", tmp_path / "a", "gpt2", progress=False, num_workers=1)
    parallel = prepare("sample", tmp_path / "b", "gpt2", progress=False, num_workers=2)
    assert serial["train_tokens"] == parallel["train_tokens"] > 900_000
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}_000.bin").read_bytes() == (tmp_path / "b" / f"{split}_000.bin").read_bytes()


def test_sources_txt_blank_lines_jsonl_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "d" / "c.json").write_text(json.dumps([{"text": "fifth"}]))
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00")
    assert list(iter_documents(str(tmp_path / "d"))) == ["first doc\nline two", "second doc", "third", "fourth", "fifth"]
    assert len(list(iter_documents("sample"))) == 5517


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare(str(tmp_path / "nope.txt"), tmp_path / "out", progress=False)


def test_batches_are_shifted_windows_and_deterministic(sample_data):
    loader = BatchLoader(sample_data, "train", batch_size=4, context_length=16, seed=7)
    x, y = loader.get_batch(3, 1)
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    x2, _ = loader.get_batch(3, 1)
    assert (x == x2).all()
    x3, _ = loader.get_batch(4, 1)
    assert not (x == x3).all()


def test_truncated_bin_is_detected(sample_data, tmp_path):
    for name in ("meta.json", "train_000.bin", "val_000.bin"):
        (tmp_path / name).write_bytes((sample_data / name).read_bytes())
    with open(tmp_path / "train_000.bin", "r+b") as f:
        f.truncate(1001)
    with pytest.raises(DataError, match="truncated"):
        open_tokens(tmp_path, "train")
    with pytest.raises(DataError, match="slm prepare"):
        open_tokens(tmp_path / "missing", "train")


def test_reference_style_datasets(sample_data):
    ds = TextDataset(["Your custom text here. " * 50, "More text..."], get_tokenizer(), context_length=32)
    x, y = ds[0]
    assert x.shape == (32,) and (x[1:] == y[:-1]).all()
    loader = create_dataloader(dataset_path="sample", data_dir=str(sample_data), split="validation", batch_size=4,
                               context_length=64, tokenizer="tinystories-4k")
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 64) and xb.dtype.is_floating_point is False
    assert np.all(xb.numpy()[:, 1:] == yb.numpy()[:, :-1])


def test_prefetcher_returns_exactly_the_loaders_batches(sample_data):
    from slm.data.loader import BatchLoader, Prefetcher

    loader = BatchLoader(sample_data, "train", 4, 32, seed=3)
    ahead = Prefetcher(loader, micro_steps=3, depth=4)
    try:
        keys = [(s, m) for s in range(5) for m in range(3)] + [(9, 1), (9, 2), (2, 0)]  # in order, then jumps
        for step, micro in keys:
            for got, want in zip(ahead.get_batch(step, micro), loader.get_batch(step, micro)):
                assert torch.equal(got, want), (step, micro)
        assert ahead.batch_size == 4  # the loader's attributes show through
    finally:
        ahead.close()
