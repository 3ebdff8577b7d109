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

import torch
from torch import Tensor

from routerlab.routers.hash import Hash, HashParams, random_table
from routerlab.routers.registry import register_router


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


@register_router("hash_balanced", HashParams)
class HashBalanced(Hash):
    """Token-id table balanced greedily by token frequency (fit on the first training batch or by fit())."""

    # its one piece of Python state, whether `fitted` is known to be set, settles in the first training step: long
    # before train.cuda_graph captures one (and a graphed step reads nothing on the host)
    cuda_graph_safe = True

    def __init__(self, d_model: int, num_experts: int, params: HashParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.register_buffer("fitted", torch.tensor(False))
        self.known_fitted = False  # a host copy of `fitted` once it is True: reading the buffer syncs with the GPU

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.known_fitted = False  # the loaded buffer decides again

    @torch.no_grad()
    def fit(self, counts: Tensor) -> None:
        """Build the table from token counts (index = token id); freezes it."""
        size = self.params.table_size
        full = torch.zeros(size, dtype=torch.float64)
        counts = torch.as_tensor(counts).detach().cpu().double().flatten()
        full.index_add_(0, torch.arange(counts.numel()) % size, counts)
        fallback = random_table(self.num_experts, size, self.params.seed)
        self.table.copy_(greedy_table(full, fallback, self.num_experts).to(self.table.device))
        self.fitted.fill_(True)
        self.known_fitted = True

    def keys(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        ids = token_ids % self.table.numel()
        if self.training and not self.known_fitted:
            if bool(self.fitted):
                self.known_fitted = True
            else:
                self.fit(torch.bincount(ids.cpu(), minlength=self.table.numel()))
        return ids
