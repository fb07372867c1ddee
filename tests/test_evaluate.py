import math

import pytest

from slm.data.loader import open_tokens
from slm.data.shards import prepare
from slm.data.tokenizer import _asset
from slm.errors import ConfigError, DataError, SlmError
from slm.evaluate import distinct_n, evaluate, format_report, repetition_rate
from slm.generate import load_model


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    run_dir, _, _ = trained_run
    return run_dir / "best.pt"


@pytest.fixture(scope="module")
def full_eval(checkpoint):
    """All of the val split, plus a few short samples."""
    return evaluate(checkpoint, samples=3, max_new_tokens=40, progress=False)


def _small_source(tmp_path, n_docs=40):
    text = "\n\n".join(f"Story {i}. Once upon a time, a little cat named Tom found a red ball in the park."
                       for i in range(n_docs))
    path = tmp_path / "stories.txt"
    path.write_text(text)
    return path


def test_loss_matches_training(full_eval, trained_run, sample_data):
    _, cfg, result = trained_run
    assert full_eval["data_dir"] == str(sample_data)  # defaults to the checkpoint's data.dir
    assert math.isfinite(full_eval["loss"])
    # other windows than the trainer's 4 random batches, so only close
    assert abs(full_eval["loss"] - result["best_val_loss"]) < 0.3
    assert full_eval["perplexity"] == pytest.approx(math.exp(full_eval["loss"]))
    ctx = cfg.model.context_length
    shards = open_tokens(sample_data, "val")
    assert full_eval["tokens"] == sum((len(s) - 1) // ctx * ctx for s in shards)  # every full window once


def test_bits_per_byte_recomputed(full_eval, checkpoint, trained_run, sample_data):
    """Bytes = UTF-8 bytes of exactly the evaluated target tokens; bpb = loss * tokens / ln 2 / bytes."""
    ctx = trained_run[1].model.context_length
    tok = load_model(checkpoint, "cpu").tokenizer
    n_bytes = 0
    for shard in open_tokens(sample_data, "val"):
        for start in range(0, len(shard) - ctx, ctx):
            n_bytes += len(tok.decode_bytes(shard[start + 1 : start + ctx + 1]))
    assert full_eval["bytes"] == n_bytes
    bpb = full_eval["loss"] * full_eval["tokens"] / math.log(2) / n_bytes
    assert full_eval["bits_per_byte"] == pytest.approx(bpb, rel=1e-9)
    assert 0 < full_eval["bits_per_byte"] < full_eval["loss"] / math.log(2)  # tokens hold more than 1 byte


def test_batches_limits_the_windows(checkpoint, full_eval):
    part = evaluate(checkpoint, batches=3, batch_size=4, progress=False)
    assert part["batches"] == 3 and part["tokens"] == 3 * 4 * 64
    assert abs(part["loss"] - full_eval["loss"]) < 0.5
    assert "stories" not in part


def test_sample_metrics(full_eval):
    assert len(full_eval["stories"]) == full_eval["samples"] == 3
    assert all(isinstance(s, str) for s in full_eval["stories"])
    for key in ("distinct_1", "distinct_2", "distinct_3", "repetition_rate", "ended_fraction"):
        assert 0.0 <= full_eval[key] <= 1.0, key
    assert full_eval["distinct_1"] <= full_eval["distinct_2"] <= full_eval["distinct_3"]
    assert 0 < full_eval["mean_length"] <= 40
    report = format_report(full_eval)
    assert "bits per byte" in report and "distinct-1/2/3" in report


def test_ngram_metrics():
    words = "the cat sat on the mat the cat sat on the mat".split()
    assert distinct_n([words], 1) == pytest.approx(5 / 12)
    assert distinct_n([["a", "b"], ["a", "b"]], 2) == pytest.approx(1 / 2)  # pooled over stories
    assert distinct_n([[]], 3) == 0.0
    # 9 four-grams; the last 3 ("the cat sat on", "cat sat on the", "sat on the mat") were seen before
    assert repetition_rate(words) == pytest.approx(3 / 9)
    assert repetition_rate("a b c d e f".split()) == 0.0
    assert repetition_rate(["a", "b"]) == 0.0


def test_other_tokenizer_is_refused(checkpoint, tmp_path):
    data = tmp_path / "gpt2-data"
    prepare(str(_small_source(tmp_path)), data, "gpt2", val_fraction=0.2, progress=False, num_workers=1)
    with pytest.raises(DataError, match="gpt2") as e:
        evaluate(checkpoint, data_dir=data, progress=False)
    assert "\n" not in str(e.value)


def test_same_tokenizer_under_another_name_is_accepted(checkpoint, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(_asset("tinystories-4k.json").read_bytes())
    data = tmp_path / "data"
    prepare(str(_small_source(tmp_path)), data, str(folder), val_fraction=0.2, progress=False, num_workers=1)
    result = evaluate(checkpoint, data_dir=data, progress=False)
    assert math.isfinite(result["loss"]) and result["bits_per_byte"] > 0


def test_bad_arguments(checkpoint):
    with pytest.raises(ConfigError, match="batches"):
        evaluate(checkpoint, batches=0, progress=False)
    with pytest.raises(ConfigError, match="samples"):
        evaluate(checkpoint, samples=-1, progress=False)
    with pytest.raises(SlmError, match="not found"):
        evaluate(checkpoint.parent / "missing.pt", progress=False)
