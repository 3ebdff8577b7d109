"""Softmax top-k gating: p = softmax(W x), the k largest p_i chosen (Shazeer et al. 2017, without noise)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class SoftmaxTopKParams(GateParams):
    k: int = 2
    renormalize: bool = True  # rescale the k chosen probabilities to sum to 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")


@register_router("softmax_topk", SoftmaxTopKParams)
class SoftmaxTopK(GatedRouter):
    """Softmax over experts, top-k; weights are the chosen probabilities."""

    finishes_weights = True  # route_topk normalizes and scales
    cuda_graph_safe = True  # no Python state across steps, no host reads: train.cuda_graph may replay it (step_graph.py)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        return self.route_topk(x, self.params.k, self.params.renormalize).routing
