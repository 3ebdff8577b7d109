"""Every router's defining selection rule against an independent reference: a hand computation, a textbook
algorithm written out in plain PyTorch / Python, or a distribution property. Default options (the gate
options of routers/gated.py at their defaults); tiny sizes, each test well under a second.

softmax_topk, expert_choice and sinkhorn's plan are pinned in test_definitions.py; `rl` needs a trained
stable-baselines3 policy and is pinned in test_rl.py (the policy's argmax action is the expert)."""
import math

import numpy as np
import pytest
import torch

from routerlab.routers import build_router, router_names
from routerlab.routers.registry import router_entry

D = 8


def make(name, E=4, **params):
    torch.manual_seed(0)
    return build_router({"name": name, **params}, D, E)


def tokens(T, seed=1, scale=1.0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)) * scale


def gate_logits(router, x):
    return x.float() @ router.gate.weight.detach().float().t()  # the linear gate, no bias, fp32


def assert_softmax_top2(out, logits, **tolerance):
    """The routing is softmax top-2 of `logits`, weights renormalized over the two; returns the softmax."""
    probs = torch.softmax(logits, 1)
    top, idx = probs.topk(2, 1)
    assert torch.equal(out.experts, idx)
    torch.testing.assert_close(out.weights, top / top.sum(1, keepdim=True), **tolerance)
    return probs


def rows(experts, weights):
    """{expert: weight} per token, unused slots (-1) left out."""
    return [{int(e): float(w) for e, w in zip(er, wr) if e >= 0} for er, wr in zip(experts.tolist(), weights.tolist())]


def test_every_registered_router_has_a_definition_test():
    here = open(__file__).read()
    pinned_elsewhere = {"softmax_topk", "expert_choice", "sinkhorn", "rl"}
    # built-in routers only: other tests' plugins and the environments' env_assigned join the same registry
    builtin = [n for n in router_names() if router_entry(n).obj.__module__.startswith("routerlab.routers.")]
    missing = [n for n in builtin if n not in pinned_elsewhere and f'"{n}"' not in here]
    assert not missing, f"routers without a selection-rule test: {missing}"


