"""Routing analysis (docs/analysis.md): every analysis on a tiny run whose answer is known."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from routerlab.analysis import placement, structure
from routerlab.analysis.regret import layer_regrets
from routerlab.analysis.trace import LayerTrace, Trace, load_trace, probe_batches, record_trace, save_trace
from routerlab.config import load_config
from routerlab.errors import ConfigError
from routerlab.train import Trainer

TINY = ["task.name=clusters", "task.train_size=256", "task.val_size=128", "task.input_dim=8", "task.num_clusters=4",
        "model.d_model=16", "model.num_experts=4", "model.expert_hidden=16", "train.batch_size=32", "train.steps=6",
        "train.eval_every=6", "train.eval_batches=2", "train.log_every=3"]


def trainer(tmp_path, *extra, name="run"):
    return Trainer(load_config(None, TINY + [f"run.dir={tmp_path}", f"run.name={name}", *extra]), log=False)


def test_replaying_a_runs_own_trace_reproduces_its_routing_exactly(tmp_path):
    run = trainer(tmp_path, "model.n_layers=2")
    run.fit()
    probe = probe_batches(run, 2)
    original = record_trace(run, probe, logits=True)
    path = save_trace(tmp_path / "t.npz", original)
    assert not list(tmp_path.glob(".t.npz*"))  # atomic: no temporary file left
    back = load_trace(path)
    assert back.meta == original.meta and back.layers[1].logits.shape == (64, 4)
    replayed = record_trace(trainer(tmp_path, "model.n_layers=2", "router.name=replay", f"router.trace={path}", name="replay"), probe)
    for a, b in zip(original.layers, replayed.layers):
        assert np.array_equal(a.experts, b.experts) and np.array_equal(a.weights, b.weights)
    assert len(np.unique(original.layers[0].experts)) > 1  # a real routing, not a constant one
    learned = trainer(tmp_path, "model.n_layers=2", "router.name=replay", f"router.trace={path}", "router.gates=learned", name="learned")
    relearned = record_trace(learned, probe)
    assert np.array_equal(relearned.layers[0].experts, original.layers[0].experts)
    assert np.allclose(relearned.layers[0].weights.sum(1), 1.0, atol=1e-6)
    with pytest.raises(ConfigError, match="not a readable"):
        (tmp_path / "bad.npz").write_bytes(b"junk")
        load_trace(tmp_path / "bad.npz")


def reference_expert_losses(model, batch) -> torch.Tensor:
    """Plain PyTorch: the classifier with its one MoE layer replaced by expert e alone (weight 1). [N, E]"""
    layer = model.ffns[0]
    w_in, w_out = layer.experts.w_in.detach(), layer.experts.w_out.detach()
    x = model.embed(batch.inputs)
    h = model.norms[0](x)
    out = []
    for e in range(w_in.shape[0]):
        gate, up = (h @ w_in[e]).chunk(2, dim=-1)
        y = x + (F.silu(gate) * up) @ w_out[e]
        out.append(F.cross_entropy(model.head(model.norm_out(y)), batch.targets, reduction="none"))
    return torch.stack(out, 1).double()


def test_a_router_forced_to_one_expert_has_regret_equal_to_the_known_loss_gap(tmp_path):
    run = trainer(tmp_path, "model.n_layers=1", "router.name=oracle", "router.expert=2")
    run.fit()
    probe = probe_batches(run, 2)
    with torch.no_grad():
        table = torch.cat([reference_expert_losses(run.model, b) for b in probe]).numpy()
    (r,) = layer_regrets(run, probe)
    assert np.allclose(r.expert_loss, table, atol=1e-5)
    gap = table[:, 2].mean() - table.min(1).mean()  # loss under the forced expert minus the oracle's
    assert gap > 0.01
    assert r.metrics()["regret"] == pytest.approx(gap, abs=1e-5)
    rank = 1 + (table < table[:, [2]]).sum(1)
    assert r.metrics()["mrr"] == pytest.approx((1 / rank).mean())
    assert r.metrics()["chosen_loss"] == pytest.approx(table[:, 2].mean(), abs=1e-5)


def test_overlap_of_a_checkpoint_with_itself_is_zero_and_training_moves_it(tmp_path):
    run = trainer(tmp_path, "model.n_layers=2")
    probe = probe_batches(run, 1)
    before = record_trace(run, probe)
    assert structure.set_change(before, record_trace(run, probe)) == [0.0, 0.0]
    run.fit()
    after = record_trace(run, probe)
    moved = structure.set_change(before, after)
    expected = [float((np.sort(a.experts, 1) != np.sort(b.experts, 1)).any(1).mean()) for a, b in zip(before.layers, after.layers)]
    assert moved == expected and max(moved) > 0


def hand_trace(experts, weights, labels, logits=None, probe="p"):
    meta = {"probe": probe, "num_experts": 3, "num_labels": 2, "num_layers": 1}
    n = len(labels)
    return Trace(meta, np.full(n, -1), np.array(labels), np.zeros(n, np.float32), [LayerTrace(np.array(experts), np.array(weights, np.float32), logits)])


def test_structure_tables_by_hand():
    t = hand_trace([[0, 1], [1, 0], [2, -1], [0, 2]], [[0.6, 0.4], [0.7, 0.3], [1, 0], [0.5, 0.5]], [0, 0, 1, 1])
    u = hand_trace([[1, 0], [1, 2], [2, -1], [2, 1]], [[0.5, 0.5]] * 4, [0, 0, 1, 1])
    assert structure.set_change(t, u) == [0.5]  # token 0: {0,1} both times; 1 and 3 changed; 2 same
    co = structure.coactivation(t.layers[0], 3)
    assert np.allclose(co, np.array([[3, 2, 1], [2, 2, 0], [1, 0, 2]]) / 4)
    assert np.array_equal(structure.domain_expert(t.labels, t.layers[0], 2, 3), [[2, 2, 0], [1, 0, 2]])
    assert np.allclose(structure.margins(t.layers[0], 3), [0.2, 0.4, 1.0, 0.0])
    logits = np.log(np.array([[0.5, 0.3, 0.2]] * 4, np.float32))
    assert np.allclose(structure.margins(hand_trace(t.layers[0].experts, t.layers[0].weights, [0] * 4, logits).layers[0], 3), 0.2, atol=1e-6)
    with pytest.raises(ConfigError, match="different probe sets"):
        structure.set_change(t, hand_trace([[0, 1]] * 4, [[1, 0]] * 4, [0] * 4, probe="q"))


def test_placement_strategies_by_hand():
    loads = [6, 2, 2, 2]  # shares 0.5, 1/6, 1/6, 1/6
    assert placement.place(loads, 2, "contiguous").rank_load == pytest.approx([8 / 12, 4 / 12])
    assert placement.place(loads, 2, "round_robin").rank_load == pytest.approx([8 / 12, 4 / 12])
    assert placement.place(loads, 2, "greedy").overload == pytest.approx(8 / 6)  # 2 slots a rank: the best there is
    eplb = placement.place(loads, 2, "eplb", redundant=2)  # expert 0 gets 3 replicas of 2 each: 6 items of 2
    assert eplb.overload == pytest.approx(1.0) and sum(len(b) for b in eplb.experts_on) == 6
    assert placement.place([5, 1, 4, 2], 2, "greedy").rank_load == pytest.approx([0.5, 0.5])  # 5, then 4, then 2 -> rank 1, 1 -> rank 0
    shape = placement.Shape(tokens=100, d_model=10, hidden=20, k=2, layers=1, num_experts=4)
    rates = placement.Rates(one_gpu_ms=10.0, expert_ms=4.0, all_gather_ms={2: 0.5}, reduce_scatter_ms={2: 0.25})
    p = placement.project_step_ms([loads], 2, "contiguous", shape, rates)
    # busiest rank computes 2 ranks x 100 tokens x k=2 x 2/3 rows at the 1-GPU rate (200 rows in 4 ms)
    assert p["expert_ms"] == pytest.approx(4.0 * (2 * 100 * 2 * 8 / 12) / 200)
    assert p["exchange_ms"] == pytest.approx(1 * 2 * 0.75) and p["step_ms"] == pytest.approx(6.0 + p["expert_ms"] + 1.5)
    assert rates.exchange_ms(3) == pytest.approx(0.75 * 2)  # nearest measured count, scaled by bytes sent
    with pytest.raises(ConfigError, match="evenly"):
        placement.place(loads, 3, "greedy")


@pytest.mark.parametrize("log, ranks", [("2026-11-28-h200x2-ep-v7c-final.txt", 2), ("2026-11-28-h200x4-ep-v7-4gpu.txt", 4)])
def test_projection_is_within_5_percent_of_the_measured_expert_parallel_runs(log, ranks):
    shape, rates, measured = placement.rates_from_log(Path(__file__).parent.parent / "benchmarks" / "h200" / log)
    assert list(measured) == [ranks]
    projected = placement.project_step_ms([np.ones(shape.num_experts)], ranks, "contiguous", shape, rates)["step_ms"]
    assert abs(projected / measured[ranks] - 1) < 0.05


def test_analyze_a_finished_run_writes_figures_and_a_summary(tmp_path):
    from routerlab.cli import app

    runner = CliRunner()
    args = [a for s in TINY + ["model.n_layers=2", f"run.dir={tmp_path}", "run.name=x", "train.steps=12"] for a in ("--set", s)]
    result = runner.invoke(app, ["train", "--no-progress", *args, "--trace-steps", "x"])
    assert result.exit_code == 2 and "--trace-steps" in result.output and not (tmp_path / "x").exists()
    result = runner.invoke(app, ["train", "--no-progress", *args, "--trace-steps", "0,6,12"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "x"
    assert sorted(p.name for p in (run / "traces").iterdir()) == ["step0000000.npz", "step0000006.npz", "step0000012.npz"]
    result = runner.invoke(app, ["trace", str(run), "--out", str(tmp_path / "t12.npz")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["analyze", str(run), "--against", str(tmp_path / "t12.npz"), "--ranks", "2,4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    for name in ("coactivation", "domain_expert", "margin", "regret", "expert_loss", "placement"):
        assert (run / "analysis" / f"{name}.png").stat().st_size > 1000
    assert [row["changed_vs_t12"] for row in summary["layers"]] == [0.0, 0.0]  # the same checkpoint traced twice
    during, after = load_trace(run / "traces" / "step0000012.npz"), load_trace(tmp_path / "t12.npz")
    assert all(np.array_equal(a.weights, b.weights) for a, b in zip(during.layers, after.layers))  # recorded in training = traced from the checkpoint
    first = load_trace(run / "traces" / "step0000000.npz")
    assert [row["changed_since_step0"] for row in summary["layers"]] == structure.set_change(first, after)
    assert (run / "analysis" / "drift.png").is_file()
    assert {p["ranks"] for p in summary["placement"]} == {2, 4}
    assert "| layer | regret | mrr |" in (run / "analysis" / "summary.md").read_text()
    oracle = load_trace(run / "analysis" / "oracle.npz")
    assert oracle.layers[0].experts.shape == (32, 1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert "analysis/regret/layer1" in events.Tags()["scalars"] and "analysis/coactivation" in events.Tags()["images"]
    assert {6, 12} <= {e.step for e in events.Scalars("analysis/mrr/layer1")}  # logged at each evaluation while training
    # bad input: one line, exit 2, nothing written
    for bad, message in ([str(tmp_path / "nope")], "does not exist"), ([str(run), "--against", str(tmp_path / "none.npz")], "does not exist"), ([str(run), "--ranks", "x"], "--ranks"):
        result = runner.invoke(app, ["analyze", *bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_ablation_cells_carry_regret_and_mrr(tmp_path):
    from routerlab.ablate.runner import train_cell
    from routerlab.analysis.regret import layer_regrets

    config = load_config(None, TINY + ["model.n_layers=1", f"run.dir={tmp_path}"])
    result = train_cell("cell", config.model_dump(mode="json"), {"router": "softmax_topk"})
    m = result["metrics"]
    assert 0 < m["top1_is_best"] <= m["mrr"] <= 1 and np.isfinite(m["regret"])
    again = trainer(tmp_path, "model.n_layers=1", name="again")  # same seed and config: same weights and numbers
    again.fit()
    (r,) = layer_regrets(again, probe_batches(again, 1))
    assert m["regret"] == pytest.approx(r.metrics()["regret"]) and m["mrr"] == pytest.approx(r.metrics()["mrr"])
