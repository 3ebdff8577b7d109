"""The MoE layer's remaining definitions against hand computations: the capacity formula, drop by probability,
the evaluation capacity, min_capacity, the top-1 expert, shared experts. Fast (tiny sizes); the mutation
run of routerlab/moe selects this file (docs/reliability.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

from routerlab.moe import ExpertBank, MoELayer, capacity_for, routing_metrics
from routerlab.moe.shared import SharedExperts
from routerlab.routers.base import Router, Routing


class GivenRouter(Router):
    def __init__(self, experts, weights, num_experts):
        super().__init__(0, num_experts, None)
        self.experts, self.weights, self.logits = experts, weights, None

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


class RecordingRouter(GivenRouter):
    def forward(self, x, *, token_ids=None):
        self.seen = token_ids
        return Routing(self.experts, self.weights, self.logits, {"balance": torch.tensor(0.5)})


def test_a_fresh_layer_has_no_stats_and_a_forward_records_ids_logits_and_losses():
    E = 2
    router = RecordingRouter(torch.tensor([[0], [1], [1], [0], [0], [1]]), torch.ones(6, 1), E)
    router.logits = torch.randn(6, E)
    layer = MoELayer(router, ExpertBank(E, 4, 8))
    assert (layer.stats, layer.top1, layer.aux_losses, layer.sequence_length) == (None, None, {}, None)
    ids = torch.arange(6).view(2, 3)
    layer(torch.randn(2, 3, 4), ids)
    assert torch.equal(router.seen, torch.arange(6))  # flattened like the hidden states
    assert set(layer.aux_losses) == {"balance"}
    assert "router_entropy" in routing_metrics(layer.stats)  # the logits reached the stats
    layer(torch.randn(6, 4))
    assert router.seen is None and layer.sequence_length is None  # a flat batch is not a sequence


def test_the_layer_uses_a_given_dispatcher_and_its_defaults():
    E, T = 2, 4
    experts, weights = torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1)
    calls = []

    def dispatcher(layer, x, routing):
        calls.append(x.shape)
        return torch.zeros_like(x), torch.ones(x.shape[0], 1, dtype=torch.bool)

    MoELayer(GivenRouter(experts, weights, E), ExpertBank(E, 4, 8), dispatcher=dispatcher)(torch.randn(T, 4))
    assert calls == [(T, 4)]
    tight = MoELayer(GivenRouter(experts, weights, E), ExpertBank(E, 4, 8), capacity_factor=0.25)  # capacity ceil(0.5) = 1
    assert int(layer_kept(tight, torch.randn(T, 4)).sum()) == 1  # min_capacity defaults to 1
    half = MoELayer(GivenRouter(experts, weights, E), ExpertBank(E, 4, 8), capacity_factor=1.0, eval_capacity_factor=0.5)
    assert int(layer_kept(half.eval(), torch.randn(T, 4)).sum()) == 1


def plain_layer(x, experts, weights, kept, w_in, w_out):
    h = w_out.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            if kept[t, j]:
                e = int(experts[t, j])
                a, b = (x[t] @ w_in[e]).split(h)
                out[t] = out[t] + weights[t, j] * ((F.silu(a) * b) @ w_out[e])
    return out


@pytest.mark.parametrize("backend", ["loop", "padded"])
@pytest.mark.parametrize("weights_need_grad", [True, False])
def test_every_gradient_of_the_layer_equals_autograd_through_a_plain_reference(backend, weights_need_grad):
    """x, expert weights and combine weights, with dropped and unused slots; combine weights without grad
    (hash routers) too. The loop backend is not the reference here: both run the core's permute/combine."""
    torch.manual_seed(2)
    E, T, d, h = 3, 7, 4, 5
    experts = torch.tensor([[0, 1], [0, 2], [0, -1], [1, 0], [0, 2], [2, 1], [-1, -1]])
    weights = torch.rand(T, 2, dtype=torch.float64).masked_fill(experts < 0, 0)
    bank = ExpertBank(E, d, h).double()
    x = torch.randn(T, d, dtype=torch.float64)
    g = torch.randn(T, d, dtype=torch.float64)
    xs, ws = x.clone().requires_grad_(), weights.clone().requires_grad_(weights_need_grad)
    layer = MoELayer(GivenRouter(experts, ws, E), bank, capacity_factor=0.6, backend=backend)  # capacity ceil(0.6 * 7 * 2 / 3) = 3
    out = layer(xs)
    kept = layer._pending[3]
    assert not bool(kept.all()) and bool(kept[experts >= 0].any())  # some slots dropped
    (out * g).sum().backward()
    xr, wr = x.clone().requires_grad_(), weights.clone().requires_grad_(True)
    w_in, w_out = bank.w_in.detach().clone().requires_grad_(), bank.w_out.detach().clone().requires_grad_()
    want = plain_layer(xr, experts, wr, kept, w_in, w_out)
    (want * g).sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(bank.w_in.grad, w_in.grad)
    torch.testing.assert_close(bank.w_out.grad, w_out.grad)
    if weights_need_grad:
        torch.testing.assert_close(ws.grad, wr.grad)
        assert bool((ws.grad[~kept] == 0).all())  # dropped and unused slots get no gradient


