"""Balancing scope, counting, score functions and selection options of the gate (issue 17; docs/routers.md).

Each test checks an option's defining property against a hand computation or a plain-PyTorch formula.
"""
from __future__ import annotations

import math
from pathlib import Path
import pytest
import torch

from routerlab.moe.stats import RoutingStats, compute_stats, rank_overload, routing_metrics
from routerlab.routers import build_router
from routerlab.routers.base import switch_balance_loss

D = 8
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


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


# ---- selection options (every router: tests/test_router_options.py) -------------------------------------------------------------
E8 = 8


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "sqrt_softplus"])
def test_score_functions_choose_and_weight_by_the_named_score(score):
    torch.manual_seed(1)
    r = build_router({"name": "softmax_topk", "k": 2, "score": score, "renormalize": False, "route_scale": 2.5}, D, E8)
    x = torch.randn(32, D)
    out = r(x)
    logits = x @ r.gate.weight.T
    s = {"softmax": logits.softmax(-1), "sigmoid": torch.sigmoid(logits),
         "sqrt_softplus": torch.log1p(torch.exp(logits)).sqrt()}[score]
    top, idx = s.topk(2, dim=-1)
    assert torch.equal(out.experts, idx)
    assert torch.allclose(out.weights, 2.5 * top, atol=1e-6)


def test_renormalize_at_k1_only_with_normalize_k1():
    torch.manual_seed(2)
    x = torch.randn(16, D)
    plain = build_router({"name": "softmax_topk", "k": 1}, D, E8)
    forced = build_router({"name": "softmax_topk", "k": 1, "normalize_k1": True, "route_scale": 2.0}, D, E8)
    forced.load_state_dict(plain.state_dict())
    p = (x @ plain.gate.weight.T).softmax(-1)
    assert torch.allclose(plain(x).weights[:, 0], p.max(-1).values, atol=1e-6)  # renormalize ignored at k=1
    assert torch.allclose(forced(x).weights, torch.full((16, 1), 2.0))


def test_init_std_and_fp64_gate():
    r = build_router({"name": "switch", "init_std": 0.006, "fp64": True}, 256, 64)
    assert r.gate.weight.std().item() == pytest.approx(0.006, rel=0.05)  # 16384 draws: 5% is > 6 sigma
    assert r(torch.randn(4, 256)).logits.dtype == torch.float64


def test_group_limited_routing_keeps_each_token_inside_its_best_groups():
    torch.manual_seed(3)
    G, top_groups, k = 4, 2, 4
    spec = {"name": "bias_balanced", "k": k, "expert_groups": G, "top_groups": top_groups}
    r = build_router(spec, D, E8)
    free = build_router({**spec, "top_groups": 0}, D, E8)
    free.load_state_dict(r.state_dict())
    x = torch.randn(200, D)
    s = torch.sigmoid(x @ r.gate.weight.T)
    out = r(x)
    for t in range(x.shape[0]):  # reference, one token at a time
        group_score = [sorted(s[t, g * 2:(g + 1) * 2].tolist(), reverse=True)[:2] for g in range(G)]
        best = sorted(range(G), key=lambda g: -sum(group_score[g]))[:top_groups]
        allowed = [e for g in best for e in (2 * g, 2 * g + 1)]
        want = sorted(allowed, key=lambda e: -s[t, e].item())[:k]
        assert sorted(out.experts[t].tolist()) == sorted(want)
    from routerlab.routers.balancing import groups_per_token

    assert groups_per_token(torch.tensor([[0, 1, 4, -1], [7, 6, 0, 3]]), 2).tolist() == [2, 3]  # {0, 2}; {3, 0, 1}
    assert groups_per_token(out.experts, 2).max() <= top_groups
    assert groups_per_token(free(x).experts, 2).float().mean() > groups_per_token(out.experts, 2).float().mean()  # the limit bites


