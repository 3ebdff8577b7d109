"""Position hash routing: a fixed random table over the token's position in its sequence.

expert(t) = table[pos_t mod table_size], pos_t = (row index in the flattened batch) mod seq_len (seq_len 0:
the row index itself). Set `seq_len` to the task's context length for a true position hash. Needs no token
ids, so it runs on every task; causal; no parameters. A baseline: routing that ignores content entirely.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require


@dataclass(frozen=True)
class HashPositionParams(RouterParams):
    seed: int = 0  # seed of the random table
    table_size: int = 65536  # positions are taken modulo this
    seq_len: int = 0  # sequence length of the flattened batch (0 = row index is the position)

    def __post_init__(self) -> None:
        require(self.table_size >= 1, f"table_size must be >= 1, got {self.table_size}")
        require(self.seq_len >= 0, f"seq_len must be >= 0, got {self.seq_len}")


@register_router("hash_position", HashPositionParams)
class HashPosition(Router):
    """Fixed random table over sequence positions; weight 1."""

    def __init__(self, d_model: int, num_experts: int, params: HashPositionParams) -> None:
        super().__init__(d_model, num_experts, params)
        g = torch.Generator().manual_seed(params.seed)
        self.register_buffer("table", torch.randint(num_experts, (params.table_size,), generator=g))

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        pos = torch.arange(x.shape[0], device=x.device)
        if self.params.seq_len > 0:
            pos = pos % self.params.seq_len
        experts = self.table[pos % self.table.numel()].unsqueeze(1)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device))
