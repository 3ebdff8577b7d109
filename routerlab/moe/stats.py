"""RoutingStats: what the core records about one routing step, and the metrics derived from it.

Every field is a sum (or a max), so stats of several batches, layers' evaluations or ranks merge by
addition. Definitions follow docs/design.md and docs/metrics.md: load_i counts token-slots the router sent to expert i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from routerlab.kernel_choice import triton_device
from routerlab.routers.balancing import slot_counts


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
    vio_batch_sum: Tensor | None = None  # sum over micro-batches (and ranks) of each one's own MaxVio
    batches: Tensor | None = None  # number of those micro-batches
    vio_seq_sum: Tensor | None = None  # sum over sequences of each sequence's own MaxVio
    sequences: Tensor | None = None  # number of sequences

    def merge(self, other: RoutingStats) -> RoutingStats:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                out[f.name] = None
            else:
                out[f.name] = torch.maximum(a, b) if f.name == "max_logit" else a + b
        return RoutingStats(**out)


def _max_vio(load: Tensor) -> Tensor:
    """max / mean - 1 along the last dim; 0 where nothing was routed."""
    mean = load.mean(-1)
    return torch.where(mean > 0, load.max(-1).values / mean.clamp_min(1e-12) - 1, torch.zeros_like(mean))


@torch.no_grad()
def compute_stats(experts: Tensor, logits: Tensor | None, kept: Tensor, kept_per_token: Tensor, sequence_length: int | None = None) -> RoutingStats:
    """experts [T, k] (-1 unused), logits [T, E] or None, kept [E], kept_per_token [T]; tokens come in
    sequences of sequence_length (None: the batch is one sequence) for the per-sequence MaxVio."""
    num_experts = kept.shape[0]
    T = experts.shape[0]
    # counts by scatter and fill instead of bincount / mask indexing / torch.tensor: no host sync on CUDA
    load = slot_counts(experts, num_experts, "all")
    L = sequence_length if sequence_length and T % sequence_length == 0 else max(T, 1)
    per_seq = slot_counts(experts.reshape(T // L, L, experts.shape[1]), num_experts, "all")
    stats = RoutingStats(
        load=load,
        kept=kept.float(),
        tokens=torch.full((), float(T), device=experts.device),
        dropped_tokens=(kept_per_token == 0).sum().float(),
        vio_batch_sum=_max_vio(load),
        batches=torch.ones((), device=experts.device),
        vio_seq_sum=_max_vio(per_seq).sum(),
        sequences=torch.full((), float(T // L), device=experts.device),
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
def stats_from_routing(experts: Tensor, logits: Tensor | None, kept: Tensor, num_experts: int, sequence_length: int | None = None) -> RoutingStats:
    """RoutingStats of one forward from its routing: experts [T, k] (-1 unused), logits [T, E] or None,
    kept [T, k] bool (slots computed), tokens in sequences of sequence_length. No host sync on CUDA; on the GPU two
    Triton kernels where they apply (routerlab/moe/triton_stats.py), not under torch.compile (compile.py compiles this)."""
    T = experts.shape[0]
    if triton_device(experts) and not torch.compiler.is_compiling():
        from routerlab.moe import triton_stats

        L = sequence_length if sequence_length and T % sequence_length == 0 else T
        if triton_stats.supports(logits, num_experts, T, L):
            return _stats_from_flat(triton_stats.routing_stats(experts, logits, kept, num_experts, L), num_experts)
    counts = slot_counts(torch.where(kept, experts, -1), num_experts, "all")  # kept slots per (global) expert
    return compute_stats(experts, logits, counts, kept.sum(1), sequence_length)


def _stats_from_flat(flat: Tensor, num_experts: int) -> RoutingStats:
    """RoutingStats viewing triton_stats.routing_stats' [3E + 9] buffer."""
    E = num_experts
    tokens, dropped, entropy, z, max_logit, vio_batch, batches, vio_seq, sequences = flat[3 * E :].unbind(0)
    return RoutingStats(load=flat[:E], kept=flat[E : 2 * E], tokens=tokens, dropped_tokens=dropped, prob_sum=flat[2 * E : 3 * E],
                        entropy_sum=entropy, z_sum=z, max_logit=max_logit, vio_batch_sum=vio_batch, batches=batches,
                        vio_seq_sum=vio_seq, sequences=sequences)


