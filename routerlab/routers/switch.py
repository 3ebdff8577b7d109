"""Switch Transformer routing (Fedus et al. 2021): top-1 with the balance loss alpha * E * sum_i f_i P_i."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from routerlab.routers.base import Routing, switch_balance_loss
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class SwitchParams(GateParams):
    alpha: float = 1e-2  # balance loss coefficient

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")


@register_router("switch", SwitchParams)
class Switch(GatedRouter):
    """Top-1 expert, weight = its softmax probability, Switch balance loss."""

    finishes_weights = True  # route_topk normalizes and scales
    cuda_graph_safe = True  # no Python state across steps, no host reads: train.cuda_graph may replay it (step_graph.py)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        out = self.route_topk(x, 1, renormalize=True)  # renormalizing one weight happens only with normalize_k1
        if self.params.alpha > 0:
            probs = out.scores if self.params.score == "softmax" else self.balance_probs(out.logits)
            out.routing.aux["balance"] = self.params.alpha * switch_balance_loss(probs, out.chosen, probs.shape[-1])
        return out.routing
