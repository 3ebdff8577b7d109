"""Balanced token -> expert assignment, shared by `sinkhorn` and `base`. Registers no router.

`balanced_capacities` fixes the loads: T = qE + r tokens, every expert gets q or q + 1 and exactly r get q + 1,
so loads differ by at most one.
`greedy_balanced`  rounds a score matrix to such an assignment by proposal rounds (vectorized, at most about
                   E rounds per phase): every unassigned token proposes to its best expert with room left;
                   each expert keeps its best proposers up to its room.
`auction_balanced` maximizes the total score under those loads with Bertsekas' auction algorithm for
                   similar objects (Jacobi bidding, epsilon scaling); epsilon-optimal: within T * eps of the
                   optimum. The r "extra" places are modelled as one extra slot per expert plus E - r dummy
                   tokens that can only sit on extra slots.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# the gate's selection options that the balanced top-1 assignment of `sinkhorn` and `base` cannot honour
_LOADS = "the balanced assignment fixes every expert's load at T/E"
BALANCED_ASSIGNMENT_REFUSES = {
    "expert_groups": f"{_LOADS}; limiting each token to its top groups can make those loads infeasible",
    "top_groups": f"{_LOADS}; limiting each token to its top groups can make those loads infeasible",
    "null_experts": f"{_LOADS}, so null experts would skip a fixed share of tokens, not the easy ones",
}


def sinkhorn_log(logits: Tensor, iters: int) -> Tensor:
    """Log of the Sinkhorn plan of exp(logits): rows sum to 1, columns to T/E (approximately after `iters`)."""
    num_tokens, num_experts = logits.shape
    log_p = logits.float()
    col_mass = math.log(num_tokens / num_experts)
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, 0, keepdim=True) + col_mass
        log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True)
    return log_p


def rank_within(groups: Tensor, values: Tensor, num_groups: int) -> Tensor:
    """Rank (0 = largest value) of every entry among the entries of the same group."""
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    g = groups[order]
    counts = torch.zeros(num_groups, dtype=torch.long, device=g.device).scatter_add_(0, g, torch.ones_like(g))  # bincount reads its max on the host
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[g]
    return rank


def _fill(scores: Tensor, room: Tensor, assign: Tensor, stop_early: bool) -> Tensor:
    """Assign tokens with assign == -1 greedily (proposal rounds) into the remaining room; in place.

    E + 1 rounds always suffice: a round either places every proposer or fills an expert. Without stop_early all of
    them run, masked, and no value is read on the host (CUDA: train.cuda_graph can capture it).
    """
    num_experts = scores.shape[1]
    room = torch.cat([room, room.new_zeros(1)])  # a last group, with no room, for the tokens already placed
    for _ in range(num_experts + 1):
        pending = assign < 0
        if stop_early and not (pending.any() and room.any()):
            break
        value, choice = scores.masked_fill((room[:num_experts] <= 0)[None, :], float("-inf")).max(1)
        choice = torch.where(pending, choice, num_experts)
        accept = rank_within(choice, value, num_experts + 1) < room[choice]
        assign.copy_(torch.where(accept, choice, assign))
        room -= torch.zeros_like(room).scatter_add_(0, choice, accept.long())
    return assign


def balanced_capacities(num_tokens: int, num_experts: int) -> tuple[int, int]:
    return divmod(num_tokens, num_experts)


def greedy_balanced(scores: Tensor) -> Tensor:
    """[T, E] scores -> [T] experts with loads q or q + 1 (r of them q + 1), higher scores served first."""
    num_tokens, num_experts = scores.shape
    q, r = balanced_capacities(num_tokens, num_experts)
    scores = scores.detach().float()
    assign = torch.full((num_tokens,), -1, dtype=torch.long, device=scores.device)
    stop_early = not scores.is_cuda  # the same assignment either way
    _fill(scores, torch.full((num_experts,), q, device=scores.device, dtype=torch.long), assign, stop_early)
    if r:
        _fill(scores, torch.ones(num_experts, device=scores.device, dtype=torch.long), assign, stop_early)
    return assign


def _auction(scores: Tensor, capacity: Tensor, eps: float, prices: Tensor, max_rounds: int) -> tuple[Tensor, Tensor, bool]:
    """One epsilon phase of the auction for objects with capacities (sum capacity = number of persons)."""
    num_persons, num_objects = scores.shape
    assign = torch.full((num_persons,), -1, dtype=torch.long, device=scores.device)
    bid_of = torch.zeros(num_persons, dtype=scores.dtype, device=scores.device)
    for _ in range(max_rounds):
        pending = (assign < 0).nonzero().squeeze(1)
        if pending.numel() == 0:
            return assign, prices, True
        values = scores[pending] - prices
        top = values.topk(2, dim=1)
        best = top.indices[:, 0]
        bids = prices[best] + (top.values[:, 0] - top.values[:, 1]) + eps
        held = (assign >= 0).nonzero().squeeze(1)
        persons = torch.cat([held, pending])
        objects = torch.cat([assign[held], best])
        offers = torch.cat([bid_of[held], bids])
        keep = rank_within(objects, offers, num_objects) < capacity[objects]
        assign[persons] = torch.where(keep, objects, torch.full_like(objects, -1))
        bid_of[persons[keep]] = offers[keep]
        holders = assign >= 0
        load = torch.bincount(assign[holders], minlength=num_objects)
        lowest = torch.full((num_objects,), float("inf"), dtype=scores.dtype, device=scores.device)
        lowest = lowest.scatter_reduce(0, assign[holders], bid_of[holders], reduce="amin")
        prices = torch.where((load >= capacity) & (capacity > 0), lowest, prices)
    return assign, prices, False


def auction_balanced(scores: Tensor, rel_eps: float = 1e-3, max_rounds: int = 2000) -> Tensor:
    """[T, E] scores -> [T] experts maximizing the total score with balanced loads (see module doc).

    Falls back to `greedy_balanced` if a phase does not finish in max_rounds (loads stay balanced).
    """
    num_tokens, num_experts = scores.shape
    scores = scores.detach().float()
    if num_experts == 1 or num_tokens == 0:
        return torch.zeros(num_tokens, dtype=torch.long, device=scores.device)
    q, r = balanced_capacities(num_tokens, num_experts)
    span = float(scores.max() - scores.min()) + 1e-6
    if r == 0:
        big = scores
        capacity = torch.full((num_experts,), q, dtype=torch.long, device=scores.device)
    else:
        # objects: E main slots (capacity q) + E extra slots (capacity 1); E - r dummies fit only extra slots
        dummies = num_experts - r
        forbidden = -4.0 * span * (num_tokens + num_experts)
        real = torch.cat([scores, scores], 1)
        dummy = torch.cat([scores.new_full((dummies, num_experts), forbidden), scores.new_zeros(dummies, num_experts)], 1)
        big = torch.cat([real, dummy], 0)
        capacity = torch.cat([torch.full((num_experts,), q), torch.ones(num_experts, dtype=torch.long)]).to(scores.device)
    prices = torch.where(capacity > 0, 0.0, float("inf")).to(big)
    eps = span / 4
    final_eps = span * rel_eps
    while True:
        assign, prices, done = _auction(big, capacity, eps, prices, max_rounds)
        if not done:
            return greedy_balanced(scores)
        if eps <= final_eps:
            break
        eps = max(eps / 8, final_eps)
    return assign[:num_tokens] % num_experts