def stats_on_host(stats: list[RoutingStats], non_blocking: bool = False) -> list[RoutingStats]:
    """The same stats on the CPU, moved in one device-to-host copy (float64 on the way holds float32 values and integer
    counts exactly), so that the metrics read from them wait for the GPU once, not once per value. CPU stats: as given.
    non_blocking: the copy is queued into pinned memory and not waited for (the values are there once the stream
    has reached it: wait on an event recorded after it)."""
    present = [(i, f.name, v) for i, s in enumerate(stats) for f in fields(s) if (v := getattr(s, f.name)) is not None]
    if not present or present[0][2].device.type == "cpu":
        return stats
    # one cat (promoting to the widest dtype present), one cast, one copy: a few launches for all the layers' fields
    flat = torch.cat([v.detach().reshape(-1) for _, _, v in present]).double().to("cpu", non_blocking=non_blocking)  # pinned when non_blocking
    out = [{f.name: None for f in fields(s)} for s in stats]
    offset = 0
    for i, name, v in present:
        out[i][name] = flat[offset : offset + v.numel()].view(v.shape).to(v.dtype)
        offset += v.numel()
    return [RoutingStats(**values) for values in out]


def rank_overload(load: np.ndarray, ranks: int) -> float:
    """Expert parallelism over `ranks` ranks holding contiguous blocks of E/ranks experts: the busiest rank's
    token-slots over the mean rank's (1.0 = even; the step waits for the busiest rank)."""
    per_rank = np.asarray(load, dtype=np.float64).reshape(ranks, -1).sum(1)
    return float(per_rank.max() / per_rank.mean()) if per_rank.sum() > 0 else 1.0


def routing_metrics(stats: RoutingStats, ranks: int = 1) -> dict[str, float]:
    """Scalar metrics of docs/metrics.md from (possibly merged) stats; rank_overload when ranks > 1 (expert parallel).

    max_vio is over every token the stats hold (merged micro-batches, ranks: the global batch);
    max_vio_batch the mean of each micro-batch's own, max_vio_seq the mean of each sequence's own.
    In NumPy on the host: a logged step reads these for every layer, and ~25 torch ops on [E] tensors took
    0.4 ms a layer on the development CPU (docs/benchmarks.md, issue 19 v6)."""
    load = _on_host(stats.load)
    num_experts = load.size
    tokens = max(float(stats.tokens), 1.0)
    mean = load.mean()
    f = load / max(load.sum(), 1.0)
    nz = f[f > 0]
    out = {
        "load_cv": float(load.std() / mean) if mean > 0 else 0.0,
        "max_vio": float(load.max() / mean - 1) if mean > 0 else 0.0,
        "dropped_frac": float(stats.dropped_tokens) / tokens,
        "dead_experts": float((load == 0).sum()),
        "usage_entropy": float(-(nz * np.log(nz)).sum()),
        "usage_entropy_max": math.log(num_experts),
        "mean_k": float(load.sum()) / tokens,  # routed slots per token (null / unused slots not counted)
    }
    if stats.batches is not None and float(stats.batches) > 0:
        out["max_vio_batch"] = float(stats.vio_batch_sum) / float(stats.batches)
        out["max_vio_seq"] = float(stats.vio_seq_sum) / max(float(stats.sequences), 1.0)
    if ranks > 1 and num_experts % ranks == 0:
        out["rank_overload"] = rank_overload(load, ranks)
    if stats.prob_sum is not None:
        P = _on_host(stats.prob_sum) / tokens
        out["router_entropy"] = float(stats.entropy_sum) / tokens
        out["z_value"] = float(stats.z_sum) / tokens
        out["max_logit"] = float(stats.max_logit)
        out["switch_balance"] = float(num_experts * (f * P).sum())
    return out


def _on_host(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def specialization(labels: Tensor, experts: Tensor, num_labels: int, num_experts: int) -> float:
    """I(label; expert) / min(H(label), log E) from the label x expert count table (tokens with expert -1 skipped)."""
    mask = experts >= 0
    table = torch.zeros(num_labels, num_experts, dtype=torch.float64)
    table.index_put_((labels[mask].long().cpu(), experts[mask].long().cpu()), torch.ones(int(mask.sum()), dtype=torch.float64), accumulate=True)
    return normalized_mutual_information(table.numpy())


def normalized_mutual_information(table) -> float:
    """I(row; column) / min(H(row), log columns) of a [rows, columns] count table, in [0, 1]; 0 when empty.

    The one implementation behind specialization (label x expert), the RL environment's episode
    specialization and the federated client x expert measure.
    """
    table = np.asarray(table, dtype=np.float64)
    total = table.sum()
    if total == 0:
        return 0.0
    joint = table / total
    p_row, p_col = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / (p_row @ p_col)[nz])).sum())
    h_row = float(-(p_row[p_row > 0] * np.log(p_row[p_row > 0])).sum())
    norm = min(h_row, math.log(table.shape[1]))
    return mi / norm if norm > 0 else 0.0


def fluctuation(previous_top1: Tensor, top1: Tensor) -> float:
    """Fraction of a fixed probe set whose top-1 expert changed (StableMoE)."""
    return float((previous_top1 != top1).float().mean())
