"""Adversarial load balancing with per-expert prices: a min-max game between the router and an adversary.

p_t = softmax(W x_t), top-k experts as in softmax_topk. Soft load share P_e = mean_t p_{t,e}, violation
v_e = E * P_e - 1 (= soft_load_e / mean soft load - 1; the v_e sum to 0). The game:

    min_router  max_{0 <= lambda_e <= price_max}  L_task + sum_e lambda_e * v_e

The router descends through its aux loss `adversary` = sum_e lambda_e v_e (prices held fixed), so the pressure
reaches the gate through gradients. The prices ascend in `after_step` (they are a buffer, not an optimizer
parameter): lambda <- clip(lambda + price_lr * v, 0, price_max), v from the step's RoutingStats (summed over
ranks, so every rank takes the same step). The box bound is what makes the game well posed: the term is linear
in lambda, so without it the inner max is +inf whenever any expert is overloaded (docs/routers.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class AdversarialParams(GateParams):
    k: int = 2
    renormalize: bool = True  # rescale the k chosen probabilities to sum to 1
    price_lr: float = 1e-3  # ascent step of the prices per optimizer step
    price_max: float = 0.02  # upper end of the box [0, price_max] the prices are projected onto
    price_decay: float = 0.0  # rho of the regularizer -rho/2 |lambda|^2 in the adversary's objective (0 = off)
    signal: str = "soft"  # ascent direction: "soft" v_e = E P_e - 1 (the game's gradient) or "hard" load_e / mean load - 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.price_lr >= 0, f"price_lr must be >= 0, got {self.price_lr}")
        require(self.price_max > 0, f"price_max must be > 0, got {self.price_max}")
        require(self.price_decay >= 0, f"price_decay must be >= 0, got {self.price_decay}")
        require(self.price_decay * self.price_lr < 1, f"price_decay * price_lr must be < 1 (else the prices overshoot), got {self.price_decay * self.price_lr}")
        require(self.signal in ("soft", "hard"), f"signal must be 'soft' or 'hard', got {self.signal!r}")


@register_router("adversarial", AdversarialParams)
class Adversarial(GatedRouter):
    """Softmax top-k; per-expert prices (the adversary) ascend on load violation, the router descends."""

    def __init__(self, d_model: int, num_experts: int, params: AdversarialParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.register_buffer("prices", torch.zeros(num_experts))

    finishes_weights = True  # route_topk normalizes and scales
    cuda_graph_safe = True  # the forward reads the prices, a buffer after_step updates in place; no host reads
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        out = self.route_topk(x, self.params.k, self.params.renormalize)
        probs = self.balance_probs(out.logits)[:, : self.num_experts]  # softmax: the gate probabilities
        if probs.shape[0] > 0:
            violation = self.num_experts * probs.mean(0) - 1
            out.routing.aux["adversary"] = (self.prices * violation).sum()
        return out.routing

    @torch.no_grad()
    def after_step(self, stats) -> None:
        if self.params.signal == "soft" and stats.prob_sum is not None:
            violation = self.num_experts * stats.prob_sum / stats.tokens.clamp_min(1) - 1
        else:
            load = stats.load
            violation = load / load.mean().clamp_min(1e-9) - 1
        p = self.params
        grad = violation.to(self.prices.device, self.prices.dtype) - p.price_decay * self.prices
        self.prices.add_(p.price_lr * grad).clamp_(0.0, p.price_max)

    def extra_metrics(self) -> dict[str, float]:
        out = {"price_max": float(self.prices.max()), "price_mean": float(self.prices.mean())}
        out.update({f"price_e{e}": float(p) for e, p in enumerate(self.prices.tolist())})
        return out
