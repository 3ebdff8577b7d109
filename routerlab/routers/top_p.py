"""Top-p (threshold) routing: each token takes the fewest experts whose scores reach a mass p
(Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models").

p_t = softmax(W x_t) (or the gate's `score`, normalized), sorted descending; token t takes experts 1..n_t with
n_t = min{n : sum_{j<=n} p_(j) >= threshold}, capped at k_max (and at least 1). Weights: the chosen scores,
renormalized to sum 1 when `renormalize`. Unused slots are -1 with weight 0, so the number of experts per token
varies. The paper's dynamic loss, the entropy of p_t, is the gate option `entropy` (positive coefficient
lowers the entropy, so fewer experts per token); any balance option applies. Group limit: experts outside the
token's top groups hold no mass (the token may then stop short of p); null experts count toward the mass and
take no compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class TopPParams(GateParams):
    threshold: float = 0.4  # p: cumulative score mass each token must reach
    k_max: int = 4  # at most this many experts per token (capped at E)
    renormalize: bool = True  # chosen weights sum to 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.threshold <= 1, f"threshold must be in (0, 1], got {self.threshold}")
        require(self.k_max >= 1, f"k_max must be >= 1, got {self.k_max}")


@register_router("top_p", TopPParams)
class TopP(GatedRouter):
    """Fewest experts whose scores reach mass p (1..k_max per token)."""

    finishes_weights = True  # normalized and scaled below
    cuda_graph_safe = True  # no Python state across steps, no host reads (always k_max slots, -1 where unused)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        p = self.params
        logits = self.gate_logits(x)
        scores = self.scores(logits)
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-9) if p.score != "softmax" else scores
        mask = self.group_mask(probs.detach())
        if mask is not None:  # experts outside the token's top groups hold no mass
            probs = probs.masked_fill(~mask, 0.0)
        k = min(p.k_max, self.num_experts + p.null_experts)
        top, experts = probs.topk(k, dim=-1)
        before = top.detach().cumsum(-1) - top.detach()  # mass of the better experts
        used = before < p.threshold  # the first expert always; the next while the mass is short of p
        if mask is not None:  # never past the allowed experts, even when their mass stays short of p
            used = used & mask.gather(1, experts)
        experts = torch.where(used, experts, torch.full_like(experts, -1))
        weights = torch.where(used, top, torch.zeros_like(top))
        if p.renormalize and (k > 1 or p.normalize_k1):
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        weights = weights * p.route_scale
        aux = self.stability_losses(logits, experts)
        experts, weights = self.drop_null(experts, weights)
        return Routing(experts, weights.to(x.dtype), logits[:, : self.num_experts], aux)
