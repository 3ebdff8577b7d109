"""The one trainer: determinism, exact resume, evaluation metrics and TensorBoard output."""
import math

import pytest
import torch

from routerlab.config import load_config
from routerlab.moe.stats import fluctuation, specialization
from routerlab.train import Trainer


def make(overrides, tmp_path, **kwargs):
    return Trainer(load_config(None, overrides), run_dir=tmp_path / "run", **kwargs)


@pytest.mark.parametrize("task", ["chars", "clusters"])
def test_resume_after_checkpoint_is_bitwise_identical(task, tiny_overrides, tmp_path):
    overrides = tiny_overrides + [f"task.name={task}", "router.name=noisy_topk", "router.jitter=0.1"]
    full = make(overrides, tmp_path / "a", log=False)
    full.fit()

    first = make(overrides, tmp_path / "b", log=False)
    first.fit(until=5)  # stopped between evaluations: the checkpoint is all that survives
    path = first.save()
    resumed = make(overrides, tmp_path / "b", log=False, resume=path)
    assert resumed.step == 5
    resumed.fit()
    assert resumed.losses == full.losses  # exact float equality, every step
    assert resumed.last_eval["loss"] == full.last_eval["loss"]


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_overrides, tmp_path):
    a = make(tiny_overrides, tmp_path / "a", log=False)
    b = make(tiny_overrides, tmp_path / "b", log=False)
    c = make(tiny_overrides + ["seed=1"], tmp_path / "c", log=False)
    for t in (a, b, c):
        t.fit(until=4)
    assert a.losses == b.losses and a.losses != c.losses


def test_training_lowers_the_loss_and_reports_routing_metrics(tiny_overrides, tmp_path):
    trainer = make(tiny_overrides + ["train.steps=60", "train.eval_every=30", "train.lr=1e-2"], tmp_path, log=False)
    before = trainer.evaluate()["loss"]
    metrics = trainer.fit()
    assert metrics["loss"] < before - 0.3
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    for key in ("load_cv", "max_vio", "dropped_frac", "dead_experts", "router_entropy", "usage_entropy",
                "z_value", "max_logit", "switch_balance", "specialization", "fluctuation", "layer1/load_cv"):
        assert key in metrics, key
    assert 0 <= metrics["specialization"] <= 1 and 0 <= metrics["fluctuation"] <= 1
    assert metrics["params_active"] < metrics["params_total"]


def test_hash_routing_never_fluctuates(tiny_overrides, tmp_path):
    trainer = make(tiny_overrides + ["router.name=hash"], tmp_path, log=False)
    assert trainer.fit()["fluctuation"] == 0.0


def test_specialization_is_one_for_a_perfect_assignment_and_zero_for_independent():
    labels = torch.arange(400) % 4
    assert specialization(labels, labels, 4, 4) == pytest.approx(1.0)
    independent = (torch.arange(400) // 4) % 4  # every label meets every expert equally often
    assert specialization(labels, independent, 4, 4) == pytest.approx(0.0, abs=1e-12)
    assert fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3, 3])) == 0.25


def test_capacity_drops_show_in_dropped_fraction(tiny_overrides, tmp_path):
    trainer = make(tiny_overrides + ["model.capacity_factor=0.25", "router.name=switch"], tmp_path, log=False)
    metrics = trainer.fit()
    assert metrics["dropped_frac"] > 0.5  # capacity for a quarter of the tokens, top-1: most are dropped


def test_tensorboard_run_has_the_routing_dashboards(tiny_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    trainer = make(tiny_overrides, tmp_path)
    trainer.fit()
    trainer.close()
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "eval/loss", "eval/perplexity", "routing/load_cv/layer0", "routing/switch_balance/layer1",
                "eval_routing/specialization/layer0", "eval_routing/fluctuation/layer1", "eval_routing/dead_experts/layer0"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("train/loss")] == [3, 6, 9, 12]
    assert acc.SummaryMetadata("load/layer0").plugin_data.plugin_name == "histograms"
    buckets = tensor_util.make_ndarray(acc.Tensors("load/layer0")[-1].tensor_proto)  # rows: left, right, count
    assert buckets[:, 2].sum() == pytest.approx(2 * 16 * 64 * 2)  # eval batches x batch x block x k slots
    assert "load/heatmap" in tags["images"]
    assert "custom_scalars__config__" in tags["tensors"]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


@pytest.mark.parametrize("task", ["clusters", "chars"])
def test_bfloat16_training_runs_for_classifier_and_lm(task, tiny_overrides, tmp_path):
    trainer = make(tiny_overrides + [f"task.name={task}", "train.dtype=bfloat16", "train.steps=3"], tmp_path, log=False)
    metrics = trainer.fit()
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert math.isfinite(metrics["loss"])
