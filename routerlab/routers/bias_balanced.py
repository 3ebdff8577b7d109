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
    normalize: bool = True  # weights s / sum of chosen s (else the raw sigmoid scores), at k=1 too
    score: str = "sigmoid"  # the gate option's default differs here (DeepSeek-V3)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.update_rate >= 0, f"update_rate must be >= 0, got {self.update_rate}")


@register_router("bias_balanced", BiasBalancedParams)
class BiasBalanced(GatedRouter):
    """Sigmoid scores, top-k of score + bias; bias nudged toward balance after every step."""

    finishes_weights = True  # route_topk normalizes and scales
    refuses = {"normalize_k1": "its own `normalize` already applies at every k, k=1 included"}
    cuda_graph_safe = True  # the forward reads the bias, a buffer after_step updates in place; no host reads
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def __init__(self, d_model: int, num_experts: int, params: BiasBalancedParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.register_buffer("bias", torch.zeros(num_experts + params.null_experts))

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        p = self.params
        return self.route_topk(x, p.k, p.normalize, selection_bias=self.bias, normalize_k1=p.normalize).routing

    @torch.no_grad()
    def after_step(self, stats) -> None:
        load = stats.load.to(self.bias.device, self.bias.dtype)
        if self.params.null_experts:  # null experts' load is what the real ones did not get
            null_load = stats.tokens * self.params.k - load.sum()
            load = torch.cat([load, (null_load / self.params.null_experts).reshape(1).expand(self.params.null_experts)])
        self.bias.add_(self.params.update_rate * torch.sign(load.mean() - load))
