"""GShard top-2 gating (Lepikhin et al. 2020).

g = softmax(W x); e1, e2 = the two largest; g1, g2 renormalized to g1 + g2 = 1.
Random routing: in training the second expert is used with probability min(1, 2 * g2) (always at evaluation
unless `random_routing_eval`). Group-level capacity: tokens are cut into G groups (in order) and each expert
takes at most ceil(capacity_factor * (T/G) * 2 / E) slots per group (GShard's 2N/(G E) with the default
factor 1; the core's meaning of capacity_factor: a multiple of the balanced share T k / E, here k = 2),
first choices before second choices, earlier tokens first; slots over capacity are marked unused (-1).
Aux loss: alpha * E * sum_e f_e P_e per group, f from first choices (GShard's c_e / S), averaged over groups.
The top-2 goes through the gate's `route_topk`, so `score`, the group limit, null experts and route_scale apply
(the random-routing probability uses the normalized g2, before route_scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Routing, switch_balance_loss
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class GShardTop2Params(GateParams):
    alpha: float = 1e-2  # GShard aux loss coefficient
    groups: int = 1  # G: capacity and aux loss are computed per group of consecutive tokens
    capacity_factor: float | None = 1.0  # per-group expert capacity ceil(cf * (T/G) * 2 / E); None = no router-level capacity
    random_routing: bool = True  # drop the second expert with probability 1 - min(1, 2 g2) in training
    random_routing_eval: bool = False  # also at evaluation (default: keep both experts at evaluation)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")
        require(self.groups >= 1, f"groups must be >= 1, got {self.groups}")
        require(self.capacity_factor is None or self.capacity_factor > 0,
                f"capacity_factor must be > 0, or null for no router-level capacity, got {self.capacity_factor}")


@register_router("gshard_top2", GShardTop2Params)
class GShardTop2(GatedRouter):
    """Top-2 with GShard random routing of the second expert, group-level capacity and aux loss."""

    finishes_weights = True  # route_topk normalizes and scales
    cuda_graph_safe = True  # no Python state across steps, no host reads (random routing draws on the device, capacity scatters)
    refuses = {"normalize_k1": "top-2 by definition: its weights are normalized over the two choices (GShard)"}

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        p = self.params
        E = self.num_experts
        out = self.route_topk(x, min(2, E), renormalize=True)
        experts, weights = out.routing.experts.clone(), out.routing.weights
        if experts.shape[1] == 2 and p.random_routing and (self.training or p.random_routing_eval):
            g2 = weights[:, 1].detach().float() / p.route_scale
            use_second = torch.rand_like(g2) < (2 * g2).clamp(max=1.0)
            experts[:, 1] = torch.where(use_second, experts[:, 1], torch.full_like(experts[:, 1], -1))
        T = x.shape[0]
        G = max(1, min(p.groups, T))
        bounds = [(g * T) // G for g in range(G + 1)]
        aux = out.routing.aux
        probs = out.scores if p.score == "softmax" else self.balance_probs(out.logits)
        first = out.chosen[:, :1]  # GShard's c_e counts first choices, before capacity
        balance = []
        for g in range(G):
            lo, hi = bounds[g], bounds[g + 1]
            if hi == lo:
                continue
            if p.capacity_factor is not None:
                capacity = math.ceil(p.capacity_factor * (hi - lo) * 2 / E)
                experts[lo:hi] = _apply_capacity(experts[lo:hi], E, capacity)
            if p.alpha > 0 and self.training:
                balance.append(switch_balance_loss(probs[lo:hi], first[lo:hi], probs.shape[-1]))
        if balance:
            aux["balance"] = p.alpha * torch.stack(balance).mean()
        weights = torch.where(experts >= 0, weights, torch.zeros_like(weights))
        return Routing(experts, weights.to(x.dtype), out.routing.logits, aux)


def _apply_capacity(experts: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Mark slots past `capacity` per expert as -1; first choices before second ones, token order within."""
    flat = experts.t().reshape(-1)
    valid = flat >= 0
    # one row per expert, slots along it: a scatter, not onehot[flat[valid], valid] = 1 (boolean-mask indexing waits on
    # the host on CUDA; an unused slot writes its 0 into row 0), and the running count along the contiguous last dim
    # (on CUDA a cumulative sum down the first dim of [slots, E] runs each column's T*k steps one after another)
    onehot = torch.zeros(num_experts, flat.numel(), dtype=torch.long, device=flat.device)
    onehot.scatter_(0, flat.clamp_min(0)[None, :], valid[None, :].long())
    position = onehot.cumsum(1).gather(0, flat.clamp_min(0)[None, :]).squeeze(0) - 1
    flat = torch.where(valid & (position < capacity), flat, torch.full_like(flat, -1))
    return flat.view(experts.shape[1], -1).t()
