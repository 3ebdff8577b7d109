"""The step's device-side parts, on the CPU: when train.cuda_graph may replay a step (the capture itself needs a GPU:
docs/benchmarks.md has its equivalence run), and the sync-free update of a fused optimizer: a non-finite loss skips
the update on the device (found_inf) and clipping is a divisor the fused step applies (grad_scale)."""
from __future__ import annotations

import pytest
import torch

from routerlab.config import load_config
from routerlab.errors import RunStopped
from routerlab.routers import build_router
from routerlab.train import Trainer, lr_lambda

TINY = ["train.steps=4", "model.d_model=16", "model.n_heads=2", "model.expert_hidden=16", "train.batch_size=4",
        "train.eval_batches=1", "task.name=clusters", "router.name=softmax_topk", "router.k=2"]


def trainer(tmp_path, *extra: str) -> Trainer:
    return Trainer(load_config(None, TINY + list(extra)), run_dir=tmp_path / "run", log=False)


@pytest.mark.parametrize("extra, reason", [
    ([], "not on CUDA"),  # everything else qualifies: on a GPU this run would be graphed
    (["train.cuda_graph=false"], "train.cuda_graph is false"),
    (["train.micro_batches=2"], "not on CUDA"),  # micro-batches are replayed one by one
    (["router.name=relu"], "router class ReLURouter does not declare cuda_graph_safe"),  # reads its slot count on the host
])
def test_when_a_step_may_be_replayed(tmp_path, extra, reason):
    t = trainer(tmp_path, *extra)
    assert t.cuda_graph_off == reason and t.step_graph is None


# Declared routers whose state moves from step to step (in the forward, observe_token_loss or after_step), the
# overrides that train them here, and the tensors that must move. A replay writes the memory its step was captured
# with and after_step runs eagerly between replays, so each of these must change in place: a tensor re-bound to a
# new object would leave the graph reading (or after_step seeing) the old one.
STATEFUL = {
    "adversarial": (["router={name: adversarial, k: 2, price_lr: 0.5}"], {"prices"}),
    "adversarial_critic": (["router={name: adversarial_critic, k: 2, group_size: 4}"], {"critic", "critic_m", "critic_v", "critic_step", "_usage"}),
    "bias_balanced": (["router={name: bias_balanced, k: 2, update_rate: 0.1}"], {"bias"}),
    "quantile_balanced": (["router={name: quantile_balanced, k: 1, eval_ema: 0.5}", "train.batch_size=16"], {"prices", "eval_prices"}),
    "reinforce": (["router={name: reinforce}"], {"baseline", "baseline_steps"}),
    "softmax_topk": (["router.smoothing=0.5"], {"gate_ema"}),  # gate smoothing's EMA, an option of every gated router
}


def router_tensors(router) -> dict[str, torch.Tensor]:
    """The tensors a router holds besides its parameters: its buffers and plain tensor attributes."""
    held = dict(router.named_buffers(recurse=False))
    held.update({k: v for k, v in vars(router).items() if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)})
    return held


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_a_declared_routers_state_moves_in_place_from_step_to_step(tmp_path, name):
    extra, moving = STATEFUL[name]
    t = trainer(tmp_path, *extra)
    router = t.layers[0].router
    assert vars(type(router)).get("cuda_graph_safe") and t.cuda_graph_off == "not on CUDA"
    t.train_step()  # the first step makes what a router keeps from its forwards (the critic's usage)
    held = {k: (v, v.data_ptr(), v.clone()) for k, v in router_tensors(router).items()}
    assert moving <= held.keys()
    for _ in range(2):
        t.train_step()
    now = router_tensors(router)
    assert now.keys() == held.keys()
    for k, (tensor, address, _) in held.items():
        assert now[k] is tensor and now[k].data_ptr() == address, f"{name}.{k} was re-bound"
    assert [k for k in sorted(moving) if torch.equal(held[k][2], now[k])] == []  # ... and did move


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reinforce_corrects_its_baseline_on_the_device_as_the_python_formula_does(dtype):
    """observe_token_loss runs inside the captured step, so the bias correction reads no step count on the host; its
    numbers are those of baseline / (1 - decay**n) with a Python float (bitwise, a bf16 buffer too)."""
    torch.manual_seed(0)
    router = build_router({"name": "reinforce", "entropy": 0.0, "baseline_decay": 0.9}, 6, 3)
    router.baseline = router.baseline.to(dtype)
    router.train()
    for n in range(12):
        router(torch.randn(10, 6))
        token_loss = torch.rand(10) * 3
        logp = router._chosen[0].detach()
        reward = -token_loss
        b = reward.mean() if n == 0 else router.baseline / (1 - 0.9**n)
        surrogate = router.observe_token_loss(token_loss)["reinforce"]
        assert int(router.baseline_steps) == n + 1 and router.baseline.dtype == dtype
        assert torch.equal(surrogate.detach(), -1.0 * ((reward - b) * logp).mean()), n


