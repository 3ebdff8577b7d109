"""Quantile balancing: expert prices from the dual of the balanced assignment problem, no loss coefficient.

The balanced top-k assignment of a batch is the linear program
    max sum_{t,e} s_{t,e} x_{t,e}   s.t.  sum_e x_{t,e} = k (every token),  sum_t x_{t,e} <= C (every expert),
with C = ceil(capacity * T k / E). Its dual has one price q_e >= 0 per expert, and the routing is top-k of
s_t - q. Dual coordinate descent: holding the other prices, expert e's best price lets exactly C tokens choose it.
Token t chooses e iff s_{t,e} - q_e > r_{t,e}, r_{t,e} = the k-th largest s_{t,e'} - q_{e'} over e' != e, so
    q_e = max(0, a value between the C-th and (C+1)-th largest of s_{t,e} - r_{t,e} over tokens)
(a quantile of the margins: hence the name; the midpoint, so no token ties with the price)
`sweeps` sweeps over the experts per training forward (default 2), warm-started from the previous prices; the
prices are a buffer, and evaluation routes with the stored prices, or with their EMA over training steps
(`eval_ema`); a token's routing then depends on it alone: causal at evaluation (in training the prices come
from the batch, like BASE layers).
Combine weights are the unbiased scores of the chosen experts, so the gate learns through them; there is
no balance loss and no coefficient (the balance options of the gate still apply). Megatron-Core calls
its version of this quantile balancing (`qb_dual_update`); the BIP-based balancing of Sun et al. 2024
solves the same dual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class QuantileBalancedParams(GateParams):
    k: int = 1
    renormalize: bool = True  # chosen weights sum to 1 (at k > 1)
    capacity: float = 1.0  # C = ceil(capacity * T k / E) slots per expert in the batch's assignment problem
    sweeps: int = 2  # coordinate-descent sweeps over the experts per training forward (warm-started)
    eval_ema: float = 0.0  # evaluation routes with an EMA (this decay) of the batch prices; 0 = the last batch's

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.capacity >= 1, f"capacity must be >= 1 (1 = exactly balanced), got {self.capacity}")
        require(self.sweeps >= 1, f"sweeps must be >= 1, got {self.sweeps}")
        require(0 <= self.eval_ema < 1, f"eval_ema must be in [0, 1), got {self.eval_ema}")


@torch.no_grad()
def dual_prices(scores: Tensor, prices: Tensor, k: int, capacity: int, sweeps: int = 1) -> Tensor:
    """Coordinate descent on the expert prices q of the balanced assignment dual (see the module doc)."""
    T, E = scores.shape
    q = prices.clone()
    if T <= capacity or k >= E:
        return q.zero_()
    for _ in range(sweeps):
        for e in range(E):
            adjusted = scores - q
            adjusted[:, e] = float("-inf")
            rival = adjusted.topk(k, dim=-1).values[:, -1]  # the k-th best other expert
            margin = scores[:, e] - rival
            top = margin.topk(capacity + 1).values
            q[e] = (0.5 * (top[-2] + top[-1])).clamp_min(0)  # between the C-th and (C+1)-th: no ties at the price
    return q


@register_router("quantile_balanced", QuantileBalancedParams)
class QuantileBalanced(GatedRouter):
    """Top-k of score - price; the prices solve the batch's balanced-assignment dual (no coefficient)."""

    finishes_weights = True  # route_topk normalizes and scales
    refuses = {"null_experts": "the assignment problem gives every expert the capacity C; a null expert has no compute to "
                               "bound, so its price would only ration skipping"}
    # the prices are buffers the forward updates in place (dual_prices: E fixed-size sweeps on the device); no host reads
    cuda_graph_safe = True

    def __init__(self, d_model: int, num_experts: int, params: QuantileBalancedParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.register_buffer("prices", torch.zeros(num_experts))
        self.register_buffer("eval_prices", torch.zeros(num_experts))

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        p = self.params
        logits = self.gate_logits(x)
        if self.training and x.shape[0] > 0:
            with torch.no_grad():
                scores = self.scores(logits.detach()).float()  # the same scores route_topk selects on
                C = math.ceil(p.capacity * x.shape[0] * p.k / self.num_experts)
                self.prices.copy_(dual_prices(scores, self.prices.float(), p.k, C, p.sweeps))
                self.eval_prices.mul_(p.eval_ema).add_((1 - p.eval_ema) * self.prices)
        prices = self.prices if self.training else self.eval_prices
        return self.route_topk(x, p.k, p.renormalize, selection_bias=-prices, logits=logits).routing

    def extra_metrics(self) -> dict[str, float]:
        return {"price_max": float(self.prices.max()), "price_mean": float(self.prices.mean())}
