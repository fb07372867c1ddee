"""Tokenizers: text <-> token ids, with ``<|endoftext|>`` between documents.

``get_tokenizer(name)`` takes
  * ``gpt2``           - OpenAI's GPT-2 BPE (50,257 ids) through tiktoken, built from the ``vocab.bpe`` /
                         ``encoder.json`` files bundled in this package, so it works with no network;
  * ``tinystories-4k`` - a 4,096-id byte-level BPE trained on the bundled TinyStories sample (used by the
                         CPU demo: a small vocabulary makes a small model train ~10x faster);
  * a folder holding ``tokenizer.json`` (or the file itself) - a Hugging Face ``tokenizers`` BPE, e.g. one
                         made with ``train_tokenizer``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from slm.errors import ConfigError

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer regex (tiktoken calls it r50k)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_FILES = {  # file name -> sha256, checked by tiktoken on load
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
BUNDLED = {"tinystories-4k": "tinystories-4k.json"}


def _asset(*parts: str) -> Path:
    return Path(str(resources.files("slm.data").joinpath("assets", *parts)))


class Tokenizer:
    """Common interface: ``encode``, ``encode_batch``, ``decode``, ``decode_bytes``, ``eot_id``, ``vocab_size``."""

    name: str
    eot_id: int
    vocab_size: int

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class TiktokenTokenizer(Tokenizer):
    def __init__(self, name: str, encoding):
        self.name, self.encoding = name, encoding
        self.eot_id, self.vocab_size = encoding.eot_token, encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; "<|endoftext|>" in the text becomes the special token."""
        return self.encoding.encode(text, allowed_special={EOT})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Documents to ids, special-token text treated as ordinary text (what ``slm prepare`` uses)."""
        return self.encoding.encode_ordinary_batch(texts, num_threads=1)

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A byte-level BPE from a Hugging Face ``tokenizer.json``."""

    def __init__(self, name: str, hf):
        self.name, self.hf = name, hf
        eot = self.hf.token_to_id(EOT)
        if eot is None:
            raise ConfigError(f"data.tokenizer: {name} has no {EOT} token")
        self.eot_id, self.vocab_size = eot, self.hf.get_vocab_size()
        self._byte_decoder = _bytes_of_token_strings()

    @classmethod
    def from_file(cls, name: str, path: Path) -> HFTokenizer:
        from tokenizers import Tokenizer as _HF

        try:
            return cls(name, _HF.from_file(str(path)))
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
            raise ConfigError(f"data.tokenizer: {path} is not a valid tokenizer.json ({str(e)[:160]})") from None

    @property
    def json(self) -> str:
        """The whole tokenizer as JSON text (stored in checkpoints so models travel with their tokenizer)."""
        return self.hf.to_str()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # split on EOT text so it is never produced from document content
        return [e.ids for e in self.hf.encode_batch([t.replace(EOT, " ") for t in texts], add_special_tokens=False)]

    def decode_bytes(self, ids) -> bytes:
        out = bytearray()
        for i in ids:
            piece = self.hf.id_to_token(int(i))
            if piece is None:
                continue
            if piece == EOT:
                out += EOT.encode()
            else:
                out += bytes(self._byte_decoder[c] for c in piece)
        return bytes(out)


@lru_cache(maxsize=1)
def _bytes_of_token_strings() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character; this maps them back (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@lru_cache(maxsize=None)
def _gpt2() -> TiktokenTokenizer:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(_asset("gpt2", "vocab.bpe")), str(_asset("gpt2", "encoder.json")),
                                            GPT2_FILES["vocab.bpe"], GPT2_FILES["encoder.json"])
    encoding = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    return TiktokenTokenizer("gpt2", encoding)


@lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    if name == "gpt2":
        return _gpt2()
    if name in BUNDLED:
        return HFTokenizer.from_file(name, _asset(BUNDLED[name]))
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return HFTokenizer.from_file(str(Path(name)), path)
    raise ConfigError(f"data.tokenizer: {name!r} is neither a built-in tokenizer ({', '.join(['gpt2', *BUNDLED])}) "
                      "nor a folder with tokenizer.json")


def tokenizer_info(tok: Tokenizer) -> dict:
    """What a checkpoint stores about its tokenizer: enough to rebuild it anywhere."""
    info = {"name": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    if isinstance(tok, HFTokenizer) and tok.name not in BUNDLED:
        info["json"] = tok.json
    return info


def tokenizer_from_info(info: dict) -> Tokenizer:
    """Inverse of ``tokenizer_info``."""
    if info.get("json"):
        from tokenizers import Tokenizer as _HF

        return HFTokenizer(info["name"], _HF.from_str(info["json"]))
    return get_tokenizer(info["name"])


def train_tokenizer(documents, vocab_size: int, out_dir: str | os.PathLike) -> Path:
    """Train a byte-level BPE with ``<|endoftext|>`` as a special token; writes ``out_dir/tokenizer.json``.

    ``documents`` is any iterable of strings; it is consumed as a stream.
    """
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ConfigError(f"vocab_size: expected at least 257 (256 bytes + {EOT}), got {vocab_size}")
    hf = _HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(documents, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def build_tokenizer(source: str, vocab_size: int, out_dir: str | os.PathLike, text_field: str = "text",
                    max_mb: float = 1000.0) -> Path:
    """``slm tokenizer train``: a BPE trained on (a sample of) any source ``slm prepare`` accepts.

    A corpus larger than ``max_mb`` is sampled: every k-th document of a local corpus of known size,
    else the first ``max_mb`` of the stream.
    """
    from slm.data.sources import iter_documents, local_files

    files = local_files(source)
    total = sum(f.stat().st_size for f in files) if files else None
    budget = int(max_mb * 1e6)
    every = max(1, -(-total // budget)) if total else 1

    def sample():
        seen = 0
        for i, doc in enumerate(iter_documents(source, "train", text_field)):
            if i % every:
                continue
            yield doc
            seen += len(doc)
            if seen >= budget:
                return

    return train_tokenizer(sample(), vocab_size, out_dir)