def test_null_experts_take_slots_without_compute():
    torch.manual_seed(4)
    n = 4
    r = build_router({"name": "softmax_topk", "k": 2, "null_experts": n, "renormalize": False}, D, E8)
    assert r.gate.weight.shape == (E8 + n, D)
    x = torch.randn(64, D)
    out = r(x)
    p = (x @ r.gate.weight.T).softmax(-1)  # over E + n
    top, idx = p.topk(2, dim=-1)
    real = idx < E8
    assert torch.equal(out.experts, torch.where(real, idx, -1))
    assert torch.allclose(out.weights, torch.where(real, top, 0.0), atol=1e-6)
    assert out.logits.shape == (64, E8)
    assert 0 < (out.experts >= 0).sum(1).float().mean() < 2  # realized k below the nominal 2


def test_a_router_refuses_a_selection_option_it_cannot_honour():
    with pytest.raises(Exception, match="does not take score='sigmoid'"):
        build_router({"name": "sparsemax", "score": "sigmoid"}, D, E8)
    with pytest.raises(Exception, match="expert_groups=3 must divide"):
        build_router({"name": "softmax_topk", "expert_groups": 3}, D, E8)


# ---- variable k -------------------------------------------------------------------------------------------
def test_top_p_takes_the_fewest_experts_reaching_the_mass():
    torch.manual_seed(5)
    r = build_router({"name": "top_p", "threshold": 0.5, "k_max": 8}, D, E8)
    x = torch.randn(64, D) * 3
    out = r(x)
    p = (x @ r.gate.weight.T).softmax(-1)
    for t in range(64):
        vals, ids = p[t].sort(descending=True)
        n = int((vals.cumsum(0) < 0.5).sum()) + 1  # fewest with cumulative mass >= 0.5
        assert sorted(out.experts[t][out.experts[t] >= 0].tolist()) == sorted(ids[:n].tolist())
    assert torch.allclose(out.weights.sum(1), torch.ones(64), atol=1e-6)
    assert len(set((out.experts >= 0).sum(1).tolist())) > 1  # k varies by token


def test_relu_router_l1_control_moves_toward_the_target_k():
    torch.manual_seed(6)
    r = build_router({"name": "relu", "k": 2.0, "l1_init": 1e-3, "l1_step": 2.0}, D, E8).train()
    x = torch.randn(128, D)
    out = r(x)
    gates = torch.relu(x @ r.gate.weight.T)
    assert torch.equal((out.experts >= 0).sum(1), (gates > 0).sum(1))  # every positive gate is used
    f = (gates > 0).float().mean(0)
    want = 1e-3 * (gates.mean(0) * E8 * f / f.sum()).sum()
    assert float(out.aux["l1"]) == pytest.approx(float(want), rel=1e-5)
    from routerlab.moe.stats import compute_stats

    stats = compute_stats(out.experts, None, torch.ones(E8), torch.ones(128))
    dense = float(stats.load.sum()) / 128 > 2  # random init: about E/2 experts per token
    r.after_step(stats)
    assert float(r.l1_coef) == pytest.approx(2e-3 if dense else 5e-4)


# ---- capacity, drop policies, shared experts (the MoE layer) ---------------------------------------------
class FixedRouter(torch.nn.Module):
    """Given experts and weights, whatever the input."""

    def __init__(self, experts, weights):
        super().__init__()
        self.experts, self.weights, self.num_experts = experts, weights, 4

    def forward(self, x, *, token_ids=None):
        from routerlab.routers import Routing

        return Routing(self.experts, self.weights, None, {})


def fixed_layer(experts, weights, **kw):
    from routerlab.moe import ExpertBank, MoELayer

    torch.manual_seed(0)
    return MoELayer(FixedRouter(experts, weights), ExpertBank(4, D, 8), backend="loop", **kw)


