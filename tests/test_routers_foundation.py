"""The foundation routers' defining equations, checked against hand computations."""
import math

import pytest
import torch

from routerlab.errors import ConfigError
from routerlab.moe import ExpertBank, MoELayer, routing_metrics
from routerlab.routers import build_router, router_names
from routerlab.routers.base import switch_balance_loss
from routerlab.routers.noisy_topk import load_probability


def test_switch_balance_value_is_one_for_uniform_routing():
    E, T = 4, 64
    experts = (torch.arange(T) % E).unsqueeze(1)  # every expert gets T/E tokens
    probs = torch.full((T, E), 1.0 / E)  # the router is uniform
    assert switch_balance_loss(probs, experts, E).item() == pytest.approx(1.0)


def test_switch_aux_loss_matches_hand_computation():
    router = build_router({"name": "switch", "alpha": 0.5}, d_model=2, num_experts=2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # logits equal x
    routing = router(x)
    # probabilities of expert 0 per token: sigmoid(2), sigmoid(-1), sigmoid(1)
    p0 = [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1))]
    P = [sum(p0) / 3, 1 - sum(p0) / 3]
    f = [2 / 3, 1 / 3]  # tokens 0 and 2 go to expert 0
    expected = 0.5 * 2 * (f[0] * P[0] + f[1] * P[1])
    assert routing.experts.squeeze(1).tolist() == [0, 1, 0]
    assert routing.aux["balance"].item() == pytest.approx(expected, rel=1e-6)
    assert routing.weights.squeeze(1)[0].item() == pytest.approx(p0[0], rel=1e-6)


def test_noisy_topk_load_estimate_matches_its_definition():
    torch.manual_seed(0)
    T, E, k = 5, 4, 2
    clean, noise = torch.randn(T, E), torch.rand(T, E) + 0.5
    noisy = clean + torch.randn(T, E) * noise
    P = load_probability(clean, noisy, noise, k)
    normal = torch.distributions.Normal(0.0, 1.0)
    for t in range(T):
        for i in range(E):
            others = torch.cat([noisy[t, :i], noisy[t, i + 1 :]])
            kth_excluding = others.sort(descending=True).values[k - 1]  # k-th highest of the other experts
            expected = normal.cdf((clean[t, i] - kth_excluding) / noise[t, i])
            assert P[t, i].item() == pytest.approx(expected.item(), abs=1e-6)


def test_noisy_topk_starts_at_zero_and_has_both_losses():
    router = build_router({"name": "noisy_topk", "k": 2}, d_model=8, num_experts=4)
    assert router.gate.weight.abs().sum() == 0 and router.noise.weight.abs().sum() == 0
    routing = router.train()(torch.randn(32, 8))
    assert set(routing.aux) == {"importance", "load"}
    assert torch.allclose(routing.weights.sum(-1), torch.ones(32))


def test_hash_is_a_fixed_table_and_refuses_missing_token_ids():
    router = build_router({"name": "hash", "seed": 3}, d_model=8, num_experts=4)
    ids = torch.tensor([5, 7, 5, 9, 7])
    a, b = router(torch.randn(5, 8), token_ids=ids), router(torch.randn(5, 8), token_ids=ids)
    assert torch.equal(a.experts, b.experts) and a.experts[0] == a.experts[2]
    assert a.logits is None and a.aux == {}
    with pytest.raises(ConfigError, match="token ids"):
        router(torch.randn(5, 8))


def test_random_router_draws_distinct_experts():
    router = build_router({"name": "random", "k": 3}, d_model=4, num_experts=5)
    experts = router(torch.randn(200, 4)).experts
    assert all(len(set(row)) == 3 for row in experts.tolist())
    assert set(experts.flatten().tolist()) == set(range(5))


def test_z_loss_option_adds_the_st_moe_term():
    router = build_router({"name": "softmax_topk", "z_loss": 0.1}, d_model=4, num_experts=3)
    x = torch.randn(10, 4)
    routing = router(x)
    expected = 0.1 * torch.logsumexp(routing.logits, -1).square().mean()
    assert routing.aux["z_loss"].item() == pytest.approx(expected.item())


def test_router_parameters_are_validated_with_the_valid_names():
    with pytest.raises(ConfigError, match="valid routers: .*softmax_topk"):
        build_router({"name": "nope"}, 4, 4)
    with pytest.raises(ConfigError, match="k=9 is larger than num_experts=4"):
        build_router({"name": "softmax_topk", "k": 9}, 4, 4)
    with pytest.raises(ConfigError, match="valid: .*renormalize"):
        build_router({"name": "softmax_topk", "kk": 1}, 4, 4)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        build_router({"name": "softmax_topk", "k": 0}, 4, 4)


def test_a_plugin_file_registers_a_router(tmp_path, monkeypatch):
    plugin = tmp_path / "my_router.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "import torch\n"
        "from routerlab.routers import Router, RouterParams, Routing, register_router\n"
        "@dataclass(frozen=True)\n"
        "class FirstParams(RouterParams):\n"
        "    expert: int = 0\n"
        "@register_router('always_first', FirstParams)\n"
        "class AlwaysFirst(Router):\n"
        "    '''Sends every token to one expert.'''\n"
        "    def forward(self, x, *, token_ids=None):\n"
        "        e = torch.full((x.shape[0], 1), self.params.expert, dtype=torch.long)\n"
        "        return Routing(e, torch.ones(x.shape[0], 1))\n"
    )
    from routerlab.routers import load_plugin

    load_plugin(plugin)
    assert "always_first" in router_names()
    layer = MoELayer(build_router({"name": "always_first", "expert": 2}, 8, 4), ExpertBank(4, 8, 16))
    layer(torch.randn(10, 8))
    metrics = routing_metrics(layer.stats)
    assert metrics["dead_experts"] == 3 and metrics["max_vio"] == pytest.approx(3.0)
