"""Language modelling over a token array on disk: the machinery the `stdlib`, `text` and `tokens` tasks share.

A corpus is a list of documents (relative path, bytes, domain label). Documents go to train/val/test by a
fixed hash of their relative path, so the split is the same on every machine that has the file. The
corpus is tokenized once into flat arrays (documents joined by an end-of-document token; uint16 when the
vocabulary fits, else uint32) plus one uint8 domain label per token, written atomically into a cache
folder named after the content checksum, the split fractions and the tokenizer, and read back as
memory maps. `data_checksum` (sha256 over every document's path and content hash) keys results by the
data's content, never by its path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from routerlab.errors import ConfigError
from routerlab.registry import require
from routerlab.tasks.base import Batch, Task, TaskParams
from routerlab.tasks.tokenizer import BPETokenizer, ByteTokenizer, _import_tokenizers, bpe_path, make_tokenizer

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """$ROUTERLAB_CACHE, else ~/.cache/routerlab (token arrays and tokenizers, keyed by content)."""
    return Path(os.environ.get("ROUTERLAB_CACHE") or Path.home() / ".cache" / "routerlab")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusParams(TaskParams):
    block_size: int = 256
    tokenizer: Literal["bytes", "bpe"] = "bytes"
    vocab_size: int = 8192  # BPE only
    val_frac: float = 0.05  # share of documents (by path hash) in val
    test_frac: float = 0.05
    cache_dir: str | None = None  # default $ROUTERLAB_CACHE or ~/.cache/routerlab

    def __post_init__(self) -> None:
        require(self.block_size >= 2, f"block_size must be >= 2, got {self.block_size}")
        require(300 <= self.vocab_size <= 1 << 20, f"vocab_size must be in [300, {1 << 20}], got {self.vocab_size}")
        require(0 < self.val_frac < 0.5, f"val_frac must be in (0, 0.5), got {self.val_frac}")
        require(0 <= self.test_frac < 0.5, f"test_frac must be in [0, 0.5), got {self.test_frac}")


@dataclass(frozen=True)
class Document:
    path: str  # relative to the corpus root, '/'-separated (the split hash reads it)
    data: bytes
    label: str  # domain


def split_of(path: str, val_frac: float, test_frac: float) -> str:
    """train / val / test from the first 8 bytes of sha256(path): the same on every machine."""
    u = int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def content_checksum(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in sorted(docs, key=lambda d: d.path):
        h.update(f"{d.path}\0{hashlib.sha256(d.data).hexdigest()}\n".encode("utf-8"))
    return h.hexdigest()


def file_list_hash(docs: list[Document]) -> str:
    return hashlib.sha256("\n".join(sorted(d.path for d in docs)).encode("utf-8")).hexdigest()


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the split's own token frequencies: the loss of the best context-free predictor."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def save_dir_atomic(final: Path, files: dict[str, bytes | np.ndarray]) -> None:
    """Write every file into a temporary sibling folder, then rename it into place (a racing writer's folder wins)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        for name, data in files.items():
            if isinstance(data, np.ndarray):
                data.tofile(tmp / name)
            else:
                (tmp / name).write_bytes(data)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: its folder has the same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TokenLM(Task):
    """An LM task over flat token arrays per split; the specialization label comes per token."""

    kind = "lm"
    has_token_ids = True
    label_name = "domain"

    tokens: dict[str, np.ndarray]
    token_labels: dict[str, np.ndarray] | None = None  # uint8 per token; None: token-id bucket (num_labels ranges of ids)
    data_checksum: str = ""
    info: dict = {}

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        arr = self.tokens[split]
        L = self.block_size
        starts = torch.randint(len(arr) - L - 1, (batch_size,), generator=generator).numpy()
        index = starts[:, None] + np.arange(L + 1)
        window = torch.from_numpy(arr[index].astype(np.int64))
        inputs = window[:, :-1]
        if self.token_labels is not None:
            labels = torch.from_numpy(self.token_labels[split][index[:, :-1]].astype(np.int64))
        else:
            labels = inputs * self.num_labels // self.vocab_size  # token-id bucket
        return Batch(inputs, window[:, 1:], labels, token_ids=inputs)

    def unigram_entropy(self, split: str = "val") -> float:
        return unigram_entropy(self.tokens[split], self.vocab_size)

    def check_sizes(self) -> None:
        for split in ("train", "val"):
            n = len(self.tokens[split])
            if n <= self.block_size + 1:
                raise ConfigError(
                    f"task {self.name!r}: the {split} split has {n} tokens, too few for block_size={self.block_size}; "
                    f"give more data, a larger val_frac, or a smaller block_size"
                )

    def data_info(self) -> dict:
        """What the run records about its data (checksum, sizes, tokenizer, unigram baseline)."""
        return {"task": self.name, "data_checksum": self.data_checksum, **self.info,
                "unigram_entropy_val": round(self.unigram_entropy("val"), 6)}


class DocumentLM(TokenLM):
    """A TokenLM built from documents: subclasses implement `documents()` (and may override `split_documents`)."""

    params: CorpusParams

    def documents(self) -> list[Document]:  # pragma: no cover
        raise NotImplementedError

    def split_documents(self, docs: list[Document]) -> dict[str, list[Document]]:
        p = self.params
        out: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for d in sorted(docs, key=lambda d: d.path):
            out[split_of(d.path, p.val_frac, p.test_frac)].append(d)
        return out

    def __init__(self, params: CorpusParams) -> None:
        self.params = p = params
        self.block_size = p.block_size
        docs = self.documents()
        self.data_checksum = content_checksum(docs)
        splits = self.split_documents(docs)
        if not splits["train"] or not splits["val"]:
            raise ConfigError(
                f"task {self.name!r}: {len(docs)} documents give {len(splits['train'])} for train and {len(splits['val'])} for val; "
                f"both need at least one (raise val_frac={p.val_frac}, or give more files)"
            )
        self.domains = sorted({d.label for d in docs})
        if len(self.domains) > 255:
            raise ConfigError(f"task {self.name!r}: {len(self.domains)} domains; at most 255 are supported")
        self.num_labels = len(self.domains)
        cache_root = Path(p.cache_dir) if p.cache_dir else default_cache_dir()
        train_checksum = content_checksum(splits["train"])
        want = "bytes" if p.tokenizer == "bytes" else f"bpe{p.vocab_size}"
        folder = cache_root / f"{self.name}-{self.data_checksum[:16]}-{want}-v{p.val_frac:g}-t{p.test_frac:g}-c{CACHE_VERSION}"
        if not (folder / "meta.json").is_file():
            tok = make_tokenizer(p.tokenizer, p.vocab_size, cache_root, train_checksum, lambda: [d.data for d in splits["train"]])
            self._write_cache(folder, splits, tok)
        meta = json.loads((folder / "meta.json").read_text())
        if p.tokenizer == "bytes":
            self.tokenizer: ByteTokenizer | BPETokenizer = ByteTokenizer()
        else:
            path = bpe_path(cache_root, train_checksum, p.vocab_size)
            self.tokenizer = BPETokenizer(_import_tokenizers().Tokenizer.from_file(str(path))) if path.is_file() else None
        self.vocab_size = self.num_classes = meta["vocab_size"]
        dtype = np.dtype(meta["dtype"])
        self.tokens = {s: np.memmap(folder / f"{s}.bin", dtype=dtype, mode="r") if meta["tokens"][s] else np.zeros(0, dtype)
                       for s in SPLITS}
        self.token_labels = {s: np.memmap(folder / f"{s}.labels.bin", dtype=np.uint8, mode="r") if meta["tokens"][s] else np.zeros(0, np.uint8)
                             for s in SPLITS}
        self.cache_folder = folder
        self.info = {
            "file_list_hash": file_list_hash(docs),
            "files": {s: len(splits[s]) for s in SPLITS},
            "bytes": sum(len(d.data) for d in docs),
            "tokens": meta["tokens"],
            "tokenizer": meta["tokenizer"],
            "vocab_size": meta["vocab_size"],
            "domains": len(self.domains),
        }
        self.check_sizes()

    def _write_cache(self, folder: Path, splits: dict[str, list[Document]], tok) -> None:
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        label_index = {name: i for i, name in enumerate(self.domains)}
        files: dict[str, bytes | np.ndarray] = {}
        counts = {}
        for s in SPLITS:
            docs = splits[s]
            encoded = tok.encode_docs([d.data for d in docs])
            eot = np.array([tok.eot], dtype=np.uint32)
            parts = [x for e in encoded for x in (e, eot)]
            ids = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
            labels = np.concatenate([np.full(len(e) + 1, label_index[d.label], np.uint8) for e, d in zip(encoded, docs)]) if docs else np.zeros(0, np.uint8)
            counts[s] = int(len(ids))
            if len(ids):
                files[f"{s}.bin"], files[f"{s}.labels.bin"] = ids, labels
        meta = {"vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name, "tokens": counts, "tokenizer": tok.tag,
                "domains": self.domains, "data_checksum": self.data_checksum}
        files["meta.json"] = json.dumps(meta, indent=1).encode("utf-8")
        save_dir_atomic(folder, files)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))

