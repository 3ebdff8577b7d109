"""Graph router: experts are nodes of a learned graph and share routing signal with their neighbours.

Expert embeddings H0 = U ([E, dim], learned). Learned adjacency from edge logits L ([E, E], learned, no
self-loops): soft  A = row-softmax(L)  or sparse  A = row-softmax(L restricted to each row's `neighbors`
largest entries). R rounds (1 or 2) of residual message passing:
    H_{r+1} = H_r + tanh(A H_r M_r),   M_r learned [dim, dim]
Token-expert scores: s(x)_e = <Q x, H_R[e]> / sqrt(dim) with a learned query Q [dim, d]; then softmax top-k
(renormalized) and the Switch-style balance loss alpha * E * sum_e f_e P_e. A gradient step on one expert's
score moves its neighbours' embeddings too, so related experts are routed alike. The top-k goes through the
gate's `route_topk` on s(x), so every selection option applies (null experts are extra nodes of the graph).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from routerlab.routers.base import Routing, switch_balance_loss
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class GraphParams(GateParams):
    k: int = 2
    dim: int = 32  # expert embedding / query dimension
    rounds: int = 1  # message-passing rounds (1 or 2)
    adjacency: str = "soft"  # "soft" (dense row-softmax) or "sparse" (top-`neighbors` per row)
    neighbors: int = 2  # kept neighbours per expert when adjacency is "sparse"
    alpha: float = 1e-2  # balance loss coefficient

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.dim >= 1, f"dim must be >= 1, got {self.dim}")
        require(self.rounds in (1, 2), f"rounds must be 1 or 2, got {self.rounds}")
        require(self.adjacency in ("soft", "sparse"), f"adjacency must be 'soft' or 'sparse', got {self.adjacency!r}")
        require(self.neighbors >= 1, f"neighbors must be >= 1, got {self.neighbors}")
        require(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")


@register_router("graph", GraphParams)
class GraphRouter(GatedRouter):
    """Expert embeddings refined by message passing over a learned expert graph, then top-k."""

    def __init__(self, d_model: int, num_experts: int, params: GraphParams) -> None:
        super().__init__(d_model, num_experts, params)
        nodes = num_experts + params.null_experts
        self.gate = nn.Linear(d_model, params.dim, bias=False)  # the query projection Q
        self.expert_emb = nn.Parameter(torch.randn(nodes, params.dim) / math.sqrt(params.dim))
        self.edge_logits = nn.Parameter(0.01 * torch.randn(nodes, nodes))
        self.mix = nn.ParameterList(nn.Parameter(torch.randn(params.dim, params.dim) / math.sqrt(params.dim)) for _ in range(params.rounds))

    finishes_weights = True  # route_topk normalizes and scales
    cuda_graph_safe = True  # no Python state across steps, no host reads: train.cuda_graph may replay it (step_graph.py)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def adjacency_matrix(self) -> Tensor:
        E = self.edge_logits.shape[0]
        logits = self.edge_logits.float().masked_fill(torch.eye(E, dtype=torch.bool, device=self.edge_logits.device), float("-inf"))
        if self.params.adjacency == "sparse" and self.params.neighbors < E - 1:
            kth = logits.topk(self.params.neighbors, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(-1)

    def expert_states(self) -> Tensor:
        H = self.expert_emb.float()
        if H.shape[0] > 1:
            A = self.adjacency_matrix()
            for M in self.mix:
                H = H + torch.tanh(A @ H @ M.float())
        return H

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        query = self.raw_logits(x)
        scores = query.float() @ self.expert_states().t() / math.sqrt(self.params.dim)
        out = self.route_topk(x, self.params.k, renormalize=True, logits=self.postprocess(scores))
        if self.params.alpha > 0 and self.training:
            probs = out.scores if self.params.score == "softmax" else self.balance_probs(out.logits)
            out.routing.aux["balance"] = self.params.alpha * switch_balance_loss(probs, out.chosen, probs.shape[-1])
        return out.routing
