"""Routing metrics and ablation summaries against hand computations (numpy, sklearn, scipy): each metric of
docs/metrics.md has one definition and this file pins it. Fast: the mutation-testing run selects it."""
import math

import numpy as np
import pytest
import torch

from routerlab.moe.stats import fluctuation, normalized_mutual_information, routing_metrics, specialization, stats_from_routing


def case():
    torch.manual_seed(0)
    E, T = 5, 12
    experts = torch.tensor([[0, 1], [0, 2], [0, -1], [1, 0], [3, 0], [0, 1], [1, 3], [0, 2], [-1, -1], [2, 0], [0, 3], [1, 2]])
    kept = experts >= 0
    kept[10, 0] = False  # a slot dropped by capacity
    logits = torch.randn(T, E, dtype=torch.float64) * 2
    return E, T, experts, kept, logits


def test_every_routing_metric_matches_its_textbook_definition():
    E, T, experts, kept, logits = case()
    m = routing_metrics(stats_from_routing(experts, logits, kept, E))
    ids = experts.numpy()
    load = np.bincount(ids[ids >= 0], minlength=E).astype(float)  # routed slots, before capacity
    assert load.tolist() == [9, 5, 4, 3, 0]
    assert m["load_cv"] == pytest.approx(load.std() / load.mean())
    assert m["max_vio"] == pytest.approx(load.max() / load.mean() - 1)
    assert m["dead_experts"] == 1.0  # expert 4 only: load 3 is alive
    kept_np = kept.numpy()
    assert m["dropped_frac"] == pytest.approx(sum(1 for t in range(T) if not kept_np[t].any()) / T)  # tokens 8 and 10? 8 only
    f = load / load.sum()
    assert m["usage_entropy"] == pytest.approx(-sum(x * math.log(x) for x in f if x > 0))
    assert m["usage_entropy_max"] == pytest.approx(math.log(E))
    assert m["mean_k"] == pytest.approx(load.sum() / T)
    p = torch.softmax(logits, -1).numpy()
    assert m["router_entropy"] == pytest.approx(float(np.mean(-(p * np.log(p)).sum(1))), rel=1e-5)
    lse = np.log(np.exp(logits.numpy()).sum(1))
    assert m["z_value"] == pytest.approx(float(np.mean(lse ** 2)), rel=1e-5)
    assert m["max_logit"] == pytest.approx(float(np.abs(logits.numpy()).max()), rel=1e-6)
    assert m["switch_balance"] == pytest.approx(E * float((f * p.mean(0)).sum()), rel=1e-5)
    assert m["max_vio_batch"] == pytest.approx(load.max() / load.mean() - 1)


def test_per_sequence_max_vio_is_the_mean_of_each_sequences_own():
    E, T, experts, kept, logits = case()
    m = routing_metrics(stats_from_routing(experts, None, kept, E, sequence_length=4))
    vios = []
    for s in range(3):
        ids = experts[4 * s:4 * s + 4].numpy()
        load = np.bincount(ids[ids >= 0], minlength=E).astype(float)
        vios.append(load.max() / load.mean() - 1)
    assert m["max_vio_seq"] == pytest.approx(np.mean(vios))
    assert "router_entropy" not in m  # no logits, no probability metrics


def test_merged_stats_are_the_stats_of_the_union():
    E, T, experts, kept, logits = case()
    a = stats_from_routing(experts[:6], logits[:6], kept[:6], E)
    b = stats_from_routing(experts[6:], logits[6:], kept[6:], E)
    whole = routing_metrics(stats_from_routing(experts, logits, kept, E))
    merged = routing_metrics(a.merge(b))
    for key in ("load_cv", "max_vio", "dead_experts", "dropped_frac", "usage_entropy", "mean_k", "router_entropy", "z_value", "max_logit", "switch_balance"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-6), key


def test_specialization_is_normalized_mutual_information():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    experts = np.where(rng.random(400) < 0.7, labels, rng.integers(0, 4, 400))  # mostly label -> expert
    h_label = -sum(c / 400 * math.log(c / 400) for c in np.bincount(labels) if c)
    want = mutual_info_score(labels, experts) / min(h_label, math.log(4))
    got = specialization(torch.tensor(labels), torch.tensor(experts), 3, 4)
    assert got == pytest.approx(want, rel=1e-9)
    assert specialization(torch.tensor(labels), torch.tensor(labels), 3, 4) == pytest.approx(1.0)
    skipped = torch.tensor(np.where(np.arange(400) % 5 == 0, -1, experts))  # tokens with no expert are left out
    keep = np.arange(400) % 5 != 0
    want = mutual_info_score(labels[keep], experts[keep]) / min(-sum(c / keep.sum() * math.log(c / keep.sum()) for c in np.bincount(labels[keep]) if c), math.log(4))
    assert specialization(torch.tensor(labels), skipped, 3, 4) == pytest.approx(want, rel=1e-9)
    assert normalized_mutual_information(np.zeros((3, 4))) == 0.0
    assert normalized_mutual_information(np.ones((1, 4))) == 0.0  # one label: H(label) = 0


def test_fluctuation_is_the_changed_fraction():
    assert fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1])) == 0.5


def test_summary_mean_std_and_t_interval():
    from scipy import stats as scipy_stats

    from routerlab.ablate.report import summarize

    values = [1.0, 2.5, 4.0, 3.0]
    s = summarize(values)
    std = float(np.std(values, ddof=1))
    assert (s.mean, s.n) == (pytest.approx(2.625), 4)
    assert s.std == pytest.approx(std)
    assert s.half == pytest.approx(scipy_stats.t.ppf(0.975, 3) * std / 2)
    one = summarize([5.0])
    assert one.mean == 5.0 and one.std == 0.0 and math.isnan(one.half)


def test_edge_cases_of_the_metrics():
    E = 4
    nothing = torch.full((6, 2), -1)
    m = routing_metrics(stats_from_routing(nothing, torch.zeros(6, E), torch.zeros(6, 2, dtype=torch.bool), E))
    assert (m["load_cv"], m["max_vio"], m["usage_entropy"], m["max_vio_batch"], m["dropped_frac"], m["dead_experts"]) == (0.0, 0.0, 0.0, 0.0, 1.0, 4.0)
    one = torch.tensor([[2, -1]] + [[-1, -1]] * 3)  # a single routed slot
    logits = torch.zeros(4, E)
    m = routing_metrics(stats_from_routing(one, logits, one >= 0, E))
    assert m["switch_balance"] == pytest.approx(E * 1.0 * 0.25)  # f = [0, 0, 1, 0], P uniform
    assert m["max_vio_seq"] == pytest.approx(m["max_vio"]) == pytest.approx(3.0)  # one sequence: its own MaxVio
    assert normalized_mutual_information(np.array([[5, 0], [0, 0], [0, 5]])) == pytest.approx(1.0)  # an empty label row


def test_summary_of_two_values_has_an_interval():
    from scipy import stats as scipy_stats

    from routerlab.ablate.report import summarize

    s = summarize([1.0, 3.0])
    assert s.half == pytest.approx(scipy_stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2))
