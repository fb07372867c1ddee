"""The model: ``GPT`` and its ``GPTConfig``. The attention code is in ``gpt.py`` (and its GPU kernel for
contexts of up to 128 tokens in ``short_attention.py``)."""

from slm.model.gpt import GPT, FeedForward, GPTConfig, KVCache, MultiHeadAttention, TransformerBlock

__all__ = ["GPT", "GPTConfig", "KVCache", "MultiHeadAttention", "FeedForward", "TransformerBlock"]