def test_drop_by_probability_keeps_each_experts_highest_weights():
    experts = torch.zeros(8, 1, dtype=torch.long)  # all 8 tokens to expert 0; capacity ceil(1 * 8 / 4) = 2
    weights = torch.tensor([[0.1], [0.9], [0.3], [0.8], [0.2], [0.5], [0.4], [0.6]])
    x = torch.randn(8, D)
    by_position = fixed_layer(experts, weights, capacity_factor=1.0)
    by_prob = fixed_layer(experts, weights, capacity_factor=1.0, drop_policy="probability")
    by_position(x), by_prob(x)
    kept = lambda layer: layer._pending[3][:, 0].nonzero().flatten().tolist()
    assert kept(by_position) == [0, 1]  # the first two tokens
    assert kept(by_prob) == [1, 3]  # the two highest weights, 0.9 and 0.8
    min_cap = fixed_layer(experts, weights, capacity_factor=1.0, min_capacity=5)
    min_cap(x)
    assert kept(min_cap) == [0, 1, 2, 3, 4]


def test_eval_capacity_factor_applies_at_evaluation_only():
    experts = torch.zeros(8, 1, dtype=torch.long)
    layer = fixed_layer(experts, torch.ones(8, 1), capacity_factor=1.0, eval_capacity_factor=None)
    x = torch.randn(8, D)
    layer.train()(x)
    assert int(layer._pending[3].sum()) == 2
    layer.eval()(x)
    assert int(layer._pending[3].sum()) == 8  # dropless at evaluation
    layer.eval_capacity_factor = 2.0
    layer(x)
    assert int(layer._pending[3].sum()) == 4


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_add_an_always_on_swiglu(gated):
    from routerlab.moe.shared import SharedExperts

    experts = torch.tensor([[0], [1], [2], [3]])
    routed = fixed_layer(experts, torch.ones(4, 1))
    torch.manual_seed(1)
    shared = SharedExperts(D, 2, 8, gated=gated)
    both = fixed_layer(experts, torch.ones(4, 1), shared=shared)
    x = torch.randn(4, D)
    w1, w3 = shared.gate_up.weight.chunk(2, 0)
    # two experts of hidden 8, each silu(x W1_i) * (x W3_i) W2_i, summed
    want = sum((torch.nn.functional.silu(x @ w1[8 * i:8 * (i + 1)].T) * (x @ w3[8 * i:8 * (i + 1)].T)) @ shared.down.weight[:, 8 * i:8 * (i + 1)].T for i in range(2))
    if gated:
        want = torch.sigmoid(x @ shared.gate.weight.T) * want
    assert torch.allclose(both(x), routed(x) + want, atol=1e-5)


# ---- quantile balancing ------------------------------------------------------------------------------------
def test_quantile_prices_solve_the_balanced_assignment_lp():
    from scipy.optimize import linprog

    from routerlab.routers.quantile_balanced import dual_prices

    torch.manual_seed(7)
    T, E, k = 48, 4, 1
    s = (torch.randn(T, E) + torch.tensor([1.5, 0.5, 0.0, -1.0])).softmax(-1).double()  # skewed toward expert 0
    C = T * k // E
    q = dual_prices(s, torch.zeros(E, dtype=torch.float64), k, C, sweeps=50)
    chosen = (s - q).topk(k, dim=-1).indices
    load = torch.bincount(chosen.flatten(), minlength=E)
    assert load.max() <= C
    # the LP optimum (scipy), against the score our routing collects
    A_tok = torch.kron(torch.eye(T), torch.ones(1, E)).numpy()
    A_exp = torch.kron(torch.ones(1, T), torch.eye(E)).numpy()
    lp = linprog(-s.flatten().numpy(), A_ub=A_exp, b_ub=[C] * E, A_eq=A_tok, b_eq=[k] * T, bounds=(0, 1), method="highs")
    assert float(s.gather(1, chosen).sum()) == pytest.approx(-lp.fun, rel=1e-6)
    assert torch.bincount(s.argmax(-1), minlength=E).max() > C  # unpriced top-1 would overload