@pytest.mark.parametrize("backend", ["loop", "padded"])
def test_no_tokens_and_no_routed_slot_give_zeros(backend):
    """An empty batch, or one whose every slot is unused (an expert-parallel rank can receive no rows)."""
    from routerlab.moe.experts import ExpertBank as Bank

    bank = Bank(3, 4, 5)
    for experts in (torch.zeros(0, 2, dtype=torch.long), torch.full((4, 2), -1)):
        layer = MoELayer(GivenRouter(experts, torch.zeros(experts.shape), 3), bank, backend=backend)
        x = torch.randn(experts.shape[0], 4)
        out = layer(x)
        assert out.shape == x.shape and bool((out == 0).all())


def test_backend_choice_and_instances():
    from routerlab.moe.backends import choose_backend, expert_backend
    from routerlab.moe.kernels import grouped_mm_supported

    assert expert_backend("loop") is expert_backend("loop")
    assert choose_backend("auto", torch.zeros(2, 4)) == "loop"  # fp32 on CPU
    assert choose_backend("padded", torch.zeros(2, 4)) == "padded"
    if grouped_mm_supported(torch.zeros(2, 16, dtype=torch.bfloat16)):
        assert choose_backend("auto", torch.zeros(2, 16, dtype=torch.bfloat16)) == "grouped"
        torch.manual_seed(0)
        bank = ExpertBank(2, 16, 16, activation="gelu").bfloat16()
        x = torch.randn(6, 16, dtype=torch.bfloat16)
        counts = torch.tensor([4, 2])
        torch.testing.assert_close(bank(x, counts, "grouped"), bank(x, counts, "loop"), rtol=2e-2, atol=2e-2)


def test_expert_bank_init_scale_rank_and_blocks():
    torch.manual_seed(0)
    bank = ExpertBank(4, 64, 32)
    assert (bank.first_expert, bank.num_experts, bank.total_experts, bank.sharded) == (0, 4, 4, False)
    assert float(bank.w_in.std()) == pytest.approx(1 / math.sqrt(64), rel=0.05)  # N(0, 1/d) init
    assert float(bank.w_out.std()) == pytest.approx(1 / math.sqrt(32), rel=0.05)
    whole = ExpertBank(4, 8, 6, activation="gelu").double()
    state = torch.get_rng_state()
    part = whole.block(1, 2)
    assert torch.equal(torch.get_rng_state(), state)  # a block copies values: it draws nothing
    assert (part.first_expert, part.num_experts, part.activation, part.w_in.dtype) == (2, 2, "gelu", torch.float64)
    assert torch.equal(part.w_in, whole.w_in[2:4]) and torch.equal(part.w_out, whole.w_out[2:4])


