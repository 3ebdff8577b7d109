"""Hash layers (Roller et al. 2021): a fixed random table maps each token id to one expert."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.errors import ConfigError
from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require


@dataclass(frozen=True)
class HashParams(RouterParams):
    seed: int = 0  # seed of the random table
    table_size: int = 65536  # token ids are taken modulo this

    def __post_init__(self) -> None:
        require(self.table_size >= 1, f"table_size must be >= 1, got {self.table_size}")


def random_table(num_experts: int, size: int, seed: int) -> Tensor:
    return torch.randint(num_experts, (size,), generator=torch.Generator().manual_seed(seed))


@register_router("hash", HashParams)
class Hash(Router):
    """Fixed random token-id -> expert table; no parameters, no aux loss, weight 1.

    The hash family (hash_bigram, hash_position, hash_balanced) subclasses it and changes `keys`.
    """

    needs_token_ids = True
    cuda_graph_safe = True  # no Python state across steps, no host reads: train.cuda_graph may replay it (step_graph.py)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def __init__(self, d_model: int, num_experts: int, params: HashParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.register_buffer("table", random_table(num_experts, params.table_size, params.seed))

    def keys(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        """[T] integer keys looked up in the table (taken modulo its size)."""
        return token_ids

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        if self.needs_token_ids and token_ids is None:
            raise ConfigError(f"router {self.router_name!r} needs token ids; this task has none (use 'lsh' or a learned router)")
        experts = self.table[self.keys(x, token_ids).long() % self.table.numel()].unsqueeze(1)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device))