def test_quantile_balanced_routes_with_stored_prices_at_evaluation():
    torch.manual_seed(8)
    r = build_router({"name": "quantile_balanced", "k": 1, "sweeps": 8}, D, 4).train()
    x = torch.randn(64, D) + 2 * torch.randn(1, D)
    r(x)
    prices = r.prices.clone()
    assert prices.max() > 0 and not r(x).aux  # no loss, no coefficient
    r.eval()
    out = r(x[:5])
    s = (x[:5] @ r.gate.weight.T).softmax(-1)
    assert torch.equal(out.experts[:, 0], (s - prices).argmax(-1))
    assert torch.allclose(out.weights[:, 0], s.gather(1, out.experts).squeeze(1), atol=1e-6)


# ---- recipes -----------------------------------------------------------------------------------------------
def test_recipe_ablation_trains_exactly_the_recipe_configs():
    from routerlab.config import make_config, read_config_file

    root = Path(__file__).resolve().parents[1]
    ablation = read_config_file(root / "configs/ablations/recipes.yaml", sections="name, description, base, axes, metrics", what="ablation")
    base_model = ablation["base"]["model"]
    for entry in ablation["axes"]["router"]:
        entry = dict(entry)
        label, extra = entry.pop("label"), entry.pop("set", {})
        recipe = make_config(read_config_file(root / f"configs/recipes/{label}.yaml"))
        assert recipe.router == make_config({"router": entry}).router, label
        model = {**base_model, **{key.split(".", 1)[1]: v for key, v in extra.items()}}
        assert recipe.model == make_config({"model": model}).model, label
        assert {"task": recipe.task, "train": recipe.train.model_dump()} == {
            "task": make_config({"task": ablation["base"]["task"]}).task, "train": make_config({"train": ablation["base"]["train"]}).train.model_dump()}


def test_layer_pooled_balance_is_transformers_loss_over_concatenated_layers():
    from routerlab.models.common import MoEModel

    torch.manual_seed(9)
    E, k = 8, 2

    class TwoLayers(MoEModel):
        def __init__(self, mode):
            super().__init__()
            self.a = fixed_or_gated({"name": "softmax_topk", "k": k, "balance_batch": 1.0, "balance_layers": mode}, E)
            self.b = fixed_or_gated({"name": "softmax_topk", "k": k, "balance_batch": 1.0, "balance_layers": mode}, E)

    pooled, summed = TwoLayers("pool").train(), TwoLayers("sum").train()
    summed.load_state_dict(pooled.state_dict())
    xa, xb = torch.randn(32, D), torch.randn(32, D)
    for m in (pooled, summed):
        m.a(xa), m.b(xb)
    la, lb = xa @ pooled.a.router.gate.weight.T, xb @ pooled.b.router.gate.weight.T
    aux = pooled.aux_losses()
    assert set(aux) == {"pooled/balance_batch"}
    assert k * float(aux["pooled/balance_batch"]) == pytest.approx(float(transformers_load_balancing_loss(torch.cat([la, lb]), E, k)), rel=1e-5)
    per_layer = summed.aux_losses()
    assert float(sum(per_layer.values())) == pytest.approx(float(transformers_load_balancing_loss(la, E, k) + transformers_load_balancing_loss(lb, E, k)) / k, rel=1e-5)


def fixed_or_gated(spec, E):
    from routerlab.moe import ExpertBank, MoELayer

    return MoELayer(build_router(spec, D, E), ExpertBank(E, D, 8), backend="loop")


def test_quantile_balanced_eval_prices_are_the_ema_of_batch_prices():
    torch.manual_seed(10)
    r = build_router({"name": "quantile_balanced", "k": 1, "eval_ema": 0.5}, D, 4).train()
    shift = 2 * torch.randn(1, D)
    r(torch.randn(64, D) + shift)
    q1 = r.prices.clone()
    r(torch.randn(64, D) + shift)
    q2 = r.prices.clone()
    assert torch.allclose(r.eval_prices, 0.5 * (0.5 * q1) + 0.5 * q2)