def test_switch_is_argmax_with_its_probability_and_the_fedus_balance_loss():
    E, T = 4, 40
    r = make("switch", E).train()
    x = tokens(T)
    out = r(x)
    logits = gate_logits(r, x)
    probs = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    best = [max(range(E), key=lambda e: float(logits[t, e])) for t in range(T)]
    assert out.experts[:, 0].tolist() == best
    torch.testing.assert_close(out.weights[:, 0], probs[torch.arange(T), best])  # not renormalized to 1
    f = torch.tensor([best.count(e) / T for e in range(E)])
    assert float(out.aux["balance"].detach()) == pytest.approx(0.01 * E * float((f * probs.mean(0)).sum()), rel=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_topk_without_noise_is_topk_of_the_clean_logits_softmaxed_over_the_kept(k):
    E, T = 5, 30
    r = make("noisy_topk", E, k=k)
    torch.nn.init.normal_(r.gate.weight)  # the paper's zero init would make every logit 0
    x = tokens(T)
    out = r.eval()(x)  # evaluation: no noise
    logits = gate_logits(r, x)
    for t in range(T):
        kept = sorted(range(E), key=lambda e: -float(logits[t, e]))[:k]
        z = [math.exp(float(logits[t, e])) for e in kept]
        want = {e: v / sum(z) for e, v in zip(kept, z)}  # softmax(KeepTopK(H, k)): zeros outside
        got = rows(out.experts, out.weights)[t]
        assert got.keys() == want.keys() and all(got[e] == pytest.approx(want[e], rel=1e-5) for e in want)


def test_noisy_topk_noise_only_in_training():
    r = make("noisy_topk", 4, k=1)
    torch.nn.init.normal_(r.gate.weight)
    x = tokens(200)
    clean = r.eval()(x).experts
    torch.manual_seed(5)
    noisy = r.train()(x).experts
    assert torch.equal(clean, r.eval()(x).experts) and not torch.equal(clean, noisy)


def test_gshard_top2_first_and_second_expert_rule():
    E, T = 4, 400
    r = make("gshard_top2", E, capacity_factor=None)
    x = tokens(T)
    probs = torch.softmax(gate_logits(r, x), 1)
    order = probs.argsort(1, descending=True)
    g1, g2 = probs.gather(1, order[:, :1])[:, 0], probs.gather(1, order[:, 1:2])[:, 0]
    w1, w2 = g1 / (g1 + g2), g2 / (g1 + g2)
    out = r.eval()(x)  # evaluation: both experts always
    assert torch.equal(out.experts, order[:, :2])
    torch.testing.assert_close(out.weights, torch.stack([w1, w2], 1))
    torch.manual_seed(9)
    out = r.train()(x)
    torch.manual_seed(9)
    u = torch.rand(T)  # the only draw of a training forward without jitter
    keep_second = u < torch.clamp(2 * w2, max=1.0)  # GShard: second expert with probability min(1, 2 g2)
    assert torch.equal(out.experts[:, 0], order[:, 0])
    assert torch.equal(out.experts[:, 1], torch.where(keep_second, order[:, 1], -1))
    torch.testing.assert_close(out.weights[:, 1], torch.where(keep_second, w2, 0))


def test_gshard_top2_group_capacity_takes_first_choices_then_seconds_in_token_order():
    E, T, G, cf = 4, 24, 2, 0.5
    r = make("gshard_top2", E, capacity_factor=cf, groups=G, random_routing=False).eval()
    x = tokens(T, scale=3)
    out = r(x)
    order = torch.softmax(gate_logits(r, x), 1).argsort(1, descending=True)[:, :2].tolist()
    cap = math.ceil(cf * (T // G) * 2 / E)
    want = [[-1, -1] for _ in range(T)]
    for g in range(G):
        used = [0] * E
        for j in range(2):  # all first choices of the group, then all second choices
            for t in range(g * T // G, (g + 1) * T // G):
                e = order[t][j]
                if used[e] < cap:
                    used[e] += 1
                    want[t][j] = e
    assert out.experts.tolist() == want
    assert bool((out.weights[out.experts < 0] == 0).all())


def test_hash_is_its_table_modulo_its_size():
    E, size = 4, 16
    r = make("hash", E, table_size=size, seed=3)
    ids = torch.arange(3 * size)
    out = r(tokens(len(ids)), token_ids=ids)
    table = torch.randint(E, (size,), generator=torch.Generator().manual_seed(3))  # the documented table
    assert out.experts[:, 0].tolist() == [int(table[i % size]) for i in range(3 * size)]
    assert out.weights.eq(1).all() and out.logits is None
    other = make("hash", E, table_size=size, seed=4)(tokens(len(ids)), token_ids=ids)
    assert not torch.equal(other.experts, out.experts)  # the seed picks the table


def test_hash_bigram_keys_on_the_previous_token_reset_at_sequence_starts():
    E, size, L = 4, 64, 5
    r = make("hash_bigram", E, table_size=size, seq_len=L)
    ids = torch.tensor([3, 7, 7, 1, 0, 9, 3, 7, 2, 2])
    out = r(tokens(len(ids)), token_ids=ids)
    table = r.table.tolist()
    for t, i in enumerate(ids.tolist()):
        prev = -1 if t % L == 0 else int(ids[t - 1])
        assert int(out.experts[t, 0]) == table[(i * 1000003 + (prev + 1) * 8191) % size], t


def test_hash_position_keys_on_the_position_in_the_sequence():
    E, size, L = 4, 8, 3
    r = make("hash_position", E, table_size=size, seq_len=L)
    out = r(tokens(10))
    assert out.experts[:, 0].tolist() == [int(r.table[(t % L) % size]) for t in range(10)]
    whole = make("hash_position", E, table_size=size)(tokens(10))
    assert whole.experts[:, 0].tolist() == [int(r.table[t % size]) for t in range(10)]


def test_hash_balanced_is_the_lpt_greedy_table_of_the_counts():
    E, size = 3, 12
    counts = torch.tensor([9, 0, 1, 7, 7, 3, 0, 2, 5, 1, 0, 4])
    r = make("hash_balanced", E, table_size=size)
    fallback = r.table.clone()
    r.fit(counts)
    load, want = [0] * E, fallback.tolist()
    for i in sorted((i for i in range(size) if counts[i] > 0), key=lambda i: (-int(counts[i]), i)):
        e = min(range(E), key=lambda e: (load[e], e))  # least-loaded expert, ties to the lowest id
        want[i] = e
        load[e] += int(counts[i])
    assert r.table.tolist() == want
    assert max(load) - min(load) <= int(counts.max())  # LPT's balance bound
    ids = torch.repeat_interleave(torch.arange(size), counts)
    per_expert = torch.bincount(r.eval()(tokens(len(ids)), token_ids=ids).experts[:, 0], minlength=E)
    assert per_expert.tolist() == load


def test_hash_balanced_fits_itself_on_the_first_training_batch():
    E, size = 2, 8
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])
    r = make("hash_balanced", E, table_size=size).train()
    out = r(tokens(len(ids)), token_ids=ids)
    assert torch.bincount(out.experts[:, 0], minlength=E).tolist() == [4, 4]  # {0} vs {1, 2, 3}
    before = r.table.clone()
    r(tokens(4), token_ids=torch.tensor([5, 5, 5, 5]))
    assert torch.equal(r.table, before)  # frozen after the fit


def test_random_draws_k_distinct_uniform_experts_with_weight_one_over_k():
    E, k, T = 5, 2, 4000
    torch.manual_seed(0)
    out = make("random", E, k=k)(tokens(T))
    assert all(len(set(row)) == k for row in out.experts.tolist())
    assert out.weights.eq(1 / k).all()
    freq = torch.bincount(out.experts.reshape(-1), minlength=E).double() / (T * k)
    assert (freq - 1 / E).abs().max() < 4 * math.sqrt((1 / E) * (1 - 1 / E) / (T * k)) + 1e-3  # within 4 sigma
    pairs = torch.bincount(out.experts[:, 0] * E + out.experts[:, 1], minlength=E * E).view(E, E)
    assert pairs.diagonal().sum() == 0 and (pairs + pairs.t()).fill_diagonal_(1).min() > 0  # every pair occurs


def test_base_trains_on_the_optimal_balanced_assignment_and_evaluates_greedily():
    from scipy.optimize import linear_sum_assignment

    E, T = 4, 14  # 14 = 3 * 4 + 2: loads 3 or 4
    r = make("base", E)
    x = tokens(T, scale=2)
    logits = gate_logits(r, x)
    out = r.train()(x)
    chosen = out.experts[:, 0]
    load = torch.bincount(chosen, minlength=E)
    assert sorted(load.tolist()) == [3, 3, 4, 4]
    # the optimum over all assignments with these loads: each expert as load-many columns
    best = -math.inf
    for extra in [(a, b) for a in range(E) for b in range(a + 1, E)]:
        cols = [e for e in range(E) for _ in range(3 + (e in extra))]
        i, j = linear_sum_assignment(-logits[:, cols].numpy())
        best = max(best, float(logits[:, cols].numpy()[i, j].sum()))
    assert float(logits[torch.arange(T), chosen].sum()) >= best - T * 1e-3 * float(logits.max() - logits.min()) - 1e-4
    torch.testing.assert_close(out.weights[:, 0], torch.sigmoid(logits[torch.arange(T), chosen]))
    ev = r.eval()(x)
    assert torch.equal(ev.experts[:, 0], logits.argmax(1))


def test_bias_balanced_bias_moves_selection_not_weights():
    E, T, k = 4, 30, 2
    r = make("bias_balanced", E, k=k)
    r.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.2]))
    x = tokens(T)
    out = r(x)
    s = torch.sigmoid(gate_logits(r, x))
    for t in range(T):
        chosen = sorted(range(E), key=lambda e: -float(s[t, e] + r.bias[e]))[:k]
        total = sum(float(s[t, e]) for e in chosen)
        want = {e: float(s[t, e]) / total for e in chosen}  # unbiased scores, normalized
        got = rows(out.experts, out.weights)[t]
        assert got.keys() == want.keys() and all(got[e] == pytest.approx(want[e], rel=1e-5) for e in want)

    class Stats:
        load = torch.tensor([10.0, 2.0, 5.0, 3.0])
        tokens = torch.tensor(10.0)

    before = r.bias.clone()
    r.after_step(Stats)
    torch.testing.assert_close(r.bias - before, 1e-3 * torch.tensor([-1.0, 1.0, 0.0, 1.0]))  # b += u sign(mean load - load), mean 5


