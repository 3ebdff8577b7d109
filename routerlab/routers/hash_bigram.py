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

from routerlab.routers.hash import Hash, HashParams
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class HashBigramParams(HashParams):
    seq_len: int = 0  # sequence length of the flattened batch (0 = one sequence)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.seq_len >= 0, f"seq_len must be >= 0, got {self.seq_len}")


@register_router("hash_bigram", HashBigramParams)
class HashBigram(Hash):
    """Fixed random table over hashed (previous, current) token-id pairs; weight 1."""

    cuda_graph_safe = True  # no Python state across steps, no host reads: train.cuda_graph may replay it (step_graph.py)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    def keys(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        ids = token_ids.long()
        prev = torch.cat([ids.new_full((1,), -1), ids[:-1]])
        if self.params.seq_len > 0:
            starts = torch.arange(ids.numel(), device=ids.device) % self.params.seq_len == 0
            prev = torch.where(starts, torch.full_like(prev, -1), prev)
        return ids * 1000003 + (prev + 1) * 8191
