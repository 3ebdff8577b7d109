"""The trainer's definitions against hand computations on a tiny classifier (CPU, well under a second each):
the step's loss and its accumulation over micro-batches, the evaluation's loss, accuracy, standard error and
parameter counts, FLOPs and tokens/s, fit's evaluation and checkpoint cadence, partial weights, and the
compatibility checks. The mutation run of routerlab/train.py selects this file (docs/reliability.md)."""
import copy
import math
import uuid

import pytest
import torch
import torch.nn.functional as F

from routerlab.config import load_config
from routerlab.errors import ConfigError
from routerlab.train import Trainer, lr_lambda

TINY = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.num_experts=4", "model.expert_hidden=16",
        "train.batch_size=8", "train.eval_batches=2", "task.name=clusters", "train.steps=6", "train.grad_clip=null"]


def trainer(tmp_path, *extra, log=False):
    return Trainer(load_config(None, TINY + list(extra)), run_dir=tmp_path / "run", log=log)


def hand_loss(model, batch):
    logits = model(batch.inputs, batch.token_ids)
    task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.targets.reshape(-1))
    return task, sum(model.aux_losses().values())


def test_a_step_returns_the_task_loss_of_the_batch_before_the_update(tmp_path):
    t = trainer(tmp_path, "router.name=switch")  # switch: a balance aux loss that must not enter the task loss
    batch = t.next_batch()
    before = copy.deepcopy(t.model)
    task, aux = hand_loss(before.train(), batch)
    assert float(aux) > 0
    assert t.train_step(batch) == pytest.approx(float(task), rel=1e-5)
    assert t.losses == [pytest.approx(float(task), rel=1e-5)] and t.step == 1
    changed = [n for (n, p), q in zip(t.model.named_parameters(), before.parameters()) if not torch.equal(p, q)]
    assert "ffns.0.router.gate.weight" in changed and "head.weight" in changed


def test_micro_batches_accumulate_to_the_gradient_of_the_whole_batch(tmp_path):
    one = trainer(tmp_path / "a")
    two = trainer(tmp_path / "b", "train.batch_size=4", "train.micro_batches=2")
    batch = one.next_batch()
    ref = copy.deepcopy(one.model).train()
    task, aux = hand_loss(ref, batch)
    (task + aux).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    l1, l2 = one.train_step(batch), two.train_step(batch)
    assert l1 == pytest.approx(l2, rel=1e-5) and l1 == pytest.approx(float(task), rel=1e-5)
    for (n, p1), p2 in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6, msg=n)
    # the same update as AdamW's first step from the hand gradient: -lr * sign(g) where g != 0 (bias-corrected)
    lr = one.config.train.lr * lr_lambda(one.config)(0)
    name = "ffns.0.router.gate.weight"
    moved = dict(one.model.named_parameters())[name] - dict(ref.named_parameters())[name]
    g = grads[name]
    torch.testing.assert_close(moved[g.abs() > 1e-6], -lr * g.sign()[g.abs() > 1e-6], rtol=2e-2, atol=1e-6)


def test_micro_batch_routing_stats_are_the_sum_of_the_parts(tmp_path):
    two = trainer(tmp_path, "train.batch_size=4", "train.micro_batches=2")
    batch = two.next_batch()
    two.train_step(batch)
    stats = two.layers[0].stats
    assert float(stats.tokens) == batch.num_tokens  # 8 tokens, not the last micro-batch's 4
    assert float(stats.load.sum()) == 2 * batch.num_tokens  # k = 2 slots per token, dropless


def test_evaluation_loss_accuracy_and_standard_error_by_hand(tmp_path):
    t = trainer(tmp_path)
    t.train_step()
    m = t.evaluate()
    assert t.model.training  # evaluate() puts the model back in training mode
    t.model.eval()
    losses, correct, n, load = [], 0, 0, torch.zeros(4)
    with torch.no_grad():
        for batch in t.eval_set:
            logits = t.model(batch.inputs, batch.token_ids)
            load += t.layers[0].stats.load
            losses += F.cross_entropy(logits, batch.targets, reduction="none").tolist()
            correct += int((logits.argmax(-1) == batch.targets).sum())
            n += batch.targets.numel()
    assert n == 16 and m["loss"] == pytest.approx(sum(losses) / n, rel=1e-5)
    assert m["accuracy"] == pytest.approx(correct / n)
    mean = sum(losses) / n
    assert m["loss_se"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in losses) / (n - 1)) / math.sqrt(n), rel=1e-4)
    assert "perplexity" not in m  # classification
    assert m["step"] == 1
    assert m["load_cv"] == m["layer0/load_cv"] and t.last_loads[0] == load.tolist()  # summed over the evaluation batches
    assert sum(t.last_loads[0]) == 2 * n


