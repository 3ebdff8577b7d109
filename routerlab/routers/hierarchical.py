"""Hierarchical mixture of experts (Jordan & Jacobs 1994; the two-level gating of Shazeer et al. 2017).

E experts in G groups of m = E/G. A primary gate chooses groups, a secondary gate an expert inside each:
p(g | x) = softmax(U x)_g,  p(e | g, x) = softmax over e in g of (W x)_e,  weight(x, e) = p(g | x) p(e | g, x).
The top k_groups groups are taken, and the top k experts inside each (k_groups * k slots); weights are the
products, not renormalized. Routing logits are the joint log-probabilities log p(g) + log p(e | g).
Aux loss: alpha * E * sum_e f_e P_e on the joint distribution. Temperature divides both gates' logits;
the z-loss is the sum of both gates' z-losses; smoothing acts on the joint distribution. Of the selection
options only route_scale applies (see `refuses`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from routerlab.errors import ConfigError
from routerlab.routers.base import Routing, switch_balance_loss, z_loss
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class HierarchicalParams(GateParams):
    groups: int = 2  # G, must divide the number of experts
    k_groups: int = 1  # groups chosen per token
    k: int = 1  # experts chosen inside each chosen group
    alpha: float = 1e-2  # balance loss coefficient

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.groups >= 1, f"groups must be >= 1, got {self.groups}")
        require(1 <= self.k_groups <= self.groups, f"k_groups must be in [1, groups={self.groups}], got {self.k_groups}")
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")


@register_router("hierarchical", HierarchicalParams)
class Hierarchical(GatedRouter):
    """Group gate x expert-in-group gate; weight = product of the two gates."""

    refuses = {"score": "its weights are a product of two softmax gates, p(g) p(e|g); another score has no such product",
               "normalize_k1": "its weights p(g) p(e|g) are not normalized over the chosen experts at any k",
               "expert_groups": "it is group-limited by construction: use its own groups and k_groups",
               "top_groups": "it is group-limited by construction: use its own groups and k_groups",
               "null_experts": "its two gates are distributions over the E real experts"}
    cuda_graph_safe = True  # no Python state across steps, no host reads: train.cuda_graph may replay it (step_graph.py)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def __init__(self, d_model: int, num_experts: int, params: HierarchicalParams) -> None:
        if num_experts % params.groups:
            raise ConfigError(f"router 'hierarchical': groups={params.groups} must divide num_experts={num_experts}")
        if params.k > num_experts // params.groups:
            raise ConfigError(f"router 'hierarchical': k={params.k} is larger than the group size {num_experts // params.groups}")
        super().__init__(d_model, num_experts, params)
        self.group_gate = nn.Linear(d_model, params.groups, bias=False)

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        p = self.params
        T, G = x.shape[0], p.groups
        m = self.num_experts // G
        group_logits = self.apply_temperature(self.raw_logits(x, self.group_gate))
        expert_logits = self.apply_temperature(self.raw_logits(x)).view(T, G, m)
        joint = group_logits.log_softmax(-1)[:, :, None] + expert_logits.log_softmax(-1)
        logits = self.apply_smoothing(joint.reshape(T, self.num_experts))
        probs = logits.softmax(-1).view(T, G, m)
        group_gate = probs.sum(-1)  # [T, G]
        expert_gate = probs / group_gate[:, :, None].clamp_min(1e-30)  # [T, G, m]
        g_w, g_idx = group_gate.topk(p.k_groups, dim=-1)  # [T, kg]
        e_w, e_idx = expert_gate.gather(1, g_idx[:, :, None].expand(T, p.k_groups, m)).topk(p.k, dim=-1)  # [T, kg, k]
        experts = (g_idx[:, :, None] * m + e_idx).reshape(T, -1)
        weights = (g_w[:, :, None] * e_w).reshape(T, -1)
        aux = self.stability_losses(logits, experts)
        if p.z_loss > 0:
            aux["z_loss"] = p.z_loss * (z_loss(group_logits) + z_loss(expert_logits.reshape(T * G, m)))
        if p.alpha > 0 and self.training:
            aux["balance"] = p.alpha * switch_balance_loss(probs.reshape(T, -1), experts, self.num_experts)
        return Routing(experts, weights.to(x.dtype), logits, aux)
