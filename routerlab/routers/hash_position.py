"""Position hash routing: a fixed random table over the token's position in its sequence.

expert(t) = table[pos_t mod table_size], pos_t = (row index in the flattened batch) mod seq_len (seq_len 0:
the row index itself). Set `seq_len` to the task's context length for a true position hash. Needs no token
ids, so it runs on every task; causal; no parameters. A baseline: routing that ignores content entirely.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.hash import Hash, HashParams
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class HashPositionParams(HashParams):
    seq_len: int = 0  # sequence length of the flattened batch (0 = row index is the position)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.seq_len >= 0, f"seq_len must be >= 0, got {self.seq_len}")


@register_router("hash_position", HashPositionParams)
class HashPosition(Hash):
    """Fixed random table over sequence positions; weight 1."""

    needs_token_ids = False
    cuda_graph_safe = True  # no Python state across steps, no host reads: train.cuda_graph may replay it (step_graph.py)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def keys(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        pos = torch.arange(x.shape[0], device=x.device)
        return pos % self.params.seq_len if self.params.seq_len > 0 else pos
