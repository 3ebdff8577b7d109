"""Pins of the routers' defining behaviour that the mutation run (benchmarks/mutation.py routers) found unpinned:
parameter ranges and their messages, the constructor's contract (sizes, buffers a checkpoint does or does not
carry, dtypes), and the rules of graph, reinforce, replay and oracle, the hash family, lsh, noisy_topk, switch,
bias_balanced, base and random, each against an independent reference written here. CPU, tiny shapes, fixed seeds.
"""
import math

import numpy as np
import pytest
import torch

from routerlab.errors import ConfigError
from routerlab.routers.registry import router_entry
from test_router_definitions import D, assert_softmax_top2, gate_logits, make, reference_greedy_balanced, tokens


def refusal(name, **params):
    """The message of the ValueError a router's parameter dataclass raises for these values."""
    with pytest.raises(ValueError) as err:
        router_entry(name).params(**params)
    return str(err.value)


def accepts(name, **params):
    return router_entry(name).params(**params)


# -- parameter ranges: the bound itself is accepted, the value past it refused with a message naming it ----------
REFUSED = [
    ("graph", {"k": 0}, "k must be >= 1, got 0"),
    ("graph", {"dim": 0}, "dim must be >= 1, got 0"),
    ("graph", {"rounds": 3}, "rounds must be 1 or 2, got 3"),
    ("graph", {"adjacency": "full"}, "adjacency must be 'soft' or 'sparse', got 'full'"),
    ("graph", {"neighbors": 0}, "neighbors must be >= 1, got 0"),
    ("graph", {"alpha": -0.5}, "alpha must be >= 0, got -0.5"),
    ("reinforce", {"pg_coef": 0.0}, "pg_coef must be > 0, got 0.0"),
    ("reinforce", {"baseline_decay": 1.0}, "baseline_decay must be in [0, 1), got 1.0"),
    ("reinforce", {"baseline_decay": -0.1}, "baseline_decay must be in [0, 1), got -0.1"),
    ("reinforce", {"entropy": -1.0}, "entropy and balance must be >= 0, got -1.0, 0.0"),
    ("reinforce", {"balance": -1.0}, "entropy and balance must be >= 0, got 0.01, -1.0"),
    ("replay", {}, "trace must name a routing trace file (.npz from 'routerlab trace')"),
    ("replay", {"trace": "t.npz", "layer": -2}, "layer must be >= 0, or -1 for automatic, got -2"),
    ("noisy_topk", {"k": 0}, "k must be >= 1, got 0"),
    ("noisy_topk", {"w_importance": -0.1}, "w_importance and w_load must be >= 0"),
    ("noisy_topk", {"w_load": -0.1}, "w_importance and w_load must be >= 0"),
    ("lsh", {"bits": 21}, "bits must be in [0, 20], got 21"),
    ("lsh", {"bits": -1}, "bits must be in [0, 20], got -1"),
    ("base", {"rel_eps": 0.0}, "rel_eps must be in (0, 1), got 0.0"),
    ("base", {"rel_eps": 1.0}, "rel_eps must be in (0, 1), got 1.0"),
    ("base", {"max_rounds": 0}, "max_rounds must be >= 1, got 0"),
    ("random", {"k": 0}, "k must be >= 1, got 0"),
    ("switch", {"alpha": -1.0}, "alpha must be >= 0, got -1.0"),
    ("hash_position", {"seq_len": -1}, "seq_len must be >= 0, got -1"),
    ("hash", {"table_size": 0}, "table_size must be >= 1, got 0"),
    ("bias_balanced", {"k": 0}, "k must be >= 1, got 0"),
    ("bias_balanced", {"update_rate": -0.1}, "update_rate must be >= 0, got -0.1"),
    ("hash_bigram", {"seq_len": -1}, "seq_len must be >= 0, got -1"),
    ("sinkhorn", {"iters": 0}, "iters must be >= 1, got 0"),
    ("oracle", {}, "oracle needs expert >= 0 (force one expert) or trace (an oracle trace from 'routerlab analyze')"),
]
ACCEPTED = [
    ("graph", {"k": 1, "dim": 1, "neighbors": 1, "alpha": 0.0, "rounds": 2, "adjacency": "sparse"}),
    ("reinforce", {"baseline_decay": 0.0, "entropy": 0.0, "balance": 0.0, "pg_coef": 1e-6}),
    ("replay", {"trace": "t.npz", "layer": -1}),
    ("oracle", {"expert": 0}),
    ("noisy_topk", {"k": 1, "w_importance": 0.0, "w_load": 0.0}),
    ("lsh", {"bits": 20}),
    ("lsh", {"bits": 0}),
    ("base", {"rel_eps": 0.999, "max_rounds": 1}),
    ("random", {"k": 1}),
    ("hash_position", {"seq_len": 0, "table_size": 1}),
    ("hash", {"table_size": 1}),
    ("bias_balanced", {"k": 1, "update_rate": 0.0}),
    ("hash_bigram", {"seq_len": 0}),
    ("sinkhorn", {"iters": 1}),
]


