"""Sharded, resumable prepare and trained tokenizers."""

import json

import numpy as np
import pytest

import slm.data.shards as prep
from slm.cli import main

from slm.data import BatchLoader, get_tokenizer, iter_documents, open_tokens, prepare
from slm.data.tokenizer import build_tokenizer, tokenizer_from_info, tokenizer_info

TEXTS = ["once upon a time, a fox said \"hi!\"\n\nthe end.", "héllo wörld — 😀 ünïcode", "tabs\tand  spaces  \n"]


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer("sample", 1024, out)
    return out


def test_trained_tokenizer_round_trips_exactly(trained_tokenizer):
    tok = get_tokenizer(str(trained_tokenizer))
    assert tok.vocab_size == 1024
    for text in TEXTS + list(iter_documents("sample"))[:200]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a <|endoftext|> b").count(tok.eot_id) == 1
    assert tok.eot_id not in tok.encode_batch(["a <|endoftext|> b"])[0]  # document text never makes the special id
    # a checkpoint carries the whole tokenizer, so it works after the folder is gone
    again = tokenizer_from_info(tokenizer_info(tok))
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_cli_tokenizer_train(tmp_path, capsys):
    assert main(["tokenizer", "train", "--data", "sample", "--vocab-size", "600", "--out", str(tmp_path / "t"),
                 "--max-mb", "1"]) == 0
    assert "600 tokens" in capsys.readouterr().out
    assert get_tokenizer(str(tmp_path / "t")).vocab_size == 600


def read_split(data_dir, split):
    return np.concatenate(open_tokens(data_dir, split))


def test_sharded_prepare_equals_unsharded(tmp_path):
    whole = prepare("sample", tmp_path / "whole", "tinystories-4k", progress=False, num_workers=2)
    sharded = prepare("sample", tmp_path / "sharded", "tinystories-4k", progress=False, num_workers=2,
                      shard_tokens=100_000)
    assert len(whole["shards"]["train"]) == 1 and len(sharded["shards"]["train"]) >= 5
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "whole", split), read_split(tmp_path / "sharded", split))
    # every shard but the last holds at least shard_tokens and ends at a document boundary
    for name in sharded["shards"]["train"][:-1]:
        ids = np.fromfile(tmp_path / "sharded" / name, dtype=np.uint16)
        assert len(ids) >= 100_000 and ids[-1] == 0
    loader = BatchLoader(tmp_path / "sharded", "train", batch_size=64, context_length=32, seed=0)
    x, y = loader.get_batch(0)
    assert (x[:, 1:] == y[:, :-1]).all()


def test_interrupted_prepare_resumes_to_identical_output(tmp_path, monkeypatch):
    reference = prepare("sample", tmp_path / "ref", "tinystories-4k", progress=False, num_workers=1,
                        shard_tokens=50_000)
    real_task, calls = prep._encode_task, {"n": 0}

    def crashing_task(*args):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt("simulated crash")
        return real_task(*args)

    monkeypatch.setattr(prep, "_encode_task", crashing_task)
    with pytest.raises(KeyboardInterrupt):
        prepare("sample", tmp_path / "cut", "tinystories-4k", progress=False, num_workers=1, shard_tokens=50_000)
    progress = json.loads((tmp_path / "cut" / "progress.json").read_text())
    assert progress["documents"] > 0 and progress["train"]["shards"]
    kept = sorted(p.name for p in (tmp_path / "cut").glob("train_*.bin"))
    monkeypatch.setattr(prep, "_encode_task", real_task)
    calls["n"] = 0
    resumed = prepare("sample", tmp_path / "cut", "tinystories-4k", progress=False, num_workers=1,
                      shard_tokens=50_000)
    assert resumed["shards"] == reference["shards"] and resumed["documents"] == reference["documents"]
    for name in kept + reference["shards"]["val"]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "ref", split), read_split(tmp_path / "cut", split))
    assert not (tmp_path / "cut" / "progress.json").exists()


def test_uint32_ids_for_large_vocabularies(tmp_path):
    hf = get_tokenizer("tinystories-4k").hf
    hf = type(hf).from_str(hf.to_str())  # a copy: the cached tokenizer stays as it is
    hf.add_tokens([f"<w{i}>" for i in range(62_000)])
    (tmp_path / "big").mkdir()
    hf.save(str(tmp_path / "big" / "tokenizer.json"))
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"story {i} <w{61_500 + i}> ends"}) + "\n" for i in range(200)))
    meta = prepare(str(src), tmp_path / "out", str(tmp_path / "big"), val_fraction=0.1, progress=False, num_workers=1)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 66_096
    ids = read_split(tmp_path / "out", "train")
    assert ids.dtype == np.uint32 and ids.max() >= 65_536
    tok = get_tokenizer(str(tmp_path / "big"))
    first = ids[: list(ids).index(tok.eot_id)]
    k = next(i for i in range(200) if not prep.is_val_document(i, 0.1))
    assert tok.decode(first) == f"story {k} <w{61_500 + k}> ends"
