"""How good is a checkpoint? Loss, perplexity and bits per byte on held-out text, plus sample statistics.

    val tokens -> consecutive windows of context_length + 1 tokens (stride context_length, no overlap)
               -> summed cross-entropy over every target token          -> loss = nats / tokens
               -> UTF-8 bytes of the same target tokens (decode_bytes)  -> bits per byte = nats / ln 2 / bytes

Perplexity and loss depend on the tokenizer (a bigger vocabulary makes fewer, harder predictions); bits per
byte does not, so it compares models with different tokenizers on the same text.

With ``samples=K`` the model also writes K stories from <|endoftext|>, and their diversity is measured:
distinct-n (unique word n-grams / all word n-grams, pooled over the stories), the repetition rate (share of
a story's word 4-grams it already used earlier, averaged over stories), how often a story ended by itself
(<|endoftext|> before ``max_new_tokens``) and the mean length in tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from slm.data.loader import open_tokens, read_meta
from slm.data.tokenizer import HFTokenizer, Tokenizer, get_tokenizer
from slm.device import autocast
from slm.errors import ConfigError, DataError, SlmError
from slm.generate import generate_ids, load_model

# sampling settings of the stories (those of `slm generate`)
TEMPERATURE = 0.8
TOP_K = 200


def _check_tokenizer(data_dir: Path, meta: dict, tok: Tokenizer, checkpoint) -> None:
    """Refuse data tokenized differently from the checkpoint: its losses would be meaningless."""
    if meta["tokenizer"] == tok.name:
        return
    same = False
    try:  # the same tokenizer under another name (e.g. a tokenizer folder given by another path)
        data_tok = get_tokenizer(meta["tokenizer"])
        same = (type(data_tok) is type(tok) and data_tok.vocab_size == tok.vocab_size and data_tok.eot_id == tok.eot_id
                and (not isinstance(tok, HFTokenizer) or data_tok.json == tok.json))
    except SlmError:
        pass
    if not same:
        raise DataError(f"{data_dir} was tokenized with {meta['tokenizer']!r} but {checkpoint} uses "
                        f"{tok.name!r}; evaluate on data prepared with `slm prepare --tokenizer {tok.name}`")


def _windows(shards: list[np.memmap], context_length: int) -> list[tuple[int, int]]:
    """(shard, start) of every window of context_length + 1 tokens, stepping by context_length.

    Each window predicts its last context_length tokens, so every token of a shard after the first is a
    target exactly once (the tail that does not fill a whole window is left out).
    """
    return [(s, start) for s, shard in enumerate(shards)
            for start in range(0, len(shard) - context_length, context_length)]


def _token_bytes(tok: Tokenizer) -> np.ndarray:
    """UTF-8 length of each token id. decode_bytes of a sequence is the concatenation of its tokens' bytes,
    so summing this table over the targets counts exactly the bytes decode_bytes(targets) would give."""
    return np.array([len(tok.decode_bytes([i])) for i in range(tok.vocab_size)], dtype=np.int64)


@torch.no_grad()
def validation_loss(lm, data_dir: str | Path, batches: int | None = None, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Summed loss and byte count over the val split (or its first ``batches`` batches of windows)."""
    model, tok, device = lm.model, lm.tokenizer, lm.device
    ctx = model.config.context_length
    shards = open_tokens(data_dir, "val")
    windows = _windows(shards, ctx)
    if not windows:
        raise DataError(f"{data_dir}: the val split is shorter than context_length + 1 = {ctx + 1} tokens; "
                        "prepare it with more text (or a larger --val-fraction)")
    if batches is not None:
        windows = windows[: batches * batch_size]
    token_bytes = _token_bytes(tok)
    offsets = np.arange(ctx + 1)

    model.eval()
    nats, tokens, n_bytes = 0.0, 0, 0
    starts = range(0, len(windows), batch_size)
    for i in tqdm(starts, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True):
        rows = np.stack([shards[s][start + offsets] for s, start in windows[i : i + batch_size]]).astype(np.int64)
        if rows.max() >= len(token_bytes):
            raise DataError(f"{data_dir}: the val data holds token id {rows.max()}, beyond the tokenizer's "
                            f"{len(token_bytes)} ids; prepare it again")
        window = torch.from_numpy(rows).to(device)
        x, y = window[:, :-1], window[:, 1:]
        with autocast(device, lm.dtype):
            logits, _ = model(x)
        nats += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        tokens += y.numel()
        n_bytes += int(token_bytes[rows[:, 1:]].sum())
    return {"nats": nats, "tokens": tokens, "bytes": n_bytes, "batches": len(starts)}


