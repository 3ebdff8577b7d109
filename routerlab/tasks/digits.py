"""`digits`: scikit-learn's bundled 8x8 digit images (1797 images, 10 classes), no download."""
from __future__ import annotations

import dataclasses

import torch

from routerlab.registry import require
from routerlab.tasks.base import ClassificationTask, TaskParams, register_task


@dataclasses.dataclass(frozen=True)
class DigitsParams(TaskParams):
    val_frac: float = 0.2
    seed: int = 0  # split seed

    def __post_init__(self) -> None:
        require(0 < self.val_frac < 1, f"val_frac must be in (0, 1), got {self.val_frac}")


@register_task("digits", DigitsParams)
class Digits(ClassificationTask):
    """scikit-learn's 8x8 handwritten digits; the specialization label is the class."""

    label_name = "class"
    num_labels = 10
    num_classes = 10
    input_dim = 64

    def __init__(self, params: DigitsParams) -> None:
        from sklearn.datasets import load_digits

        self.params = params
        bunch = load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        y = torch.tensor(bunch.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(params.seed))
        n_val = int(round(params.val_frac * len(y)))
        val, train = order[:n_val], order[n_val:]
        self.data = {"train": (x[train], y[train], y[train]), "val": (x[val], y[val], y[val])}
