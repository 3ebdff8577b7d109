"""Aggregation and expert selection (pure torch and numpy, no flwr) and the per-round federation metrics.

A client update carries the shared parameters whole and, for every MoE layer, only the rows of the
stacked expert tensors (ExpertBank stacks experts on dim 0) that the client held this round (`held`;
absent = all experts). `merge` averages:
  - every shared parameter over the clients that sent it, weighted by their training examples;
  - row e of each expert tensor over the clients that held expert e, weighted by what the strategy
    says (examples for fedavg, tokens routed to e for expert_weighted); an expert that no client held,
    or whose weights are all zero, keeps its global value.
Parameter names decide the role: '.router.' = router, '.experts.' = expert (DESIGN.md tagging).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

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


def is_local(key: str, local: list[str] | tuple[str, ...]) -> bool:
    """Whether `key` stays on the client: it contains one of the `local` patterns ('' matches every key)."""
    return any(p in f".{key}" for p in local)


@dataclass
class ClientUpdate:
    state: dict[str, Tensor]  # the parameters the client sent back (expert tensors: only the held rows, in `held` order)
    num_examples: int
    tokens: dict[str, Tensor] = field(default_factory=dict)  # MoE layer name -> [E] token-slots routed this round
    held: dict[str, list[int]] = field(default_factory=dict)  # MoE layer name -> expert ids held (absent = all)


ExpertWeights = Callable[[ClientUpdate, str], "Tensor | None"]  # (update, layer) -> [E] weights, None = examples


def full_rows(update: ClientUpdate, key: str, like: Tensor) -> tuple[Tensor, Tensor]:
    """The update's expert tensor scattered into the global shape (double), and the [E] mask of rows it holds."""
    rows = update.held.get(expert_layer(key))
    value = update.state[key].double()
    if rows is None:
        return value, torch.ones(like.shape[0], dtype=torch.bool)
    full = torch.zeros(like.shape, dtype=torch.float64)
    full[torch.as_tensor(rows, dtype=torch.long)] = value
    mask = torch.zeros(like.shape[0], dtype=torch.bool)
    mask[torch.as_tensor(rows, dtype=torch.long)] = True
    return full, mask


def merge(global_state: dict[str, Tensor], updates: list[ClientUpdate], expert_weights: ExpertWeights) -> dict[str, Tensor]:
    """The new global state (see the module docstring). Keys no client sent and integer buffers keep their value."""
    out = dict(global_state)
    for key, current in global_state.items():
        senders = [u for u in updates if key in u.state]
        if not senders or not current.is_floating_point():
            continue
        if not is_expert(key):
            w = torch.tensor([float(u.num_examples) for u in senders], dtype=torch.float64)
            stacked = torch.stack([u.state[key].double() for u in senders])
            out[key] = ((stacked * w.reshape((-1,) + (1,) * current.dim())).sum(0) / w.sum()).to(current.dtype)
            continue
        layer, num = expert_layer(key), current.shape[0]
        values, weights = [], []
        for u in senders:
            full, mask = full_rows(u, key, current)
            given = expert_weights(u, layer)
            w = torch.full((num,), float(u.num_examples), dtype=torch.float64) if given is None else given.double().reshape(num)
            values.append(full)
            weights.append(torch.where(mask, w, torch.zeros_like(w)))
        w = torch.stack(weights)  # [clients, E]
        used = w.sum(0) > 0
        w = torch.where(used, w, torch.ones_like(w))  # avoid 0/0 on rows that keep their global value
        stacked = torch.stack(values)
        merged = (stacked * w.reshape(w.shape + (1,) * (current.dim() - 1))).sum(0) / w.sum(0).reshape((num,) + (1,) * (current.dim() - 1))
        keep = used.reshape((-1,) + (1,) * (current.dim() - 1))
        out[key] = torch.where(keep, merged, current.double()).to(current.dtype)
    return out


def aggregate(strategy: str, global_state: dict[str, Tensor], updates: list[ClientUpdate]) -> dict[str, Tensor]:
    """`merge` with the expert weights of the registered strategy `strategy`."""
    from federated.strategies import strategy_class

    return merge(global_state, updates, strategy_class(strategy).expert_weights)


def choose_experts(last_tokens: Tensor | None, num_experts: int, keep: int, explore: int, rng: np.random.Generator) -> list[int]:
    """The `keep` experts a client is sent: its most used ones last round (by token-slots, ties and unused
    slots filled at random) minus `explore` slots given to experts it did not use most. No history: `keep` at random."""
    keep = min(keep, num_experts)
    order = rng.permutation(num_experts)  # the random tie-break and the random fill
    if last_tokens is None:
        return sorted(order[:keep].tolist())
    explore = min(explore, keep - 1) if keep > 1 else 0
    tokens = np.asarray(last_tokens, dtype=np.float64)
    ranked = [int(e) for e in sorted(order, key=lambda e: -tokens[e]) if tokens[e] > 0][: keep - explore]
    rest = [int(e) for e in order if e not in ranked]
    return sorted(ranked + rest[: keep - len(ranked)])


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
