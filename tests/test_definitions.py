"""Each definition pinned to an independent reference (hand computation, textbook formula, plain PyTorch).
These are the places where a small, realistic bug kept every other test green."""
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from routerlab.config import load_config
from routerlab.routers import build_router
from routerlab.train import Trainer

D, E = 8, 4
TINY = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.num_experts=4", "model.expert_hidden=16",
        "train.batch_size=8", "train.eval_batches=2", "task.name=clusters", "train.steps=20"]


def trainer(tmp_path, *extra):
    return Trainer(load_config(None, TINY + list(extra)), run_dir=tmp_path / "run", log=False)


def test_top2_weights_are_the_renormalized_top2_softmax():
    torch.manual_seed(0)
    out = build_router({"name": "softmax_topk", "k": 2}, D, E).eval()(torch.randn(50, D))
    probs = torch.exp(out.logits - out.logits.max(1, keepdim=True).values)
    probs = probs / probs.sum(1, keepdim=True)  # softmax by hand
    top, idx = torch.sort(probs, 1, descending=True)
    torch.testing.assert_close(out.weights.sum(1), torch.ones(50))
    assert torch.equal(out.experts.sort(1).values, idx[:, :2].sort(1).values)
    torch.testing.assert_close(out.weights.gather(1, out.experts.argsort(1)), (top[:, :2] / top[:, :2].sum(1, keepdim=True)).gather(1, idx[:, :2].argsort(1)))


def test_expert_choice_takes_each_experts_highest_scoring_tokens():
    torch.manual_seed(1)
    T, cf = 24, 1.0
    out = build_router({"name": "expert_choice", "capacity_factor": cf}, D, E).eval()(torch.randn(T, D))
    scores = out.logits.softmax(-1)
    c = min(T, math.ceil(cf * T / E))
    for e in range(E):
        taken = {t for t in range(T) if e in out.experts[t].tolist()}
        best = set(sorted(range(T), key=lambda t: -float(scores[t, e]))[:c])
        assert taken == best, f"expert {e} took {sorted(taken)}, its top-{c} tokens are {sorted(best)}"


def test_sinkhorn_iterations_balance_the_plan_as_the_textbook_algorithm():
    from routerlab.routers.assignment import sinkhorn_log

    torch.manual_seed(2)
    T = 32
    logits = torch.randn(T, E) * 3
    p = torch.exp(logits.double())
    for _ in range(5):  # Sinkhorn-Knopp: columns to T/E, rows to 1
        p = p / p.sum(0, keepdim=True) * (T / E)
        p = p / p.sum(1, keepdim=True)
    plan = sinkhorn_log(logits, 5).exp().double()
    torch.testing.assert_close(plan, p, rtol=1e-4, atol=1e-6)
    assert (plan.sum(0) - T / E).abs().max() < (logits.softmax(1).sum(0) - T / E).abs().max() / 4  # iterating balances
    assert not torch.allclose(sinkhorn_log(logits, 1), sinkhorn_log(logits, 8))


def test_load_cv_is_std_over_mean_and_a_load_of_one_is_not_dead():
    from routerlab.moe.stats import RoutingStats, routing_metrics

    load = [1.0, 5.0, 0.0, 6.0]
    stats = RoutingStats.__new__(RoutingStats)
    fields = {f: None for f in RoutingStats.__dataclass_fields__}
    fields.update(load=torch.tensor(load), tokens=torch.tensor(6.0), dropped_tokens=torch.tensor(0.0))
    try:
        stats = RoutingStats(**{**fields})
        m = routing_metrics(stats)
    except Exception:
        pytest.skip("RoutingStats needs more fields than a load vector")
    assert m["load_cv"] == pytest.approx(np.std(load) / np.mean(load))  # population std, textbook CV
    assert m["dead_experts"] == 1.0  # only the expert with load 0


def test_evaluation_uses_the_validation_split(tmp_path):
    t = trainer(tmp_path)
    val = {tuple(row.tolist()) for row in t.task.data["val"][0]} if isinstance(t.task.data["val"], tuple) else None
    if val is None:
        pytest.skip("task data layout changed")
    train = {tuple(row.tolist()) for row in t.task.data["train"][0]}
    for batch in t.eval_set:
        rows = {tuple(r.tolist()) for r in batch.inputs.reshape(batch.inputs.shape[0], -1)}
        assert rows <= val and not rows & train


