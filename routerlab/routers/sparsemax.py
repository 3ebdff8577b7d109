"""Sparsemax gating (Martins & Astudillo 2016), capped at k_max experts per token.

sparsemax(z) = argmin_{p in simplex} ||p - z||^2 = [z - tau(z)]_+, tau such that the result sums to 1.
The cap: sparsemax is taken over each token's k_max largest logits only (so at most k_max experts, weights
still sum to 1, and exact zeros mark unused slots: expert -1, weight 0). The number of experts per token
varies from 1 to k_max. Differentiable (autograd through tau with the support held fixed is the exact
sparsemax Jacobian). Aux loss: alpha * E * sum_i f_i P_i with P the mean sparse gate.
Selection options: the group limit leaves only the token's top groups' logits to the sparse map; null experts
are extra gate outputs whose slots are unused; route_scale scales the weights. `score` and normalize_k1 are
refused: the sparse map is the score function, and its weights sum to 1 for every token already.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Routing, switch_balance_loss
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


def sparsemax(z: Tensor) -> Tensor:
    """Sparsemax over the last dim."""
    zs, _ = z.sort(dim=-1, descending=True)
    ks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cssv = zs.cumsum(-1) - 1
    support = (zs * ks > cssv).to(z.dtype)  # prefix of the sorted values
    size = support.sum(-1, keepdim=True)
    tau = (cssv.gather(-1, size.long() - 1)) / size
    return (z - tau).clamp_min(0)


def entmax15(z: Tensor) -> Tensor:
    """1.5-entmax over the last dim (Peters et al. 2019, exact sort-based algorithm)."""
    z = z / 2
    zs, _ = z.sort(dim=-1, descending=True)
    ks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    mean = zs.cumsum(-1) / ks
    mean_sq = (zs.square()).cumsum(-1) / ks
    ss = ks * (mean_sq - mean.square())
    delta = (1 - ss) / ks
    tau = mean - delta.clamp_min(0).sqrt()
    size = (tau <= zs).sum(-1, keepdim=True)
    tau_star = tau.gather(-1, size - 1)
    return (z - tau_star).clamp_min(0).square()


@dataclass(frozen=True)
class SparseGateParams(GateParams):
    k_max: int = 4  # at most this many experts per token (capped at E)
    alpha: float = 1e-2  # balance loss coefficient

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k_max >= 1, f"k_max must be >= 1, got {self.k_max}")
        require(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")


class SparseGate(GatedRouter):
    """Shared body of sparsemax / entmax15: a sparse map over the k_max largest logits."""

    transform = staticmethod(sparsemax)
    refuses = {"score": "the sparse map (sparsemax, 1.5-entmax) is this router's score function",
               "normalize_k1": "the sparse map's weights sum to 1 for every token, one expert included"}

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        E = self.num_experts
        logits = self.gate_logits(x)
        routed = logits
        mask = self.group_mask(logits.detach())
        if mask is not None:  # far below any threshold tau: exact zeros outside the top groups (finite, so no NaN)
            routed = logits.masked_fill(~mask, -1e4)
        k = min(self.params.k_max, logits.shape[-1])
        top, experts = routed.topk(k, dim=-1)
        gates = self.transform(top.float())
        used = gates > 0
        experts = torch.where(used, experts, torch.full_like(experts, -1))
        weights = torch.where(used, gates, torch.zeros_like(gates))
        aux = self.stability_losses(logits, experts)
        experts, weights = self.drop_null(experts, weights)
        if self.params.alpha > 0 and self.training:
            dense = torch.zeros(logits.shape[0], E, dtype=gates.dtype, device=gates.device).scatter_add(1, experts.clamp_min(0), weights)
            aux["balance"] = self.params.alpha * switch_balance_loss(dense, experts, E)
        return Routing(experts, weights.to(x.dtype), logits[:, :E], aux)


@register_router("sparsemax", SparseGateParams)
class Sparsemax(SparseGate):
    """Sparsemax over the k_max largest logits: 1..k_max experts per token, exact zeros."""

    cuda_graph_safe = True  # no Python state across steps, no host reads (always k_max slots, -1 where unused)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    transform = staticmethod(sparsemax)
