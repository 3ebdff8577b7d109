"""Frequency-balanced hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", balanced variant).

A fixed token-id -> expert table built greedily from token frequencies so that every expert receives about
the same number of training tokens: ids sorted by count (most frequent first), each given to the expert
with the smallest total count so far (longest-processing-time scheduling). Ids never counted keep a random
expert (the plain `hash` table with the same seed).

Where the counts come from: call `router.fit(counts)` with the corpus' token counts ([table_size] or
shorter), or let the router fit itself on the first forward in training mode from that batch's token ids
(a sample of the training corpus; the table is frozen after that and stored in the checkpoint).
Forwards before the fit (evaluation of an untrained model) use the random fallback table.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.errors import ConfigError
from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require


@dataclass(frozen=True)
class HashBalancedParams(RouterParams):
    seed: int = 0  # seed of the fallback table for ids never counted
    table_size: int = 65536  # token ids are taken modulo this

    def __post_init__(self) -> None:
        require(self.table_size >= 1, f"table_size must be >= 1, got {self.table_size}")


def greedy_table(counts: Tensor, fallback: Tensor, num_experts: int) -> Tensor:
    """LPT greedy: most frequent ids first, each to the least-loaded expert (ties: lowest expert id)."""
    table = fallback.clone()
    counts = counts.detach().cpu().double()
    ids = torch.nonzero(counts > 0).squeeze(1)
    order = ids[torch.argsort(counts[ids], descending=True, stable=True)].tolist()
    heap = [(0.0, e) for e in range(num_experts)]
    values = counts.tolist()
    for token in order:
        load, e = heapq.heappop(heap)
        table[token] = e
        heapq.heappush(heap, (load + values[token], e))
    return table


@register_router("hash_balanced", HashBalancedParams)
class HashBalanced(Router):
    """Token-id table balanced greedily by token frequency (fit on the first training batch or by fit())."""

    needs_token_ids = True

    def __init__(self, d_model: int, num_experts: int, params: HashBalancedParams) -> None:
        super().__init__(d_model, num_experts, params)
        g = torch.Generator().manual_seed(params.seed)
        self.register_buffer("table", torch.randint(num_experts, (params.table_size,), generator=g))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, counts: Tensor) -> None:
        """Build the table from token counts (index = token id); freezes it."""
        size = self.params.table_size
        full = torch.zeros(size, dtype=torch.float64)
        counts = torch.as_tensor(counts).detach().cpu().double().flatten()
        full.index_add_(0, torch.arange(counts.numel()) % size, counts)
        g = torch.Generator().manual_seed(self.params.seed)
        fallback = torch.randint(self.num_experts, (size,), generator=g)
        self.table.copy_(greedy_table(full, fallback, self.num_experts).to(self.table.device))
        self.fitted.fill_(True)

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ConfigError(f"router {self.router_name!r} needs token ids; this task has none (use 'lsh' or a learned router)")
        ids = token_ids % self.table.numel()
        if self.training and not bool(self.fitted):
            self.fit(torch.bincount(ids.cpu(), minlength=self.table.numel()))
        experts = self.table[ids].unsqueeze(1)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device))
