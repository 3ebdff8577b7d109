"""Balance losses at three scopes, and the two ways of counting f (docs/routers.md, "Balancing scope").

All three are the Switch form  L = E * sum_e f_e P_e  with f detached and P the mean normalized router score
(softmax probabilities, or s / sum(s) for sigmoid-type scores, as DeepSeek-V3 normalizes them). They differ
only in which tokens f and P are taken over:

  micro-batch   f and P over this forward's T tokens (what `switch` computes)
  sequence      f and P over each sequence's own tokens, then the mean over sequences (DeepSeek-V2/V3)
  global        f over every token of the optimizer step so far: all gradient-accumulation micro-batches of
                the step up to this one, summed over all data-parallel ranks (an all-reduce of the counts);
                P over this forward's tokens (Qiu et al. 2025; Megatron-Core's global_aux_loss)

Counting: "first" counts each token's first choice only; "all" counts all k of its slots and divides by the
number of slots. Both normalize f to sum 1, so a uniform router scores 1. Relation to transformers'
load_balancing_loss_func (counts all k and divides by tokens, f sums to k): theirs = k * ours with "all".
Not a router (no registration); GatedRouter uses these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def slot_counts(experts: Tensor, num_experts: int, counting: str) -> Tensor:
    """[..., E] float counts of chosen slots per expert (-1 skipped); 'first' = column 0 only. experts [..., T, k]."""
    chosen = experts[..., :1] if counting == "first" else experts
    # a row of counts per token, then their sum: adding all T*k slots into one row of E counters would make
    # every slot of an expert wait on the same atomic (the counts are small integers: exact in any order);
    # unused slots (-1) go to a spare counter, with no boolean-mask indexing (a host sync on CUDA)
    onehot = torch.zeros(*chosen.shape[:-1], num_experts + 1, device=experts.device)
    onehot.scatter_add_(-1, torch.where(chosen >= 0, chosen, num_experts), torch.ones(chosen.shape, device=experts.device))
    return onehot[..., :num_experts].sum(-2)


def shares(counts: Tensor) -> Tensor:
    """f = counts / their sum (along the last dim), 0 where nothing was counted."""
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def batch_balance(probs: Tensor, experts: Tensor, counting: str) -> Tensor:
    """E * sum_e f_e P_e over the whole micro-batch. probs [T, E] normalized scores, experts [T, k]."""
    E = probs.shape[-1]
    f = shares(slot_counts(experts, E, counting)).to(probs.dtype)
    return E * (f * probs.mean(0)).sum()


def sequence_balance(probs: Tensor, experts: Tensor, counting: str, sequence_length: int | None) -> Tensor:
    """Mean over sequences of E * sum_e f_{s,e} P_{s,e}; sequences are consecutive runs of sequence_length
    tokens (None: the micro-batch is one sequence)."""
    T, E = probs.shape
    L = T if not sequence_length else sequence_length
    if T == 0 or T % L:
        raise ValueError(f"sequence balance needs whole sequences: {T} tokens is not a multiple of sequence length {L}")
    S = T // L
    f = shares(slot_counts(experts.view(S, L, -1), E, counting)).to(probs.dtype)  # [S, E]
    P = probs.view(S, L, E).mean(1)
    return E * (f * P).sum(-1).mean()


class GlobalCounts:
    """Running slot counts of one optimizer step, summed over ranks: the f of the global-batch loss.

    add() is called once per training forward (every rank the same number of times, as for any collective);
    reset() once per optimizer step. Micro-batch m of a step sees the counts of micro-batches 1..m (the
    later ones are not known when its backward runs; Megatron-Core does the same).
    """

    def __init__(self) -> None:
        self.counts: Tensor | None = None

    def add(self, counts: Tensor) -> Tensor:
        counts = counts.detach().clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        self.counts = counts if self.counts is None else self.counts + counts
        return self.counts

    def reset(self) -> None:
        self.counts = None


def global_balance(probs: Tensor, experts: Tensor, counting: str, tracker: GlobalCounts) -> Tensor:
    """E * sum_e f^global_e P_e: f from the tracker's step-so-far counts over all ranks, P from this micro-batch."""
    E = probs.shape[-1]
    f = shares(tracker.add(slot_counts(experts, E, counting))).to(probs.dtype)
    return E * (f * probs.mean(0)).sum()


def max_vio(counts: Tensor) -> Tensor:
    """max(load) / mean(load) - 1 along the last dim (0 where there is no load)."""
    mean = counts.mean(-1)
    return torch.where(mean > 0, counts.max(-1).values / mean.clamp_min(1e-12) - 1, torch.zeros_like(mean))


@dataclass
class BalancePart:
    """One layer's share of a layer-pooled balance loss: its coefficient, slot counts [E] and mean P [E]."""

    coef: float
    counts: Tensor
    mean_probs: Tensor


def pooled_balance(parts: list[BalancePart]) -> Tensor:
    """coef * E * sum_e f_e P_e with f the slot shares of all layers together and P the mean over layers
    (layers see the same tokens), as transformers concatenates every layer's logits."""
    counts = torch.stack([p.counts for p in parts]).sum(0)
    P = torch.stack([p.mean_probs for p in parts]).mean(0)
    return parts[0].coef * P.shape[-1] * (shares(counts).to(P.dtype) * P).sum()


def groups_per_token(experts: Tensor, group_size: int) -> Tensor:
    """[T] number of distinct expert groups (ranks, under expert parallelism with contiguous blocks) each token
    uses, unused slots (-1) skipped: the copies of the token an all-to-all that sends once per rank moves."""
    groups = torch.where(experts >= 0, experts // group_size, -1)
    sorted_groups = groups.sort(dim=-1).values
    new = torch.ones_like(sorted_groups, dtype=torch.bool)
    new[:, 1:] = sorted_groups[:, 1:] != sorted_groups[:, :-1]
    return (new & (sorted_groups >= 0)).sum(-1)
