"""`chars`: character-level language modelling on a UTF-8 text.

Default corpus: the Python documentation topics that ship with every Python (`pydoc_data.topics`,
about 465 KB). Token ids are the characters, so hash routers have what they need. The
specialization label of a token is the category of its character: lowercase, uppercase, digit,
whitespace, punctuation, other.
"""
from __future__ import annotations

from pathlib import Path

import copy
import dataclasses

import torch
from torch import Tensor

from routerlab.errors import ConfigError
from routerlab.registry import require
from routerlab.tasks.base import Batch, Task, TaskParams, register_task

CATEGORIES = ("lower", "upper", "digit", "space", "punct", "other")


@dataclasses.dataclass(frozen=True)
class CharsParams(TaskParams):
    block_size: int = 64
    corpus: str | None = None  # path of a UTF-8 text file; None = pydoc_data.topics
    val_frac: float = 0.1
    test_frac: float = 0.0  # > 0: a held-out `test` split cut from the end of the training text

    def __post_init__(self) -> None:
        require(self.block_size >= 2, f"block_size must be >= 2, got {self.block_size}")
        require(0 < self.val_frac < 1, f"val_frac must be in (0, 1), got {self.val_frac}")
        require(0 <= self.test_frac < 1, f"test_frac must be in [0, 1), got {self.test_frac}")


def default_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def read_corpus(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"corpus file {path!r} does not exist; give a UTF-8 text file or leave corpus unset for the built-in text")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"corpus file {path!r} is not valid UTF-8 (byte {err.start}); give a UTF-8 text file") from None
    if not text:
        raise ConfigError(f"corpus file {path!r} is empty; give a UTF-8 text file with some text in it")
    return text


def category(ch: str) -> int:
    if ch.islower():
        return 0
    if ch.isupper():
        return 1
    if ch.isdigit():
        return 2
    if ch.isspace():
        return 3
    if ch.isprintable() and not ch.isalnum():
        return 4
    return 5


@register_task("chars", CharsParams)
class Chars(Task):
    """Character-level language modelling (default: Python's own documentation text)."""

    kind = "lm"
    label_name = "character category"
    num_labels = len(CATEGORIES)
    has_token_ids = True

    def __init__(self, params: CharsParams) -> None:
        self.params = params
        text = default_corpus() if params.corpus is None else read_corpus(params.corpus)
        n_val = int(len(text) * params.val_frac)
        if len(text) - n_val <= params.block_size + 1 or n_val <= params.block_size + 1:
            raise ConfigError(
                f"corpus has {len(text)} characters, too few for block_size={params.block_size} and val_frac={params.val_frac}; "
                f"give a text of at least {int((params.block_size + 2) / min(params.val_frac, 1 - params.val_frac)) + 1} characters"
            )
        self.chars = sorted(set(text))
        self.vocab_size = self.num_classes = len(self.chars)
        self.block_size = params.block_size
        index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.category_of_id = torch.tensor([category(c) for c in self.chars], dtype=torch.long)
        n_test = int(len(text) * params.test_frac)
        if n_test and (n_test <= params.block_size + 1 or len(text) - n_val - n_test <= params.block_size + 1):
            raise ConfigError(f"test_frac={params.test_frac} leaves too little text for block_size={params.block_size}; use a larger or smaller test_frac")
        train_end = len(ids) - n_val - n_test  # layout: train | test | val (val stays where it always was)
        self.data = {"train": ids[:train_end], "val": ids[len(ids) - n_val :]}
        if n_test:
            self.data["test"] = ids[train_end : len(ids) - n_val]

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        ids = self.data[split]
        starts = torch.randint(len(ids) - self.block_size - 1, (batch_size,), generator=generator)
        window = torch.stack([ids[s : s + self.block_size + 1] for s in starts.tolist()])
        inputs = window[:, :-1]
        return Batch(inputs, window[:, 1:], self.category_of_id[inputs], token_ids=inputs)

    def num_examples(self, split: str) -> int:
        return len(self.data[split])

    def subset(self, split: str, indices: Tensor) -> Chars:
        part = copy.copy(self)
        part.data = {**self.data, split: self.data[split][indices]}
        return part

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)
