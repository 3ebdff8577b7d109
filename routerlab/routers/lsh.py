"""Locality-sensitive hash routing: random hyperplanes over the hidden state (for tasks without token ids).

code(x) = sum_j [x . r_j > 0] 2^j with b fixed Gaussian hyperplanes r_j (b = ceil(log2 E) unless set), and
expert = table[code], a fixed table that spreads the 2^b codes evenly over the E experts. Nearby hidden
states (small angle) share an expert. No parameters, weight 1, causal. Deterministic given x; the hidden
state itself moves while the model trains, so routing fluctuation is not 0 (unlike token-id hashes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require


@dataclass(frozen=True)
class LSHParams(RouterParams):
    seed: int = 0  # seed of the hyperplanes and code table
    bits: int = 0  # number of hyperplanes (0 = ceil(log2 E), at least 1)

    def __post_init__(self) -> None:
        require(0 <= self.bits <= 20, f"bits must be in [0, 20], got {self.bits}")


@register_router("lsh", LSHParams)
class LSH(Router):
    """Random-hyperplane hash of the hidden state -> expert; no token ids needed."""

    cuda_graph_safe = True  # no Python state across steps, no host reads: train.cuda_graph may replay it (step_graph.py)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def __init__(self, d_model: int, num_experts: int, params: LSHParams) -> None:
        super().__init__(d_model, num_experts, params)
        bits = params.bits or max(1, math.ceil(math.log2(num_experts)))
        g = torch.Generator().manual_seed(params.seed)
        self.register_buffer("planes", torch.randn(d_model, bits, generator=g))
        codes = torch.randperm(2**bits, generator=g) % num_experts
        self.register_buffer("table", codes)
        self.register_buffer("powers", 2 ** torch.arange(bits))

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        with torch.no_grad():
            bits = (x.detach().float() @ self.planes.float()) > 0  # planes are cast with a bf16 model
            code = (bits.long() * self.powers).sum(-1)
        experts = self.table[code].unsqueeze(1)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device))
