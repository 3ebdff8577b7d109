"""BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models").

Score s_te = x_t . w_e. Training: a balanced linear assignment, every expert gets T/E tokens (floor or ceil
when E does not divide T) and the total score sum_t s_{t,a(t)} is maximal, solved by an auction algorithm
(epsilon-optimal, epsilon = rel_eps * score range; routerlab/routers/assignment.py). Evaluation: greedy top-1.
Weight sigmoid(s_{t,a(t)}) as in the paper (the expert output is scaled by it and added to the residual).
No aux loss. Selection options: `score` gives the weight (default sigmoid, the paper's); normalize_k1 makes it 1.
The assignment is not differentiable; the weight is, so the gate still learns.
Training assignment uses the whole batch (as in the paper); evaluation is per token (causal).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.assignment import BALANCED_ASSIGNMENT_REFUSES, auction_balanced
from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class BaseParams(GateParams):
    rel_eps: float = 1e-3  # auction epsilon relative to the score range (smaller: closer to optimal, slower)
    max_rounds: int = 2000  # auction rounds per epsilon phase before the greedy balanced fallback
    score: str = "sigmoid"  # the weight sigmoid(s), as in the paper

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.rel_eps < 1, f"rel_eps must be in (0, 1), got {self.rel_eps}")
        require(self.max_rounds >= 1, f"max_rounds must be >= 1, got {self.max_rounds}")


@register_router("base", BaseParams)
class BaseLayer(GatedRouter):
    """Balanced linear assignment (auction) in training, greedy top-1 at evaluation; sigmoid weight."""

    refuses = BALANCED_ASSIGNMENT_REFUSES

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        logits = self.gate_logits(x)
        if self.training and x.shape[0] > 0:
            with torch.no_grad():
                experts = auction_balanced(logits.detach(), self.params.rel_eps, self.params.max_rounds)[:, None]
        else:
            experts = logits.argmax(-1, keepdim=True)
        weights = self.scores(logits).gather(1, experts)
        return Routing(experts, weights.to(x.dtype), logits, self.stability_losses(logits, experts))