def distinct_n(stories: list[list[str]], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over the stories (1.0 = no n-gram ever repeats)."""
    grams = [tuple(words[i : i + n]) for words in stories for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(words: list[str], n: int = 4) -> float:
    """Share of a story's n-grams that already appeared earlier in the same story (0.0 = none)."""
    seen, repeats, total = set(), 0, 0
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        repeats += gram in seen
        total += 1
        seen.add(gram)
    return repeats / total if total else 0.0


def sample_stories(lm, samples: int, max_new_tokens: int = 200, seed: int = 0, progress: bool = True) -> dict:
    """Write ``samples`` stories from <|endoftext|> (seeds seed, seed+1, ...) and measure their diversity."""
    tok = lm.tokenizer
    stories, lengths, ended = [], [], 0
    for i in tqdm(range(samples), desc="samples", unit="story", disable=not progress, dynamic_ncols=True):
        ids = list(generate_ids(lm.model, [tok.eot_id], max_new_tokens, TEMPERATURE, TOP_K, eos_id=tok.eot_id,
                                seed=seed + i, dtype=lm.dtype))
        if ids and ids[-1] == tok.eot_id:
            ended += 1
            ids = ids[:-1]
        stories.append(tok.decode(ids))
        lengths.append(len(ids))
    words = [story.split() for story in stories]
    return {
        "samples": samples,
        "distinct_1": distinct_n(words, 1),
        "distinct_2": distinct_n(words, 2),
        "distinct_3": distinct_n(words, 3),
        "repetition_rate": sum(repetition_rate(w) for w in words) / samples,
        "ended_fraction": ended / samples,
        "mean_length": sum(lengths) / samples,  # generated tokens, <|endoftext|> not counted
        "stories": stories,
    }


def evaluate(checkpoint: str | Path, data_dir: str | Path | None = None, batches: int | None = None,
             batch_size: int = 8, samples: int = 0, max_new_tokens: int = 200, seed: int = 0,
             device: str = "auto", progress: bool = True) -> dict:
    """``slm eval``: validation loss, perplexity and bits per byte of a checkpoint, and optionally sample metrics.

    ``data_dir`` defaults to the data the checkpoint was trained on (its config's ``data.dir``); ``batches``
    limits the evaluation to the first that many batches of ``batch_size`` windows (default: all of val).
    """
    if batches is not None and batches < 1:
        raise ConfigError(f"batches: expected a positive integer, got {batches!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if samples < 0:
        raise ConfigError(f"samples: expected 0 or more, got {samples!r}")
    if samples and max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    lm = load_model(checkpoint, device)
    data_dir = Path(data_dir if data_dir is not None else lm.config.data.dir)
    meta = read_meta(data_dir)
    _check_tokenizer(data_dir, meta, lm.tokenizer, checkpoint)

    val = validation_loss(lm, data_dir, batches, batch_size, progress)
    loss = val["nats"] / val["tokens"]
    result = {
        "checkpoint": str(checkpoint),
        "step": lm.step,
        "parameters": lm.model.count_parameters(),
        "data_dir": str(data_dir),
        "tokenizer": lm.tokenizer.name,
        "batches": val["batches"],
        "tokens": val["tokens"],
        "bytes": val["bytes"],
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": val["nats"] / math.log(2) / val["bytes"],
    }
    if samples:
        result.update(sample_stories(lm, samples, max_new_tokens, seed, progress))
    return result


def format_report(result: dict) -> str:
    """The result of ``evaluate`` as a few lines for the terminal."""
    lines = [
        f"checkpoint     {result['checkpoint']} (step {result['step']:,}, {result['parameters']:,} parameters)",
        f"data           {result['data_dir']} val, {result['tokens']:,} tokens / {result['bytes']:,} bytes "
        f"in {result['batches']:,} batches (tokenizer {result['tokenizer']})",
        f"loss           {result['loss']:.4f} nats/token",
        f"perplexity     {result['perplexity']:.2f}",
        f"bits per byte  {result['bits_per_byte']:.4f}",
    ]
    if result.get("samples"):
        lines += [
            f"samples        {result['samples']} stories from <|endoftext|>, mean {result['mean_length']:.1f} tokens, "
            f"{result['ended_fraction']:.0%} ended by themselves",
            f"distinct-1/2/3 {result['distinct_1']:.3f} / {result['distinct_2']:.3f} / {result['distinct_3']:.3f}",
            f"repetition     {result['repetition_rate']:.3f} (share of 4-grams repeated within a story)",
        ]
        for i, story in enumerate(result["stories"][:3]):
            text = " ".join(story.split())
            lines.append(f"sample {i + 1}       {text[:200]}{'...' if len(text) > 200 else ''}")
    return "\n".join(lines)
