"""Autoregressive sampling with a KV cache.

    prompt ids -> prefill (one forward over the prompt, filling the cache)
               -> repeat: sample one id from the last logits; forward that id alone (O(T) with the cache)
               -> stop at <|endoftext|> or max_new_tokens

Each call makes its own cache, so concurrent generations never share state.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from slm.model import GPT


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of ``logits`` (B, V). temperature 0 means greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: GPT, prompt: list[int], max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 seed: int | None = None, dtype: torch.dtype | None = None) -> Iterator[int]:
    """Yield new token ids one at a time. Stops after ``eos_id`` (which is yielded) or ``max_new_tokens``.

    When the context window fills up, the cache is rebuilt from the most recent 3/4 of the window.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token (use the <|endoftext|> id to start from nothing)")
    model.eval()
    device = model.tok_emb.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    ctx = model.config.context_length
    tokens = list(prompt)[-ctx:]
    use_autocast = dtype is not None and dtype != torch.float32 and device.type != "cpu"
    cache_dtype = dtype if use_autocast else model.tok_emb.weight.dtype

    def forward(ids: list[int], cache):
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            logits, _ = model(torch.tensor([ids], device=device), cache=cache)
        return logits[:, -1, :]

    cache = model.new_cache(1, ctx, dtype=cache_dtype)
    logits = forward(tokens, cache)
    for _ in range(max_new_tokens):
        next_id = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
        yield next_id
        if next_id == eos_id:
            return
        tokens.append(next_id)
        if cache.pos >= ctx:  # window full: keep the recent tokens and start a fresh cache
            tokens = tokens[-(ctx * 3 // 4):]
            cache = model.new_cache(1, ctx, dtype=cache_dtype)
            logits = forward(tokens, cache)
        else:
            logits = forward([next_id], cache)


class StreamDecoder:
    """Turns a stream of ids into text pieces, holding back bytes of a half-finished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, b""

    def push(self, token_id: int) -> str:
        self.pending += self.tokenizer.decode_bytes([token_id])
        try:
            text, self.pending = self.pending.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            if len(self.pending) - e.start > 3:  # not a truncated character: give up on those bytes
                text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
            else:
                text, self.pending = self.pending[: e.start].decode("utf-8"), self.pending[e.start :]
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text
