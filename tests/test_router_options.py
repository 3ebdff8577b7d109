"""Balancing, stability and selection options of every learned router (GateParams; docs/routers.md)."""
from __future__ import annotations

import pytest
import torch

from routerlab.errors import ConfigError
from routerlab.routers import build_router
from routerlab.routers.balancing import groups_per_token
from routerlab.routers.base import switch_balance_loss
from routerlab.routers.gated import SELECTION_OPTIONS, GatedRouter, importance_weights, score_fn
from routerlab.routers.registry import ROUTERS, router_entry

D, E = 16, 8
LEARNED = ["softmax_topk", "noisy_topk", "switch", "gshard_top2", "expert_choice", "sinkhorn", "base", "bias_balanced",
           "sparsemax", "entmax15", "hierarchical", "graph", "dselect_k", "relu", "top_p", "quantile_balanced",
           "adversarial", "adversarial_critic"]
ALL_ON = {"z_loss": 1e-3, "entropy": 1e-3, "temperature": 1.5, "smoothing": 0.1, "router_clip": 1.0,
          "jitter": 0.01, "importance_balance": 1e-2, "importance_power": 0.5}


@pytest.mark.parametrize("name", LEARNED)
def test_every_learned_router_takes_every_option(name):
    torch.manual_seed(0)
    r = build_router({"name": name, **ALL_ON}, D, E).train()
    out = r(torch.randn(32, D), token_ids=torch.randint(0, 9, (32,)))
    assert {"z_loss", "entropy", "importance_balance"} <= set(out.aux)
    assert all(torch.isfinite(v) for v in out.aux.values())
    loss = (out.weights * torch.randn_like(out.weights)).sum() + sum(out.aux.values())
    loss.backward()
    r.before_step()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in r.parameters() if p.grad is not None))
    assert norm <= 1.0 + 1e-4
    assert "gate_ema" in r.state_dict()


def test_router_clip_touches_only_router_gradients():
    torch.manual_seed(0)
    r = build_router({"name": "switch", "router_clip": 0.01}, D, E)
    other = torch.nn.Parameter(torch.randn(D))
    out = r(torch.randn(64, D) * 10 + other)
    (out.weights.sum() * 100 + out.logits.square().mean()).backward()
    before_other = other.grad.clone()
    assert r.gate.weight.grad.norm() > 0.01
    r.before_step()
    assert r.gate.weight.grad.norm() == pytest.approx(0.01, rel=1e-4)
    assert torch.equal(other.grad, before_other)
    unclipped = build_router({"name": "switch"}, D, E)
    unclipped.gate.weight.grad = torch.ones_like(unclipped.gate.weight)
    unclipped.before_step()
    assert torch.equal(unclipped.gate.weight.grad, torch.ones_like(unclipped.gate.weight))


def test_temperature_divides_the_logits():
    torch.manual_seed(0)
    a = build_router({"name": "softmax_topk"}, D, E)
    b = build_router({"name": "softmax_topk", "temperature": 4.0}, D, E)
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, D)
    torch.testing.assert_close(b(x).logits, a(x).logits / 4.0)


