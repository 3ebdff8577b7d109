"""Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3).

s = sigmoid(W x). Selection: top-k of s + b, with b a per-expert bias (a buffer, not a parameter) used for
selection only. Weights from the unbiased scores of the chosen experts, normalized to sum 1:
g_te = s_te / sum_{e' chosen} s_te'. After each optimizer step: b_i += u * sign(mean_j load_j - load_i).
No aux loss (the stability options still apply to the logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class BiasBalancedParams(GateParams):
    k: int = 2
    update_rate: float = 1e-3  # u, the bias step per optimizer step
    normalize: bool = True  # weights s / sum of chosen s (else the raw sigmoid scores)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.update_rate >= 0, f"update_rate must be >= 0, got {self.update_rate}")


@register_router("bias_balanced", BiasBalancedParams)
class BiasBalanced(GatedRouter):
    """Sigmoid scores, top-k of score + bias; bias nudged toward balance after every step."""

    def __init__(self, d_model: int, num_experts: int, params: BiasBalancedParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.register_buffer("bias", torch.zeros(num_experts))

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        logits = self.gate_logits(x)
        scores = torch.sigmoid(logits)
        experts = (scores.detach() + self.bias.to(scores.dtype)).topk(self.params.k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.params.normalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        return Routing(experts, weights.to(x.dtype), logits, self.stability_losses(logits, experts))

    @torch.no_grad()
    def after_step(self, stats) -> None:
        load = stats.load.to(self.bias.device, self.bias.dtype)
        self.bias.add_(self.params.update_rate * torch.sign(load.mean() - load))
