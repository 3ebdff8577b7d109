"""The task contract and registry. A task makes batches; it never downloads anything.

Tasks are one file each in this package, registered with `@register_task(name, Params)` (a frozen
dataclass, the parameter style of every component kind) and found automatically (`routerlab.registry`).

Every batch carries, besides inputs and targets, the token ids the MoE layers may hash on (or None)
and a `labels` tensor: one label per MoE token, used for the specialization metric
(cluster id, class, or character category).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from routerlab.registry import Params, Registry, Spec

@dataclasses.dataclass(frozen=True)
class TaskParams(Params):
    """Parameters of a task: subclass as a frozen dataclass, every field with a default; range checks in
    `__post_init__` with `routerlab.registry.require`."""


TASKS = Registry("task", package="routerlab.tasks", skip=("base",), params=TaskParams, name_attribute="name")


@dataclass
class Batch:
    inputs: Tensor  # float [B, d_in] (classification) or long [B, L] (language modelling)
    targets: Tensor  # long [B] or [B, L]
    labels: Tensor  # long, one specialization label per MoE token ([B] or [B, L])
    token_ids: Tensor | None = None  # long, one id per MoE token, or None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> Batch:
        """Move to device; float inputs also take the model's dtype (ids and labels stay integers). A tensor that
        is two fields (an LM's inputs are its token ids) is moved once. non_blocking: from pinned memory, the copy
        runs asynchronously (routerlab/prefetch.py)."""
        inputs = self.inputs.to(device, dtype, non_blocking=non_blocking) if dtype is not None and self.inputs.is_floating_point() else None
        return self._map(lambda t: t.to(device, non_blocking=non_blocking), inputs)

    def pin_memory(self) -> Batch:
        """A contiguous copy in page-locked host memory (CUDA only), so that a non-blocking copy to the GPU does not
        wait. Contiguous: the copy of a strided view (an LM's inputs and targets are windows of one tensor) would
        first go through a temporary in pageable memory, and wait."""
        return self._map(lambda t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t))

    def _map(self, fn, inputs: Tensor | None = None) -> Batch:
        """fn applied to every field, once per distinct tensor (inputs: a result given for the inputs already)."""
        done: dict[int, Tensor] = {} if inputs is None else {id(self.inputs): inputs}

        def once(t: Tensor | None) -> Tensor | None:
            if t is not None and id(t) not in done:
                done[id(t)] = fn(t)
            return None if t is None else done[id(t)]

        return Batch(once(self.inputs), once(self.targets), once(self.labels), once(self.token_ids))

    def chunks(self, n: int) -> list[Batch]:
        """n micro-batches along the batch dimension (equal when n divides the batch)."""
        if n == 1:
            return [self]
        parts = [t.tensor_split(n) if t is not None else [None] * n for t in (self.inputs, self.targets, self.labels, self.token_ids)]
        return [Batch(*fields) for fields in zip(*parts) if fields[0].shape[0] > 0]

    @property
    def num_tokens(self) -> int:
        return self.labels.numel()


class Task:
    """Base class. Subclasses fill the attributes below and implement `batch`, `num_examples`, `subset`.

    The protocol apps use (trainer, federated clients, RL environments, studies); nothing else:
      kind                      "classification" (one target per example) or "lm" (a target per token)
      batch(split, n, generator) a Batch drawn from split ("train", "val")
      num_examples(split)       examples in split (tokens of the text for a language model)
      subset(split, indices)    a copy whose split holds only those examples; the task itself is untouched
    """

    name: str = ""
    kind: Literal["classification", "lm"] = "classification"
    label_name: str = "class"  # what the specialization label is
    num_labels: int = 1  # number of distinct specialization labels
    num_classes: int = 0  # output size (vocabulary size for LM)
    input_dim: int = 0  # feature size (classification)
    vocab_size: int = 0  # LM vocabulary
    block_size: int = 0  # LM context length
    has_token_ids: bool = False

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:  # pragma: no cover
        raise NotImplementedError

    def num_examples(self, split: str) -> int:  # pragma: no cover
        raise NotImplementedError

    def subset(self, split: str, indices: Tensor) -> Task:  # pragma: no cover
        raise NotImplementedError

    def data_info(self) -> dict:
        """What a run records about its data (corpus tasks: data_checksum, token counts, unigram entropy)."""
        return {}

    def describe(self) -> str:
        return self.__class__.__doc__.strip().splitlines()[0] if self.__doc__ else ""


class ClassificationTask(Task):
    """A task held as tensors: `self.data[split] = (inputs, targets, labels)`."""

    data: dict[str, tuple[Tensor, Tensor, Tensor]]

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        inputs, targets, labels = self.data[split]
        idx = torch.randint(len(targets), (batch_size,), generator=generator)
        return Batch(inputs[idx], targets[idx], labels[idx])

    def num_examples(self, split: str) -> int:
        return len(self.data[split][1])

    def examples(self, split: str) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, targets, labels) of every example of split."""
        return self.data[split]

    def subset(self, split: str, indices: Tensor) -> ClassificationTask:
        part = copy.copy(self)
        part.data = dict(self.data)
        part.restrict(split, indices)
        return part

    def restrict(self, split: str, indices: Tensor) -> None:
        """Keep only these examples of a split, in place (federated partitions)."""
        self.data[split] = tuple(t[indices] for t in self.data[split])


register_task = TASKS.register
"""Class decorator: `@register_task("my_task", MyParams)`; the class is built as `cls(params)`."""


def task_names() -> list[str]:
    return TASKS.names()


def task_entry(name: str):
    """(task class, parameter dataclass) of a registered task."""
    return TASKS.entry(name)


def parse_task(spec: Mapping[str, Any] | Spec) -> Spec:
    return TASKS.parse(spec)


def parse_task_params(spec: Mapping[str, Any] | Spec) -> TaskParams:
    return TASKS.parse(spec).params


def build_task(spec: Mapping[str, Any] | Spec) -> Task:
    return TASKS.build(spec)


def describe_tasks() -> list[tuple[str, str, dict[str, Any]]]:
    return TASKS.describe()
