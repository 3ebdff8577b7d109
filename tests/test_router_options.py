"""Balancing and stability options of every learned router (GateParams; docs/routers.md)."""
from __future__ import annotations

import pytest
import torch

from routerlab.routers import build_router
from routerlab.routers.base import switch_balance_loss
from routerlab.routers.gated import importance_weights

D, E = 16, 8
LEARNED = ["softmax_topk", "noisy_topk", "switch", "gshard_top2", "expert_choice", "sinkhorn", "base", "bias_balanced",
           "sparsemax", "entmax15", "hierarchical", "graph", "dselect_k"]
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