def test_smoothing_mixes_in_the_ema_of_gate_probabilities():
    torch.manual_seed(0)
    r = build_router({"name": "softmax_topk", "smoothing": 0.3, "ema_decay": 0.5}, D, E)
    plain = build_router({"name": "softmax_topk"}, D, E)
    plain.load_state_dict(r.state_dict())
    x = torch.randn(40, D)
    r.eval()
    ema0 = r.gate_ema.clone()
    out = r(x)
    assert torch.equal(r.gate_ema, ema0)  # evaluation does not move the EMA
    p = plain.eval()(x).logits.softmax(-1)
    torch.testing.assert_close(out.logits.softmax(-1), 0.7 * p + 0.3 * ema0)
    # the logsumexp (z-loss scale) is untouched by smoothing
    torch.testing.assert_close(torch.logsumexp(out.logits, -1), torch.logsumexp(plain(x).logits, -1))
    r.train()
    r(x)
    torch.testing.assert_close(r.gate_ema, 0.5 * ema0 + 0.5 * p.mean(0))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_entropy_option_sharpens_or_explores(sign):
    torch.manual_seed(0)
    r = build_router({"name": "softmax_topk", "entropy": sign * 1.0}, D, E)
    opt = torch.optim.SGD(r.parameters(), lr=0.5)
    x = torch.randn(128, D)

    def entropy() -> float:
        logp = r(x).logits.log_softmax(-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    start = entropy()
    for _ in range(20):
        out = r(x)
        opt.zero_grad()
        out.aux["entropy"].backward()
        opt.step()
    end = entropy()
    assert (end < start - 0.1) if sign > 0 else (end > start + 0.01)


def test_jitter_only_in_training_and_fp32_gate():
    torch.manual_seed(0)
    r = build_router({"name": "switch", "jitter": 0.2}, D, E)
    x = torch.randn(32, D)
    r.train()
    assert not torch.equal(r(x).logits, r(x).logits)
    r.eval()
    assert torch.equal(r(x).logits, r(x).logits)
    out = r(x.bfloat16())
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.bfloat16
    low = build_router({"name": "switch", "fp32": False}, D, E).bfloat16()
    assert low(x.bfloat16()).logits.dtype == torch.bfloat16


def test_importance_weights_give_every_expert_group_equal_mass():
    top1 = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    w = importance_weights(top1, 4, power=1.0)
    mass = torch.zeros(4).index_add_(0, top1, w)
    torch.testing.assert_close(mass[:3], torch.full((3,), 100 / 4))
    assert w[-1] > w[0]  # tokens on the under-used expert weigh more
    torch.testing.assert_close(importance_weights(top1, 4, power=0.0), torch.ones(100))


def test_importance_balance_reweights_the_switch_objective():
    torch.manual_seed(0)
    probs = torch.rand(100, 4).softmax(-1)
    top1 = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    plain = switch_balance_loss(probs, top1[:, None], 4)
    weighted = switch_balance_loss(probs, top1[:, None], 4, importance_weights(top1, 4, 1.0))
    flat = switch_balance_loss(probs, top1[:, None], 4, torch.ones(100))
    torch.testing.assert_close(plain, flat)
    assert not torch.allclose(plain, weighted)
    r = build_router({"name": "switch", "alpha": 0.0, "importance_balance": 1.0}, D, E)
    out = r(torch.randn(64, D))
    manual = switch_balance_loss(out.logits.softmax(-1), out.experts, E, importance_weights(out.experts[:, 0], E, 1.0))
    torch.testing.assert_close(out.aux["importance_balance"], manual)


# ---- selection options on every learned router ---------------------------------------------------------------
def test_the_learned_list_is_every_gated_router():
    builtin = [n for n in ROUTERS.names() if router_entry(n).obj.__module__.startswith("routerlab.routers.")]  # not test plugins
    gated = {name for name in builtin if issubclass(router_entry(name).obj, GatedRouter)}
    assert gated == set(LEARNED)


def refuses(name: str, option: str) -> bool:
    return option in router_entry(name).obj.refuses


def takers(option: str) -> list[str]:
    return [name for name in LEARNED if not refuses(name, option)]


NO_CAPACITY = {"gshard_top2": {"capacity_factor": None}}  # router-level capacity would drop slots at evaluation


def twins(name: str, base: dict, **options):
    """The router with defaults (plus base) and with options, the same weights, randomized so no gate is zero."""
    torch.manual_seed(0)
    plain = build_router({"name": name, **NO_CAPACITY.get(name, {}), **base}, D, E)
    with torch.no_grad():
        for q in plain.parameters():
            q.normal_(0.0, 0.5)
    opted = build_router({"name": name, **NO_CAPACITY.get(name, {}), **base, **options}, D, E)
    opted.load_state_dict(plain.state_dict())
    return plain, opted


def both_modes(plain, opted, x):
    """(plain output, opted output) in evaluation and in training, the same random draws for both."""
    for train in (False, True):
        plain.train(train), opted.train(train)
        torch.manual_seed(1)
        a = plain(x)
        torch.manual_seed(1)
        yield a, opted(x)


@pytest.mark.parametrize("name", takers("route_scale"))
def test_route_scale_multiplies_every_weight(name):
    plain, scaled = twins(name, {}, route_scale=2.5)
    for a, b in both_modes(plain, scaled, torch.randn(48, D)):
        assert torch.equal(a.experts, b.experts)
        torch.testing.assert_close(b.weights, 2.5 * a.weights)


K1 = {"softmax_topk": {"k": 1}, "switch": {}, "adversarial": {"k": 1}, "adversarial_critic": {"k": 1}, "graph": {"k": 1},
      "quantile_balanced": {"k": 1}, "top_p": {"k_max": 1}, "sinkhorn": {}, "base": {}}


def test_every_router_that_takes_normalize_k1_is_tested_at_k1():
    assert set(takers("normalize_k1")) == set(K1)


@pytest.mark.parametrize("name", sorted(K1))
def test_normalize_k1_gives_a_single_expert_weight_one(name):
    plain, normalized = twins(name, K1[name], normalize_k1=True)
    for a, b in both_modes(plain, normalized, torch.randn(48, D)):
        assert torch.equal(a.experts, b.experts)
        assert ((a.experts >= 0).sum(1) == 1).all()
        assert (a.weights.sum(1) < 1 - 1e-3).all()  # the score itself: off, nothing is normalized at k=1
        torch.testing.assert_close(b.weights.sum(1), torch.ones(48))


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "sqrt_softplus"])
@pytest.mark.parametrize("name", takers("score"))
def test_score_option_sets_the_weights_of_every_taker(name, score):
    """Each used slot weighs s(logit) of its expert, or s over the token's used slots normalized to sum 1."""
    _, r = twins(name, {}, score=score)
    r.eval()
    out = r(torch.randn(48, D))
    used = out.experts >= 0

    def matches(fn: str) -> bool:
        s = score_fn(fn, out.logits).gather(1, out.experts.clamp_min(0)) * used
        normalized = s / s.sum(1, keepdim=True)
        return torch.allclose(out.weights, s, atol=1e-5) or torch.allclose(out.weights, normalized, atol=1e-5)

    assert matches(score)
    assert not matches("sigmoid" if score != "sigmoid" else "softmax")  # the check tells the scores apart


