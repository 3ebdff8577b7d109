"""MoELayer: route, dispatch (sort token-slots by expert, drop over capacity), compute, combine.

The layer knows nothing about any particular router. It keeps, for the last forward:
  stats       RoutingStats (loads, drops, entropy, logit scale) for metrics and router.after_step
  top1        [T] highest-weight expert of each token (-1 if none), for specialization and fluctuation
  aux_losses  the router's already-scaled auxiliary losses
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from routerlab.moe.experts import ExpertBank
from routerlab.moe.stats import RoutingStats, compute_stats
from routerlab.routers.base import Router


def capacity_for(num_tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Slots per expert: ceil(capacity_factor * T * k / E); None means dropless."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def dispatch(experts: Tensor, num_experts: int, capacity: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Order token-slots by expert and drop those past capacity.

    Slots are taken slot-major (all first choices before second choices), token order within, so
    capacity drops later choices and later tokens first (GShard's priority).
    Returns (slot index into experts.t().flatten() for each kept slot, grouped by expert; kept counts [E];
    token index of each kept slot).
    """
    num_tokens, k = experts.shape
    flat = experts.t().reshape(-1)
    key = torch.where(flat >= 0, flat, num_experts)  # unused slots sort last
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    routed = torch.bincount(sorted_key, minlength=num_experts + 1)
    if capacity is None:
        kept_counts = routed[:num_experts]
        keep = order[: int(kept_counts.sum())]
    else:
        starts = routed.cumsum(0) - routed
        position = torch.arange(order.numel(), device=order.device) - starts[sorted_key]
        mask = (sorted_key < num_experts) & (position < capacity)
        keep = order[mask]
        kept_counts = routed[:num_experts].clamp(max=capacity)
    return keep, kept_counts, keep % num_tokens


class MoELayer(nn.Module):
    def __init__(self, router: Router, experts: ExpertBank, capacity_factor: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
        self.router = router
        self.experts = experts
        self.capacity_factor = capacity_factor
        self.backend = backend
        self.stats: RoutingStats | None = None
        self.top1: Tensor | None = None
        self.aux_losses: dict[str, Tensor] = {}

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if token_ids is not None:
            token_ids = token_ids.reshape(-1)
        routing = self.router(x, token_ids=token_ids)
        experts, weights = routing.experts, routing.weights
        capacity = capacity_for(x.shape[0], experts.shape[1], self.experts.num_experts, self.capacity_factor)
        keep, counts, token_of_slot = dispatch(experts, self.experts.num_experts, capacity)

        y = self.experts(x[token_of_slot], counts, self.backend)
        slot_weights = weights.t().reshape(-1)[keep].to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_slot, y * slot_weights[:, None])

        kept_per_token = torch.bincount(token_of_slot, minlength=x.shape[0])
        self.stats = compute_stats(experts, routing.logits, counts, kept_per_token)
        self.top1 = experts.gather(1, weights.detach().argmax(1, keepdim=True)).squeeze(1)
        self.aux_losses = routing.aux
        return out.reshape(shape)