@pytest.mark.parametrize("name, params, message", REFUSED)
def test_out_of_range_parameters_are_refused_with_a_message_naming_the_bound(name, params, message):
    assert refusal(name, **params) == message


@pytest.mark.parametrize("name, params", ACCEPTED)
def test_parameters_at_their_bounds_are_accepted(name, params):
    assert {k: getattr(accepts(name, **params), k) for k in params} == params


MINE = ["graph", "reinforce", "oracle", "random", "base", "noisy_topk", "switch", "lsh", "hash", "hash_position",
        "hash_bigram", "hash_balanced", "bias_balanced", "sinkhorn"]


@pytest.mark.parametrize("name", MINE)
def test_a_router_keeps_its_sizes_and_parameters(name):
    """The regret analysis rebuilds a layer's router from router.d_model and num_experts; params drive forward."""
    params = {"expert": 1} if name == "oracle" else {}
    r = make(name, 3, **params)
    assert (r.d_model, r.num_experts, r.params) == (D, 3, accepts(name, **params))


# -- graph -------------------------------------------------------------------------------------------------
def graph_reference_scores(r, x):
    """s(x)_e = <Q x, H_R[e]> / sqrt(dim), H by residual message passing over the (sparse) row-softmax graph,
    written per row: each node's neighbours are the others, the `neighbors` largest when sparse."""
    L, nodes, p = r.edge_logits.detach().double(), r.edge_logits.shape[0], r.params
    A = torch.zeros(nodes, nodes, dtype=torch.float64)
    for i in range(nodes):
        others = sorted((j for j in range(nodes) if j != i), key=lambda j: -float(L[i, j]))
        if p.adjacency == "sparse":
            others = others[: p.neighbors]
        z = sum(math.exp(float(L[i, j])) for j in others)
        for j in others:
            A[i, j] = math.exp(float(L[i, j])) / z
    H = r.expert_emb.detach().double()
    for M in r.mix:
        H = H + torch.tanh(A @ H @ M.detach().double())
    return (x.double() @ r.gate.weight.detach().double().t()) @ H.t() / math.sqrt(p.dim)


@pytest.mark.parametrize("E, dim, neighbors", [(5, 4, 3), (2, 4, 1), (4, 1, 2), (6, 3, 4)])
def test_graph_scores_follow_the_sparse_graph_at_every_neighbour_count(E, dim, neighbors):
    r = make("graph", E, dim=dim, adjacency="sparse", neighbors=neighbors, rounds=2, k=2)
    with torch.no_grad():
        r.edge_logits.normal_()
    x = tokens(12)
    assert_softmax_top2(r.eval()(x), graph_reference_scores(r, x).float(), rtol=1e-4, atol=1e-5)


def test_graph_with_one_expert_routes_everything_to_it_with_weight_one():
    out = make("graph", 1, k=1).train()(tokens(5))
    assert out.experts.tolist() == [[0]] * 5
    assert out.weights.tolist() == [[1.0]] * 5


def test_graph_initial_scales_are_the_documented_ones():
    torch.manual_seed(0)
    dim, E = 64, 16
    r = make("graph", E, dim=dim)
    assert float(r.expert_emb.detach().std()) == pytest.approx(1 / math.sqrt(dim), rel=0.1)  # H0 ~ N(0, 1/dim)
    assert float(r.edge_logits.detach().std()) == pytest.approx(0.01, rel=0.15)  # near-uniform graph at the start
    assert float(r.mix[0].detach().std()) == pytest.approx(1 / math.sqrt(dim), rel=0.1)
    assert r.gate.bias is None


