"""Text in, text out: prompt -> ids -> ``generate_ids`` -> text, optionally streamed piece by piece."""

from __future__ import annotations

from collections.abc import Callable

from slm.generate.model_io import LoadedModel
from slm.generate.sampling import StreamDecoder, generate_ids


def generate_text(lm: LoadedModel, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 200, top_p: float | None = None, seed: int | None = None,
                  on_text: Callable[[str], None] | None = None) -> str:
    """The continuation of ``prompt`` (without the prompt), stopping at <|endoftext|>.

    ``on_text`` receives each new piece of text as soon as it is decoded (for streaming).
    """
    tok = lm.tokenizer
    prompt_ids = tok.encode(prompt) if prompt else [tok.eot_id]
    decoder, pieces = StreamDecoder(tok), []
    for token_id in generate_ids(lm.model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                                 eos_id=tok.eot_id, seed=seed, dtype=lm.dtype):
        if token_id == tok.eot_id:
            break
        piece = decoder.push(token_id)
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)
    tail = decoder.flush()
    if tail:
        pieces.append(tail)
        if on_text:
            on_text(tail)
    return "".join(pieces)
