"""Tokenizers of the corpus tasks: raw bytes (the default) or a byte-level BPE trained locally.

bytes  ids 0..255 are the bytes, 256 is end-of-document: vocabulary 257, nothing to train.
bpe    a byte-level BPE (the `tokenizers` library) trained on the training split only, with
       `<|endoftext|>` as its end-of-document token; saved as JSON in the cache folder under the hash of
       the training data and the vocabulary size, so a second run (or another process) reuses it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from routerlab.errors import ConfigError

EOT_TEXT = "<|endoftext|>"


class ByteTokenizer:
    tag = "bytes"
    vocab_size = 257
    eot = 256

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(d, dtype=np.uint8).astype(np.uint32) for d in docs]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot = tokenizer.token_to_id(EOT_TEXT)
        self.tag = f"bpe{self.vocab_size}"

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        texts = [d.decode("utf-8", errors="replace") for d in docs]
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("tokenizer 'bpe' needs the `tokenizers` package (pip install 'routerlab[data]'); or use tokenizer=bytes") from None
    return tokenizers


def train_bpe(train_docs: list[bytes], vocab_size: int):
    """A byte-level BPE trained on these documents (deterministic for the same documents and size)."""
    tk = _import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT_TEXT], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator((d.decode("utf-8", errors="replace") for d in train_docs), trainer=trainer, length=len(train_docs))
    return tokenizer


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bpe_path(cache_dir: Path, train_checksum: str, vocab_size: int) -> Path:
    return cache_dir / f"bpe-{train_checksum[:16]}-{vocab_size}.json"


def make_tokenizer(kind: str, vocab_size: int, cache_dir: Path, train_checksum: str, train_docs) -> ByteTokenizer | BPETokenizer:
    """The tokenizer `kind`; a BPE is loaded from the cache or trained on `train_docs()` and cached."""
    if kind == "bytes":
        return ByteTokenizer()
    tk = _import_tokenizers()
    path = bpe_path(cache_dir, train_checksum, vocab_size)
    if path.is_file():
        return BPETokenizer(tk.Tokenizer.from_file(str(path)))
    tokenizer = train_bpe(train_docs(), vocab_size)
    write_atomic(path, tokenizer.to_str().encode("utf-8"))
    return BPETokenizer(tokenizer)