def fedus_balance(alpha, logits, experts, score):
    """alpha * E * sum_e f_e P_e: f over every slot's hard choice, P the mean normalized score (softmax, or
    sigmoid / its row sum)."""
    E = logits.shape[1]
    s = torch.softmax(logits.double(), 1) if score == "softmax" else torch.sigmoid(logits.double())
    P = (s / s.sum(1, keepdim=True)).mean(0)
    f = torch.bincount(experts.reshape(-1), minlength=E).double() / experts.numel()
    return alpha * E * float((f * P).sum())


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_graph_balance_loss_is_alpha_e_sum_f_p_in_training_only(score):
    E, T, alpha = 4, 7, 0.5  # 14 slots over 4 experts: the loads cannot be uniform
    r = make("graph", E, k=2, alpha=alpha, score=score, dim=4)
    x = tokens(T, scale=20)  # confident scores: a loss far from its uniform value 1
    out = r.train()(x)
    want = fedus_balance(alpha, graph_reference_scores(r, x), out.experts, score)
    assert out.aux["balance"].item() == pytest.approx(want, rel=1e-5) and abs(want / alpha - 1) > 0.05
    assert "balance" not in r.eval()(x).aux
    assert "balance" not in make("graph", E, alpha=0.0).train()(x).aux


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_switch_balance_loss_normalizes_elementwise_scores(score):
    E, T, alpha = 4, 7, 0.5
    r = make("switch", E, alpha=alpha, score=score)
    x = tokens(T, scale=20)
    out = r(x)
    want = fedus_balance(alpha, gate_logits(r, x), out.experts, score)
    assert out.aux["balance"].item() == pytest.approx(want, rel=1e-5) and abs(want / alpha - 1) > 0.05
    assert "balance" not in make("switch", E, alpha=0.0)(x).aux


# -- reinforce ---------------------------------------------------------------------------------------------
def test_reinforce_routing_carries_its_logits_and_one_expert_per_token_in_the_input_dtype():
    E, T = 3, 7
    r = make("reinforce", E)
    x = tokens(T).double()
    for mode in (r.train(), r.eval()):
        out = mode(x)
        torch.testing.assert_close(out.logits, gate_logits(r, x))
        assert out.experts.shape == (T, 1) and out.weights.dtype == torch.float64
        assert isinstance(out.aux, dict)
    assert out.aux == {}  # evaluation: no entropy bonus


def test_reinforce_trains_a_bf16_model_with_its_policy_in_float32():
    # bf16-pure training casts the router to bf16; the policy's float32 input once met a bf16 weight and raised
    r = make("reinforce", 3).to(torch.bfloat16).train()
    x = tokens(5).to(torch.bfloat16)
    out = r(x)
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.bfloat16
    r.observe_token_loss(torch.rand(5))["reinforce"].backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.dtype == torch.bfloat16