def bisect_tau(fn, lo, hi):
    """tau with fn(tau) = 1 for a decreasing fn, by bisection (independent of the sort-based closed forms)."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) > 1 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_sparse_gates_are_the_closed_form_over_the_k_max_largest_logits(name):
    E, T, k_max = 6, 25, 4
    r = make(name, E, k_max=k_max)
    torch.nn.init.normal_(r.gate.weight, std=0.7)
    x = tokens(T)
    out = r.eval()(x)
    logits = gate_logits(r, x).double()
    sizes = set()
    for t in range(T):
        z = sorted(logits[t].tolist(), reverse=True)[:k_max]
        top = sorted(range(E), key=lambda e: -float(logits[t, e]))[:k_max]
        if name == "sparsemax":  # argmin_p ||p - z||^2 on the simplex = [z - tau]_+
            tau = bisect_tau(lambda tau: sum(max(v - tau, 0) for v in z), min(z) - 1, max(z))
            p = [max(v - tau, 0) for v in z]
        else:  # 1.5-entmax = [z/2 - tau]_+^2
            tau = bisect_tau(lambda tau: sum(max(v / 2 - tau, 0) ** 2 for v in z), min(z) / 2 - 1, max(z) / 2)
            p = [max(v / 2 - tau, 0) ** 2 for v in z]
        want = {e: w for e, w in zip(top, p) if w > 1e-9}
        got = rows(out.experts, out.weights)[t]
        assert got.keys() == want.keys(), (t, got, want)
        assert all(got[e] == pytest.approx(want[e], abs=1e-5) for e in want)
        sizes.add(len(want))
    assert len(sizes) > 1  # the number of experts per token varies


def test_dselect_k_gate_is_the_mixture_of_binary_code_selectors():
    E, T, k, gamma = 8, 12, 2, 1.0
    r = make("dselect_k", E, k=k, gamma=gamma)
    torch.nn.init.normal_(r.gate.weight, std=1.5)
    x = tokens(T)
    out = r.eval()(x)
    z = gate_logits(r, x).view(T, k, 3).double()
    a = torch.softmax(x.double() @ r.selector_weights.weight.detach().double().t(), 1)

    def step(v):
        if v <= -gamma / 2:
            return 0.0
        if v >= gamma / 2:
            return 1.0
        return -2 * v**3 / gamma**3 + 3 * v / (2 * gamma) + 0.5

    for t in range(T):
        q = [0.0] * E
        for i in range(k):
            for e in range(E):
                prob = 1.0
                for j in range(3):  # bit j of e picks S(z_ij) or 1 - S(z_ij)
                    s = step(float(z[t, i, j]))
                    prob *= s if (e >> j) & 1 else 1 - s
                q[e] += float(a[t, i]) * prob
        want = {e: w for e, w in enumerate(q) if w > 0}
        got = rows(out.experts, out.weights)[t]
        assert got.keys() == want.keys() and all(got[e] == pytest.approx(want[e], abs=1e-5) for e in want)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)


def test_lsh_code_is_the_sign_pattern_of_the_hyperplanes():
    E = 4
    r = make("lsh", E, seed=2)
    x = tokens(40)
    out = r(x)
    planes, table = r.planes, r.table.tolist()
    for t in range(40):
        code = sum(1 << j for j in range(planes.shape[1]) if float(x[t] @ planes[:, j]) > 0)
        assert int(out.experts[t, 0]) == table[code]
    assert planes.shape[1] == 2  # ceil(log2 4) hyperplanes
    assert sorted(np.bincount(table, minlength=E).tolist()) == [1, 1, 1, 1]  # the codes spread evenly
    assert torch.equal(r(2.5 * x).experts, out.experts)  # a hash of the direction: scale does not matter
    assert out.weights.eq(1).all()


def test_hierarchical_weight_is_group_gate_times_expert_in_group_gate():
    E, G, T = 8, 2, 20
    r = make("hierarchical", E, groups=G, k_groups=2, k=1)
    x = tokens(T)
    out = r.eval()(x)
    pg = torch.softmax(x @ r.group_gate.weight.detach().t(), 1)
    w = gate_logits(r, x).view(T, G, E // G)
    pe = torch.softmax(w, 2)
    for t in range(T):
        want = {}
        for g in sorted(range(G), key=lambda g: -float(pg[t, g]))[:2]:
            j = max(range(E // G), key=lambda j: float(pe[t, g, j]))
            want[g * (E // G) + j] = float(pg[t, g] * pe[t, g, j])
        got = rows(out.experts, out.weights)[t]
        assert got.keys() == want.keys() and all(got[e] == pytest.approx(want[e], rel=1e-5) for e in want)


@pytest.mark.parametrize("adjacency", ["soft", "sparse"])
def test_graph_router_scores_against_message_passed_expert_states(adjacency):
    E, T, dim = 5, 16, 6
    r = make("graph", E, dim=dim, rounds=2, adjacency=adjacency, neighbors=2, k=2)
    with torch.no_grad():
        r.edge_logits.normal_()
    x = tokens(T)
    out = r.eval()(x)
    L = r.edge_logits.detach().clone()
    L.fill_diagonal_(-math.inf)  # no self-loops
    if adjacency == "sparse":
        for i in range(E):
            keep = sorted(range(E), key=lambda j: -float(L[i, j]))[:2]
            L[i, [j for j in range(E) if j not in keep]] = -math.inf
    A = torch.exp(L) / torch.exp(L).sum(1, keepdim=True)
    H = r.expert_emb.detach()
    for M in r.mix:
        H = H + torch.tanh(A @ H @ M.detach())
    scores = (x @ r.gate.weight.detach().t()) @ H.t() / math.sqrt(dim)
    assert_softmax_top2(out, scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_top_p_takes_the_fewest_experts_reaching_the_threshold(threshold):
    E, T, k_max = 6, 40, 4
    r = make("top_p", E, threshold=threshold, k_max=k_max)
    torch.nn.init.normal_(r.gate.weight, std=0.5)
    x = tokens(T)
    out = r.eval()(x)
    probs = torch.softmax(gate_logits(r, x), 1)
    sizes = set()
    for t in range(T):
        ranked = sorted(range(E), key=lambda e: -float(probs[t, e]))
        chosen, mass = [], 0.0
        for e in ranked[:k_max]:
            chosen.append(e)
            mass += float(probs[t, e])
            if mass >= threshold:
                break
        total = sum(float(probs[t, e]) for e in chosen)
        want = {e: float(probs[t, e]) / total for e in chosen}
        got = rows(out.experts, out.weights)[t]
        assert got.keys() == want.keys(), (t, got, want)
        assert all(got[e] == pytest.approx(want[e], rel=1e-5) for e in want)
        sizes.add(len(chosen))
    assert len(sizes) > 1


def test_relu_router_uses_every_positive_gate_unnormalized():
    E, T = 6, 30
    r = make("relu", E)
    x = tokens(T)
    out = r.eval()(x)
    logits = gate_logits(r, x)
    for t in range(T):
        want = {e: float(logits[t, e]) for e in range(E) if float(logits[t, e]) > 0}
        got = rows(out.experts, out.weights)[t]
        assert got.keys() == want.keys() and all(got[e] == pytest.approx(want[e], rel=1e-5) for e in want)
    counts = {len(g) for g in rows(out.experts, out.weights)}
    assert len(counts) > 1


def test_relu_l1_coefficient_moves_toward_the_target_sparsity():
    E = 4
    r = make("relu", E, k=1.0, l1_init=1.0, l1_step=2.0)

    class Stats:
        tokens = torch.tensor(10.0)
        load = torch.tensor([5.0, 5.0, 5.0, 5.0])  # sparsity 1 - 20/40 = 0.5 < target 0.75: raise lambda

    r.after_step(Stats)
    assert float(r.l1_coef) == 2.0
    Stats.load = torch.tensor([1.0, 1.0, 0.0, 0.0])  # sparsity 0.95 > 0.75: lower it
    r.after_step(Stats)
    assert float(r.l1_coef) == 1.0


def test_quantile_balanced_routes_by_score_minus_price_and_the_prices_balance():
    E, T, k = 4, 64, 1
    r = make("quantile_balanced", E, k=k, sweeps=30)
    x = torch.cat([tokens(T) + torch.tensor([2.0] + [0.0] * (D - 1))])  # a skewed batch
    probs = torch.softmax(gate_logits(r, x), 1)
    assert torch.bincount(probs.argmax(1), minlength=E).max() > T // E + 4  # skewed without prices
    out = r.train()(x)
    prices = r.prices.clone()
    assert bool((prices >= 0).all()) and float(prices.max()) > 0
    chosen = (probs - prices).argmax(1)
    assert torch.equal(out.experts[:, 0], chosen)
    torch.testing.assert_close(out.weights[:, 0], probs[torch.arange(T), chosen])  # unbiased score, k=1
    C = math.ceil(T * k / E)
    assert torch.bincount(chosen, minlength=E).max() <= C + 1  # the dual solution: loads near C
    ev = r.eval()(x)
    assert torch.equal(ev.experts[:, 0], (probs - r.eval_prices).argmax(1))


def test_adversarial_selects_like_softmax_topk_and_charges_prices_on_violation():
    E, T = 4, 20
    r = make("adversarial", E, k=2)
    r.prices.copy_(torch.tensor([0.01, 0.0, 0.02, 0.005]))
    x = tokens(T)
    out = r.train()(x)
    probs = assert_softmax_top2(out, gate_logits(r, x))
    violation = E * probs.mean(0) - 1
    assert float(out.aux["adversary"]) == pytest.approx(float((r.prices * violation).sum()), rel=1e-5)

    class Stats:
        load = torch.tensor([8.0, 4.0, 2.0, 6.0])
        prob_sum = torch.tensor([8.0, 4.0, 2.0, 6.0])
        tokens = torch.tensor(20.0)

    before = r.prices.clone()
    r.after_step(Stats)  # soft signal: v = E * prob_sum / T - 1, projected onto [0, price_max]
    want = (before + 1e-3 * (E * Stats.prob_sum / 20 - 1)).clamp(0, 0.02)
    torch.testing.assert_close(r.prices, want)


def test_adversarial_critic_selects_softmax_topk_and_feeds_the_critic_sorted_usage():
    E, T, n = 4, 16, 8
    r = make("adversarial_critic", E, k=2, group_size=n)
    x = tokens(T)
    out = r.train()(x)
    assert_softmax_top2(out, gate_logits(r, x))
    usage = []
    for g in range(T // n):
        counts = torch.bincount(out.experts[g * n:(g + 1) * n].reshape(-1), minlength=E).double()
        usage.append(sorted((E * counts / (n * 2)).tolist(), reverse=True))
    torch.testing.assert_close(r._usage.double(), torch.tensor(usage, dtype=torch.float64))


def test_reinforce_samples_from_the_policy_in_training_and_takes_its_argmax_at_evaluation():
    E, T = 3, 6000
    r = make("reinforce", E)
    x = tokens(1).expand(T, D)  # one state, many draws
    probs = torch.softmax(x[0] @ r.gate.weight.detach().t(), 0)
    torch.manual_seed(0)
    out = r.train()(x)
    freq = torch.bincount(out.experts[:, 0], minlength=E).double() / T
    assert (freq - probs.double()).abs().max() < 4 * math.sqrt(0.25 / T)
    assert torch.equal(r.eval()(x[:5]).experts[:, 0], torch.full((5,), int(probs.argmax())))
    assert out.weights.eq(1).all()


def test_oracle_forces_its_expert_and_replay_follows_the_trace_by_token_order(tmp_path):
    from routerlab.analysis.trace import LayerTrace, Trace, save_trace

    E = 4
    out = make("oracle", E, expert=2)(tokens(5))
    assert out.experts[:, 0].tolist() == [2] * 5 and out.weights.eq(1).all()
    experts = np.array([[0, 1], [2, -1], [3, 0]], dtype=np.int64)
    weights = np.array([[0.6, 0.4], [1.0, 0.0], [0.3, 0.7]], dtype=np.float32)
    trace = Trace({"num_experts": E, "num_layers": 1}, np.full(3, -1), np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.float32), [LayerTrace(experts, weights)])
    path = save_trace(tmp_path / "t.npz", trace)
    r = make("replay", E, trace=str(path), layer=0)
    first, second = r(tokens(2)), r(tokens(3))  # a cursor over the trace, wrapping at its end
    assert first.experts.tolist() == [[0, 1], [2, -1]]
    assert second.experts.tolist() == [[3, 0], [0, 1], [2, -1]]
    torch.testing.assert_close(second.weights, torch.tensor([[0.3, 0.7], [0.6, 0.4], [1.0, 0.0]]))


def test_sinkhorn_evaluates_as_plain_top1_with_its_probability():
    E, T = 4, 30
    r = make("sinkhorn", E).eval()
    x = tokens(T)
    out = r(x)
    probs = torch.softmax(gate_logits(r, x), 1)
    assert torch.equal(out.experts[:, 0], probs.argmax(1))
    torch.testing.assert_close(out.weights[:, 0], probs.max(1).values)
    train = r.train()(x).experts[:, 0]
    assert sorted(torch.bincount(train, minlength=E).tolist()) == [7, 7, 8, 8]  # 30 = 4 * 7 + 2


def reference_greedy_balanced(scores, E):
    """Proposal rounds in plain Python: each unplaced token proposes to its best expert with room (lowest id on
    ties); each expert keeps its best proposers (earliest token on ties) up to its room; loads q, then +1 for r."""
    T = len(scores)
    q, r = divmod(T, E)
    assign = [-1] * T
    for room in ([q] * E, [1] * E if r else [0] * E):
        while any(a < 0 for a in assign) and sum(room):
            proposals = {}
            for t in (t for t in range(T) if assign[t] < 0):
                best = max((e for e in range(E) if room[e] > 0), key=lambda e: (scores[t][e], -e))
                proposals.setdefault(best, []).append(t)
            for e, proposers in proposals.items():
                kept = sorted(proposers, key=lambda t: (-scores[t][e], t))[: room[e]]
                for t in kept:
                    assign[t] = e
                room[e] -= len(kept)
    return assign


@pytest.mark.parametrize("stop_early", [True, False])  # False: the masked all-rounds form CUDA runs (no host reads)
def test_greedy_balanced_is_the_proposal_rounds_algorithm(stop_early, monkeypatch):
    from routerlab.routers import assignment

    fill = assignment._fill
    monkeypatch.setattr(assignment, "_fill", lambda s, room, a, _: fill(s, room, a, stop_early))
    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        T, E = int(torch.randint(0, 40, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        scores = torch.randint(0, 3, (T, E), generator=g).float() if trial % 2 else torch.randn(T, E, generator=g)
        got = assignment.greedy_balanced(scores)
        assert got.tolist() == reference_greedy_balanced(scores.tolist(), E), (T, E)
        if T:
            loads = torch.bincount(got, minlength=E)
            assert int(loads.max() - loads.min()) <= 1 and int(loads.sum()) == T


def test_hash_balanced_reads_fitted_on_the_host_only_until_it_is_known():
    E, size = 2, 8
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])
    fitted = make("hash_balanced", E, table_size=size).train()
    fitted(tokens(len(ids)), token_ids=ids)
    assert fitted.known_fitted  # later steps (a captured CUDA graph among them) read no device flag
    fresh = make("hash_balanced", E, table_size=size).train()
    fresh.load_state_dict(fitted.state_dict())
    assert not fresh.known_fitted  # the loaded buffer decides: fitted, so the loaded table is kept, not refit
    fresh(tokens(4), token_ids=torch.tensor([5, 5, 5, 5]))
    assert fresh.known_fitted and torch.equal(fresh.table, fitted.table)
