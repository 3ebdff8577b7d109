"""`clusters`: K latent Gaussian clusters, each with its own nonlinear labelling function.

The ground truth for specialization: an expert per cluster can learn that cluster's function, so a
good router learns cluster -> expert. `zipf` skews cluster frequencies (p_i proportional to
1 / (i+1)^zipf), which makes unbalanced routers collapse.
"""
from __future__ import annotations

import dataclasses

import torch

from routerlab.registry import require
from routerlab.tasks.base import ClassificationTask, TaskParams, register_task


@dataclasses.dataclass(frozen=True)
class ClustersParams(TaskParams):
    num_clusters: int = 8
    input_dim: int = 32
    num_classes: int = 4
    train_size: int = 16384
    val_size: int = 2048
    test_size: int = 0  # > 0: a held-out `test` split, drawn after train and val (which stay as they were)
    spread: float = 0.5  # within-cluster std, relative to unit-norm-scaled centers
    zipf: float = 0.0
    seed: int = 0  # data seed, independent of the training seed

    def __post_init__(self) -> None:
        for name, low in (("num_clusters", 1), ("input_dim", 2), ("num_classes", 2), ("train_size", 1), ("val_size", 1), ("test_size", 0)):
            require(getattr(self, name) >= low, f"{name} must be >= {low}, got {getattr(self, name)}")
        require(self.spread > 0, f"spread must be > 0, got {self.spread}")
        require(self.zipf >= 0, f"zipf must be >= 0, got {self.zipf}")


@register_task("clusters", ClustersParams)
class Clusters(ClassificationTask):
    """Synthetic classification from K latent clusters with per-cluster labelling functions."""

    label_name = "cluster"

    def __init__(self, params: ClustersParams) -> None:
        self.params = params
        self.num_labels = params.num_clusters
        self.num_classes = params.num_classes
        self.input_dim = params.input_dim
        g = torch.Generator().manual_seed(params.seed)
        K, d, C, hidden = params.num_clusters, params.input_dim, params.num_classes, 16
        self.centers = torch.randn(K, d, generator=g) * 2.0
        self.w1 = torch.randn(K, d, hidden, generator=g)
        self.w2 = torch.randn(K, hidden, C, generator=g)
        freq = 1.0 / torch.arange(1, K + 1, dtype=torch.float64) ** params.zipf
        self.cluster_probs = (freq / freq.sum()).float()
        self.data = {"train": self._make(params.train_size, g), "val": self._make(params.val_size, g)}
        if params.test_size:
            self.data["test"] = self._make(params.test_size, g)

    def _make(self, n: int, g: torch.Generator):
        cluster = torch.multinomial(self.cluster_probs, n, replacement=True, generator=g)
        offset = torch.randn(n, self.input_dim, generator=g) * self.params.spread
        x = self.centers[cluster] + offset
        hidden = torch.tanh(torch.einsum("nd,ndh->nh", offset, self.w1[cluster]))
        y = torch.einsum("nh,nhc->nc", hidden, self.w2[cluster]).argmax(-1)
        return x, y, cluster