def test_reinforce_entropy_bonus_is_minus_coefficient_times_mean_policy_entropy():
    E, T = 4, 9
    x = tokens(T)
    r = make("reinforce", E, entropy=0.3).train()
    p = torch.softmax(gate_logits(r, x), 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert r(x).aux["entropy_bonus"].item() == pytest.approx(-0.3 * float(entropy), rel=1e-5)
    assert "entropy_bonus" not in make("reinforce", E, entropy=0.0).train()(x).aux


def test_reinforce_surrogate_uses_the_bias_corrected_ema_of_previous_batch_rewards():
    """Three steps against the module docstring's formulas written out: b_1 = the first batch's mean reward,
    b_n = EMA_{n-1} / (1 - decay^(n-1)); reward r_t = -l_t - balance (E f_{e_t} - 1)."""
    E, T, decay, pg, balance = 3, 8, 0.9, 2.0, 0.5
    r = make("reinforce", E, baseline_decay=decay, pg_coef=pg, balance=balance, entropy=0.0).train()
    ema, means = 0.0, []
    for step in range(3):
        x = tokens(T, seed=10 + step)
        out = r(x)
        chosen = out.experts[:, 0].tolist()
        logp = torch.log_softmax(gate_logits(r, x).double(), 1)[torch.arange(T), chosen]
        loss = torch.linspace(0.5, 2.0, T) * (step + 1)
        f = [chosen.count(e) / T for e in range(E)]
        reward = [-float(loss[t]) - balance * (E * f[chosen[t]] - 1) for t in range(T)]
        mean = sum(reward) / T
        b = mean if step == 0 else ema / (1 - decay**step)
        want = -pg * sum((reward[t] - b) * float(logp[t]) for t in range(T)) / T
        got = r.observe_token_loss(loss)
        assert got["reinforce"].item() == pytest.approx(want, rel=1e-5)
        ema = decay * ema + (1 - decay) * mean
        means.append(mean)
    state = r.state_dict()
    assert float(state["baseline"]) == pytest.approx(ema, rel=1e-5) and int(state["baseline_steps"]) == 3
    assert not state["baseline_steps"].is_floating_point()  # an exact step count


def test_reinforce_surrogate_gradient_is_the_reinforce_estimator():
    E, T = 3, 6
    r = make("reinforce", E, entropy=0.0).train()
    x = tokens(T)
    chosen = r(x).experts[:, 0]
    loss = torch.arange(T, dtype=torch.float32)
    r.observe_token_loss(loss)["reinforce"].backward()
    W = r.gate.weight.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(x @ W.t(), 1)[torch.arange(T), chosen]
    advantage = -loss - (-loss).mean()  # first step: the baseline is the batch mean
    (-(advantage * logp).mean()).backward()
    torch.testing.assert_close(r.gate.weight.grad, W.grad)


def test_reinforce_observes_a_loss_only_after_a_training_forward_of_as_many_tokens():
    E = 3
    r = make("reinforce", E)
    assert r.observe_token_loss(torch.ones(4)) == {}  # nothing routed yet
    r.eval()(tokens(4))
    assert r.observe_token_loss(torch.ones(4)) == {}  # evaluation samples nothing
    r.train()(tokens(4))
    assert r.observe_token_loss(torch.ones(5)) == {}  # another batch's losses
    r.train()(tokens(4))
    assert set(r.observe_token_loss(torch.ones(4))) == {"reinforce"}
    assert r.observe_token_loss(torch.ones(4)) == {}  # a forward's choices are used once


# -- replay and oracle -------------------------------------------------------------------------------------
def write_trace(path, E=4, token_ids=None):
    """A three-layer trace of three tokens: every layer routes differently."""
    from routerlab.analysis.trace import LayerTrace, Trace, save_trace

    ids = np.full(3, -1) if token_ids is None else np.asarray(token_ids)
    layer0 = LayerTrace(np.array([[0, 1], [2, -1], [3, 0]], dtype=np.int64), np.array([[0.6, 0.4], [1.0, 0.0], [0.3, 0.7]], dtype=np.float32))
    layer1 = LayerTrace(np.array([[1, 2], [3, 0], [-1, 2]], dtype=np.int64), np.array([[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32))
    layer2 = LayerTrace(np.array([[3, -1], [1, -1], [0, -1]], dtype=np.int64), np.ones((3, 2), dtype=np.float32) * [1.0, 0.0])
    meta = {"num_experts": E, "num_layers": 3}
    return str(save_trace(path, Trace(meta, ids, np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.float32), [layer0, layer1, layer2])))


def test_replay_automatic_layers_count_the_routers_built_from_one_trace(tmp_path):
    trace = write_trace(tmp_path / "auto.npz")
    built = [make("replay", 4, trace=trace) for _ in range(4)]
    assert [r.layer for r in built] == [0, 1, 2, 0]  # the i-th router gets layer i, modulo the trace's 3 layers
    assert built[1](tokens(1)).experts.tolist() == [[1, 2]]
    assert make("replay", 4, trace=trace, layer=2).layer == 2  # explicit layers do not advance the count
    assert make("replay", 4, trace=trace).layer == 1


def test_replay_refuses_a_layer_the_trace_lacks_and_a_trace_of_another_expert_count(tmp_path):
    trace = write_trace(tmp_path / "t.npz")
    with pytest.raises(ConfigError, match="has 3 MoE layer"):
        make("replay", 4, trace=trace, layer=3)
    with pytest.raises(ConfigError, match="has 4 experts, this model 5"):
        make("replay", 5, trace=trace, layer=0)


def test_replay_recorded_weights_take_the_input_dtype_and_the_trace_stays_out_of_checkpoints(tmp_path):
    r = make("replay", 4, trace=write_trace(tmp_path / "t.npz"), layer=0)
    out = r(tokens(2).double())
    assert out.weights.dtype == torch.float64 and out.logits is None
    assert r.state_dict() == {}  # the trace file is the routing: a checkpoint does not copy it
    assert (r.d_model, r.num_experts) == (D, 4)


def test_replay_learned_gates_are_the_gate_softmax_at_the_replayed_experts_renormalized(tmp_path):
    E = 4
    r = make("replay", E, trace=write_trace(tmp_path / "t.npz"), layer=1, gates="learned")
    assert r.gate.weight.shape == (E, D) and r.gate.bias is None
    x = tokens(3).double()
    out = r(x)
    logits = gate_logits(r, x)
    torch.testing.assert_close(out.logits, logits.float())
    p = torch.softmax(logits, 1)
    recorded = [[1, 2], [3, 0], [-1, 2]]
    want = []
    for t, experts in enumerate(recorded):
        used = [float(p[t, e]) if e >= 0 else 0.0 for e in experts]
        want.append([u / sum(used) for u in used])
    assert out.experts.tolist() == recorded
    torch.testing.assert_close(out.weights, torch.tensor(want, dtype=torch.float64))
    assert r.state_dict().keys() == {"gate.weight"}


def test_replay_checks_the_token_stream_against_the_trace_ids(tmp_path):
    trace = write_trace(tmp_path / "ids.npz", token_ids=[0, 6, 7])  # id 0 is a recorded id too (-1: none)
    r = make("replay", 4, trace=trace, layer=0)
    assert r(tokens(2), token_ids=torch.tensor([0, 6])).experts.tolist() == [[0, 1], [2, -1]]
    with pytest.raises(ConfigError, match=r"token 0 of trace .* is id 0, the stream has 9"):
        r(tokens(2), token_ids=torch.tensor([7, 9]))  # positions 2 and 0 (wrapped): the second differs
    loose = make("replay", 4, trace=trace, layer=0, check_tokens=False)
    assert loose(tokens(2), token_ids=torch.tensor([9, 9])).experts.tolist() == [[0, 1], [2, -1]]
    assert make("replay", 4, trace=trace, layer=0)(tokens(1)).experts.tolist() == [[0, 1]]  # no ids: no check
    unrecorded = make("replay", 4, trace=write_trace(tmp_path / "noids.npz"), layer=0)
    assert unrecorded(tokens(2), token_ids=torch.tensor([9, 9])).experts.tolist() == [[0, 1], [2, -1]]


def test_oracle_with_a_trace_replays_the_chosen_layer_and_checks_the_tokens(tmp_path):
    trace = write_trace(tmp_path / "oracle.npz", token_ids=[5, 6, 7])
    r = make("oracle", 4, trace=trace, layer=1)
    assert (r.d_model, r.num_experts, r.replay.d_model, r.replay.num_experts) == (D, 4, D, 4)
    out = r(tokens(3).double(), token_ids=torch.tensor([5, 6, 7]))
    assert out.experts.tolist() == [[1, 2], [3, 0], [-1, 2]] and out.weights.dtype == torch.float64
    with pytest.raises(ConfigError, match="is id 5, the stream has 0"):
        r(tokens(1), token_ids=torch.tensor([0]))
    assert make("oracle", 4, trace=str(tmp_path / "oracle.npz")).replay.layer == 0  # layer -1: the first automatic one


def test_oracle_forces_any_expert_of_the_model_and_refuses_one_past_it():
    x = tokens(3).double()
    for e in (0, 3):
        out = make("oracle", 4, expert=e)(x)
        assert out.experts.tolist() == [[e]] * 3 and out.experts.dtype == torch.long
        assert out.weights.dtype == torch.float64 and out.weights.tolist() == [[1.0]] * 3
    with pytest.raises(ConfigError, match="expert=4 but the model has 4 experts; use 0..3"):
        make("oracle", 4, expert=4)


# -- noisy_topk --------------------------------------------------------------------------------------------
def normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


def noisy_topk_reference(r, x, noise, k):
    """Shazeer et al. 2017 written out per token: H = clean + n * softplus(x W_noise) (+ 0.01), G = softmax over
    the kept k of H, P_i = Phi((clean_i - kth largest of H without i) / std_i); both losses w * CV^2 (population)."""
    clean = gate_logits(r, x).double()
    std = torch.nn.functional.softplus(x.double() @ r.noise.weight.detach().double().t()) + 0.01
    H = clean + noise.double() * std
    T, E = clean.shape
    G = torch.zeros(T, E, dtype=torch.float64)
    P = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        kept = sorted(range(E), key=lambda e: -float(H[t, e]))[:k]
        z = sum(math.exp(float(H[t, e])) for e in kept)
        for e in kept:
            G[t, e] = math.exp(float(H[t, e])) / z
        for i in range(E):
            others = sorted((float(H[t, j]) for j in range(E) if j != i), reverse=True)
            P[t, i] = 1.0 if k >= E else normal_cdf((float(clean[t, i]) - others[k - 1]) / float(std[t, i]))

    def cv2(v):
        return float(((v - v.mean()) ** 2).mean() / v.mean() ** 2)

    return G, r.params.w_importance * cv2(G.sum(0)), r.params.w_load * cv2(P.sum(0))


@pytest.mark.parametrize("E, k", [(4, 2), (3, 2), (4, 1), (3, 3)])
def test_noisy_topk_training_gates_and_losses_match_the_paper_with_the_same_noise(E, k):
    T = 16
    r = make("noisy_topk", E, k=k, w_importance=0.3, w_load=0.7).train()
    torch.nn.init.normal_(r.gate.weight, std=0.5)
    torch.nn.init.normal_(r.noise.weight, std=0.5)
    x = tokens(T).double()  # a float64 model: the gates are scattered in the scores' dtype
    torch.manual_seed(5)
    out = r(x)
    torch.manual_seed(5)
    G, importance, load = noisy_topk_reference(r, x, torch.randn(T, E), k)
    got = torch.zeros(T, E, dtype=torch.float64).scatter(1, out.experts, out.weights)
    torch.testing.assert_close(got, G, rtol=1e-5, atol=1e-6)
    assert out.aux["importance"].item() == pytest.approx(importance, rel=1e-4, abs=1e-9)
    assert out.aux["load"].item() == pytest.approx(load, rel=1e-4, abs=1e-9)


def test_noisy_topk_zero_init_noise_std_is_softplus_zero_plus_a_hundredth():
    """Both weights start at zero: every logit is 0 and H = n * (log 2 + 0.01)."""
    E, T = 4, 8
    r = make("noisy_topk", E, k=1, w_importance=0.0, w_load=0.0).train()
    torch.manual_seed(3)
    out = r(tokens(T))
    torch.manual_seed(3)
    H = torch.randn(T, E) * (math.log(2) + 0.01)
    assert out.experts[:, 0].tolist() == H.argmax(1).tolist()
    assert out.aux == {}  # both coefficients 0: neither loss


def test_noisy_topk_reads_its_gate_once_per_forward():
    """The clean logits are computed once and handed to the selection: with gate smoothing on, a second gate
    read would move the EMA of gate probabilities twice per step."""
    E, T, decay = 4, 10, 0.5
    r = make("noisy_topk", E, k=2, smoothing=0.5, ema_decay=decay).train()
    torch.nn.init.normal_(r.gate.weight)
    x = tokens(T)
    probs = torch.softmax(gate_logits(r, x), 1)
    r(x)
    torch.testing.assert_close(r.gate_ema, decay * torch.full((E,), 1 / E) + (1 - decay) * probs.mean(0))


# -- lsh ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E, bits", [(1, 1), (2, 1), (3, 2), (8, 3), (5, 3)])
def test_lsh_draws_its_hyperplanes_and_table_from_its_seed_alone(E, bits):
    torch.manual_seed(123)  # the global generator must not matter
    r = make("lsh", E, seed=7)
    g = torch.Generator().manual_seed(7)
    planes = torch.randn(D, bits, generator=g)  # ceil(log2 E) hyperplanes, at least one
    table = torch.randperm(2**bits, generator=g) % E
    assert torch.equal(r.planes, planes) and torch.equal(r.table, table)


def test_lsh_code_bit_is_one_only_for_a_strictly_positive_side():
    r = make("lsh", 4, seed=1)
    out = r(torch.zeros(3, D, dtype=torch.float64))  # on every hyperplane: all bits 0, code 0
    assert out.experts.tolist() == [[int(r.table[0])]] * 3
    assert out.weights.dtype == torch.float64 and out.weights.tolist() == [[1.0]] * 3


# -- base (BASE layers) and random -------------------------------------------------------------------------
def test_base_max_rounds_bounds_the_auction_before_the_greedy_fallback():
    """Two tokens, two experts, one place each. Scores [[10, 0], [10.5, 9]]: the optimum is token 0 -> 0,
    token 1 -> 1 (19); the greedy rule (the higher proposer keeps expert 0, the other takes what is left)
    gives [1, 0] (10.5). One auction round cannot finish, so max_rounds=1 falls back to greedy."""
    x = torch.zeros(2, D)
    x[0, 0] = x[1, 1] = 1.0
    W = torch.zeros(2, D)
    W[:, 0] = torch.tensor([10.0, 0.0])
    W[:, 1] = torch.tensor([10.5, 9.0])
    for max_rounds, want in [(2000, [0, 1]), (1, [1, 0])]:
        r = make("base", 2, max_rounds=max_rounds).train()
        r.gate.weight.data.copy_(W)
        assert r(x).experts[:, 0].tolist() == want


@pytest.mark.parametrize("name", ["base", "sinkhorn"])
def test_balanced_assignment_routers_balance_option_counts_the_assignment_not_the_argmax(name):
    """balance_batch = c * E * sum_e f_e P_e with f the loads of the assignment actually made: T/E each, so
    the loss is c * sum_e P_e = c whatever the (skewed) gate."""
    E, T, c = 4, 12, 0.3
    r = make(name, E, balance_batch=c, z_loss=0.1).train()
    r.gate.weight.data[0] += 3.0  # every token prefers expert 0
    x = tokens(T).abs()
    out = r(x.double())
    assert torch.bincount(out.experts[:, 0], minlength=E).tolist() == [3] * E
    assert out.aux["balance_batch"].item() == pytest.approx(c, rel=1e-5)
    z = torch.logsumexp(gate_logits(r, x), 1).square().mean()  # the stability losses see the gate's logits
    assert out.aux["z_loss"].item() == pytest.approx(0.1 * float(z), rel=1e-5)
    assert out.weights.dtype == torch.float64


def test_sinkhorn_training_rounds_the_textbook_plan_of_its_iterations():
    """Training: Sinkhorn-Knopp on exp(logits) (`iters` rounds: columns to T/E, then rows to 1), rounded by
    the proposal rounds; weight = the softmax probability of the assigned expert. On a skewed gate every
    iteration count gives another assignment."""
    E, T = 4, 14
    x = tokens(T, scale=2)
    assignments = []
    for iters in (1, 2, 8):
        r = make("sinkhorn", E, iters=iters).train()
        r.gate.weight.data[0] += 0.5
        logits = gate_logits(r, x).double()
        plan = torch.exp(logits)
        for _ in range(iters):
            plan = plan / plan.sum(0, keepdim=True) * (T / E)
            plan = plan / plan.sum(1, keepdim=True)
        out = r(x)
        want = reference_greedy_balanced(plan.tolist(), E)
        assert out.experts[:, 0].tolist() == want, iters
        torch.testing.assert_close(out.weights[:, 0].double(), torch.softmax(logits, 1)[torch.arange(T), want], rtol=1e-5, atol=1e-7)
        assignments.append(want)
    assert assignments[0] != assignments[1] != assignments[2]


def test_sinkhorn_training_on_one_token_follows_its_uniform_plan():
    """T = 1: normalizing each column to T/E = 1/E leaves every entry of the one row equal, so the rounding's
    proposal goes to the lowest id on the tie, expert 0, whatever the gate prefers (the textbook algorithm)."""
    E = 4
    r = make("sinkhorn", E).train()
    for t in range(4):
        x = tokens(1, seed=20 + t, scale=3)
        out = r(x)
        p = torch.softmax(gate_logits(r, x), 1)
        assert out.experts.tolist() == [[reference_greedy_balanced([[1.0] * E], E)[0]]] == [[0]]
        torch.testing.assert_close(out.weights[0, 0], p[0, 0])
    assert [int(r.eval()(tokens(1, seed=20 + t, scale=3)).experts) for t in range(4)] != [0] * 4  # evaluation: the argmax


def test_sinkhorn_training_on_an_empty_batch_routes_nothing():
    out = make("sinkhorn", 4).train()(torch.zeros(0, D))
    assert out.experts.shape == (0, 1) and out.weights.shape == (0, 1)


def test_random_routing_is_k_per_token_in_the_input_dtype():
    out = make("random", 5, k=1)(tokens(6).double())
    assert out.experts.shape == (6, 1) and out.weights.dtype == torch.float64 and out.weights.eq(1).all()


# -- the hash family ---------------------------------------------------------------------------------------
def test_hash_position_with_sequences_of_one_token_sends_every_token_to_the_first_entry():
    r = make("hash_position", 4, table_size=8, seq_len=1)
    assert r(tokens(5)).experts[:, 0].tolist() == [int(r.table[0])] * 5  # every position is 0



@pytest.mark.parametrize("seq_len", [0, 1])
def test_hash_bigram_first_token_of_a_sequence_pairs_with_id_minus_one(seq_len):
    """key = id_t * 1000003 + (id_{t-1} + 1) * 8191 with id_{t-1} = -1 at a sequence start: the batch's first
    token (seq_len 0, one sequence), or every token (seq_len 1)."""
    size = 97
    r = make("hash_bigram", 4, table_size=size, seq_len=seq_len)
    for ids in ([5, 11, 2, 40], [0], [1], [2], [3], [4], [6], [7]):
        prev = [-1] + ids[:-1] if seq_len == 0 else [-1] * len(ids)
        want = [int(r.table[(i * 1000003 + (p + 1) * 8191) % size]) for i, p in zip(ids, prev)]
        assert r(tokens(len(ids)), token_ids=torch.tensor(ids)).experts[:, 0].tolist() == want


@pytest.mark.parametrize("name", ["hash", "hash_position", "hash_bigram", "hash_balanced"])
def test_hash_routers_give_weight_one_in_the_input_dtype(name):
    out = make(name, 4)(tokens(3).double(), token_ids=torch.tensor([1, 2, 3]))
    assert out.weights.dtype == torch.float64 and out.weights.tolist() == [[1.0]] * 3


# -- bias_balanced -----------------------------------------------------------------------------------------
def test_bias_balanced_normalize_applies_at_k1_too():
    """DeepSeek-V3's g = s / sum of the chosen s: one chosen expert gets weight 1; normalize=False keeps sigmoid(s)."""
    E, T = 4, 6
    x = tokens(T)
    normalized = make("bias_balanced", E, k=1)(x)
    assert normalized.weights.tolist() == [[1.0]] * T
    raw = make("bias_balanced", E, k=1, normalize=False)
    out = raw(x)
    s = torch.sigmoid(gate_logits(raw, x))
    assert out.experts[:, 0].tolist() == s.argmax(1).tolist()
    torch.testing.assert_close(out.weights[:, 0], s.max(1).values)


# -- base.py: the shared balance loss ----------------------------------------------------------------------
def test_switch_balance_loss_of_one_routed_slot_counts_it_as_the_whole_batch():
    from routerlab.routers.base import switch_balance_loss

    probs = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    experts = torch.tensor([[2, -1], [-1, -1]])  # one used slot in the batch: f = (0, 0, 1)
    assert float(switch_balance_loss(probs, experts, 3)) == pytest.approx(3 * (0.7 + 0.4) / 2)


def test_switch_balance_loss_weights_tokens_by_their_importance_weights():
    from routerlab.routers.base import switch_balance_loss

    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    experts = torch.tensor([[2], [0]])  # f = (1/2, 0, 1/2)
    w = torch.tensor([0.1, 0.3])  # small weights: the normalization is by their sum, not clamped to 1
    P = [(0.1 * probs[0, e] + 0.3 * probs[1, e]) / 0.4 for e in range(3)]
    want = 3 * (0.5 * float(P[0]) + 0.5 * float(P[2]))
    assert float(switch_balance_loss(probs, experts, 3, w)) == pytest.approx(want, rel=1e-6)


# -- hash_balanced -----------------------------------------------------------------------------------------
def test_hash_balanced_fit_folds_counts_onto_the_table_and_keeps_uncounted_ids_random():
    """Counts longer than the table add up modulo its size: [3, 1, 2, 0, 2, 2, 0, 0] on 4 entries is
    [5, 3, 2, 0]; LPT on 2 experts: id 0 -> 0 (load 5), id 1 -> 1 (3), id 2 -> 1 (5); id 3 keeps the seed's table."""
    r = make("hash_balanced", 2, table_size=4, seed=9)
    fallback = torch.randint(2, (4,), generator=torch.Generator().manual_seed(9))  # the plain hash table
    assert r.table.tolist() == fallback.tolist() and not bool(r.fitted)
    r.eval()(tokens(3), token_ids=torch.tensor([0, 1, 2]))
    assert not bool(r.fitted)  # evaluation never fits
    r.fit([3, 1, 2, 0, 2, 2, 0, 0])
    assert r.table.tolist() == [0, 1, 1, int(fallback[3])] and bool(r.state_dict()["fitted"])


def test_hash_balanced_fits_on_the_first_training_batch_ids_modulo_the_table():
    r = make("hash_balanced", 2, table_size=4, seed=9).train()
    fallback = r.table.clone()
    out = r(tokens(5), token_ids=torch.tensor([4, 4, 4, 1, 6]))  # ids 0, 0, 0, 1, 2: counts [3, 1, 1, 0]
    assert r.table.tolist() == [0, 1, 1, int(fallback[3])]
    assert out.experts[:, 0].tolist() == [0, 0, 0, 1, 1]


def test_hash_balanced_breaks_count_ties_by_the_lower_id_on_a_large_table():
    """LPT with equal counts taken in id order (a stable sort): on hundreds of tied ids an unstable sort
    would interleave them differently."""
    E, size = 3, 300
    counts = torch.randint(1, 4, (size,), generator=torch.Generator().manual_seed(4))
    r = make("hash_balanced", E, table_size=size)
    r.fit(counts)
    load, want = [0] * E, [0] * size
    for i in sorted(range(size), key=lambda i: (-int(counts[i]), i)):
        want[i] = min(range(E), key=lambda e: (load[e], e))
        load[want[i]] += int(counts[i])
    assert r.table.tolist() == want