def test_parameter_counts_and_flops_per_token(tmp_path):
    t = trainer(tmp_path, "router.name=switch")  # k = 1 of E = 4
    t.train_step()
    m = t.evaluate()
    total = sum(p.numel() for p in t.model.parameters())
    experts = sum(p.numel() for p in t.layers[0].experts.parameters())
    assert m["params_total"] == total
    assert m["params_active"] == pytest.approx(total - experts * (1 - 1 / 4))
    linear = sum(mod.weight.numel() for mod in t.model.modules() if isinstance(mod, torch.nn.Linear))
    assert t.flops_per_token() == pytest.approx(6.0 * (linear + experts * 1 / 4))


def test_tokens_per_second_leaves_out_the_first_steps(tmp_path):
    t = trainer(tmp_path, "train.timing_skip=2")
    t.step_log = [(10.0, 100), (10.0, 100), (1.0, 50), (3.0, 150)]
    assert t.tokens_per_s == pytest.approx(200 / 4)
    assert t.train_tokens == 400 and t.train_time == pytest.approx(24.0)
    assert t.perf_metrics()["step_time_ms"] == pytest.approx(2000.0) and t.perf_metrics()["tokens_per_s"] == pytest.approx(50.0)
    t.step_log = [(10.0, 100), (10.0, 100), (4.0, 80)]  # one steady step
    assert t.perf_metrics()["step_time_ms"] == pytest.approx(4000.0)
    t.step_log = t.step_log[:2]  # no steady steps yet: all of them
    assert t.tokens_per_s == pytest.approx(10.0)
    assert t.peak_flops() == (None, "unknown (set train.peak_flops)")
    t2 = trainer(tmp_path / "p", "train.peak_flops=1e12")
    t2.step_log = [(1.0, 1000)]
    assert t2.peak_flops() == (1e12, "train.peak_flops")
    assert t2.perf_metrics()["mfu"] == pytest.approx(t2.flops_per_token() * 1000 / 1e12)


def test_fit_evaluates_every_eval_every_and_at_the_end_and_reports_the_last_window(tmp_path):
    t = trainer(tmp_path, "train.steps=5", "train.eval_every=2", "train.log_every=2", "train.checkpoint_every=3", log=True)
    seen, saves = [], []
    t.on_eval(lambda step, m: seen.append(("hook", step)))
    t.on_step(lambda step, loss: saves.append(step) if (t.run_dir / "checkpoint.pt").exists() else None)
    result = t.fit(on_eval=lambda step, m: seen.append(("arg", step)))
    t.close()
    assert seen == [("hook", 2), ("arg", 2), ("hook", 4), ("arg", 4), ("hook", 5), ("arg", 5)]
    assert saves[0] == 4  # the first checkpoint is written after step 3
    assert result["train_loss"] == pytest.approx(sum(t.losses[-2:]) / 2)
    assert result["step"] == 5 and t.step == 5
    partial = trainer(tmp_path / "u", "train.steps=5", "train.eval_every=2")
    calls = []
    evaluate = partial.evaluate
    partial.evaluate = lambda: calls.append(partial.step) or evaluate()
    partial.fit(until=3)
    assert partial.step == 3 and partial.last_eval["step"] == 3 and calls == [2, 3]  # a fresh evaluation at the stopping point
    partial.fit(until=4)
    assert calls == [2, 3, 4]  # step 4 was evaluated in the loop: not again at the end
    assert math.isnan(trainer(tmp_path / "z").fit(until=0)["train_loss"])  # no step, no training loss


def test_close_releases_the_board_and_the_folder_lock(tmp_path):
    from routerlab import outputs

    t = trainer(tmp_path, log=True)
    key = str((tmp_path / "run").resolve())
    assert key in outputs._held and t.board is not None
    state = t.state_dict()
    assert state["config"] == t.config.model_dump(mode="json") and state["step"] == 0
    t.close()
    assert key not in outputs._held and t.board is None and t._lock is None
    t.close()  # twice is harmless


def test_load_weights_takes_a_partial_dict_and_refuses_unknown_names(tmp_path):
    t = trainer(tmp_path)
    before = {k: v.clone() for k, v in t.weights().items()}
    t.load_weights({"head.bias": torch.full_like(before["head.bias"], 3.0)})
    after = t.weights()
    assert after["head.bias"].eq(3.0).all()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "head.bias")
    with pytest.raises(ConfigError, match="unknown parameter"):
        t.load_weights({"nope": torch.zeros(1)})


