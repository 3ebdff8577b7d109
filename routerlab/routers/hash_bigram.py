"""Bigram hash routing: a fixed random table over (previous token, current token) pairs.

expert(t) = table[(id_t * 1000003 + (id_{t-1} + 1) * 8191) mod table_size], with id_{t-1} = -1 at the start
of a sequence. The router sees the flattened batch, so it needs the sequence length to know where
sequences start: set `seq_len` to the task's context length (0 treats the flattened batch as one sequence,
so the first token of a sequence sees the last token of the previous one). Causal, no parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.errors import ConfigError
from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require


@dataclass(frozen=True)
class HashBigramParams(RouterParams):
    seed: int = 0  # seed of the random table
    table_size: int = 65536  # size of the hashed bigram table
    seq_len: int = 0  # sequence length of the flattened batch (0 = one sequence)

    def __post_init__(self) -> None:
        require(self.table_size >= 1, f"table_size must be >= 1, got {self.table_size}")
        require(self.seq_len >= 0, f"seq_len must be >= 0, got {self.seq_len}")


@register_router("hash_bigram", HashBigramParams)
class HashBigram(Router):
    """Fixed random table over hashed (previous, current) token-id pairs; weight 1."""

    needs_token_ids = True

    def __init__(self, d_model: int, num_experts: int, params: HashBigramParams) -> None:
        super().__init__(d_model, num_experts, params)
        g = torch.Generator().manual_seed(params.seed)
        self.register_buffer("table", torch.randint(num_experts, (params.table_size,), generator=g))

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ConfigError(f"router {self.router_name!r} needs token ids; this task has none (use 'lsh' or a learned router)")
        ids = token_ids.long()
        prev = torch.cat([ids.new_full((1,), -1), ids[:-1]])
        if self.params.seq_len > 0:
            starts = torch.arange(ids.numel(), device=ids.device) % self.params.seq_len == 0
            prev = torch.where(starts, torch.full_like(prev, -1), prev)
        key = (ids * 1000003 + (prev + 1) * 8191) % self.table.numel()
        experts = self.table[key].unsqueeze(1)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device))
