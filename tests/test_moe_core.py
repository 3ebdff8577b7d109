"""Backend equivalence of the MoE core: every backend equals `loop`, and an independent per-slot
reference, forward and backward; capacity drops exactly the overflow."""
from __future__ import annotations

import pytest
import torch

from routerlab.moe import ExpertBank, MoELayer, capacity_for, plan_dispatch
from routerlab.moe.kernels import grouped_mm_supported, swiglu_reference
from routerlab.routers.base import Router, Routing


class GivenRouter(Router):
    """Returns a routing fixed by the test (a real Router, so the layer runs its normal path)."""

    def __init__(self, experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> None:
        super().__init__(0, num_experts, None)
        self.experts, self.weights = experts, weights

    def forward(self, x, *, token_ids=None):
        return Routing(self.experts, self.weights, None, {})


def random_routing(T, E, k, gen, *, skip_experts=(), unused_frac=0.0):
    """Distinct experts per token drawn from those not in skip_experts; some slots -1 if unused_frac."""
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    scores = torch.rand(T, allowed.numel(), generator=gen)
    experts = allowed[scores.topk(k, dim=1).indices]
    if unused_frac:
        experts[torch.rand(T, k, generator=gen) < unused_frac] = -1
    weights = torch.rand(T, k, generator=gen)
    return experts, weights


def kept_slots_reference(experts, E, capacity):
    """Slot-major, token order within: a slot is kept while its expert has room."""
    T, k = experts.shape
    used = [0] * E
    kept = torch.zeros(k, T, dtype=torch.bool)
    for j in range(k):
        for t in range(T):
            e = int(experts[t, j])
            if e >= 0 and (capacity is None or used[e] < capacity):
                used[e] += 1
                kept[j, t] = True
    return kept


def reference_output(bank, x, experts, weights, kept):
    """sum over kept slots of w * FFN_e(x_t), one slot at a time."""
    out = torch.zeros_like(x)
    T, k = experts.shape
    for j in range(k):
        for t in range(T):
            if kept[j, t]:
                e = int(experts[t, j])
                h = x[t] @ bank.w_in[e]
                act = swiglu_reference(h) if bank.activation == "swiglu" else torch.nn.functional.gelu(h)
                out[t] = out[t] + weights[t, j].to(x.dtype) * (act @ bank.w_out[e])
    return out


def run_layer(backend, bank, x, experts, weights, E, capacity_factor=None):
    x = x.detach().clone().requires_grad_(True)
    w = weights.detach().clone().requires_grad_(True)
    layer = MoELayer(GivenRouter(experts, w, E), bank, capacity_factor, backend)
    bank.zero_grad()
    out = layer(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    (out.float() * grad_out.float()).sum().backward()
    grads = [x.grad, w.grad, bank.w_in.grad, bank.w_out.grad]
    return out.detach(), [g.detach().clone() for g in grads], layer


def close(a, b, tol):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) < tol


@pytest.mark.parametrize("E,k,activation", [(4, 1, "swiglu"), (8, 2, "swiglu"), (6, 3, "gelu"), (16, 2, "swiglu")])
def test_backends_equal_loop_fp32(E, k, activation):
    gen = torch.Generator().manual_seed(E * 10 + k)
    T, d, h = 37, 16, 24
    torch.manual_seed(E + k)
    bank = ExpertBank(E, d, h, activation)
    x = torch.randn(T, d, generator=gen)
    experts, weights = random_routing(T, E, k, gen, skip_experts=(0, E - 1))  # two experts get no token
    ref_out, ref_grads, layer = run_layer("loop", bank, x, experts, weights, E)
    assert layer.stats.kept[0] == 0 and layer.stats.kept[E - 1] == 0

    # independent reference (per slot) for the loop itself
    xr = x.clone().requires_grad_(True)
    expected = reference_output(bank, xr, experts, weights, kept_slots_reference(experts, E, None))
    assert close(ref_out, expected.detach(), 1e-5)

    out, grads, _ = run_layer("padded", bank, x, experts, weights, E)
    assert close(out, ref_out, 1e-5)
    for g, r in zip(grads, ref_grads):
        assert close(g, r, 1e-5)
    assert bank.w_in.grad[0].abs().sum() == 0  # an expert without tokens gets no gradient


@pytest.mark.skipif(not grouped_mm_supported(torch.zeros(1, dtype=torch.bfloat16)), reason="no grouped_mm on this torch")
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (6, 3)])
def test_grouped_equals_loop_bf16(E, k):
    gen = torch.Generator().manual_seed(100 + E + k)
    T, d, h = 40, 16, 32  # grouped_mm wants 16-byte rows
    torch.manual_seed(E * k)
    bank = ExpertBank(E, d, h).to(torch.bfloat16)
    x = torch.randn(T, d, generator=gen).to(torch.bfloat16)
    experts, weights = random_routing(T, E, k, gen, skip_experts=(1,), unused_frac=0.2)
    ref_out, ref_grads, _ = run_layer("loop", bank, x, experts, weights.to(torch.bfloat16), E)
    out, grads, _ = run_layer("grouped", bank, x, experts, weights.to(torch.bfloat16), E)
    assert torch.isfinite(out).all()
    assert close(out, ref_out, 1e-2)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and close(g, r, 2e-2)


