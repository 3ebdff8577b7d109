"""Switch Transformer routing (Fedus et al. 2021): top-1 with the balance loss alpha * E * sum_i f_i P_i."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from routerlab.routers.base import Routing, switch_balance_loss, topk_routing
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

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        logits = self.gate_logits(x)
        probs = logits.softmax(-1)
        experts, weights = topk_routing(probs, 1, renormalize=False)
        aux = self.stability_losses(logits)
        if self.params.alpha > 0:
            aux["balance"] = self.params.alpha * switch_balance_loss(probs, experts, self.num_experts)
        return Routing(experts, weights.to(x.dtype), logits, aux)