def fused(t: Trainer) -> Trainer:
    """The trainer with the optimizer CUDA gets (fused AdamW: found_inf and grad_scale on the device), on the CPU."""
    c = t.config.train
    t.optimizer = torch.optim.AdamW(t.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.95), fused=True)
    t.scheduler = torch.optim.lr_scheduler.LambdaLR(t.optimizer, lr_lambda(t.config))
    return t


def nan_batch(t: Trainer):
    batch = t.next_batch()
    batch.inputs[0, 0] = float("nan")
    return batch


def snapshot(t: Trainer) -> list[torch.Tensor]:
    moments = [v.clone() for s in t.optimizer.state.values() for v in s.values()]
    return [p.detach().clone() for p in t.model.parameters()] + moments


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_non_finite_step_stops_with_weights_and_moments_untouched_on_the_device_path(tmp_path):
    t = fused(trainer(tmp_path))
    t.train_step()
    before = snapshot(t)
    with pytest.raises(RunStopped, match="step 2: the loss .* is not finite"):
        t.train_step(nan_batch(t))
    assert same(before, snapshot(t)) and t.step == 1


def test_skip_on_the_device_path_drops_the_update_and_trains_on(tmp_path):
    t = fused(trainer(tmp_path, "train.on_nonfinite=skip"))
    t.train_step()
    before = snapshot(t)
    t.train_step(nan_batch(t))
    assert t.skipped_steps == 1 and t.step == 2 and same(before, snapshot(t))
    t.train_step()
    assert not same(before, snapshot(t)) and all(torch.isfinite(p).all() for p in t.model.parameters())


def test_a_checkpoint_of_an_unfused_run_resumes_on_the_device_path(tmp_path):
    """A run saved on the CPU (torch's plain AdamW) and resumed where the step is fused (CUDA): the loaded groups keep
    this trainer's fused step, so found_inf and grad_scale still reach it (an unfused step refuses them)."""
    cpu = trainer(tmp_path / "a", "train.grad_clip=0.01")
    cpu.train_step()
    path = cpu.save(tmp_path / "cpu.pt")
    resumed = fused(trainer(tmp_path / "b", "train.grad_clip=0.01"))
    resumed.load(path)
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    resumed.train_step()
    before = snapshot(resumed)
    with pytest.raises(RunStopped):
        resumed.train_step(nan_batch(resumed))
    assert same(before, snapshot(resumed)) and resumed.step == 2


def test_clipping_as_the_fused_steps_divisor_equals_clip_grad_norm(tmp_path):
    """grad_clip 0.01 clips every step here (norms are ~1), so a wrong divisor would move the weights differently."""
    device_path = fused(trainer(tmp_path / "a", "train.grad_clip=0.01"))
    host_path = trainer(tmp_path / "b", "train.grad_clip=0.01")  # foreach AdamW after clip_grad_norm_
    unclipped = fused(trainer(tmp_path / "c", "train.grad_clip=null"))
    for _ in range(3):
        losses = device_path.train_step(), host_path.train_step(), unclipped.train_step()
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert float(device_path.optimizer.grad_scale) > 1 and unclipped.optimizer.grad_scale is None
    for a, b in zip(device_path.model.parameters(), host_path.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, c, rtol=1e-5, atol=1e-6) for a, c in zip(device_path.model.parameters(), unclipped.model.parameters()))


def test_a_layers_record_put_back_after_an_evaluation_gives_the_training_steps_statistics(tmp_path):
    """What a replay relies on: restore() brings back the step's routing record after an eager forward replaced it."""
    t = trainer(tmp_path)
    t.train_step()
    layer = t.layers[0]
    recorded, load = layer.recorded(), layer.stats.load.clone()
    t.evaluate()  # eager forwards on other batches: a new record
    assert not torch.equal(layer.stats.load, load)
    layer.restore(recorded)
    assert torch.equal(layer.stats.load, load)


