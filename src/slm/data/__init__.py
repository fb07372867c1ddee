"""Data: source -> tokenizer -> token shards on disk (``prepare``) -> batches (``BatchLoader``).

Names are imported lazily so that ``slm prepare`` and its worker processes never load torch.
"""

import importlib

_EXPORTS = {
    "BatchLoader": "loader", "open_tokens": "loader", "read_meta": "loader",
    "TextDataset": "dataset", "TokenFileDataset": "dataset", "create_dataloader": "dataset",
    "prepare": "shards",
    "iter_documents": "sources",
    "Tokenizer": "tokenizer", "get_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"slm.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slm.data' has no attribute {name!r}")
