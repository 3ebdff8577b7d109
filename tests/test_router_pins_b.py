"""Pins of router definitions the mutation run (benchmarks/mutation.py routers; docs/reliability.md) found
unpinned: the gate options of routers/gated.py and the selection rules of the zoo routers. Every expected value
comes from a hand computation or a plain-PyTorch / Python reference written here. Tiny CPU shapes, fixed seeds."""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from routerlab.errors import ConfigError
from routerlab.routers import build_router
from routerlab.routers.gated import GateParams, GatedRouter, group_limit_mask, importance_weights
from routerlab.routers.registry import router_entry

D = 8


def make(name, E=4, d_model=D, **params):
    torch.manual_seed(0)
    return build_router({"name": name, **params}, d_model, E)


def tokens(T, seed=1, d_model=D):
    return torch.randn(T, d_model, generator=torch.Generator().manual_seed(seed))


def gate_logits(router, x):
    return x.float() @ router.gate.weight.detach().float().t()


def slot_shares(experts, E, first_only=False):
    """f_e = the share of chosen slots on expert e (-1 skipped), counted in plain Python."""
    counts = [0.0] * E
    for row in experts.tolist():
        for e in row[:1] if first_only else row:
            if e >= 0:
                counts[e] += 1
    total = max(sum(counts), 1.0)
    return torch.tensor([c / total for c in counts])


