"""Random routing: k distinct experts drawn uniformly for every token at every step (a baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require


@dataclass(frozen=True)
class RandomParams(RouterParams):
    k: int = 2

    def __post_init__(self) -> None:
        require(self.k >= 1, f"k must be >= 1, got {self.k}")


@register_router("random", RandomParams)
class RandomRouter(Router):
    """Uniformly random k distinct experts per token, weight 1/k."""

    cuda_graph_safe = True  # no Python state across steps, no host reads; torch.rand draws on the device

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        k = self.params.k
        experts = torch.rand(x.shape[0], self.num_experts, device=x.device).topk(k, dim=-1).indices
        return Routing(experts, torch.full(experts.shape, 1.0 / k, dtype=x.dtype, device=x.device))
