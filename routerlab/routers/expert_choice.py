"""Expert-choice routing (Zhou et al. 2022): experts pick tokens, not the other way round.

S = softmax(W x) over experts, [T, E]. Each expert e takes the C = ceil(c * T / E) tokens with the largest
S[:, e] (capacity factor c, default 2), with weight S[t, e]. A token may be taken by several experts or by
none (it then passes through the residual). Perfect load balance by construction, no aux loss.

Selection options: `score` replaces the softmax; with a group limit an expert may take only tokens whose top
groups hold it; route_scale scales the weights.

Not causal: whether a token is taken depends on the scores of every other token in the batch, later ones
included. The trainer refuses it for the causal LM unless `allow_noncausal=true`.
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
class ExpertChoiceParams(GateParams):
    capacity_factor: float = 2.0  # c: each expert takes ceil(c * T / E) tokens (capped at T)
    allow_noncausal: bool = False  # opt in to using this non-causal router on a causal LM

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.capacity_factor > 0, f"capacity_factor must be > 0, got {self.capacity_factor}")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens / num_experts)))


@register_router("expert_choice", ExpertChoiceParams)
class ExpertChoice(GatedRouter):
    """Each expert takes its top ceil(c*T/E) tokens by softmax score; tokens get 0..E experts. Not causal."""

    causal = False
    refuses = {"normalize_k1": "experts choose tokens: a token's weights are its scores for the experts that took it, with "
                               "no top-k to normalize over",
               "null_experts": "experts choose tokens; a token taken by no expert already skips the layer"}

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        logits = self.gate_logits(x)
        scores = self.scores(logits)
        if T == 0:
            empty = torch.zeros(0, 1, dtype=torch.long, device=x.device)
            return Routing(empty, x.new_zeros(0, 1), logits, {})
        capacity = expert_capacity(T, E, self.params.capacity_factor)
        select = scores.detach()
        mask = self.group_mask(select)
        if mask is not None:
            select = select.masked_fill(~mask, float("-inf"))
        chosen = select.topk(capacity, dim=0).indices  # [C, E] token indices per expert
        taken = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        taken.scatter_(0, chosen, True)
        if mask is not None:  # an expert with fewer allowed tokens than its capacity takes only those
            taken &= mask
        # token-major layout: each row lists the experts that took the token, then -1 padding
        k = max(1, int(taken.sum(1).max()))
        order = taken.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]
        used = taken.gather(1, order)
        experts = torch.where(used, order, torch.full_like(order, -1))
        weights = torch.where(used, scores.gather(1, order), torch.zeros_like(scores[:, :k]))
        return Routing(experts, weights.to(x.dtype), logits, self.stability_losses(logits, experts))
