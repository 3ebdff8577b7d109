"""ReLU routing (Wang et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing").

w_t = ReLU(W x_t): a token uses every expert with a positive gate (0..E of them, no top-k), and the gates are
the combine weights (no normalization). Sparsity is steered by an adaptive L1 penalty
    L_reg = lambda_i * (1/T) sum_t sum_e w_{t,e}        (the load-balanced variant: weighted by E f_e)
with lambda updated after every step toward the target sparsity 1 - k/E:
    lambda_{i+1} = lambda_i * alpha^{sign((1 - k/E) - S_i)},   S_i = fraction of zero gates in the step.
So the mean number of experts per token follows `k` on average, while each token's own count varies.
Selection options: the group limit zeroes the gates outside the token's top groups (ranked by their best two
gates); route_scale scales the weights. `score`, normalize_k1 and null experts are refused (see `refuses`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class ReLUParams(GateParams):
    k: float = 2.0  # target mean experts per token (sparsity 1 - k/E)
    l1_init: float = 1e-8  # lambda_0
    l1_step: float = 1.2  # alpha > 1: the multiplicative update of lambda
    balanced_l1: bool = True  # weight the L1 term of expert e by E f_e (ReMoE's load-balanced regularizer)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k > 0, f"k must be > 0, got {self.k}")
        require(self.l1_init > 0, f"l1_init must be > 0, got {self.l1_init}")
        require(self.l1_step > 1, f"l1_step must be > 1, got {self.l1_step}")


@register_router("relu", ReLUParams)
class ReLURouter(GatedRouter):
    """ReLU gates, 0..E experts per token; an adaptive L1 penalty holds the mean count near k."""

    refuses = {"score": "ReLU is this router's score function (ReMoE)",
               "normalize_k1": "ReMoE's gates are the combine weights, unnormalized at every k",
               "null_experts": "a token whose ReLU gates are all zero already uses no expert"}

    def __init__(self, d_model: int, num_experts: int, params: ReLUParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.register_buffer("l1_coef", torch.tensor(float(params.l1_init)))

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        p = self.params
        logits = self.gate_logits(x)
        gates = torch.relu(logits)
        mask = self.group_mask(gates.detach())
        if mask is not None:
            gates = gates.masked_fill(~mask, 0.0)
        used = gates > 0
        kk = max(1, int(used.sum(1).max())) if x.shape[0] else 1
        order = torch.where(used, gates.detach(), torch.full_like(gates, -1.0)).argsort(dim=1, descending=True, stable=True)[:, :kk]
        chosen = used.gather(1, order)
        experts = torch.where(chosen, order, torch.full_like(order, -1))
        weights = torch.where(chosen, gates.gather(1, order), torch.zeros_like(gates[:, :kk]))
        aux = self.stability_losses(logits, experts)
        if self.training and x.shape[0] > 0:
            per_expert = gates.float().mean(0)  # (1/T) sum_t w_{t,e}
            if p.balanced_l1:
                f = used.float().mean(0) / used.float().mean(0).sum().clamp_min(1e-9)
                per_expert = per_expert * (self.num_experts * f).detach()
            aux["l1"] = self.l1_coef * per_expert.sum()
        return Routing(experts, weights.to(x.dtype), logits, aux)

    @torch.no_grad()
    def after_step(self, stats) -> None:
        sparsity = 1 - float(stats.load.sum()) / max(float(stats.tokens) * self.num_experts, 1.0)
        target = 1 - self.params.k / self.num_experts
        self.l1_coef.mul_(self.params.l1_step if sparsity < target else 1 / self.params.l1_step)

    def extra_metrics(self) -> dict[str, float]:
        return {"l1_coef": float(self.l1_coef)}