# ---- parameters: every range check names its option and its bound; the closed ends are accepted ----------------
RANGE_ERRORS = [  # (router, options, the whole message); "gate" is GateParams, the options every learned router takes
    ("gate", {"z_loss": -1.0}, "z_loss must be >= 0, got -1.0"),
    ("gate", {"jitter": 1.0}, "jitter must be in [0, 1), got 1.0"),
    ("gate", {"temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ("gate", {"smoothing": 1.0}, "smoothing must be in [0, 1), got 1.0"),
    ("gate", {"ema_decay": 1.0}, "ema_decay must be in [0, 1), got 1.0"),
    ("gate", {"router_clip": -1.0}, "router_clip must be >= 0 (0 = off), got -1.0"),
    ("gate", {"importance_balance": -1.0}, "importance_balance must be >= 0, got -1.0"),
    ("gate", {"importance_power": -1.0}, "importance_power must be >= 0, got -1.0"),
    ("gate", {"balance_batch": -1.0}, "balance_batch must be >= 0, got -1.0"),
    ("gate", {"balance_sequence": -1.0}, "balance_sequence must be >= 0, got -1.0"),
    ("gate", {"balance_global": -1.0}, "balance_global must be >= 0, got -1.0"),
    ("gate", {"balance_count": "some"}, "balance_count must be 'all' or 'first', got 'some'"),
    ("gate", {"balance_layers": "mean"}, "balance_layers must be 'sum' or 'pool', got 'mean'"),
    ("gate", {"init_std": -1.0}, "init_std must be >= 0 (0 = default init), got -1.0"),
    ("gate", {"score": "relu"}, "score must be one of softmax, sigmoid, sqrt_softplus, got 'relu'"),
    ("gate", {"route_scale": 0.0}, "route_scale must be > 0, got 0.0"),
    ("gate", {"expert_groups": 0}, "expert_groups must be >= 1, got 0"),
    ("gate", {"expert_groups": 2, "top_groups": 3}, "top_groups must be in [0, expert_groups=2] (0 = off), got 3"),
    ("gate", {"null_experts": -1}, "null_experts must be >= 0, got -1"),
    ("softmax_topk", {"k": 0}, "k must be >= 1, got 0"),
    ("adversarial_critic", {"k": 0}, "k must be >= 1, got 0"),
    ("adversarial_critic", {"weight": -0.1}, "weight must be >= 0, got -0.1"),
    ("adversarial_critic", {"group_size": 0}, "group_size must be >= 1, got 0"),
    ("adversarial_critic", {"hidden": 0}, "hidden must be >= 1, got 0"),
    ("adversarial_critic", {"critic_lr": -0.1}, "critic_lr must be >= 0, got -0.1"),
    ("adversarial_critic", {"critic_steps": 0}, "critic_steps must be >= 1, got 0"),
    ("adversarial", {"k": 0}, "k must be >= 1, got 0"),
    ("adversarial", {"price_lr": -0.1}, "price_lr must be >= 0, got -0.1"),
    ("adversarial", {"price_max": 0.0}, "price_max must be > 0, got 0.0"),
    ("adversarial", {"price_decay": -0.1}, "price_decay must be >= 0, got -0.1"),
    ("adversarial", {"price_decay": 2.0, "price_lr": 0.5}, "price_decay * price_lr must be < 1 (else the prices overshoot), got 1.0"),
    ("adversarial", {"signal": "both"}, "signal must be 'soft' or 'hard', got 'both'"),
    ("dselect_k", {"k": 0}, "k must be >= 1, got 0"),
    ("dselect_k", {"gamma": 0.0}, "gamma must be > 0, got 0.0"),
    ("dselect_k", {"entropy_reg": -0.1}, "entropy_reg must be >= 0, got -0.1"),
    ("dselect_k", {"k_max": -1}, "k_max must be >= 0, got -1"),
    ("expert_choice", {"capacity_factor": 0.0}, "capacity_factor must be > 0, got 0.0"),
    ("gshard_top2", {"alpha": -0.1}, "alpha must be >= 0, got -0.1"),
    ("gshard_top2", {"groups": 0}, "groups must be >= 1, got 0"),
    ("gshard_top2", {"capacity_factor": 0.0}, "capacity_factor must be > 0, or null for no router-level capacity, got 0.0"),
    ("hierarchical", {"groups": 0, "k_groups": 0}, "groups must be >= 1, got 0"),
    ("hierarchical", {"k_groups": 3}, "k_groups must be in [1, groups=2], got 3"),
    ("hierarchical", {"k_groups": 0}, "k_groups must be in [1, groups=2], got 0"),
    ("hierarchical", {"k": 0}, "k must be >= 1, got 0"),
    ("hierarchical", {"alpha": -0.1}, "alpha must be >= 0, got -0.1"),
    ("quantile_balanced", {"k": 0}, "k must be >= 1, got 0"),
    ("quantile_balanced", {"capacity": 0.5}, "capacity must be >= 1 (1 = exactly balanced), got 0.5"),
    ("quantile_balanced", {"sweeps": 0}, "sweeps must be >= 1, got 0"),
    ("quantile_balanced", {"eval_ema": 1.0}, "eval_ema must be in [0, 1), got 1.0"),
    ("relu", {"k": 0.0}, "k must be > 0, got 0.0"),
    ("relu", {"l1_init": 0.0}, "l1_init must be > 0, got 0.0"),
    ("relu", {"l1_step": 1.0}, "l1_step must be > 1, got 1.0"),
    ("sparsemax", {"k_max": 0}, "k_max must be >= 1, got 0"),
    ("sparsemax", {"alpha": -0.1}, "alpha must be >= 0, got -0.1"),
    ("top_p", {"threshold": 0.0}, "threshold must be in (0, 1], got 0.0"),
    ("top_p", {"threshold": 1.5}, "threshold must be in (0, 1], got 1.5"),
    ("top_p", {"k_max": 0}, "k_max must be >= 1, got 0"),
]
CLOSED_ENDS = [  # the boundary values each range includes
    ("gate", {"ema_decay": 0.0, "importance_power": 0.0, "expert_groups": 2, "top_groups": 2, "jitter": 0.0,
              "smoothing": 0.0, "z_loss": 0.0, "init_std": 0.0, "null_experts": 0}),
    ("adversarial_critic", {"k": 1, "weight": 0.0, "group_size": 1, "hidden": 1, "critic_lr": 0.0, "critic_steps": 1}),
    ("adversarial", {"k": 1, "price_lr": 0.0, "price_decay": 0.0}),
    ("adversarial", {"price_decay": 1.9, "price_lr": 0.5}),
    ("dselect_k", {"k": 1, "entropy_reg": 0.0, "k_max": 0}),
    ("gshard_top2", {"alpha": 0.0, "groups": 1, "capacity_factor": None}),
    ("hierarchical", {"groups": 2, "k_groups": 2, "k": 1, "alpha": 0.0}),
    ("hierarchical", {"groups": 1, "k_groups": 1}),
    ("quantile_balanced", {"k": 1, "capacity": 1.0, "sweeps": 1, "eval_ema": 0.0}),
    ("sparsemax", {"k_max": 1, "alpha": 0.0}),
    ("top_p", {"threshold": 1.0, "k_max": 1}),
]


def params_type(name):
    return GateParams if name == "gate" else router_entry(name).params


@pytest.mark.parametrize("name, options, message", RANGE_ERRORS)
def test_parameters_refuse_out_of_range_values_naming_the_option_and_bound(name, options, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        params_type(name)(**options)


@pytest.mark.parametrize("name, options", CLOSED_ENDS)
def test_parameters_accept_the_closed_ends_of_their_ranges(name, options):
    params_type(name)(**options)


def test_a_refusal_by_an_unregistered_router_names_its_class():
    class Unregistered(GatedRouter):
        refuses = {"score": "it has no scores"}

    with pytest.raises(ConfigError, match=r"^router 'Unregistered' does not take score='sigmoid': it has no scores$"):
        Unregistered(D, 4, GateParams(score="sigmoid"))


# ---- gate: init, jitter, temperature ---------------------------------------------------------------------------
def test_init_std_draws_gate_weights_centred_on_zero_with_that_spread():
    w = make("softmax_topk", E=32, d_model=64, init_std=0.02).gate.weight.detach()
    assert abs(float(w.mean())) < 0.002  # 2048 draws: the standard error of the mean is 0.00044
    assert float(w.std()) == pytest.approx(0.02, rel=0.05)


def test_jitter_multiplies_the_input_by_uniform_noise_in_one_minus_to_one_plus_jitter():
    r = make("softmax_topk", E=2, d_model=1, jitter=0.5).train()
    x = torch.ones(4000, 1)
    factors = r.raw_logits(x).detach() / r.gate.weight.detach().t()  # [T, E]: x * u * w / w, u per token
    u = factors[:, 0]
    torch.testing.assert_close(factors[:, 1], u)  # one factor per input coordinate, shared by the experts
    assert 0.5 <= float(u.min()) < 0.51 and 1.49 < float(u.max()) <= 1.5
    assert float(u.mean()) == pytest.approx(1.0, abs=0.02)


def test_temperature_two_halves_the_gate_logits():
    r = make("softmax_topk", temperature=2.0)
    x = tokens(6)
    torch.testing.assert_close(r.gate_logits(x), gate_logits(r, x) / 2)


# ---- scores: normalized for the balance losses, group limit ----------------------------------------------------
@pytest.mark.parametrize("score", ["softmax", "sigmoid", "sqrt_softplus"])
def test_balance_probs_are_the_scores_normalized_per_token(score):
    r = make("softmax_topk", score=score)
    logits = torch.tensor([[-3.0, -4.0, -2.5, -5.0], [1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 3.0, -2.0]])
    if score == "softmax":
        s = logits.exp()
    elif score == "sigmoid":
        s = 1 / (1 + (-logits).exp())
    else:
        s = torch.log1p(logits.exp()).sqrt()
    torch.testing.assert_close(r.balance_probs(logits), s / s.sum(1, keepdim=True))


def best_groups(scores, groups, top_groups, best_of):
    """Reference: per token, the experts of the top_groups groups ranked by the sum of their best_of scores."""
    T, E = scores.shape
    size = E // groups
    keep = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        rank = sorted(range(groups), key=lambda g: -sum(sorted(scores[t, g * size:(g + 1) * size].tolist())[-best_of:]))
        for g in rank[:top_groups]:
            keep[t, g * size:(g + 1) * size] = True
    return keep


def test_group_limit_ranks_groups_by_their_best_two_scores_or_their_one_score():
    # group 0 wins on its best two (1.0 > 0.95), group 1 would win on all three (1.39 > 1.1)
    scores = torch.tensor([[0.9, 0.1, 0.1, 0.5, 0.45, 0.44], [0.0, 0.2, 0.15, 0.3, 0.0, 0.0]])
    torch.testing.assert_close(group_limit_mask(scores, 2, 1), best_groups(scores, 2, 1, best_of=2))
    assert group_limit_mask(scores, 2, 1)[0].tolist() == [True] * 3 + [False] * 3
    single = torch.tensor([[0.1, 0.7, 0.3, 0.2], [0.4, 0.1, 0.2, 0.9]])  # groups of one expert: the top experts
    torch.testing.assert_close(group_limit_mask(single, 4, 2), best_groups(single, 4, 2, best_of=1))


def test_group_limit_leaves_the_null_experts_open():
    r = make("softmax_topk", E=4, k=2, expert_groups=2, top_groups=1, null_experts=2)
    with torch.no_grad():
        r.gate.weight.normal_(0.0, 1.0)
    x = tokens(20)
    out = r.eval()(x)
    scores = gate_logits(r, x).softmax(-1)  # over 4 real + 2 null experts
    allowed = torch.cat([best_groups(scores[:, :4], 2, 1, best_of=2), torch.ones(20, 2, dtype=torch.bool)], 1)
    chosen = scores.masked_fill(~allowed, -1.0).topk(2, -1).indices
    assert torch.equal(out.experts, torch.where(chosen < 4, chosen, -1))
    assert (chosen >= 4).any() and (chosen < 4).any()  # the draw exercises both kinds


def test_route_topk_selects_and_weights_by_the_noisy_scores():
    r = make("softmax_topk", E=5)
    x, noise = tokens(12), torch.randn(12, 5, generator=torch.Generator().manual_seed(3))
    out = r.route_topk(x, 2, True, logit_noise=noise)
    noisy = (gate_logits(r, x) + noise).softmax(-1)
    top, idx = noisy.topk(2, -1)
    assert torch.equal(out.routing.experts, idx)
    torch.testing.assert_close(out.routing.weights, top / top.sum(1, keepdim=True))
    torch.testing.assert_close(out.logits, gate_logits(r, x))  # the logits stay clean


@pytest.mark.parametrize("name", ["sparsemax", "top_p"])
def test_route_scale_two_doubles_the_weights_of_a_router_finished_by_the_hook(name):
    plain, scaled = make(name), make(name, route_scale=2.0)
    x = tokens(10)
    a, b = plain.eval()(x), scaled.eval()(x)
    assert torch.equal(a.experts, b.experts)
    torch.testing.assert_close(b.weights, 2 * a.weights)


# ---- stability losses: balance scopes, counting, entropy, importance -------------------------------------------
def batch_balance_ref(probs, experts, first_only=False):
    return probs.shape[1] * float((slot_shares(experts, probs.shape[1], first_only) * probs.mean(0)).sum())


def test_balance_batch_of_a_single_token_and_no_loss_for_no_tokens():
    r = make("softmax_topk", k=2, balance_batch=1.0, importance_balance=1.0).train()
    x = tokens(1)
    out = r(x)
    probs = gate_logits(r, x).softmax(-1)
    assert float(out.aux["balance_batch"].detach()) == pytest.approx(batch_balance_ref(probs, out.experts), rel=1e-5)
    assert "importance_balance" in out.aux
    empty = r(torch.zeros(0, D))
    assert "balance_batch" not in empty.aux and "importance_balance" not in empty.aux


@pytest.mark.parametrize("count", ["first", "all"])  # the same at k=1: one choice per token
def test_stability_losses_count_the_argmax_when_given_no_choices(count):
    r = make("softmax_topk", E=4, balance_batch=1.0, balance_count=count, importance_balance=1.0).train()
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.5, 0.0, 0.5, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                           [0.2, 0.0, 0.0, 0.0]])
    aux = r.stability_losses(logits)
    probs = logits.softmax(-1)
    top1 = probs.argmax(1, keepdim=True)
    assert float(aux["balance_batch"].detach()) == pytest.approx(batch_balance_ref(probs, top1), rel=1e-5)
    assert float(aux["importance_balance"].detach()) == pytest.approx(importance_ref(probs, top1, 1.0), rel=1e-5)


@pytest.mark.parametrize("count", ["first", "all"])
def test_sequence_global_and_pooled_balance_count_first_or_all_slots(count):
    first = count == "first"
    r = make("softmax_topk", E=4, k=2, balance_count=count, balance_sequence=1.0, balance_global=1.0,
             balance_batch=1.0, balance_layers="pool").train()
    r.sequence_length = 3
    x = tokens(6)
    out = r(x)
    probs = gate_logits(r, x).softmax(-1)
    seq = [batch_balance_ref(probs[s:s + 3], out.experts[s:s + 3], first) for s in (0, 3)]
    assert float(out.aux["balance_sequence"].detach()) == pytest.approx(sum(seq) / 2, rel=1e-5)
    assert float(out.aux["balance_global"].detach()) == pytest.approx(batch_balance_ref(probs, out.experts, first), rel=1e-5)
    counts = slot_shares(out.experts, 4, first) * (6 if first else 12)
    torch.testing.assert_close(r.balance_part.counts, counts)
    assert "balance_batch" not in out.aux  # pooled: the model adds it over the layers


def test_balance_sequence_alone_is_charged():
    r = make("softmax_topk", balance_sequence=0.5).train()
    x = tokens(4)
    out = r(x)
    probs = gate_logits(r, x).softmax(-1)
    assert float(out.aux["balance_sequence"].detach()) == pytest.approx(0.5 * batch_balance_ref(probs, out.experts), rel=1e-5)


def test_entropy_loss_is_the_mean_token_entropy_over_tokens_not_experts():
    r = make("softmax_topk", E=4, entropy=0.5).train()
    x = tokens(7)
    p = gate_logits(r, x).softmax(-1)
    want = 0.5 * sum(-sum(v * math.log(v) for v in row) for row in p.tolist()) / 7
    assert float(r(x).aux["entropy"].detach()) == pytest.approx(want, rel=1e-5)


def importance_ref(probs, experts, power):
    """c=1: E * sum_i f_i P~_i, P~ the token-weighted mean probability, w_x = (1/E / f1_{e(x)})^power with f1 the
    shares of first choices (a token whose first slot is unused counts its argmax)."""
    T, E = probs.shape
    top1 = [row[0] if row[0] >= 0 else int(probs[t].argmax()) for t, row in enumerate(experts.tolist())]
    f1 = [top1.count(e) / T for e in range(E)]
    w = torch.tensor([((1 / E) / f1[e]) ** power for e in top1])
    P = (w[:, None] * probs).sum(0) / w.sum()
    return E * float((slot_shares(experts, E) * P).sum())


def test_importance_balance_takes_the_first_slot_as_the_top1_and_counts_every_slot():
    r = make("softmax_topk", E=4, importance_balance=1.0, importance_power=2.0).train()
    logits = torch.tensor([[2.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 3.0], [0.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.5],
                           [0.0, 0.0, 2.0, 1.0]])
    # expert 0 first where it is not the argmax; an unused first slot; second slots beside them
    experts = torch.tensor([[2, 0], [0, 3], [-1, 1], [3, 0], [2, -1]])
    aux = r.stability_losses(logits, experts)
    assert float(aux["importance_balance"].detach()) == pytest.approx(importance_ref(logits.softmax(-1), experts, 2.0), rel=1e-5)


def test_importance_weights_of_a_single_token():
    torch.testing.assert_close(importance_weights(torch.tensor([2]), 4, 1.0), torch.tensor([0.25]))


# ---- adversarial_critic: the critic MLP, the usage statistics, the generator loss and the critic's Adam ----------
def critic_ref(flat, usage, hidden):
    """D(u) = w2 . tanh(W1 u + b1) + b, the weights read from `flat` in that order, written as loops."""
    E = usage.shape[1]
    W1 = [[float(flat[h * E + e]) for e in range(E)] for h in range(hidden)]
    b1 = [float(flat[hidden * E + h]) for h in range(hidden)]
    w2 = [float(flat[hidden * (E + 1) + h]) for h in range(hidden)]
    return torch.tensor([sum(w2[h] * math.tanh(sum(W1[h][e] * float(u[e]) for e in range(E)) + b1[h]) for h in range(hidden))
                         + float(flat[-1]) for u in usage])


def test_critic_logit_is_a_tanh_mlp_over_the_packed_weights():
    from routerlab.routers.adversarial_critic import critic_logit

    hidden, E = 3, 4
    flat = torch.randn(hidden * E + 2 * hidden + 1, generator=torch.Generator().manual_seed(0))
    usage = torch.tensor([[2.0, 1.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(critic_logit(flat, usage, hidden), critic_ref(flat, usage, hidden))


def test_critic_starts_with_scaled_gaussian_weights_and_zero_biases():
    r = make("adversarial_critic", E=16, hidden=256)
    hidden, E, flat = 256, 16, r.critic
    assert flat.shape == (hidden * E + 2 * hidden + 1,)
    W1, b1, w2 = flat[: hidden * E], flat[hidden * E: hidden * (E + 1)], flat[hidden * (E + 1): -1]
    assert float(W1.std()) == pytest.approx(1 / math.sqrt(E), rel=0.05)  # 4096 draws
    assert float(w2.std()) == pytest.approx(1 / math.sqrt(hidden), rel=0.15)  # 256 draws
    assert not b1.any() and float(flat[-1]) == 0.0
    assert not r.critic_m.any() and not r.critic_v.any() and int(r.critic_step) == 0


def usage_ref(experts, E, k, n):
    """[G, E] E * (slot share of each expert in each group of n tokens), sorted descending; -1 slots skipped."""
    rows = []
    for g in range(experts.shape[0] // n):
        counts = [0.0] * E
        for row in experts[g * n:(g + 1) * n].tolist():
            for e in row:
                if e >= 0:
                    counts[e] += 1
        rows.append(sorted((E * c / (n * k) for c in counts), reverse=True))
    return torch.tensor(rows)


def test_group_usage_is_hard_counts_with_the_soft_mean_as_its_gradient():
    r = make("adversarial_critic", E=4, k=2, group_size=3)
    probs = torch.rand(7, 4, generator=torch.Generator().manual_seed(0)).softmax(-1).requires_grad_()
    experts = torch.tensor([[0, 1], [0, 2], [0, -1], [3, 1], [1, 2], [1, 0], [2, 3]])  # the 7th token: no whole group
    usage = r.group_usage(probs, experts)
    torch.testing.assert_close(usage.detach(), usage_ref(experts, 4, 2, 3))
    # straight-through: d usage[g, j] / d probs = E / n on the tokens of group g, for the expert sorted to j
    usage[0, 0].backward()
    top_expert = 0  # group 0: expert 0 holds 3 of 6 slots
    want = torch.zeros(7, 4)
    want[:3, top_expert] = 4 / 3
    torch.testing.assert_close(probs.grad, want)


def test_group_usage_of_fewer_tokens_than_a_group_is_one_group_of_them_all():
    r = make("adversarial_critic", E=4, k=1, group_size=32)
    experts = torch.tensor([[0], [0], [2], [1], [0]])
    usage = r.group_usage(torch.full((5, 4), 0.25), experts)
    torch.testing.assert_close(usage, usage_ref(experts, 4, 1, 5))
    r.train()(tokens(5))
    assert r._group_n == 5 and r._usage.shape == (1, 4)
    assert "critic" in r(tokens(1)).aux  # one token is one group of one


def test_balanced_usage_is_random_routing_to_k_distinct_uniform_experts():
    r = make("adversarial_critic", E=4, k=2)
    usage = r.balanced_usage(3, 5, torch.Generator().manual_seed(7))
    draws = torch.rand(15, 4, generator=torch.Generator().manual_seed(7))  # k largest of E uniforms: a uniform k-subset
    picks = [sorted(range(4), key=lambda e: -float(row[e]))[:2] for row in draws]
    torch.testing.assert_close(usage, usage_ref(torch.tensor(picks), 4, 2, 5))
    torch.testing.assert_close(usage.sum(1), torch.full((3,), 4.0))
    one = make("adversarial_critic", E=8, k=1).balanced_usage(1, 1, torch.Generator().manual_seed(2))
    assert one.tolist() == [[8.0] + [0.0] * 7]  # every expert has a column, drawn (here 4) or not


def test_the_router_is_charged_the_mean_softplus_of_the_critic_on_its_usage():
    r = make("adversarial_critic", E=4, k=2, group_size=4, weight=0.3)
    x = tokens(12)
    out = r.train()(x)
    usage = usage_ref(out.experts, 4, 2, 4)
    want = 0.3 * sum(math.log1p(math.exp(float(d))) for d in critic_ref(r.critic, usage, 32)) / 3
    assert float(out.aux["critic"].detach()) == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(r._usage, usage)
    assert r._group_n == 4
    r.eval()(tokens(12, seed=2))
    torch.testing.assert_close(r._usage, usage)  # evaluation leaves the training usage alone
    assert "critic" not in r.train()(torch.zeros(0, D)).aux


def test_after_step_trains_the_critic_by_adam_on_the_logistic_loss():
    from routerlab.routers.adversarial_critic import critic_logit

    r = make("adversarial_critic", E=4, k=1, group_size=4, critic_lr=0.05, critic_steps=2, seed=3)
    assert math.isnan(r.extra_metrics()["critic_loss"])  # no critic step yet
    r.after_step(None)  # no training forward yet: nothing to learn from
    assert int(r.critic_step) == 0
    r.train()(tokens(8))
    usage, start = r._usage.clone(), r.critic.clone()
    r.after_step(None)
    # reference: torch.optim.Adam (betas 0.9, 0.999, eps 1e-8) on softplus(-D(router)) + softplus(D(balanced))
    flat = start.clone().requires_grad_()
    opt = torch.optim.Adam([flat], lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    for step in (1, 2):
        balanced = r.balanced_usage(2, 4, torch.Generator().manual_seed(3 * 1_000_003 + step))
        loss = torch.nn.functional.softplus(-critic_logit(flat, usage, 32)).mean() + \
            torch.nn.functional.softplus(critic_logit(flat, balanced, 32)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(r.critic, flat.detach(), rtol=1e-5, atol=1e-6)
    state = opt.state[flat]
    torch.testing.assert_close(r.critic_m, state["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.critic_v, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert int(r.critic_step) == 2
    assert r.extra_metrics()["critic_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    after = r.critic.clone()
    r.after_step(None)  # no training forward since: nothing to learn from
    assert torch.equal(r.critic, after) and int(r.critic_step) == 2


# ---- hierarchical: the joint log-probabilities, both gates' z-loss, the balance loss on the joint ----------------
def hierarchical_gates(r, x, G):
    """log p(g), log p(e | g) ([T, G], [T, G, m]) from plain matrix products."""
    group = (x @ r.group_gate.weight.detach().t()).log_softmax(-1)
    inner = (x @ r.gate.weight.detach().t()).view(x.shape[0], G, -1).log_softmax(-1)
    return group, inner


def test_hierarchical_logits_are_the_joint_log_probabilities_and_the_balance_is_on_the_joint():
    r = make("hierarchical", E=8, groups=2, k_groups=2, k=2, alpha=0.5, balance_batch=1.0).train()
    x = tokens(6)
    out = r(x)
    group, inner = hierarchical_gates(r, x, 2)
    joint = (group[:, :, None] + inner).reshape(6, 8)
    torch.testing.assert_close(out.logits, joint)
    probs = joint.exp()
    assert out.experts.shape == (6, 4)  # k_groups * k slots
    assert float(out.aux["balance"].detach()) == pytest.approx(0.5 * batch_balance_ref(probs, out.experts), rel=1e-5)
    # the gate's balance option counts the same four slots per token
    assert float(out.aux["balance_batch"].detach()) == pytest.approx(batch_balance_ref(probs, out.experts), rel=1e-5)
    assert "z_loss" not in out.aux
    assert "balance" not in r.eval()(x).aux and "balance" not in make("hierarchical", alpha=0.0).train()(x).aux


def test_hierarchical_z_loss_is_the_sum_of_both_gates_z_losses():
    r = make("hierarchical", E=8, groups=2, z_loss=0.1)
    x = tokens(5)
    group_logits = x @ r.group_gate.weight.detach().t()
    expert_logits = (x @ r.gate.weight.detach().t()).view(5 * 2, 4)
    want = 0.1 * (group_logits.logsumexp(-1).square().mean() + expert_logits.logsumexp(-1).square().mean())
    torch.testing.assert_close(r(x).aux["z_loss"].detach(), want)


def test_hierarchical_k_may_be_the_whole_group():
    r = make("hierarchical", E=8, groups=2, k=4)
    assert ((r(tokens(3)).experts >= 0).sum(1) == 4).all()
    with pytest.raises(ConfigError, match="k=5 is larger than the group size 4$"):
        make("hierarchical", E=8, groups=2, k=5)


def padded_by_value(values):
    """[T, max used] the experts with a positive value, largest first, padded with -1."""
    rows = [sorted((e for e in range(values.shape[1]) if values[t, e] > 0), key=lambda e: -float(values[t, e]))
            for t in range(values.shape[0])]
    out = torch.full((values.shape[0], max(1, max(map(len, rows)))), -1)
    for t, row in enumerate(rows):
        out[t, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# ---- dselect_k: the smooth step, the k_max cap, the selector entropy, the z-loss on the selector weights ----------
def smooth_step_ref(v, gamma):
    if v <= -gamma / 2:
        return 0.0
    if v >= gamma / 2:
        return 1.0
    return -2 * v**3 / gamma**3 + 3 * v / (2 * gamma) + 0.5


def test_smooth_step_is_the_cubic_between_its_flat_ends():
    from routerlab.routers.dselect_k import smooth_step

    gamma = 2.0
    t = torch.tensor([-3.0, -1.0, -0.99, -0.5, 0.0, 0.3, 0.99, 1.0, 2.5])
    torch.testing.assert_close(smooth_step(t, gamma), torch.tensor([smooth_step_ref(float(v), gamma) for v in t]))
    assert smooth_step(torch.tensor([0.0]), 0.5).item() == 0.5


def dselect_ref(r, x, gamma, temperature=1.0):
    """q [T, E] = sum_i softmax(A x)_i prod_j (bit j of e ? S(z_ij) : 1 - S(z_ij)) and the selectors r [T, k, E]."""
    T, E, k, m = x.shape[0], r.num_experts, r.params.k, r.bits
    z = (x @ r.gate.weight.detach().t() / temperature).view(T, k, m)
    a = (x @ r.selector_weights.weight.detach().t() / temperature).softmax(-1)
    sel = torch.zeros(T, k, E)
    for t in range(T):
        for i in range(k):
            for e in range(E):
                sel[t, i, e] = math.prod(smooth_step_ref(float(z[t, i, j]), gamma) if (e >> j) & 1 else
                                         1 - smooth_step_ref(float(z[t, i, j]), gamma) for j in range(m))
    return (a[:, :, None] * sel).sum(1), sel


def test_dselect_k_caps_the_experts_per_token_at_k_max_and_renormalizes():
    r = make("dselect_k", E=8, k=2, k_max=2, gamma=1.0)
    x = tokens(10)
    out = r.eval()(x)
    q, _ = dselect_ref(r, x, 1.0)
    assert ((q > 0).sum(1) > 2).any()  # the cap binds
    for t in range(10):
        top = sorted(range(8), key=lambda e: -float(q[t, e]))[:2]
        kept = {e: float(q[t, e]) for e in top if q[t, e] > 0}
        want = {e: v / sum(kept.values()) for e, v in kept.items()}
        got = {int(e): float(w) for e, w in zip(out.experts[t], out.weights[t].detach()) if e >= 0}
        assert got.keys() == want.keys() and all(got[e] == pytest.approx(want[e], rel=1e-5) for e in want)


def test_dselect_k_logits_selector_entropy_and_z_loss():
    r = make("dselect_k", E=4, k=2, gamma=3.0, entropy_reg=0.1, z_loss=0.01, temperature=2.0).train()
    x = tokens(6)
    out = r(x)
    q, sel = dselect_ref(r, x, 3.0, temperature=2.0)
    torch.testing.assert_close(out.logits, q.clamp_min(1e-9).log(), rtol=1e-5, atol=1e-5)
    # sum over the k selectors, mean over tokens (the paper's and docs/routers.md's sum_i; it was a mean over selectors)
    entropy = sum(-v * math.log(v) for v in sel.flatten().tolist() if v > 0) / 6
    assert float(out.aux["selector_entropy"].detach()) == pytest.approx(0.1 * entropy, rel=1e-5)
    alpha_logits = x @ r.selector_weights.weight.detach().t() / 2.0
    torch.testing.assert_close(out.aux["z_loss"].detach(), 0.01 * alpha_logits.logsumexp(-1).square().mean())
    assert "selector_entropy" not in r.eval()(x).aux  # a training regularizer
    plain = make("dselect_k", E=4, entropy_reg=0.0).train()(x).aux
    assert "z_loss" not in plain and "selector_entropy" not in plain


@pytest.mark.parametrize("E, gamma", [(2, 1.0), (8, 0.3)])
def test_dselect_k_lists_each_tokens_experts_by_gate_value_then_pads_with_unused_slots(E, gamma):
    r = make("dselect_k", E=E, k=2, gamma=gamma, balance_batch=1.0)
    with torch.no_grad():
        r.gate.weight.normal_(0.0, 1.0)
    x = tokens(16)
    out = r.train()(x)
    q, _ = dselect_ref(r, x, gamma)
    counts = (q > 0).sum(1)
    assert counts.min() < counts.max()  # tokens differ in how many experts they reach
    want = padded_by_value(q)
    assert torch.equal(out.experts, want)
    torch.testing.assert_close(out.weights, torch.where(want >= 0, q.gather(1, want.clamp_min(0)), 0.0), rtol=1e-5, atol=1e-6)
    # the gate's balance option counts every reached expert, not only the argmax
    assert float(out.aux["balance_batch"].detach()) == pytest.approx(batch_balance_ref(q, want), rel=1e-4)


def test_dselect_k_routes_no_tokens_to_an_empty_routing():
    out = make("dselect_k", E=4).train()(torch.zeros(0, D))
    assert out.experts.shape == (0, 1) and out.weights.shape == (0, 1)


def test_dselect_k_with_one_expert_sends_every_token_there_with_weight_one():
    out = make("dselect_k", E=1, k=1).train()(tokens(3))
    assert out.experts.tolist() == [[0]] * 3 and out.weights.tolist() == [[1.0]] * 3
    assert "selector_entropy" not in out.aux  # no selector bits to regularize


# ---- sparsemax / entmax15: the maps over the last dim of any shape; the sparse gate's balance loss ----------------
def bisect_threshold(mass, lo, hi):
    """tau with mass(tau) = 1 for a decreasing mass, by bisection (independent of the sort-based closed forms)."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
    return (lo + hi) / 2


def sparse_map_ref(z, name):
    """sparsemax [z - tau]_+ or 1.5-entmax [z/2 - tau]_+^2 of one vector (a list), tau by bisection."""
    if name == "sparsemax":
        tau = bisect_threshold(lambda tau: sum(max(v - tau, 0) for v in z), min(z) - 1, max(z))
        return [max(v - tau, 0) for v in z]
    tau = bisect_threshold(lambda tau: sum(max(v / 2 - tau, 0) ** 2 for v in z), min(z) / 2 - 1, max(z) / 2)
    return [max(v / 2 - tau, 0) ** 2 for v in z]


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_sparse_maps_act_on_the_last_dim_of_a_vector_and_of_a_batch(name):
    from routerlab.routers import sparsemax as module

    fn = getattr(module, name)
    vector = torch.tensor([1.2, -0.3, 0.9, 0.1, 1.0], dtype=torch.float64)
    torch.testing.assert_close(fn(vector), torch.tensor(sparse_map_ref(vector.tolist(), name), dtype=torch.float64))
    batch = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = torch.tensor([[sparse_map_ref(row, name) for row in block] for block in batch.tolist()], dtype=torch.float64)
    torch.testing.assert_close(fn(batch), want)


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_sparse_gate_balance_loss_is_alpha_switch_loss_on_the_dense_sparse_gates(name):
    r = make(name, E=6, k_max=4, alpha=0.5, balance_batch=1.0).train()
    with torch.no_grad():
        r.gate.weight.normal_(0.0, 0.7)
    x = tokens(2)  # fewer tokens than k_max: every token still gets its k_max largest logits
    out = r(x)
    logits = gate_logits(r, x)
    dense = torch.zeros(2, 6)
    for t in range(2):
        top = sorted(range(6), key=lambda e: -float(logits[t, e]))[:4]
        for e, w in zip(top, sparse_map_ref([float(logits[t, e]) for e in top], name)):
            dense[t, e] = w
    got = torch.zeros(2, 6).scatter_add(1, out.experts.clamp_min(0), out.weights.detach())
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)
    assert out.experts.shape == (2, 4)  # k_max slots, though there are fewer tokens
    assert float(out.aux["balance"].detach()) == pytest.approx(0.5 * batch_balance_ref(dense, out.experts), rel=1e-5)
    softmax = logits.softmax(-1)  # the gate's balance option: f over every used slot, P the softmax
    assert float(out.aux["balance_batch"].detach()) == pytest.approx(batch_balance_ref(softmax, out.experts), rel=1e-5)
    assert "balance" not in r.eval()(x).aux and "balance" not in make(name, alpha=0.0).train()(x).aux


# ---- balancing.py: shares of a single slot, sequence boundaries, a one-layer pool -------------------------------
def test_shares_of_a_single_counted_slot_put_all_of_f_on_it():
    from routerlab.routers.balancing import shares

    torch.testing.assert_close(shares(torch.tensor([0.0, 1.0, 0.0])), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(shares(torch.zeros(3)), torch.zeros(3))  # nothing counted: no share


def test_sequence_balance_takes_one_token_and_refuses_no_tokens():
    from routerlab.routers.balancing import sequence_balance

    probs = torch.tensor([[0.7, 0.2, 0.1]])
    # one token, one sequence: E * P of its expert
    assert float(sequence_balance(probs, torch.tensor([[0]]), "all", None)) == pytest.approx(3 * 0.7)
    with pytest.raises(ValueError, match="0 tokens is not a multiple of sequence length 4"):
        sequence_balance(torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.long), "all", 4)


def test_pooled_balance_of_one_layer_is_its_batch_balance():
    from routerlab.routers.balancing import BalancePart, pooled_balance

    part = BalancePart(0.5, torch.tensor([3.0, 1.0, 0.0, 0.0]), torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert float(pooled_balance([part])) == pytest.approx(0.5 * 4 * (0.75 * 0.4 + 0.25 * 0.3))


# ---- relu: the expert layout, the load-balanced L1 term, empty and one-token batches ------------------------------
def relu_l1_ref(gates, coef, balanced):
    """coef * sum_e (1/T) sum_t w_te, each expert's term weighted by E f_e (f_e its share of the used slots)."""
    T, E = gates.shape
    per_expert = gates.mean(0)
    if balanced:
        used = (gates > 0).float().sum(0)
        per_expert = per_expert * E * used / used.sum()
    return coef * float(per_expert.sum())


@pytest.mark.parametrize("balanced", [True, False])
def test_relu_lists_positive_gates_largest_first_and_charges_the_l1_term(balanced):
    r = make("relu", E=6, l1_init=0.3, balanced_l1=balanced, balance_batch=1.0).train()
    x = tokens(10)
    out = r(x)
    logits = gate_logits(r, x)
    gates = logits.clamp_min(0)
    want = padded_by_value(gates)
    assert (want >= 0).sum(1).min() < want.shape[1]  # the padding is exercised
    assert torch.equal(out.experts, want)
    torch.testing.assert_close(out.logits, logits)
    assert float(out.aux["l1"].detach()) == pytest.approx(relu_l1_ref(gates, 0.3, balanced), rel=1e-5)
    assert float(out.aux["balance_batch"].detach()) == pytest.approx(batch_balance_ref(logits.softmax(-1), want), rel=1e-5)
    assert "l1" not in r.eval()(x).aux  # a training penalty


def test_relu_with_at_most_one_positive_gate_per_token():
    r = make("relu", E=4, l1_init=0.5).train()
    with torch.no_grad():
        r.gate.weight.copy_(-torch.ones(4, D))
        r.gate.weight[0] = 1.0
    x = torch.tensor([[1.0] * D, [0.0] * D, [0.5] * D, [0.0] * D])  # tokens 0 and 2 reach expert 0, the others none
    out = r(x)
    assert out.experts.tolist() == [[0], [-1], [0], [-1]]
    gates = gate_logits(r, x).clamp_min(0)
    assert float(out.aux["l1"].detach()) == pytest.approx(relu_l1_ref(gates, 0.5, True), rel=1e-5)
    one = r(x[:1])
    assert float(one.aux["l1"].detach()) == pytest.approx(relu_l1_ref(gates[:1], 0.5, True), rel=1e-5)
    empty = r(torch.zeros(0, D))
    assert empty.experts.shape == (0, 1) and "l1" not in empty.aux


# ---- top_p: normalized elementwise scores, the group limit, the reach boundary, renormalization at k_max = 2 -------
def top_p_ref(probs, threshold, k_max, allowed=None):
    """{expert: weight} per token: the shortest prefix of its k_max largest probs (allowed experts only) whose running
    sum reaches threshold (all of them if none does), renormalized to sum 1."""
    rows = []
    for t, row in enumerate(probs.tolist()):
        ranked = sorted(((v, e) for e, v in enumerate(row) if allowed is None or allowed[t, e]), reverse=True)[:k_max]
        masses = list(itertools.accumulate(v for v, _ in ranked))
        kept = ranked[:next((n + 1 for n, m in enumerate(masses) if m >= threshold), len(ranked))]
        rows.append({e: v / sum(w for w, _ in kept) for v, e in kept})
    return rows


def assert_rows(out, want):
    got = [{int(e): float(w) for e, w in zip(er, wr) if e >= 0} for er, wr in zip(out.experts.tolist(), out.weights.tolist())]
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(g[e] == pytest.approx(w[e], rel=1e-5, abs=1e-7) for e in w), (g, w)


def test_top_p_normalizes_sigmoid_scores_before_taking_the_mass():
    r = make("top_p", E=4, score="sigmoid", threshold=0.6, k_max=4, balance_batch=1.0).train()
    with torch.no_grad():
        r.gate.weight.copy_(-0.5 + 0.3 * torch.randn(4, D, generator=torch.Generator().manual_seed(0)))
    x = 0.5 + torch.rand(12, D, generator=torch.Generator().manual_seed(1))  # logits near -4: sigmoids sum far below 1
    out = r(x)
    s = torch.sigmoid(gate_logits(r, x))
    assert (s.sum(1) < 0.5).all()
    probs = s / s.sum(1, keepdim=True)
    assert_rows(out, top_p_ref(probs, 0.6, 4))
    assert float(out.aux["balance_batch"].detach()) == pytest.approx(batch_balance_ref(probs, out.experts), rel=1e-5)


def test_top_p_group_limit_takes_mass_only_inside_the_top_group():
    r = make("top_p", E=6, threshold=0.9, k_max=6, expert_groups=2, top_groups=1)
    with torch.no_grad():
        r.gate.weight.normal_(0.0, 1.0)
    x = tokens(10)
    probs = gate_logits(r, x).softmax(-1)
    allowed = best_groups(probs, 2, 1, best_of=2)
    assert_rows(r.eval()(x), top_p_ref(probs, 0.9, 6, allowed))


def test_top_p_stops_at_the_expert_whose_mass_reaches_the_threshold_exactly():
    x = tokens(1)
    probs = make("top_p", E=4)(x).logits.detach().softmax(-1)
    top = probs.sort(-1, descending=True).values
    reached = float((top.cumsum(-1) - top)[0, 1])  # the first expert's mass, in the router's own arithmetic
    out = make("top_p", E=4, threshold=reached)(x)
    assert (out.experts >= 0).sum().item() == 1


def test_top_p_renormalizes_two_slots():
    r = make("top_p", E=4, threshold=0.99, k_max=2)
    out = r(tokens(5))
    assert ((out.experts >= 0).sum(1) == 2).all()
    torch.testing.assert_close(out.weights.sum(1), torch.ones(5))


# ---- gshard_top2: one group is the whole batch; the balance loss counts first choices, per group ------------------
def gshard_capacity_ref(experts, E, capacity):
    """First choices in token order, then second choices; each expert keeps its first `capacity` slots."""
    kept, load = experts.clone(), [0] * E
    for slot in range(experts.shape[1]):
        for t in range(experts.shape[0]):
            e = int(experts[t, slot])
            if e >= 0:
                kept[t, slot] = e if load[e] < capacity else -1
                load[e] += 1
    return kept


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [1, 2])
def test_gshard_balance_is_the_mean_over_groups_of_the_first_choice_switch_loss(score, groups):
    E, T = 4, 12
    r = make("gshard_top2", E=E, alpha=0.5, groups=groups, score=score, random_routing=False, capacity_factor=0.5).train()
    with torch.no_grad():
        r.gate.weight.normal_(0.0, 1.0)
    x = tokens(T)
    out = r(x)
    logits = gate_logits(r, x)
    s = logits.softmax(-1) if score == "softmax" else torch.sigmoid(logits)
    chosen = s.topk(2, -1).indices
    size = T // groups
    capacity = math.ceil(0.5 * size * 2 / E)
    want = torch.cat([gshard_capacity_ref(chosen[g * size:(g + 1) * size], E, capacity) for g in range(groups)])
    assert torch.equal(out.experts, want)
    P = s / s.sum(1, keepdim=True)
    per_group = [batch_balance_ref(P[g * size:(g + 1) * size], chosen[g * size:(g + 1) * size, :1]) for g in range(groups)]
    assert float(out.aux["balance"].detach()) == pytest.approx(0.5 * sum(per_group) / groups, rel=1e-5)
    assert "balance" not in r.eval()(x).aux
    assert "balance" not in make("gshard_top2", E=E, alpha=0.0, random_routing=False).train()(x).aux


# ---- adversarial: the hard signal, price decay, the box, the metrics, small batches -------------------------------
def adversary_stats(load, prob_sum=None, tokens=None):
    from routerlab.moe.stats import RoutingStats

    load = torch.tensor(load)
    T = torch.tensor(float(load.sum()) if tokens is None else tokens)
    return RoutingStats(load=load, kept=load, tokens=T, dropped_tokens=torch.tensor(0.0),
                        prob_sum=None if prob_sum is None else torch.tensor(prob_sum))


@pytest.mark.parametrize("signal", ["hard", "soft"])
def test_adversarial_prices_ascend_on_the_load_signal_minus_the_decay_inside_the_box(signal):
    r = make("adversarial", E=4, price_lr=0.1, price_max=0.25, price_decay=2.0, signal=signal)
    start = torch.tensor([0.2, 0.1, 0.0, 0.45])
    r.prices.copy_(start)
    load, prob_sum = [6.0, 1.0, 1.0, 4.0], [5.0, 2.0, 2.0, 3.0]
    r.after_step(adversary_stats(load, prob_sum))  # 12 tokens
    if signal == "hard":
        violation = [v / 3.0 - 1 for v in load]  # load over the mean load
    else:
        violation = [4 * v / 12 - 1 for v in prob_sum]  # E * mean probability - 1
    want = [min(max(q + 0.1 * (v - 2.0 * q), 0.0), 0.25) for q, v in zip(start.tolist(), violation)]
    torch.testing.assert_close(r.prices, torch.tensor(want))
    assert 0.0 in want and 0.25 in want  # both ends of the box bind
    metrics = r.extra_metrics()
    assert metrics["price_max"] == pytest.approx(max(want)) and metrics["price_mean"] == pytest.approx(sum(want) / 4)
    assert [metrics[f"price_e{e}"] for e in range(4)] == pytest.approx(want)


def test_adversarial_soft_signal_without_probabilities_falls_back_to_the_load():
    r = make("adversarial", E=2, price_lr=0.1, price_max=1.0)
    r.after_step(adversary_stats([3.0, 1.0]))  # no prob_sum (a router without probabilities in the stats)
    torch.testing.assert_close(r.prices, torch.tensor([0.1 * 0.5, 0.0]))


def test_adversarial_charges_a_single_token_and_not_an_empty_batch():
    r = make("adversarial", E=4, k=2)
    r.prices.copy_(torch.tensor([0.01, 0.0, 0.02, 0.005]))
    x = tokens(1)
    violation = 4 * gate_logits(r, x).softmax(-1)[0] - 1
    assert float(r.train()(x).aux["adversary"].detach()) == pytest.approx(float((r.prices * violation).sum()), rel=1e-5)
    assert "adversary" not in r(torch.zeros(0, D)).aux


# ---- expert_choice: the capacity, each token's experts in id order, one and no tokens -----------------------------
def test_expert_capacity_is_ceil_c_t_over_e_at_least_one_at_most_t():
    from routerlab.routers.expert_choice import expert_capacity

    assert expert_capacity(4, 8, 1.0) == 1  # ceil(0.5)
    assert expert_capacity(10, 4, 2.0) == 5
    assert expert_capacity(3, 2, 4.0) == 3  # capped at the tokens there are
    assert expert_capacity(1, 8, 0.1) == 1


def expert_choice_ref(scores, capacity):
    """[T, width] each token's experts (ids ascending; -1 padding): expert e takes its `capacity` highest-scoring tokens."""
    T, E = scores.shape
    takers = [[] for _ in range(T)]
    for e in range(E):
        for t in sorted(range(T), key=lambda t: -float(scores[t, e]))[:capacity]:
            takers[t].append(e)
    out = torch.full((T, max(1, max(map(len, takers)))), -1)
    for t, row in enumerate(takers):
        out[t, :len(row)] = torch.tensor(sorted(row), dtype=torch.long)
    return out


@pytest.mark.parametrize("E, T, c", [(4, 6, 1.0), (2, 4, 1.0)])  # (2, 4): the two experts take disjoint halves
def test_expert_choice_lists_each_tokens_experts_and_counts_them_for_the_balance_option(E, T, c):
    r = make("expert_choice", E=E, capacity_factor=c, balance_batch=1.0).train()
    with torch.no_grad():
        r.gate.weight.normal_(0.0, 1.0)
    x = tokens(T)
    out = r(x)
    s = gate_logits(r, x).softmax(-1)
    want = expert_choice_ref(s, math.ceil(c * T / E))
    assert torch.equal(out.experts, want)
    torch.testing.assert_close(out.weights, torch.where(want >= 0, s.gather(1, want.clamp_min(0)), 0.0))
    assert float(out.aux["balance_batch"].detach()) == pytest.approx(batch_balance_ref(s, want), rel=1e-5)


def test_expert_choice_group_limit_lets_an_expert_take_only_tokens_whose_top_group_holds_it():
    r = make("expert_choice", E=4, capacity_factor=1.0, expert_groups=2, top_groups=1)
    with torch.no_grad():
        r.gate.weight.normal_(0.0, 1.0)
    x = tokens(8)
    s = gate_logits(r, x).softmax(-1)
    allowed = best_groups(s, 2, 1, best_of=2)
    want = expert_choice_ref(s.masked_fill(~allowed, -1.0), 2)
    want = torch.where((want >= 0) & allowed.gather(1, want.clamp_min(0)), want, -1)  # fewer allowed tokens than room
    got = r.eval()(x).experts
    assert [sorted(e for e in row if e >= 0) for row in got.tolist()] == [sorted(e for e in row if e >= 0) for row in want.tolist()]


def test_expert_choice_routes_one_token_to_every_expert_and_no_tokens_to_nothing():
    r = make("expert_choice", E=4)
    assert r(tokens(1)).experts.tolist() == [[0, 1, 2, 3]]
    empty = r(torch.zeros(0, D))
    assert empty.experts.shape == (0, 1) and empty.weights.shape == (0, 1)
    assert empty.experts.dtype == torch.long and empty.logits.shape == (0, 4) and empty.aux == {}


# ---- quantile_balanced: capacity at k > 1, which prices route when, one gate evaluation per forward ----------------
def test_quantile_balanced_fills_every_expert_to_its_capacity_at_k2():
    E, T, k = 4, 32, 2
    r = make("quantile_balanced", E=E, k=k, sweeps=30).train()
    x = tokens(T) + torch.tensor([2.0] + [0.0] * (D - 1))  # skewed
    out = r(x)
    loads = torch.bincount(out.experts.reshape(-1), minlength=E)
    assert loads.tolist() == [T * k // E] * E  # C = ceil(capacity * T k / E) = 16 slots each, all T k slots placed


def test_quantile_balanced_routes_training_by_the_batch_prices_and_evaluation_by_their_ema():
    r = make("quantile_balanced", E=4, k=1, eval_ema=0.5, sweeps=10)
    with torch.no_grad():
        r.gate.weight.normal_(0.0, 1.0)
    r.eval_prices.copy_(torch.tensor([0.0, 0.3, 0.0, 0.0]))
    x = tokens(24) + torch.tensor([2.0] + [0.0] * (D - 1))
    probs = gate_logits(r, x).softmax(-1)
    out = r.train()(x)
    assert r.prices.max() > 0
    assert torch.equal(out.experts[:, 0], (probs - r.prices).argmax(1))
    torch.testing.assert_close(r.eval_prices, 0.5 * torch.tensor([0.0, 0.3, 0.0, 0.0]) + 0.5 * r.prices)
    assert torch.equal(r.eval()(x).experts[:, 0], (probs - r.eval_prices).argmax(1))


def test_quantile_balanced_keeps_its_prices_for_an_empty_batch_and_drops_them_for_one_token():
    r = make("quantile_balanced", E=4).train()
    r.prices.copy_(torch.tensor([0.1, 0.0, 0.2, 0.0]))
    r(torch.zeros(0, D))
    torch.testing.assert_close(r.prices, torch.tensor([0.1, 0.0, 0.2, 0.0]))
    r(tokens(1))  # one token fits any expert's capacity: no price is needed
    torch.testing.assert_close(r.prices, torch.zeros(4))


def test_quantile_balanced_evaluates_the_gate_once_per_forward():
    r = make("quantile_balanced", E=4, smoothing=0.5, ema_decay=0.5).train()
    x = tokens(8)
    ema0 = r.gate_ema.clone()
    p = gate_logits(r, x).softmax(-1)
    out = r(x)
    torch.testing.assert_close(out.logits.softmax(-1), 0.5 * p + 0.5 * ema0)  # smoothed toward the EMA before the step
    torch.testing.assert_close(r.gate_ema, 0.5 * ema0 + 0.5 * p.mean(0))  # moved once


# ---- assignment: ranks within groups, the auction's optimum at both load patterns, its edge cases -----------------
def test_rank_within_ranks_each_group_by_value_earlier_entries_first_on_ties():
    from routerlab.routers.assignment import rank_within

    groups = torch.tensor([2, 0, 2, 1, 0, 2, 0])
    values = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.1, 0.5, 0.7])
    want = [sum(1 for j in range(7) if groups[j] == groups[i] and (values[j] > values[i] or (values[j] == values[i] and j < i)))
            for i in range(7)]
    assert rank_within(groups, values, 3).tolist() == want


def optimal_balanced_total(scores):
    """The best total score over assignments with loads q or q + 1 (r experts at q + 1): every choice of the r
    experts, each expert as load-many columns of a rectangular assignment problem (scipy)."""
    from scipy.optimize import linear_sum_assignment

    T, E = scores.shape
    q, r = divmod(T, E)
    best = -math.inf
    for extra in itertools.combinations(range(E), r):
        cols = [e for e in range(E) for _ in range(q + (e in extra))]
        i, j = linear_sum_assignment(-scores[:, cols].numpy())
        best = max(best, float(scores[:, cols].numpy()[i, j].sum()))
    return best


@pytest.mark.parametrize("T, E, scale, shift, rel_eps", [
    (12, 4, 2.0, 0.0, 1e-4), (10, 3, 2.0, 0.0, 1e-4), (5, 4, 2.0, 0.0, 1e-4), (6, 2, 2.0, 0.0, 1e-4), (3, 4, 2.0, 0.0, 1e-4),
    (1, 3, 2.0, 0.0, 1e-4), (12, 4, 0.01, 0.0, None), (9, 4, 0.01, 0.0, None),
    (5, 3, 0.01, 0.0, None), (8, 4, 0.01, -3.0, None),  # close scores, negative ones: epsilon scales with their spread only
])
def test_auction_balanced_reaches_the_optimum_within_its_epsilon(T, E, scale, shift, rel_eps):
    from routerlab.routers.assignment import auction_balanced

    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E)) * scale + shift
    got = auction_balanced(scores) if rel_eps is None else auction_balanced(scores, rel_eps=rel_eps)
    q, r = divmod(T, E)
    assert sorted(torch.bincount(got, minlength=E).tolist()) == [q] * (E - r) + [q + 1] * r
    total = float(scores[torch.arange(T), got].sum())
    within = T * (rel_eps or 1e-3) * float(scores.max() - scores.min())  # the default rel_eps is 1e-3
    assert total >= optimal_balanced_total(scores) - within - 1e-6


def test_auction_balanced_edge_cases_and_its_greedy_fallback():
    from routerlab.routers.assignment import auction_balanced, greedy_balanced

    assert auction_balanced(torch.zeros(0, 3)).shape == (0,)
    one_expert = auction_balanced(torch.randn(5, 1))
    assert one_expert.tolist() == [0] * 5 and one_expert.dtype == torch.long  # expert ids, as from the auction
    scores = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(auction_balanced(scores, max_rounds=1), greedy_balanced(scores))  # a phase cannot finish in one round


def test_dselect_k_with_saturated_selectors_sends_each_token_to_one_expert_under_a_cap():
    r = make("dselect_k", E=4, k=1, k_max=2)
    with torch.no_grad():
        r.gate.weight.mul_(1000.0)  # every smooth step at 0 or 1: the selector is one binary code
    x = tokens(8)
    out = r.eval()(x)
    z = x @ r.gate.weight.detach().t()  # [T, 2 bits]
    code = (z > 0).long() @ torch.tensor([1, 2])  # bit j of the expert id is set where S(z_j) = 1
    assert out.experts.tolist() == code[:, None].tolist()  # one slot: no zero-weight expert listed under the cap
    torch.testing.assert_close(out.weights, torch.ones(8, 1))
