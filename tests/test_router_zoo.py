"""The router zoo: each router's defining property, on random inputs (docs/routers.md)."""
from __future__ import annotations

import math

import pytest
import torch

from routerlab.errors import ConfigError
from routerlab.moe.stats import compute_stats, fluctuation, routing_metrics
from routerlab.routers import build_router, router_names

D, E = 16, 8
LEARNED = ["softmax_topk", "noisy_topk", "switch", "gshard_top2", "expert_choice", "sinkhorn", "base", "bias_balanced",
           "sparsemax", "entmax15", "hierarchical", "graph", "dselect_k"]
FIXED = ["hash", "hash_balanced", "hash_bigram", "hash_position", "lsh", "random"]
TOKEN_HASHES = ["hash", "hash_balanced", "hash_bigram", "hash_position"]


def loads(experts: torch.Tensor, num_experts: int = E) -> torch.Tensor:
    return torch.bincount(experts[experts >= 0], minlength=num_experts)


def skewed(router, scale: float = 4.0, seed: int = 0) -> None:
    """Make a learned gate prefer a few experts strongly, so balance is not free."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(router.gate.weight.shape, generator=g)
        w[0] += 3.0  # inputs below have a positive mean, so expert 0 dominates
        router.gate.weight.copy_(scale * w / math.sqrt(D))


def test_every_zoo_router_is_registered():
    assert set(LEARNED + FIXED) <= set(router_names())


@pytest.mark.parametrize("T", [64, 100, 7])
def test_expert_choice_fills_every_expert_exactly(T):
    torch.manual_seed(T)
    r = build_router({"name": "expert_choice", "capacity_factor": 2.0}, D, E)
    skewed(r)
    for train in (True, False):
        r.train(train)
        out = r(torch.randn(T, D) + 1.0)
        cap = min(T, math.ceil(2.0 * T / E))
        assert loads(out.experts).tolist() == [cap] * E
        assert (out.weights[out.experts < 0] == 0).all() and (out.weights[out.experts >= 0] > 0).all()
        # each slot's weight is the token's softmax score for that expert
        probs = out.logits.softmax(-1)
        ok = out.experts >= 0
        rows = torch.arange(T)[:, None].expand_as(out.experts)
        torch.testing.assert_close(out.weights[ok], probs[rows[ok], out.experts[ok]])
    assert not r.causal and r.params.allow_noncausal is False


def test_expert_choice_can_leave_tokens_without_expert():
    torch.manual_seed(0)
    r = build_router({"name": "expert_choice", "capacity_factor": 0.5}, D, E)
    skewed(r)
    out = r(torch.randn(64, D) + 1.0)
    per_token = (out.experts >= 0).sum(1)
    assert (per_token == 0).any() and per_token.sum() == 8 * 4


@pytest.mark.parametrize("name", ["sinkhorn", "base"])
@pytest.mark.parametrize("T", [64, 61, 5, 300])
def test_balanced_routers_equal_loads_in_training(name, T):
    torch.manual_seed(T)
    r = build_router({"name": name}, D, E)
    skewed(r)
    x = torch.randn(T, D) + 1.0
    r.train()
    load = loads(r(x).experts)
    assert load.sum() == T and int(load.max() - load.min()) <= 1
    r.eval()  # evaluation: plain top-1, which is skewed here
    out = r(x)
    assert torch.equal(out.experts[:, 0], out.logits.argmax(-1))
    if T >= 64:
        assert int(loads(out.experts).max() - loads(out.experts).min()) > 1


def test_base_assignment_is_optimal():
    scipy_opt = pytest.importorskip("scipy.optimize")
    torch.manual_seed(3)
    T, n = 48, 6
    r = build_router({"name": "base"}, D, n)
    skewed(r)
    x = torch.randn(T, D) + 1.0
    out = r(x)
    scores = out.logits.detach().double().numpy()
    cols = [e for e in range(n) for _ in range(T // n)]
    rows, picked = scipy_opt.linear_sum_assignment(-scores[:, cols])
    best = scores[rows, [cols[c] for c in picked]].sum()
    got = scores[range(T), out.experts[:, 0].numpy()].sum()
    assert got == pytest.approx(best, abs=1e-3 * T * (scores.max() - scores.min()))
    greedy = scores[range(T), out.logits.argmax(-1).numpy()].sum()
    assert greedy > best  # the unconstrained argmax would score higher: the balance constraint binds


def test_sinkhorn_weights_are_assigned_probabilities():
    torch.manual_seed(1)
    r = build_router({"name": "sinkhorn"}, D, E)
    skewed(r)
    out = r(torch.randn(40, D) + 1.0)
    torch.testing.assert_close(out.weights[:, 0], out.logits.softmax(-1).gather(1, out.experts)[:, 0])
    assert (out.experts[:, 0] != out.logits.argmax(-1)).any()  # balancing moved some tokens off their argmax


@pytest.mark.parametrize("name", TOKEN_HASHES)
def test_token_hash_routers_are_deterministic_and_do_not_fluctuate(name):
    torch.manual_seed(0)
    r = build_router({"name": name, "seq_len": 16} if name in ("hash_bigram", "hash_position") else {"name": name}, D, E)
    ids = torch.randint(0, 100, (64,))
    r.train()
    first = r(torch.randn(64, D), token_ids=ids).experts[:, 0]
    r.eval()
    second = r(torch.randn(64, D) * 5, token_ids=ids).experts[:, 0]  # hidden states changed completely
    assert fluctuation(first, second) == 0.0
    assert first.unique().numel() > 1
    assert list(r.parameters()) == []


def test_learned_router_does_fluctuate_under_the_same_change():  # the control for the test above
    torch.manual_seed(0)
    r = build_router({"name": "switch"}, D, E).eval()
    a = r(torch.randn(64, D)).experts[:, 0]
    b = r(torch.randn(64, D) * 5).experts[:, 0]
    assert fluctuation(a, b) > 0.2


@pytest.mark.parametrize("name", ["hash_balanced", "hash_bigram"])
def test_token_id_routers_refuse_missing_ids(name):
    r = build_router({"name": name}, D, E)
    with pytest.raises(ConfigError, match="needs token ids"):
        r(torch.randn(4, D))


def test_hash_balanced_beats_random_hash_on_skewed_tokens():
    g = torch.Generator().manual_seed(0)
    zipf = torch.arange(1, 201).double() ** -0.5  # skewed, but no single id above the mean expert share
    ids = torch.multinomial(zipf, 20000, replacement=True, generator=g)
    balanced = build_router({"name": "hash_balanced"}, D, E).train()
    plain = build_router({"name": "hash"}, D, E)
    vio = {}
    for name, r in (("balanced", balanced), ("plain", plain)):
        load = loads(r(torch.zeros(len(ids), D), token_ids=ids).experts).double()
        vio[name] = float(load.max() / load.mean() - 1)
    assert vio["balanced"] < 0.05 < vio["plain"]
    assert bool(balanced.fitted) and "table" in balanced.state_dict() and "fitted" in balanced.state_dict()
    # fitted from counts explicitly: the most frequent ids land on distinct experts
    r = build_router({"name": "hash_balanced"}, D, E)
    r.fit(torch.tensor([100.0] * 8 + [1.0] * 8))
    assert sorted(r.table[:8].tolist()) == list(range(8))


def test_hash_bigram_uses_the_previous_token_and_sequence_starts():
    r = build_router({"name": "hash_bigram", "seq_len": 4}, D, E)
    ids = torch.tensor([5, 5, 5, 5, 9, 5, 9, 5])
    e = r(torch.zeros(8, D), token_ids=ids).experts[:, 0]
    assert e[0] == e[4 - 4] and e[1] == e[2] == e[3]  # (start,5) then (5,5) three times
    # position 4 starts a new sequence: (start, 9), not (5, 9); position 6 is (5, 9)
    pairs = {(p, c): int(x) for p, c, x in zip([-1, 5, 5, 5, -1, 9, 5, 9], ids.tolist(), e)}
    assert len({v for v in pairs.values()}) > 1
    key = lambda p, c: (c * 1000003 + (p + 1) * 8191) % r.table.numel()
    assert e[4] == r.table[key(-1, 9)] and e[6] == r.table[key(5, 9)]


def test_hash_position_depends_only_on_position():
    r = build_router({"name": "hash_position", "seq_len": 8}, D, E)
    e = r(torch.randn(32, D)).experts[:, 0].view(4, 8)
    assert (e == e[0]).all() and e[0].unique().numel() > 1


def test_lsh_is_deterministic_and_local():
    torch.manual_seed(0)
    r = build_router({"name": "lsh"}, D, E)
    x = torch.randn(500, D)
    a = r(x).experts[:, 0]
    assert torch.equal(a, r(x.clone()).experts[:, 0])
    near = r(x + 0.01 * torch.randn_like(x)).experts[:, 0]
    far = r(torch.randn(500, D)).experts[:, 0]
    assert (near == a).float().mean() > 0.95 and (far == a).float().mean() < 0.4
    assert loads(a).min() > 0


def test_bias_balanced_lowers_maxvio_step_by_step():
    torch.manual_seed(0)
    r = build_router({"name": "bias_balanced", "k": 2, "update_rate": 0.002}, D, E)
    skewed(r, scale=2.0)
    stream = [torch.randn(256, D) + 1.0 for _ in range(4)]  # fixed skewed stream, cycled
    vio = []
    for step in range(120):
        with torch.no_grad():
            out = r(stream[step % 4])
        stats = compute_stats(out.experts, out.logits, loads(out.experts), torch.ones(256))
        vio.append(routing_metrics(stats)["max_vio"])
        r.after_step(stats)
    cycle = [sum(vio[i : i + 4]) / 4 for i in range(0, 120, 4)]  # one pass over the stream
    assert cycle[0] > 2.0
    unbalanced = [c for c in cycle if c > 0.4]
    assert len(unbalanced) >= 8
    assert all(b < a for a, b in zip(unbalanced, unbalanced[1:]))  # falls pass after pass while unbalanced
    assert max(cycle[-5:]) < 0.1 * cycle[0]
    # weights come from the unbiased scores, normalized over the chosen experts
    out = r(stream[0])
    s = torch.sigmoid(out.logits).gather(1, out.experts)
    torch.testing.assert_close(out.weights, s / s.sum(1, keepdim=True))
    assert r.bias.abs().max() > 0.1 and "bias" in r.state_dict() and out.aux == {}


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_sparse_gates_sum_to_one_with_exact_zeros(name):
    torch.manual_seed(0)
    r = build_router({"name": name, "k_max": E}, D, E)
    skewed(r, scale=3.0)
    out = r(torch.randn(200, D))
    w = out.weights.float()
    torch.testing.assert_close(w.sum(1), torch.ones(200))
    assert ((w == 0) == (out.experts < 0)).all()
    per_token = (out.experts >= 0).sum(1)
    assert (per_token < E).all() and per_token.unique().numel() > 1  # exact zeros, variable k
    if name == "sparsemax":  # KKT of the simplex projection: z_i - p_i = tau on the support, z_i <= tau off it
        z = out.logits.detach()
        p = torch.zeros_like(z).scatter_add(1, out.experts.clamp_min(0), w)
        support = p > 0
        tau = ((z - p) * support).sum(1) / support.sum(1)
        torch.testing.assert_close(((z - p) - tau[:, None])[support], torch.zeros(int(support.sum())), atol=1e-5, rtol=0)
        assert (z[~support] <= tau[:, None].expand_as(z)[~support] + 1e-6).all()


def test_sparse_gate_respects_k_max():
    torch.manual_seed(0)
    r = build_router({"name": "entmax15", "k_max": 2}, D, E)
    out = r(torch.randn(100, D) * 0.01)  # near-uniform logits: uncapped entmax would use many experts
    assert out.experts.shape[1] == 2 and (out.experts >= 0).all()
    torch.testing.assert_close(out.weights.sum(1), torch.ones(100))


def test_gshard_second_expert_frequency_matches_gate():
    torch.manual_seed(1234)
    r = build_router({"name": "gshard_top2", "capacity_factor": None}, D, E).train()  # no router-level capacity
    with torch.no_grad():
        r.gate.weight.mul_(6.0)
        out = r(torch.randn(20000, D))
    g2 = out.weights.float()[:, 1].clone()
    used = out.experts[:, 1] >= 0
    probs = out.logits.softmax(-1).topk(2, dim=-1).values
    g2_all = probs[:, 1] / probs.sum(1)
    expected = (2 * g2_all).clamp(max=1)
    for lo, hi in [(0.0, 0.15), (0.15, 0.3), (0.3, 0.5)]:  # bins of the second gate
        m = (g2_all >= lo) & (g2_all < hi)
        n = int(m.sum())
        assert n > 500
        freq, want = used[m].float().mean(), expected[m].mean()
        assert abs(float(freq - want)) < 4 * math.sqrt(float(want * (1 - want)) / n) + 1e-3
    assert torch.equal(g2[used], g2_all[used]) and (g2[~used] == 0).all()
    r.eval()  # no random routing at evaluation
    assert (r(torch.randn(100, D)).experts >= 0).all()


def test_gshard_group_capacity():
    torch.manual_seed(0)
    r = build_router({"name": "gshard_top2", "groups": 4, "capacity_factor": 0.5, "random_routing": False}, D, E)
    skewed(r)
    out = r(torch.randn(128, D) + 1.0)
    cap = math.ceil(0.5 * 32 * 2 / E)  # capacity_factor is a multiple of the balanced share T k / E (k = 2)
    for g in range(4):
        assert loads(out.experts[32 * g : 32 * (g + 1)]).max() <= cap
    assert (out.experts[:, 1] < 0).any()  # over-capacity slots dropped
    assert "balance" in out.aux and out.aux["balance"] > 0


def test_hierarchical_weights_factor():
    torch.manual_seed(0)
    r = build_router({"name": "hierarchical", "groups": 2, "k_groups": 2, "k": 2}, D, E)
    x = torch.randn(50, D)
    out = r(x)
    group = (x @ r.group_gate.weight.t()).softmax(-1)
    inner = (x @ r.gate.weight.t()).view(50, 2, 4).softmax(-1)
    e = out.experts
    want = group.gather(1, e // 4) * inner.reshape(50, 8).gather(1, e)
    torch.testing.assert_close(out.weights, want)
    assert (out.weights.sum(1) < 1).all()  # products, not renormalized
    assert ((e // 4)[:, :2] == (e // 4)[:, :1]).all()  # slots of a chosen group stay in that group
    with pytest.raises(ConfigError, match="divide"):
        build_router({"name": "hierarchical", "groups": 3}, D, E)


def test_graph_router_shares_signal_between_experts():
    torch.manual_seed(0)
    r = build_router({"name": "graph", "adjacency": "sparse", "neighbors": 2, "rounds": 2}, D, E)
    A = r.adjacency_matrix()
    assert ((A > 0).sum(1) == 2).all() and torch.diagonal(A).eq(0).all()
    # moving one expert's embedding moves the refined state of the experts that listen to it
    base = r.expert_states().detach()
    src = int(A[0].argmax())
    with torch.no_grad():
        r.expert_emb[src] += 1.0
    moved = (r.expert_states().detach() - base).norm(dim=1)
    assert moved[0] > 1e-4
    reach = (torch.eye(E) + A + A @ A)[:, src] > 0  # within two hops of src
    assert (moved[reach] > 1e-5).all()
    assert (moved[~reach] < 1e-6).all() and (~reach).any()


def test_dselect_k_is_sparse_once_selectors_saturate():
    torch.manual_seed(0)
    r = build_router({"name": "dselect_k", "k": 2}, D, E)
    x = torch.randn(64, D)
    before = r(x)
    torch.testing.assert_close(before.weights.sum(1), torch.ones(64))
    assert (before.experts >= 0).sum(1).float().mean() > 3  # unsaturated steps: more than k experts
    with torch.no_grad():
        r.gate.weight.mul_(100.0)  # steps saturate: each selector is one binary code
    out = r(x)
    per_token = (out.experts >= 0).sum(1)
    assert (per_token >= 1).all() and (per_token <= 2).float().mean() > 0.9
    torch.testing.assert_close(out.weights.sum(1), torch.ones(64))
    with pytest.raises(ConfigError, match="power of two"):
        build_router({"name": "dselect_k"}, D, 6)


def _train_logit_scale(z: float) -> tuple[float, float]:
    torch.manual_seed(0)
    r = build_router({"name": "switch", "alpha": 0.0, "z_loss": z}, D, E)
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    x, labels = torch.randn(256, D), torch.randint(0, E, (256,))
    scale = []
    for _ in range(30):
        out = r(x)
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + sum(out.aux.values(), torch.tensor(0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        scale.append(float(torch.logsumexp(out.logits.detach(), -1).square().mean()))
    return scale[0], scale[-1]


def test_z_loss_lowers_the_logit_scale():
    start, with_z = _train_logit_scale(1.0)
    _, without = _train_logit_scale(0.0)
    assert without > start  # the task alone inflates the logits
    assert with_z < start and with_z < 0.8 * without


@pytest.mark.parametrize("name", LEARNED)
def test_gradient_reaches_every_learned_router_parameter(name):
    torch.manual_seed(0)
    r = build_router({"name": name}, D, E).train()
    x = torch.randn(64, D) + 0.5
    out = r(x, token_ids=torch.randint(0, 50, (64,)))
    loss = (out.weights * torch.randn_like(out.weights)).sum() + sum(out.aux.values(), torch.tensor(0.0))
    loss.backward()
    params = dict(r.named_parameters())
    assert params
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient in {pname}"


@pytest.mark.parametrize("name", FIXED)
def test_fixed_routers_have_no_gradient(name):
    r = build_router({"name": name}, D, E).train()
    x = torch.randn(32, D, requires_grad=True)
    out = r(x, token_ids=torch.randint(0, 50, (32,)))
    assert list(r.parameters()) == [] and not out.weights.requires_grad


def test_stateful_routers_survive_a_checkpoint():
    torch.manual_seed(0)
    a = build_router({"name": "bias_balanced"}, D, E)
    a.bias.copy_(torch.randn(E))
    b = build_router({"name": "bias_balanced"}, D, E)
    b.load_state_dict(a.state_dict())
    x = torch.randn(20, D)
    assert torch.equal(a(x).experts, b(x).experts)
