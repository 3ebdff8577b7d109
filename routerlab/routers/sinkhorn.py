"""S-BASE routing (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models").

Training: the Sinkhorn plan P of exp(W x) (rows sum to 1, columns to T/E after `iters` alternating
normalizations, log domain) is rounded to a balanced top-1 assignment: loads are floor(T/E) or ceil(T/E)
(proposal rounds: each token proposes to its best open expert by P, experts keep their best proposers).
Evaluation: plain top-1 of W x. Weight: the softmax probability of the assigned expert (differentiable).
No aux loss. Selection options: `score` gives the weight (score of the assigned expert); normalize_k1 makes it 1.
Training assignment uses the whole batch (as in the paper); evaluation is per token (causal).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.assignment import BALANCED_ASSIGNMENT_REFUSES, greedy_balanced, sinkhorn_log
from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class SinkhornParams(GateParams):
    iters: int = 8  # Sinkhorn normalization rounds

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.iters >= 1, f"iters must be >= 1, got {self.iters}")


@register_router("sinkhorn", SinkhornParams)
class Sinkhorn(GatedRouter):
    """Sinkhorn-balanced top-1 in training (loads equal within 1), plain top-1 at evaluation."""

    refuses = BALANCED_ASSIGNMENT_REFUSES
    cuda_graph_safe = True  # no Python state across steps; on CUDA the balanced assignment reads nothing on the host
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        logits = self.gate_logits(x)
        probs = self.scores(logits)
        if self.training and x.shape[0] > 0:
            with torch.no_grad():
                experts = greedy_balanced(sinkhorn_log(logits.detach(), self.params.iters))[:, None]
        else:
            experts = probs.argmax(-1, keepdim=True)
        weights = probs.gather(1, experts)
        return Routing(experts, weights.to(x.dtype), logits, self.stability_losses(logits, experts))