def test_swiglu_backward_computes_in_fp32_for_16_bit_inputs():
    from routerlab.moe.kernels import swiglu_backward

    torch.manual_seed(0)
    h13 = torch.randn(5, 8).bfloat16()
    grad = torch.randn(5, 4).bfloat16()
    a, b = h13.float().chunk(2, -1)
    s = torch.sigmoid(a)
    g = grad.float()
    want = torch.cat([g * b * s * (1 + a * (1 - s)), g * a * s], -1).bfloat16()
    assert torch.equal(swiglu_backward(h13, grad), want)
    ref = h13.double().requires_grad_()
    ga, gb = ref.chunk(2, -1)
    (F.silu(ga) * gb * grad.double()).sum().backward()
    torch.testing.assert_close(swiglu_backward(h13.double(), grad.double()), ref.grad)


def test_shared_expert_arguments_and_sequence_input():
    SharedExperts(4, 1, 1)  # the smallest valid one
    for bad in ((0, 5), (2, 0)):
        with pytest.raises(ValueError, match="num_shared >= 1 and hidden >= 1"):
            SharedExperts(4, *bad)
    torch.manual_seed(0)
    shared = SharedExperts(4, 2, 3)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(shared(x), shared(x.reshape(10, 4)).reshape(2, 5, 4))


def test_stats_metrics_edges_merges_and_rank_overload():
    from routerlab.moe.stats import RoutingStats, fluctuation, rank_overload, stats_from_routing

    E = 4
    one = stats_from_routing(torch.tensor([[2]]), None, torch.tensor([[True]]), E)  # one token, one slot
    m = routing_metrics(one)
    assert m["load_cv"] == pytest.approx(math.sqrt(3))  # load [0, 0, 1, 0]: mean 0.25 < 1 still counts
    assert m["mean_k"] == 1.0 and m["dropped_frac"] == 0.0
    dropped = stats_from_routing(torch.tensor([[1]]), None, torch.tensor([[False]]), E)
    assert routing_metrics(dropped)["dropped_frac"] == 1.0  # one token of one
    a = stats_from_routing(torch.tensor([[0], [0], [1], [2]]), torch.randn(4, E), torch.ones(4, 1, dtype=torch.bool), E)
    b = stats_from_routing(torch.tensor([[3], [3], [3], [3]]), None, torch.ones(4, 1, dtype=torch.bool), E)
    merged = routing_metrics(a.merge(b))
    assert "router_entropy" not in merged  # one part had no logits: no probability metrics for the union
    vio_a, vio_b = 2 / 1 - 1, 4 / 1 - 1  # each micro-batch's own MaxVio: max / mean - 1
    assert merged["max_vio_batch"] == pytest.approx((vio_a + vio_b) / 2)
    assert "rank_overload" not in routing_metrics(a) and "rank_overload" not in routing_metrics(a, ranks=3)
    assert routing_metrics(a, ranks=2)["rank_overload"] == pytest.approx(3 / 2)  # ranks hold {0,1}: 3, {2,3}: 1
    assert rank_overload(torch.zeros(4), 2) == 1.0
    assert fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 2])) == 0.75


@pytest.mark.parametrize("largest", [3, 64, 2**15 - 1, 2**15 + 5])
def test_the_plans_narrow_sort_keys_give_the_int64_stable_order(largest):
    """stable_order sorts as int16 (or int32 past int16's range): the same stable order as argsort of the int64 keys,
    ties (a few distinct ids among many slots) in position order, keys at the largest value included."""
    from routerlab.moe.layer import stable_order

    g = torch.Generator().manual_seed(largest)
    for n in (1, 7, 5000):
        key = torch.randint(0, largest + 1, (n,), generator=g)
        key[-1] = largest
        assert torch.equal(stable_order(key, largest), torch.argsort(key, stable=True))
        ties = torch.randint(0, 3, (n,), generator=g) * (largest // 2)
        assert torch.equal(stable_order(ties, largest), torch.argsort(ties, stable=True))
