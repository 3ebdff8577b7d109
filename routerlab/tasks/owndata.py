"""Bring your own data: `text` (a UTF-8 text file or a folder of them) and `tokens` (pre-tokenized ids).

text    a folder: every non-hidden, non-binary file under it (glob `pattern`), split by a fixed hash of its
        relative path, domain = its first folder below the root; a single file: the first part for train,
        then val, then test (cut at line ends), one domain. Tokenized like `stdlib` (bytes or a local BPE),
        cached by content.
tokens  the layout nanoGPT's prepare.py writes: a folder with train.bin and val.bin (flat uint16 or uint32
        token ids, no header), or one .bin whose last val_frac becomes val. Read as memory maps, never
        copied; the specialization label is a token-id range (label_buckets equal ranges).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Literal

import numpy as np

from routerlab.errors import ConfigError
from routerlab.registry import require
from routerlab.tasks.base import TaskParams, register_task
from routerlab.tasks.corpus import SPLITS, CorpusParams, Document, DocumentLM, TokenLM

ROOT_DOMAIN = "(root)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextParams(CorpusParams):
    path: str  # a UTF-8 text file or a folder of text files
    pattern: str = "*"  # which files of a folder (glob, matched recursively)


def is_binary(data: bytes) -> bool:
    return b"\0" in data[:8192]


@register_task("text", TextParams)
class Text(DocumentLM):
    """Language modelling on your own text file or folder (split by file hash, or by position in one file)."""

    def documents(self) -> list[Document]:
        root = Path(self.params.path)
        if root.is_file():
            return [Document(root.name, root.read_bytes(), ROOT_DOMAIN)]
        if not root.is_dir():
            raise ConfigError(f"task.path {str(root)!r} does not exist; give a UTF-8 text file or a folder of text files")
        docs = []
        for path in sorted(root.rglob(self.params.pattern)):
            rel = path.relative_to(root)
            if not path.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            data = path.read_bytes()
            if data and not is_binary(data):
                docs.append(Document(rel.as_posix(), data, rel.parts[0] if len(rel.parts) > 1 else ROOT_DOMAIN))
        if not docs:
            raise ConfigError(f"task.path {str(root)!r} holds no non-empty text files matching {self.params.pattern!r}")
        return docs

    def split_documents(self, docs: list[Document]) -> dict[str, list[Document]]:
        if len(docs) > 1 or not Path(self.params.path).is_file():
            return super().split_documents(docs)
        data, p = docs[0].data, self.params
        cuts = []
        for frac in (1 - p.val_frac - p.test_frac, 1 - p.test_frac):
            at = int(len(data) * frac)
            newline = data.find(b"\n", at)
            cuts.append(newline + 1 if 0 <= newline < at + 4096 else at)
        pieces = (data[: cuts[0]], data[cuts[0] : cuts[1]], data[cuts[1] :])
        return {s: [Document(f"{docs[0].path}#{s}", piece, ROOT_DOMAIN)] if piece else [] for s, piece in zip(SPLITS, pieces)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokensParams(TaskParams):
    path: str  # a folder with train.bin and val.bin, or one .bin file
    dtype: Literal["uint16", "uint32"] = "uint16"
    vocab_size: int | None = None  # default: largest id + 1
    block_size: int = 256
    val_frac: float = 0.05  # one .bin file only: its last part is val
    label_buckets: int = 16

    def __post_init__(self) -> None:
        require(self.vocab_size is None or self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        require(self.block_size >= 2, f"block_size must be >= 2, got {self.block_size}")
        require(0 < self.val_frac < 0.5, f"val_frac must be in (0, 0.5), got {self.val_frac}")
        require(1 <= self.label_buckets <= 255, f"label_buckets must be in [1, 255], got {self.label_buckets}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@register_task("tokens", TokensParams)
class Tokens(TokenLM):
    """Language modelling on pre-tokenized ids (nanoGPT's train.bin/val.bin, uint16 or uint32)."""

    def __init__(self, params: TokensParams) -> None:
        self.params = p = params
        self.block_size = p.block_size
        root = Path(p.path)
        dtype = np.dtype(p.dtype)
        if root.is_dir():
            files = {s: root / f"{s}.bin" for s in ("train", "val")}
            missing = [str(f) for f in files.values() if not f.is_file()]
            if missing:
                raise ConfigError(f"task.path {str(root)!r} lacks {', '.join(missing)}; give a folder with train.bin and val.bin or one .bin file")
        elif root.is_file():
            files = {"all": root}
        else:
            raise ConfigError(f"task.path {str(root)!r} does not exist; give a folder with train.bin and val.bin (nanoGPT layout) or one .bin file")
        arrays = {}
        for s, f in files.items():
            if f.stat().st_size % dtype.itemsize:
                raise ConfigError(f"{str(f)!r} has {f.stat().st_size} bytes, not a whole number of {p.dtype} ids; check task.dtype")
            arrays[s] = np.memmap(f, dtype=dtype, mode="r") if f.stat().st_size else np.zeros(0, dtype)
        if "all" in arrays:
            arr = arrays.pop("all")
            cut = len(arr) - int(len(arr) * p.val_frac)
            arrays = {"train": arr[:cut], "val": arr[cut:]}
        arrays["test"] = np.zeros(0, dtype)
        self.tokens = arrays
        largest = max(int(a.max()) for a in arrays.values() if len(a)) if any(len(a) for a in arrays.values()) else 0
        if p.vocab_size is not None and largest >= p.vocab_size:
            raise ConfigError(f"the token files hold id {largest}, not below task.vocab_size={p.vocab_size}; raise vocab_size or leave it unset")
        self.vocab_size = self.num_classes = p.vocab_size or largest + 1
        self.num_labels = min(p.label_buckets, self.vocab_size)
        self.label_name = "token-id range"
        h = hashlib.sha256(p.dtype.encode())
        for s in sorted(files):
            h.update(f"{s}:{file_sha256(files[s])}\n".encode())
        self.data_checksum = h.hexdigest()
        self.info = {"tokens": {s: int(len(a)) for s, a in arrays.items()}, "tokenizer": f"pre-tokenized {p.dtype}", "vocab_size": self.vocab_size}
        self.check_sizes()