def test_the_lr_schedule_steps_cosine_to_ten_percent(tmp_path):
    t = trainer(tmp_path, "train.lr=0.01", "train.warmup_steps=4", "train.lr_schedule=cosine")
    seen = []
    for _ in range(20):
        t.train_step()
        seen.append(t.optimizer.param_groups[0]["lr"])
    for step, lr in enumerate(seen, start=1):  # lr used for the next update, after `step` updates
        if step < 4:
            want = 0.01 * (step + 1) / 4
        else:
            progress = min(1.0, (step - 4) / 16)
            want = 0.01 * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        assert lr == pytest.approx(want), step
    assert seen[-1] == pytest.approx(0.001)


def grad_norm(model):
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))


def test_grad_clip_bounds_the_gradient_norm(tmp_path):
    free = trainer(tmp_path / "a", "train.grad_clip=null")
    free.train_step()
    clipped = trainer(tmp_path / "b", "train.grad_clip=0.001")
    clipped.train_step()
    assert grad_norm(free.model) > 0.01
    assert grad_norm(clipped.model) == pytest.approx(0.001, rel=1e-3)


def test_summary_std_is_over_one_routers_seeds(tmp_path):
    from routerlab.ablate import expand, parse_spec
    from routerlab.ablate.report import group_stats

    spec = parse_spec({"name": "s", "base": {"task": {"name": "clusters"}}, "axes": {"router": ["softmax_topk", "switch"], "seed": [0, 1, 2]}})
    plan = expand(spec, tmp_path / "runs")
    losses = {("softmax_topk", 0): 1.0, ("softmax_topk", 1): 2.0, ("softmax_topk", 2): 4.0,
              ("switch", 0): 10.0, ("switch", 1): 10.5, ("switch", 2): 11.0}
    table = [{"cell": c.id, "router": c.labels["router"], "seed": c.seed, "loss": losses[(c.labels["router"], c.seed)]} for c in plan.cells]
    stats = {s["row"]: s["loss"] for s in group_stats(plan, table, ["loss"])}
    assert stats["softmax_topk"].std == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert stats["switch"].std == pytest.approx(statistics.stdev([10.0, 10.5, 11.0]))
    assert stats["switch"].mean == pytest.approx(10.5)


def test_best_config_comes_from_the_pareto_front_end_best_on_the_first_objective():
    import optuna

    from studies.report import best_trial

    class Spec:
        name, multi_objective, directions = "s", True, ["minimize", "maximize"]

    study = optuna.create_study(directions=["minimize", "maximize"])
    points = [(3.0, 0.9), (1.0, 0.5), (2.0, 0.8), (1.5, 0.4)]  # (1.5, 0.4) is dominated by (1.0, 0.5)
    for x, y in points:
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[x, y]))
    front = [p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)]
    assert min(front) == (1.0, 0.5)
    assert tuple(best_trial(study, Spec).values) == (1.0, 0.5)
    Spec.directions = ["maximize", "minimize"]
    study2 = optuna.create_study(directions=["maximize", "minimize"])
    for x, y in points:
        study2.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[x, y]))
    assert tuple(best_trial(study2, Spec).values) == (3.0, 0.9)


def test_router_weight_gradient_matches_plain_pytorch():
    """MoELayer's gradient w.r.t. the router's gate equals autograd through a plain re-implementation:
    y_t = sum_j w_tj * W_out[e] silu(x W_gate[e]) * (x W_up[e])."""
    from routerlab.moe import ExpertBank, MoELayer

    torch.manual_seed(3)
    T, h = 20, 6
    for backend in ("loop", "padded"):  # grouped needs bf16 on CPU: too coarse for this comparison
        router = build_router({"name": "softmax_topk", "k": 2}, D, E).eval()
        bank = ExpertBank(E, D, h)
        layer = MoELayer(router, bank, None, backend=backend).double()
        x = torch.randn(T, D, dtype=torch.float64)
        layer(x).pow(2).sum().backward()
        got = router.gate.weight.grad.clone()

        gate = router.gate.weight.detach().clone().requires_grad_(True)
        logits = x @ gate.t()
        probs = logits.softmax(-1)
        top, idx = probs.topk(2, dim=-1)
        w = top / top.sum(-1, keepdim=True)
        w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
        y = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for j in range(2):
                e = int(idx[t, j])
                a, b = (x[t] @ w_in[e]).split(h)
                y[t] = y[t] + w[t, j] * ((F.silu(a) * b) @ w_out[e])
        y.pow(2).sum().backward()
        torch.testing.assert_close(got, gate.grad, rtol=1e-4, atol=1e-6)  # the gate runs in float32 (fp32=True)