def test_resume_restores_step_losses_schedule_and_data_stream(tmp_path):
    a = trainer(tmp_path, log=True)
    for _ in range(3):
        a.train_step()
    path = a.save()
    a.close()
    b = Trainer(a.config, run_dir=tmp_path / "run", log=False, resume=path)
    assert b.step == 3 and b.losses == a.losses
    assert b.scheduler.last_epoch == 3
    assert torch.equal(b.next_batch().inputs, a.next_batch().inputs)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_constant_schedule_after_warmup(tmp_path):
    t = trainer(tmp_path, "train.lr_schedule=constant", "train.warmup_steps=3")
    f = lr_lambda(t.config)
    assert [f(s) for s in range(5)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0, 1.0]
    cos = lr_lambda(trainer(tmp_path / "c", "train.steps=10", "train.warmup_steps=0").config)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.55) and cos(10) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)


@pytest.mark.parametrize("extra,message", [
    (["router.name=hash"], "routes by token id"),
])
def test_incompatible_router_and_task_are_refused(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        trainer(tmp_path, *extra)


def test_training_scalars_in_tensorboard_are_the_window_mean_lr_and_aux(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = trainer(tmp_path, "router.name=switch", "train.log_every=2", "train.steps=4", log=True)
    for _ in range(4):
        t.train_step()
    t.close()
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0}).Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == [2, 4] and loss[4] == pytest.approx(sum(t.losses[2:4]) / 2, rel=1e-5)
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    f = lr_lambda(t.config)
    assert lr[4] == pytest.approx(t.config.train.lr * f(4), rel=1e-5)  # the lr of the next update
    aux = acc.Scalars("train/aux/layer0/balance")
    assert [e.step for e in aux] == [2, 4] and all(0 < e.value < 0.1 for e in aux)  # alpha 0.01 x E sum f P ~ 1
    assert [e.step for e in acc.Scalars("routing/load_cv/layer0")] == [2, 4]


