"""The aggregation strategies (pure torch, no flwr) and the per-round federation metrics.

  fedavg           every parameter averaged with weights = the client's number of training examples.
  expert_weighted  shared parameters as fedavg; the slice [e] of each expert tensor (ExpertBank stacks
                   experts on dim 0) averaged with weights = tokens each client routed to expert e
                   in that layer during the round. An expert no client used keeps its global value,
                   so clients that never used an expert do not dilute it.
  personal_router  router parameters never leave the clients (they are absent from the updates and
                   the global router is left alone); experts and shared layers as expert_weighted.
Parameter names decide the role: '.router.' = router, '.experts.' = expert (docs/design.md, tagging).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from routerlab.moe.stats import normalized_mutual_information


def is_router(key: str) -> bool:
    return ".router." in f".{key}"


def is_expert(key: str) -> bool:
    return ".experts." in f".{key}"


def expert_layer(key: str) -> str:
    """'ffns.0.experts.w_in' -> 'ffns.0' (the MoE layer's module name)."""
    return f".{key}".split(".experts.")[0][1:]


def shared_keys(state: dict[str, Tensor], strategy: str) -> list[str]:
    """The keys that travel between server and clients under `strategy`."""
    return [k for k in state if not (strategy == "personal_router" and is_router(k))]


@dataclass
class ClientUpdate:
    state: dict[str, Tensor]  # the parameters the client sent back
    num_examples: int
    tokens: dict[str, Tensor] = field(default_factory=dict)  # MoE layer name -> [E] token-slots routed this round


def _weighted(tensors: list[Tensor], weights: Tensor) -> Tensor:
    """sum_i w_i t_i / sum_i w_i along a new leading client axis; weights broadcast from the left."""
    stacked = torch.stack([t.double() for t in tensors])
    w = weights.double().reshape(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    return (stacked * w).sum(0) / w.sum(0)


def aggregate(strategy: str, global_state: dict[str, Tensor], updates: list[ClientUpdate]) -> dict[str, Tensor]:
    """The new global state. Keys no client sent (local routers) and integer buffers keep their global value."""
    if not updates:
        return dict(global_state)
    examples = torch.tensor([float(u.num_examples) for u in updates])
    out = dict(global_state)
    for key, current in global_state.items():
        if not all(key in u.state for u in updates) or not current.is_floating_point():
            continue
        tensors = [u.state[key] for u in updates]
        layer = expert_layer(key) if is_expert(key) else None
        per_expert = (
            strategy != "fedavg" and layer is not None and all(layer in u.tokens for u in updates)
            and current.shape[0] == updates[0].tokens[layer].numel()
        )
        if per_expert:
            tokens = torch.stack([u.tokens[layer].double() for u in updates])  # [clients, E]
            used = tokens.sum(0) > 0
            merged = _weighted(tensors, torch.where(used, tokens, torch.ones_like(tokens)))
            keep = used.reshape((-1,) + (1,) * (current.dim() - 1))
            out[key] = torch.where(keep, merged, current.double()).to(current.dtype)
        else:
            out[key] = _weighted(tensors, examples).to(current.dtype)
    return out


def worst_decile(values: list[float]) -> float:
    """Mean of the lowest 10% of the values (at least one)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(np.mean(ordered[: max(1, math.ceil(len(ordered) / 10))]))


def client_expert_mi(tables: list[np.ndarray]) -> float:
    """I(client; expert) / min(H(client), log E) from [clients, E] token tables, averaged over layers.

    0 = every client spreads its tokens over the experts alike; 1 = each client has its own experts.
    """
    values = [normalized_mutual_information(t) for t in map(np.asarray, tables) if t.sum() > 0 and t.shape[0] >= 2]
    return float(np.mean(values)) if values else 0.0
