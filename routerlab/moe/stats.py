"""RoutingStats: what the core records about one routing step, and the metrics derived from it.

Every field is a sum (or a max), so stats of several batches, layers' evaluations or ranks merge by
addition. Definitions follow DESIGN.md: load_i counts token-slots the router sent to expert i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class RoutingStats:
    load: Tensor  # [E] token-slots routed to each expert (before capacity)
    kept: Tensor  # [E] token-slots each expert computed (after capacity)
    tokens: Tensor  # scalar, number of tokens
    dropped_tokens: Tensor  # scalar, tokens with no slot computed
    prob_sum: Tensor | None = None  # [E] sum over tokens of router probabilities
    entropy_sum: Tensor | None = None  # sum over tokens of H(p(x))
    z_sum: Tensor | None = None  # sum over tokens of logsumexp(logits)^2
    max_logit: Tensor | None = None  # max |logit| (merged by max)

    def merge(self, other: RoutingStats) -> RoutingStats:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                out[f.name] = None
            else:
                out[f.name] = torch.maximum(a, b) if f.name == "max_logit" else a + b
        return RoutingStats(**out)


@torch.no_grad()
def compute_stats(experts: Tensor, logits: Tensor | None, kept: Tensor, kept_per_token: Tensor) -> RoutingStats:
    """experts [T, k] (-1 unused), logits [T, E] or None, kept [E], kept_per_token [T]."""
    num_experts = kept.shape[0]
    # scatter and fill instead of bincount / mask indexing / torch.tensor: no host sync on CUDA
    slots = torch.where(experts >= 0, experts, num_experts).reshape(-1)
    load = torch.zeros(num_experts + 1, device=experts.device).index_add_(0, slots, torch.ones(slots.shape, device=experts.device))[:num_experts]
    stats = RoutingStats(
        load=load,
        kept=kept.float(),
        tokens=torch.full((), float(experts.shape[0]), device=experts.device),
        dropped_tokens=(kept_per_token == 0).sum().float(),
    )
    if logits is not None:
        logits = logits.float()
        logp = logits.log_softmax(-1)
        p = logp.exp()
        stats.prob_sum = p.sum(0)
        stats.entropy_sum = -(p * logp).sum()
        stats.z_sum = torch.logsumexp(logits, -1).square().sum()
        stats.max_logit = logits.abs().max() if logits.numel() else logits.new_zeros(())
    return stats


@torch.no_grad()
def stats_from_routing(experts: Tensor, logits: Tensor | None, kept: Tensor, num_experts: int) -> RoutingStats:
    """RoutingStats of one forward from its routing: experts [T, k] (-1 unused), logits [T, E] or None,
    kept [T, k] bool (slots computed). No host sync on CUDA."""
    slots = torch.where(kept, experts, num_experts).reshape(-1)  # kept slots per (global) expert
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=experts.device).index_add_(0, slots, torch.ones_like(slots))[:num_experts]
    return compute_stats(experts, logits, counts, kept.sum(1))


def routing_metrics(stats: RoutingStats) -> dict[str, float]:
    """Scalar metrics of DESIGN.md from (possibly merged) stats."""
    load = stats.load.double()
    num_experts = load.numel()
    tokens = max(float(stats.tokens), 1.0)
    mean = load.mean()
    f = load / load.sum().clamp_min(1.0)
    nz = f[f > 0]
    out = {
        "load_cv": float(load.std(correction=0) / mean) if mean > 0 else 0.0,
        "max_vio": float(load.max() / mean - 1) if mean > 0 else 0.0,
        "dropped_frac": float(stats.dropped_tokens) / tokens,
        "dead_experts": float((load == 0).sum()),
        "usage_entropy": float(-(nz * nz.log()).sum()),
        "usage_entropy_max": math.log(num_experts),
    }
    if stats.prob_sum is not None:
        P = stats.prob_sum.double() / tokens
        out["router_entropy"] = float(stats.entropy_sum) / tokens
        out["z_value"] = float(stats.z_sum) / tokens
        out["max_logit"] = float(stats.max_logit)
        out["switch_balance"] = float(num_experts * (f * P).sum())
    return out


def specialization(labels: Tensor, experts: Tensor, num_labels: int, num_experts: int) -> float:
    """I(label; expert) / min(H(label), log E) from the label x expert count table (tokens with expert -1 skipped)."""
    mask = experts >= 0
    table = torch.zeros(num_labels, num_experts, dtype=torch.float64)
    table.index_put_((labels[mask].long().cpu(), experts[mask].long().cpu()), torch.ones(int(mask.sum()), dtype=torch.float64), accumulate=True)
    total = table.sum()
    if total == 0:
        return 0.0
    joint = table / total
    pl, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pl @ pe)[nz]).log()).sum())
    h_label = float(-(pl[pl > 0] * pl[pl > 0].log()).sum())
    norm = min(h_label, math.log(num_experts))
    return mi / norm if norm > 0 else 0.0


def fluctuation(previous_top1: Tensor, top1: Tensor) -> float:
    """Fraction of a fixed probe set whose top-1 expert changed (StableMoE)."""
    return float((previous_top1 != top1).float().mean())
