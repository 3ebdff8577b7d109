"""Drift and structure of routing, from traces: overlap between two traces of the same probe set, router
margin, expert co-activation, and the domain x expert table."""
from __future__ import annotations

import numpy as np

from routerlab.analysis.trace import Trace
from routerlab.errors import ConfigError


def expert_sets(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """bool [N, E]: which experts each token went to (unused -1 slots ignored, order ignored)."""
    sets = np.zeros((experts.shape[0], num_experts), dtype=bool)
    rows, slots = np.nonzero(experts >= 0)
    sets[rows, experts[rows, slots]] = True
    return sets


def set_change(a: Trace, b: Trace) -> list[float]:
    """Per layer, the share of probe tokens whose expert set differs between the two traces (0 = same routing)."""
    if a.meta["probe"] != b.meta["probe"] or a.num_tokens != b.num_tokens:
        raise ConfigError(f"traces are of different probe sets ({a.meta['probe']} vs {b.meta['probe']}); compare traces of one task's probe set")
    if len(a.layers) != len(b.layers) or a.num_experts != b.num_experts:
        raise ConfigError(f"traces have different shapes ({len(a.layers)} vs {len(b.layers)} layers, {a.num_experts} vs {b.num_experts} experts)")
    E = a.num_experts
    return [float((expert_sets(la.experts, E) != expert_sets(lb.experts, E)).any(1).mean()) for la, lb in zip(a.layers, b.layers)]


def margins(layer, num_experts: int) -> np.ndarray:
    """Per token, top-1 minus top-2 router probability (softmax of the logits); from the weights when the
    router has no logits (NaN for one-expert routing without logits)."""
    if layer.logits is not None:
        z = layer.logits.astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    else:
        p = np.where(layer.experts >= 0, layer.weights, 0).astype(np.float64)
    if p.shape[1] < 2:
        return np.full(p.shape[0], np.nan)
    top2 = -np.sort(-p, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


def coactivation(layer, num_experts: int) -> np.ndarray:
    """[E, E]: share of tokens sent to both i and j (diagonal: share sent to i)."""
    s = expert_sets(layer.experts, num_experts).astype(np.float64)
    return s.T @ s / max(s.shape[0], 1)


def domain_expert(labels: np.ndarray, layer, num_labels: int, num_experts: int) -> np.ndarray:
    """[labels, E] token-slot counts: which experts each domain's tokens go to."""
    table = np.zeros((num_labels, num_experts))
    rows, slots = np.nonzero(layer.experts >= 0)
    np.add.at(table, (labels[rows], layer.experts[rows, slots]), 1.0)
    return table