def test_lm_perplexity_and_attention_flops(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    t = Trainer(load_config(None, ["task.name=chars", f"task.corpus={corpus}", "task.block_size=8", "model.d_model=16", "model.n_heads=2",
                                   "model.n_layers=1", "model.num_experts=4", "model.expert_hidden=16", "train.batch_size=4", "train.eval_batches=1"]),
                run_dir=tmp_path / "run", log=False)
    t.train_step()
    m = t.evaluate()
    assert t.task.kind == "lm" and m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
    linear = sum(mod.weight.numel() for mod in t.model.modules() if isinstance(mod, torch.nn.Linear))
    experts = sum(p.numel() for p in t.layers[0].experts.parameters())
    k_eff = float(t.layers[0].stats.load.sum()) / float(t.layers[0].stats.tokens)
    assert k_eff == 2.0
    assert t.flops_per_token() == pytest.approx(6.0 * (linear + experts * k_eff / 4) + 12.0 * 1 * 16 * 8)
    hashed = Trainer(load_config(None, ["task.name=chars", f"task.corpus={corpus}", "task.block_size=8", "model.d_model=16", "model.n_heads=2",
                                        "model.n_layers=1", "model.num_experts=4", "model.expert_hidden=16", "train.batch_size=4",
                                        "train.eval_batches=1", "router.name=hash"]), run_dir=tmp_path / "hash", log=False)
    batch = hashed.next_batch()
    hashed.train_step(batch)  # the token ids reach the router (a hash router refuses to route without them)
    table = hashed.layers[0].router.table
    want = torch.bincount(table[batch.token_ids.reshape(-1) % table.numel()], minlength=4)
    assert hashed.layers[0].stats.load.tolist() == want.tolist()


def test_the_progress_bar_names_the_run_and_counts_steps(tmp_path, capsys):
    t = Trainer(load_config(None, TINY + ["train.steps=3", "train.log_every=1"]), run_dir=tmp_path / "run", log=False, progress=True)
    t.fit()
    out = capsys.readouterr().out
    assert t.config.run_name() in out and f"loss {t.losses[-1]:.4f}" in out  # (a narrow console elides the count)
    assert f"eval {t.last_eval['loss']:.4f}" in out and f"load_cv {t.last_eval['load_cv']:.2f}" in out
    quiet = Trainer(load_config(None, TINY + ["train.steps=2"]), run_dir=tmp_path / "q", log=False)
    quiet.fit()
    assert "loss" not in capsys.readouterr().out


def test_resume_refuses_another_config_or_other_data_and_keeps_the_probe(tmp_path):
    from routerlab.checkpoint import load_checkpoint  # noqa: F401

    a = trainer(tmp_path, log=True)
    a.train_step()
    a.evaluate()
    a.data_info = {"data_checksum": "a" * 64}
    path = a.save()
    a.close()
    other = Trainer(load_config(None, TINY + ["train.lr=0.5"]), run_dir=tmp_path / "o", log=False)
    with pytest.raises(ConfigError, match="different config"):
        other.load(path)
    same = Trainer(a.config, run_dir=tmp_path / "s", log=False)
    same.data_info = {"data_checksum": "b" * 64}
    with pytest.raises(ConfigError, match="trained on data aaaaaaaaaaaa, but this task's data is bbbbbbbbbbbb"):
        same.load(path)
    same.data_info = {"data_checksum": "a" * 64}
    same.load(path)
    assert [torch.equal(p, q) for p, q in zip(same.probe_top1, a.probe_top1)] == [True]
    unknown = Trainer(a.config, run_dir=tmp_path / "u", log=False)
    unknown.data_info = {}  # a task without a checksum resumes any checkpoint of its config
    unknown.load(path)
    assert unknown.step == 1


def test_the_aux_losses_are_backpropagated_with_the_task_loss(tmp_path):
    t = trainer(tmp_path, "router.name=switch", "router.alpha=0.5")
    batch = t.next_batch()
    ref = copy.deepcopy(t.model).train()
    task, aux = hand_loss(ref, batch)
    (task + aux).backward()
    t.model.train()
    t.optimizer.zero_grad(set_to_none=True)
    loss, parts = t.forward_backward(batch, 1.0)
    assert float(loss) == pytest.approx(float(task), rel=1e-6) and set(parts) == {"layer0/balance"}
    for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_micro_batch_aux_losses_are_weighted_by_their_tokens(tmp_path):
    t = trainer(tmp_path, "router.name=switch", "train.batch_size=4", "train.micro_batches=2", "train.log_every=1", log=True)
    batch = t.next_batch()
    ref = copy.deepcopy(t.model).train()
    want = sum(0.5 * float(hand_loss(ref, part)[1]) for part in batch.chunks(2))
    seen = {}
    t._log_train = lambda aux: seen.update({k: float(v) for k, v in aux.items()})
    t.train_step(batch)
    t.close()
    assert seen == {"layer0/balance": pytest.approx(want, rel=1e-5)}


def test_a_finite_loss_with_a_non_finite_gradient_stops_the_run(tmp_path):
    from routerlab.errors import RunStopped

    name = f"nan_grad_{uuid.uuid4().hex[:8]}"  # unique: a process may run this test twice (mutation testing)
    plugin = tmp_path / f"{name}.py"
    plugin.write_text(
        "import torch\n"
        "from routerlab.routers.registry import register_router\n"
        "from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams\n"
        f"@register_router('{name}', SoftmaxTopKParams)\n"
        "class NanGrad(SoftmaxTopK):\n"
        "    def forward(self, x, *, token_ids=None):\n"
        "        out = super().forward(x, token_ids=token_ids)\n"
        "        w = out.weights + torch.sqrt(out.weights - out.weights) * 0  # 0 forward, NaN gradient\n"
        "        return type(out)(out.experts, w, out.logits, out.aux)\n")
    t = trainer(tmp_path, f"plugins=[{plugin}]", f"router.name={name}")
    before = [p.detach().clone() for p in t.model.parameters()]
    with pytest.raises(RunStopped, match="is not finite"):
        t.train_step()
    assert all(torch.equal(p, q) for p, q in zip(t.model.parameters(), before))


def test_compatibility_and_the_fixed_evaluation_set(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    lm = ["task.name=chars", f"task.corpus={corpus}", "task.block_size=8", "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
          "model.num_experts=4", "model.expert_hidden=16", "train.batch_size=4", "train.eval_batches=1", "router.name=expert_choice"]
    with pytest.raises(ConfigError, match="router 'expert_choice' is not causal .* set router.allow_noncausal=true"):
        Trainer(load_config(None, lm), run_dir=tmp_path / "a", log=False)
    Trainer(load_config(None, lm + ["router.allow_noncausal=true"]), run_dir=tmp_path / "b", log=False)
    trainer(tmp_path / "c", "router.name=expert_choice")  # a classifier: nothing leaks
    one, other = trainer(tmp_path / "d", "seed=1"), trainer(tmp_path / "e", "seed=2")
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(one.eval_set, other.eval_set))  # the same for every run


def test_the_schedule_with_a_single_decay_step_and_bf16_pure_steps(tmp_path):
    f = lr_lambda(load_config(None, ["train.steps=2", "train.warmup_steps=1"]))
    assert (f(0), f(1), f(2)) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(0.1))
    t = trainer(tmp_path, "train.precision=bf16-pure")
    assert math.isfinite(t.train_step()) and next(t.model.parameters()).dtype == torch.bfloat16


def test_a_reinforce_router_gets_the_token_losses(tmp_path):
    t = trainer(tmp_path, "router.name=reinforce", "train.log_every=1", log=True)
    seen = {}
    t._log_train = lambda aux: seen.update(aux)
    t.train_step()
    t.close()
    assert "layer0/reinforce" in seen and math.isfinite(float(seen["layer0/reinforce"]))
