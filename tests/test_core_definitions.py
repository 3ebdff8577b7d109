"""The MoE layer's remaining definitions against hand computations: the capacity formula, drop by probability,
the evaluation capacity, min_capacity, the top-1 expert, shared experts. Fast (tiny sizes); the mutation
run of routerlab/moe selects this file (docs/reliability.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

from routerlab.moe import ExpertBank, MoELayer, capacity_for
from routerlab.moe.shared import SharedExperts
from routerlab.routers.base import Router, Routing


class GivenRouter(Router):
    def __init__(self, experts, weights, num_experts):
        super().__init__(0, num_experts, None)
        self.experts, self.weights = experts, weights

    def forward(self, x, *, token_ids=None):
        return Routing(self.experts, self.weights, None, {})


def test_capacity_is_the_factor_times_the_balanced_share_rounded_up():
    assert capacity_for(10, 2, 4, None) is None  # dropless
    assert capacity_for(10, 2, 4, 1.0) == 5  # ceil(1.0 * 10 * 2 / 4)
    assert capacity_for(10, 2, 4, 1.1) == 6  # ceil(5.5)
    assert capacity_for(10, 1, 4, 0.3) == 1  # ceil(0.75)
    assert capacity_for(3, 1, 8, 0.1) == 1  # at least one slot
    assert capacity_for(10, 2, 4, 1.0, min_capacity=7) == 7
    assert capacity_for(10, 2, 4, 2.0, min_capacity=7) == 10


def layer_kept(layer, x):
    layer(x)
    return layer._pending[3]  # kept [T, k]


def test_drop_by_probability_keeps_each_experts_highest_weight_slots():
    E, T = 2, 6
    experts = torch.tensor([[0], [0], [0], [0], [1], [0]])
    weights = torch.tensor([[0.1], [0.9], [0.5], [0.7], [0.3], [0.2]])
    bank = ExpertBank(E, 4, 8)
    x = torch.randn(T, 4)
    by_prob = MoELayer(GivenRouter(experts, weights, E), bank, capacity_factor=2 / 3, drop_policy="probability")
    # capacity ceil(2/3 * 6 / 2) = 2: expert 0 keeps its two largest weights (tokens 1 and 3)
    assert layer_kept(by_prob, x)[:, 0].tolist() == [False, True, False, True, True, False]
    by_pos = MoELayer(GivenRouter(experts, weights, E), bank, capacity_factor=2 / 3)
    assert layer_kept(by_pos, x)[:, 0].tolist() == [True, True, False, False, True, False]  # the first two


def test_probability_drop_ties_fall_back_to_position():
    E = 1
    experts = torch.zeros(4, 1, dtype=torch.long)
    weights = torch.tensor([[0.5], [0.5], [0.9], [0.5]])
    layer = MoELayer(GivenRouter(experts, weights, E), ExpertBank(E, 4, 8), capacity_factor=0.5, drop_policy="probability")
    assert layer_kept(layer, torch.randn(4, 4))[:, 0].tolist() == [True, False, True, False]  # 0.9, then the first 0.5


def test_evaluation_capacity_factor():
    E, T = 2, 8
    experts = torch.zeros(T, 1, dtype=torch.long)  # everything to expert 0
    weights = torch.ones(T, 1)
    x = torch.randn(T, 4)
    bank = ExpertBank(E, 4, 8)
    same = MoELayer(GivenRouter(experts, weights, E), bank, capacity_factor=0.5)
    assert int(layer_kept(same.eval(), x).sum()) == 2  # 'train': ceil(0.5 * 8 / 2)
    dropless = MoELayer(GivenRouter(experts, weights, E), bank, capacity_factor=0.5, eval_capacity_factor=None)
    assert int(layer_kept(dropless.eval(), x).sum()) == T
    assert int(layer_kept(dropless.train(), x).sum()) == 2
    wider = MoELayer(GivenRouter(experts, weights, E), bank, capacity_factor=0.5, eval_capacity_factor=1.5)
    assert int(layer_kept(wider.eval(), x).sum()) == 6  # ceil(1.5 * 8 / 2)
    floor = MoELayer(GivenRouter(experts, weights, E), bank, capacity_factor=0.5, min_capacity=3)
    assert int(layer_kept(floor, x).sum()) == 3


@pytest.mark.parametrize("kwargs,message", [
    ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ({"eval_capacity_factor": 0.0}, "eval_capacity_factor"),
    ({"eval_capacity_factor": "test"}, "eval_capacity_factor"),
    ({"drop_policy": "random"}, "drop_policy"),
    ({"min_capacity": 0}, "min_capacity"),
])
def test_layer_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoELayer(GivenRouter(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), 2), ExpertBank(2, 4, 8), **kwargs)


def test_top1_is_the_highest_weight_expert_and_stats_count_the_kept():
    E = 4
    experts = torch.tensor([[0, 3], [2, 1], [-1, -1], [1, -1]])
    weights = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.0, 0.0], [1.0, 0.0]])
    layer = MoELayer(GivenRouter(experts, weights, E), ExpertBank(E, 4, 8))
    layer(torch.randn(4, 4))
    assert layer.top1.tolist() == [3, 2, -1, 1]
    assert layer.stats.load.tolist() == [1, 2, 1, 1]
    assert float(layer.stats.dropped_tokens) == 1.0  # the token with no expert


def test_out_is_the_weighted_sum_of_the_kept_experts_plus_the_shared_expert():
    torch.manual_seed(0)
    E, T, d, h = 3, 5, 4, 6
    experts = torch.tensor([[0, 2], [1, -1], [2, 0], [0, 1], [-1, -1]])
    weights = torch.rand(T, 2).masked_fill(experts < 0, 0)
    bank = ExpertBank(E, d, h)
    shared = SharedExperts(d, num_shared=2, hidden=3, gated=True)
    layer = MoELayer(GivenRouter(experts, weights, E), bank, shared=shared)
    x = torch.randn(T, d)
    out = layer(x)
    want = torch.zeros(T, d)
    for t in range(T):
        for j in range(2):
            e = int(experts[t, j])
            if e >= 0:
                a, b = (x[t] @ bank.w_in[e]).split(h)
                want[t] += weights[t, j] * ((F.silu(a) * b) @ bank.w_out[e])
        g, u = (x[t] @ shared.gate_up.weight.t()).split(6)
        want[t] += torch.sigmoid(x[t] @ shared.gate.weight[0]) * ((F.silu(g) * u) @ shared.down.weight.t())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert shared.flops_per_token() == 6 * d * 2 * 3
    ungated = SharedExperts(d, 1, 3)
    g, u = (x @ ungated.gate_up.weight.t()).split(3, 1)
    torch.testing.assert_close(ungated(x), (F.silu(g) * u) @ ungated.down.weight.t())


def test_a_layer_on_a_sequence_batch_keeps_its_shape_and_sequence_length():
    E = 2
    experts = torch.tensor([[0], [1], [1], [0], [0], [1]])
    layer = MoELayer(GivenRouter(experts, torch.ones(6, 1), E), ExpertBank(E, 4, 8))
    x = torch.randn(2, 3, 4)
    out = layer(x)
    assert out.shape == x.shape and layer.sequence_length == 3 and layer.router.sequence_length == 3
    flat = MoELayer(GivenRouter(experts, torch.ones(6, 1), E), layer.experts)(x.reshape(6, 4))
    torch.testing.assert_close(out.reshape(6, 4), flat)
    assert math.isclose(float(layer.stats.tokens), 6.0)