def test_the_device_path_steps_a_bf16_model(tmp_path):
    """bf16 gradients give a bf16 norm; the fused step takes its divisor in float32 (a GPU run once failed here)."""
    t = fused(trainer(tmp_path, "train.precision=bf16-pure", "train.grad_clip=0.01"))
    before = snapshot(t)
    t.train_step()
    t.train_step()
    assert t.optimizer.grad_scale.dtype == torch.float32 and float(t.optimizer.grad_scale) > 1
    assert not same(before, snapshot(t)) and all(torch.isfinite(p).all() for p in t.model.parameters())


@pytest.mark.parametrize("loss, bad, finite", [(torch.tensor(2.0 ** -30 + 1.0), torch.tensor(False), True),
                                               (torch.tensor(float("nan")), torch.tensor(True), False),
                                               (torch.tensor(1.5), torch.tensor(True), False)])  # a finite loss, a non-finite norm
def test_the_steps_one_host_read_gives_the_loss_as_item_would_and_the_finite_flag(loss, bad, finite):
    from routerlab.distributed import SingleProcess

    value, ok = SingleProcess().reduce_step([], loss, bad)
    assert ok is finite and (value == loss.item() or (value != value and loss.item() != loss.item()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200: docs/benchmarks.md, issue 19 v8)")
def test_a_logged_graphed_steps_metrics_are_its_own_though_written_during_the_next_step(tmp_path):
    # on CUDA a logged step's aux losses and statistics are copied behind its kernels and written during the next
    # step (or at close): the next replay overwrites the graph's aux tensors, so a copy queued after it would log
    # the next step's values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lm = ["task.name=stdlib", "task.block_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.num_experts=8",
          "model.expert_hidden=32", "router.name=softmax_topk", "router.k=2", "router.importance_balance=0.01", "router.z_loss=1e-3",
          "train.batch_size=8", "train.device=cuda", "train.precision=bf16-mixed", "train.eval_batches=1", "train.log_every=5"]
    t = Trainer(load_config(None, lm), run_dir=tmp_path / "run", log=True)
    seen = {}
    t.on_step(lambda step, loss: seen.update({step: {k: float(v) for k, v in t.step_graph.outputs[1].items()}}
                                             if t.step_graph.graph is not None else {}))
    for _ in range(10):
        t.train_step()
    assert t.step_graph.graph is not None, "the run should be graphed"
    t.close()
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == [5, 10] and [e.step for e in acc.Scalars("routing/load_cv/layer1")] == [5, 10]
    assert logged[5] == pytest.approx(sum(t.losses[:5]) / 5) and logged[10] == pytest.approx(sum(t.losses[5:]) / 5)
    for step in (5, 10):
        for name, value in seen[step].items():
            assert acc.Scalars(f"train/aux/{name}")[[5, 10].index(step)].value == pytest.approx(value, rel=1e-6), (step, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200: docs/benchmarks.md, issue 19 v12)")
def test_micro_batches_replayed_one_by_one_train_as_eager_ones(tmp_path):
    """train.micro_batches=2 under train.cuda_graph: each micro-batch a replay, the gradients summed over both (not the
    last one's), the same losses and gradients as every kernel eager (to rounding: the graph takes the router's gate
    kernel) and the step's routing statistics over both micro-batches."""
    lm = ["task.name=stdlib", "task.block_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.num_experts=8",
          "model.expert_hidden=32", "router.name=softmax_topk", "router.k=2", "router.balance_batch=0.01", "router.z_loss=1e-3",
          "train.batch_size=8", "train.micro_batches=2", "train.device=cuda", "train.precision=bf16-mixed", "train.eval_batches=1"]
    runs = {}
    for graphed in (True, False):
        t = Trainer(load_config(None, lm + [f"train.cuda_graph={str(graphed).lower()}"]), run_dir=tmp_path / str(graphed), log=False)
        for _ in range(6):  # 2 eager steps, the capture, 3 replayed steps
            t.train_step()
        assert (t.step_graph is not None and t.step_graph.graph is not None) == graphed
        runs[graphed] = (t.losses, [p.grad.float().clone() for p in t.model.parameters()], t.layers[0].stats.tokens.item())
    (losses, grads, tokens), (eager_losses, eager_grads, eager_tokens) = runs[True], runs[False]
    assert losses[:2] == eager_losses[:2], "the eager warm-up steps"
    assert losses == pytest.approx(eager_losses, rel=2e-3)
    assert tokens == eager_tokens == 8 * 64 * 2, "the step's statistics count both micro-batches"
    for i, (g, e) in enumerate(zip(grads, eager_grads)):
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), e.flatten(), dim=0)
        assert cosine > 0.99 and g.norm().item() == pytest.approx(e.norm().item(), rel=0.03), f"parameter {i}: cosine {cosine:.4f}"