K2 = {"switch": {}, "quantile_balanced": {"k": 2}}  # the rest use several experts per token by default


@pytest.mark.parametrize("name", takers("top_groups"))
def test_group_limit_keeps_every_token_inside_one_group(name):
    plain, limited = twins(name, K2.get(name, {}), expert_groups=4, top_groups=1)
    x = torch.randn(96, D)
    for a, b in both_modes(plain, limited, x):
        assert groups_per_token(b.experts, E // 4).max() <= 1
        assert not torch.equal(a.experts, b.experts)  # the limit bites


@pytest.mark.parametrize("name", takers("null_experts"))
def test_null_experts_take_slots_without_compute(name):
    n = 8
    torch.manual_seed(0)
    r = build_router({"name": name, **NO_CAPACITY.get(name, {}), "null_experts": n}, D, E)
    with torch.no_grad():
        for q in r.parameters():
            q.normal_(0.0, 0.5)
    x = torch.randn(96, D)
    x[:48, 0], x[48:, 0] = 4.0, -4.0
    if name != "graph":  # null logits +20 on the first half of the tokens, -20 on the second
        with torch.no_grad():
            r.gate.weight[:, 0] = 0.0
            r.gate.weight[E:, 0] = 5.0
    r.eval()
    out = r(x)
    assert out.logits.shape == (96, E) and out.experts.max() < E
    assert torch.equal(out.weights[out.experts < 0], torch.zeros_like(out.weights[out.experts < 0]))
    if name == "graph":  # its null experts are graph nodes: 8 random ones of 16 take some slots
        assert 0 < (out.experts >= 0).sum(1).float().mean() < 2
        return
    assert (out.experts[:48] == -1).all()  # a null expert won every slot: no compute
    plain = build_router({"name": name, **NO_CAPACITY.get(name, {})}, D, E).eval()
    plain.load_state_dict({k: (v[:E] if v.shape[:1] == (E + n,) else v) for k, v in r.state_dict().items()})
    ref = plain(x[48:])  # where no null expert wins, routing is the plain router's
    assert torch.equal(out.experts[48:], ref.experts)
    torch.testing.assert_close(out.weights[48:], ref.weights, atol=1e-6, rtol=1e-5)


REFUSED = [(name, option) for name in LEARNED for option in SELECTION_OPTIONS if refuses(name, option)]
VALUE = {"score": {"score": "sqrt_softplus"}, "normalize_k1": {"normalize_k1": True}, "expert_groups": {"expert_groups": 2},
         "top_groups": {"expert_groups": 2, "top_groups": 1}, "null_experts": {"null_experts": 2}}


@pytest.mark.parametrize("name, option", REFUSED)
def test_refused_options_fail_in_one_line_with_the_reason(name, option):
    with pytest.raises(ConfigError) as err:
        build_router({"name": name, **VALUE[option]}, D, E)
    message = str(err.value)
    assert "\n" not in message and f"router {name!r} does not take" in message
    assert router_entry(name).obj.refuses[option] in message or option == "top_groups"


def test_reinforce_takes_no_gate_options():
    with pytest.raises(ConfigError, match="has no parameter score"):
        build_router({"name": "reinforce", "score": "sigmoid"}, D, E)
