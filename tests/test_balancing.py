"""Balancing scope, counting, score functions and selection options of the gate (issue 17; docs/routers.md).

Each test checks an option's defining property against a hand computation or a plain-PyTorch formula.
"""
from __future__ import annotations

import math
import pytest
import torch

from routerlab.moe.stats import RoutingStats, compute_stats, rank_overload, routing_metrics
from routerlab.routers import build_router
from routerlab.routers.base import switch_balance_loss

D = 8


def two_sided(router, strength: float = 1.0):
    """Gate so that x = +v prefers expert 0 and x = -v expert 1, with p = sigmoid(2 * strength)."""
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = strength
        router.gate.weight[1, 0] = -strength
    v = torch.zeros(D)
    v[0] = 1.0
    return v


def test_sequence_balance_sees_imbalance_that_the_batch_averages_out():
    r = build_router({"name": "switch", "alpha": 0.0, "balance_batch": 1.0, "balance_sequence": 1.0}, D, 2).train()
    v = two_sided(r)
    r.sequence_length = 4
    x = torch.stack([v] * 4 + [-v] * 4)  # sequence A all to expert 0, sequence B all to expert 1
    aux = r(x).aux
    p = 1 / (1 + math.exp(-2.0))
    # batch: f = (1/2, 1/2), P = (1/2, 1/2): 2 * (1/4 + 1/4) = 1.  sequence A: f = (1, 0), P_0 = p: 2p; B the same
    assert float(aux["balance_batch"]) == pytest.approx(1.0, abs=1e-6)
    assert float(aux["balance_sequence"]) == pytest.approx(2 * p, abs=1e-6)
    # the batch loss has no gradient here (sum_e P_e = 1 with f uniform); the sequence loss does
    r.zero_grad()
    aux["balance_batch"].backward(retain_graph=True)
    assert r.gate.weight.grad.abs().max() < 1e-6
    r.zero_grad()
    aux["balance_sequence"].backward()
    assert r.gate.weight.grad.abs().max() > 1e-2


def test_global_balance_counts_every_micro_batch_of_the_step():
    r = build_router({"name": "softmax_topk", "k": 1, "balance_batch": 1.0, "balance_global": 1.0}, D, 2).train()
    v = two_sided(r)
    p = 1 / (1 + math.exp(-2.0))
    first = r(torch.stack([v] * 4)).aux  # micro-batch 1: all to expert 0
    assert float(first["balance_global"]) == pytest.approx(2 * p, abs=1e-6)
    second = r(torch.stack([-v] * 4)).aux  # micro-batch 2: all to expert 1; the step so far is balanced
    assert float(second["balance_batch"]) == pytest.approx(2 * p, abs=1e-6)
    assert float(second["balance_global"]) == pytest.approx(2 * (0.5 * (1 - p) + 0.5 * p), abs=1e-6)
    r.before_step()  # a new optimizer step starts counting afresh
    third = r(torch.stack([-v] * 4)).aux
    assert float(third["balance_global"]) == pytest.approx(2 * p, abs=1e-6)
    r.eval()  # evaluation neither adds losses nor counts
    assert "balance_global" not in r(torch.stack([v] * 4)).aux


def transformers_load_balancing_loss(gate_logits: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' load_balancing_loss_func (Mixtral / Qwen-MoE), re-implemented: all k choices counted,
    divided by tokens; one layer's logits here."""
    routing_weights = gate_logits.softmax(-1)
    _, selected = routing_weights.topk(top_k, dim=-1)
    mask = torch.nn.functional.one_hot(selected, num_experts).float()  # [T, k, E]
    tokens_per_expert = mask.mean(0)  # [k, E]
    return num_experts * (tokens_per_expert * routing_weights.mean(0)[None]).sum()


def test_topk_counting_is_transformers_loss_over_k_and_first_counting_is_switch():
    torch.manual_seed(0)
    E, k = 8, 3
    x = torch.randn(64, D)
    r_all = build_router({"name": "softmax_topk", "k": k, "balance_batch": 1.0, "balance_count": "all"}, D, E).train()
    r_first = build_router({"name": "softmax_topk", "k": k, "balance_batch": 1.0, "balance_count": "first"}, D, E).train()
    r_first.load_state_dict(r_all.state_dict())
    logits = x @ r_all.gate.weight.T
    ours_all = float(r_all(x).aux["balance_batch"])
    assert k * ours_all == pytest.approx(float(transformers_load_balancing_loss(logits, E, k)), rel=1e-5)
    probs = logits.softmax(-1)
    switch = switch_balance_loss(probs, probs.argmax(-1, keepdim=True), E)
    assert float(r_first(x).aux["balance_batch"]) == pytest.approx(float(switch), rel=1e-5)


def test_maxvio_at_batch_sequence_and_global_scope():
    E = 4
    # micro-batch 1: two sequences of 4 tokens (k = 1); micro-batch 2 the mirror image
    a = torch.tensor([[0], [0], [0], [1], [2], [2], [3], [3]])
    b = torch.tensor([[1], [1], [1], [0], [3], [3], [2], [2]])
    stats = [compute_stats(e, None, torch.ones(E), torch.ones(8), sequence_length=4) for e in (a, b)]
    merged = stats[0].merge(stats[1])
    m = routing_metrics(merged)
    # global load (4, 4, 4, 4): 0.  each micro-batch (3, 1, 2, 2) / 2: 0.5.  sequences (3,1,0,0)/1 -> 2, (0,0,2,2)/1 -> 1
    assert m["max_vio"] == pytest.approx(0.0)
    assert m["max_vio_batch"] == pytest.approx(0.5)
    assert m["max_vio_seq"] == pytest.approx(1.5)
    assert m["mean_k"] == pytest.approx(1.0)


def test_rank_overload_is_the_busiest_rank_over_the_mean_rank():
    load = torch.tensor([4.0, 0.0, 2.0, 2.0])
    assert rank_overload(load, 2) == pytest.approx(1.0)  # ranks hold (4+0, 2+2)
    assert rank_overload(load, 4) == pytest.approx(2.0)
    stats = RoutingStats(load=load, kept=load, tokens=torch.tensor(8.0), dropped_tokens=torch.tensor(0.0))
    assert routing_metrics(stats, ranks=4)["rank_overload"] == pytest.approx(2.0)