@pytest.mark.parametrize("backend", ["loop", "padded"])
@pytest.mark.parametrize("E,k,capacity_factor", [(4, 2, 0.5), (8, 1, 1.0), (4, 3, 0.25)])
def test_capacity_drops_exactly_the_overflow(backend, E, k, capacity_factor):
    gen = torch.Generator().manual_seed(E * k)
    T, d, h = 33, 8, 12
    bank = ExpertBank(E, d, h)
    x = torch.randn(T, d, generator=gen)
    # skewed routing: expert 0 is popular, so it overflows while others stay under capacity
    experts, weights = random_routing(T, E, k, gen)
    experts[: T // 2, 0] = 0
    experts[: T // 2, 1:] = torch.where(experts[: T // 2, 1:] == 0, 1, experts[: T // 2, 1:])
    capacity = capacity_for(T, k, E, capacity_factor)
    assert 0 < capacity < int(torch.bincount(experts.reshape(-1), minlength=E).max())  # something overflows
    kept_ref = kept_slots_reference(experts, E, capacity)
    plan = plan_dispatch(experts, E, capacity)
    assert torch.equal(plan.kept.view(k, T), kept_ref)
    routed = torch.bincount(experts.reshape(-1), minlength=E)
    assert torch.equal(plan.counts, routed.clamp(max=capacity))  # only the overflow is dropped
    # rows are grouped by expert, in slot-major priority order within each expert
    n = int(plan.counts.sum())
    flat = experts.t().reshape(-1)
    assert torch.equal(flat[plan.order[:n]], torch.repeat_interleave(torch.arange(E), plan.counts))

    out, grads, layer = run_layer(backend, bank, x, experts, weights, E, capacity_factor)
    xr = x.clone().requires_grad_(True)
    expected = reference_output(bank, xr, experts, weights, kept_ref)
    assert close(out, expected.detach(), 1e-5)
    assert float(layer.stats.dropped_tokens) == float((kept_ref.sum(0) == 0).sum())


def test_unused_slots_and_all_dropped_tokens_give_zero():
    E, k, T, d, h = 4, 2, 12, 8, 8
    gen = torch.Generator().manual_seed(3)
    bank = ExpertBank(E, d, h)
    x = torch.randn(T, d, generator=gen)
    experts = torch.full((T, k), -1)
    experts[:4, 0] = 2  # only four slots used
    weights = torch.rand(T, k, generator=gen)
    out, grads, layer = run_layer("loop", bank, x, experts, weights, E)
    assert out[4:].abs().sum() == 0 and out[:4].abs().sum() > 0
    assert grads[0][4:].abs().sum() == 0  # no gradient to tokens that reached no expert
    assert float(layer.stats.dropped_tokens) == T - 4


def test_unweighted_combine_sums_kept_slots_and_is_permute_transposed():
    """combine(y, None, plan) (the expert-parallel sender's sum of returned rows): forward = sum of each
    token's kept rows, backward = each row gets its token's gradient, dropped/padding rows get 0."""
    from routerlab.moe import combine

    torch.manual_seed(3)
    T, k, E, d = 9, 3, 4, 5
    experts = torch.randint(-1, E, (T, k))
    plan = plan_dispatch(experts, E, capacity=2)
    y = torch.randn(T * k, d, requires_grad=True)
    g = torch.randn(T, d)
    out = combine(y, None, plan)
    (out * g).sum().backward()
    kept = plan.kept.view(k, T)
    rows = y.detach()[plan.inv].view(k, T, d)
    assert torch.allclose(out, (rows * kept[..., None]).sum(0), atol=1e-6)
    want = torch.zeros(T * k, d)
    real = torch.arange(T * k) < plan.n_kept
    want[real] = g[plan.token_of_row[real]]
    assert torch.equal(y.grad, want)
    assert 0 < int(plan.n_kept) < T * k  # the case has both kept and dropped/unused slots


@pytest.mark.parametrize("d,h", [(16, 24), (3, 5)])  # 3 x 10 numbers per expert: not a multiple of 16, the fallback draw
def test_sharded_bank_draws_the_whole_banks_values_without_building_it(d, h):
    from routerlab.moe.experts import expert_shard

    E, P = 8, 4
    torch.manual_seed(5)
    whole = ExpertBank(E, d, h)
    after_whole = torch.randn(3)  # where the generator is left matters: later layers draw from it
    for rank in range(P):
        torch.manual_seed(5)
        with expert_shard(rank, P):
            part = ExpertBank(E, d, h)
        assert torch.equal(torch.randn(3), after_whole)
        assert (part.num_experts, part.total_experts, part.first_expert) == (E // P, E, rank * E // P)
        lo, hi = rank * E // P, (rank + 1) * E // P
        assert torch.equal(part.w_in, whole.w_in[lo:hi]) and torch.equal(part.w_out, whole.w_out[lo:hi])
        cut = whole.block(rank, P)
        assert torch.equal(cut.w_in, part.w_in) and torch.equal(cut.w_out, part.w_out)


def test_a_sharded_bank_refuses_the_local_dispatcher():
    from routerlab.moe.experts import expert_shard
    from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

    with expert_shard(0, 2):
        layer = MoELayer(SoftmaxTopK(8, 4, SoftmaxTopKParams(k=2)), ExpertBank(4, 8, 8))
    assert layer.num_experts == 4 and layer.experts.num_experts == 2
    with pytest.raises(ValueError, match="shard the model"):
        layer(torch.randn(5, 8))


def test_an_expert_backend_is_one_class_registered_by_name(tmp_path):
    """A new backend: one class in one (plugin) file, registered by name; model.backend finds it, no other edits."""
    from routerlab.config import make_config
    from routerlab.errors import ConfigError
    from routerlab.train import Trainer

    plugin = tmp_path / "counting_backend.py"
    plugin.write_text(
        "from routerlab.moe.backends import Loop, register_backend\n\n"
        "@register_backend('counting_loop')\n"
        "class CountingLoop(Loop):\n"
        "    calls = 0\n\n"
        "    def __call__(self, bank, x, counts):\n"
        "        CountingLoop.calls += 1\n"
        "        return super().__call__(bank, x, counts)\n", encoding="utf-8")

    def trainer(backend, plugins=()):
        return Trainer(make_config({"seed": 1, "plugins": list(plugins), "task": {"name": "clusters"},
                                    "model": {"d_model": 8, "n_layers": 1, "num_experts": 4, "expert_hidden": 8, "backend": backend},
                                    "train": {"steps": 2, "batch_size": 8, "eval_batches": 1}, "run": {"dir": str(tmp_path), "checkpoint": False}}), log=False)

    with pytest.raises((ConfigError, ValueError), match="unknown expert backend 'counting_loop'"):
        trainer("counting_loop")
    assert trainer("counting_loop", [str(plugin)]).train_step() == trainer("loop").train_step()
    from routerlab.moe.backends import expert_backend

    assert type(expert_backend("counting_loop")).calls == 1  # one MoE layer, one forward (backward: autograd)
