"""Data: source -> tokenizer -> token files on disk (``prepare``) -> batches (``BatchLoader``)."""

from slm.data.dataset import TextDataset, TokenFileDataset, create_dataloader
from slm.data.loader import BatchLoader, open_tokens, read_meta
from slm.data.prepare import prepare
from slm.data.sources import iter_documents
from slm.data.tokenizer import Tokenizer, get_tokenizer

__all__ = ["BatchLoader", "TextDataset", "TokenFileDataset", "Tokenizer", "create_dataloader", "get_tokenizer",
           "iter_documents", "open_tokens", "prepare", "read_meta"]
