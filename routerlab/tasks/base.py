"""The task contract and registry. A task makes batches; it never downloads anything.

Every batch carries, besides inputs and targets, the token ids the MoE layers may hash on (or None)
and a `labels` tensor: one label per MoE token, used for the specialization metric
(cluster id, class, or character category).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from routerlab.errors import ConfigError
from routerlab.routers.registry import format_validation_error


class TaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Batch:
    inputs: Tensor  # float [B, d_in] (classification) or long [B, L] (language modelling)
    targets: Tensor  # long [B] or [B, L]
    labels: Tensor  # long, one specialization label per MoE token ([B] or [B, L])
    token_ids: Tensor | None = None  # long, one id per MoE token, or None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move to device; float inputs also take the model's dtype (ids and labels stay integers)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        inputs = self.inputs.to(device, dtype) if dtype is not None and self.inputs.is_floating_point() else move(self.inputs)
        return Batch(inputs, move(self.targets), move(self.labels), move(self.token_ids))

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
    """Base class. Subclasses fill the attributes below and implement `batch`."""

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

    def restrict(self, split: str, indices: Tensor) -> None:
        """Keep only these examples of a split (federated partitions)."""
        self.data[split] = tuple(t[indices] for t in self.data[split])


_TASKS: dict[str, tuple[Callable[..., Task], type[TaskParams]]] = {}


def register_task(name: str, params: type[TaskParams] = TaskParams):
    def decorate(cls):
        _TASKS[name] = (cls, params)
        cls.name = name
        return cls

    return decorate


def _discover() -> None:
    from routerlab.tasks import chars, clusters, digits, owndata, stdlib  # noqa: F401  (registration side effect)


def task_names() -> list[str]:
    _discover()
    return sorted(_TASKS)


def task_entry(name: str):
    _discover()
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def parse_task_params(spec: dict[str, Any]) -> TaskParams:
    spec = dict(spec)
    name = spec.pop("name", None)
    if name is None:
        raise ConfigError(f"task needs a 'name'; valid tasks: {', '.join(task_names())}")
    _, params_model = task_entry(name)
    unknown = set(spec) - set(params_model.model_fields)
    if unknown:
        valid = ", ".join(sorted(params_model.model_fields)) or "(none)"
        raise ConfigError(f"task {name!r} has no parameter {', '.join(sorted(unknown))}; valid: {valid}")
    try:
        return params_model(**spec)
    except ValidationError as err:
        raise ConfigError(f"task {name!r}: {format_validation_error(err)}") from None


def build_task(spec: dict[str, Any]) -> Task:
    params = parse_task_params(spec)
    cls, _ = task_entry(spec["name"])
    return cls(params)


def describe_tasks() -> list[tuple[str, str, dict[str, Any]]]:
    rows = []
    for name in task_names():
        cls, params_model = _TASKS[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        rows.append((name, doc, {f: "(required)" if info.is_required() else info.default for f, info in params_model.model_fields.items()}))
    return rows
