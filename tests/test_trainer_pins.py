"""Pins for what the trainer logs, saves and steps, and when (the survivors of the trainer's mutation pass,
docs/reliability.md): a tiny classifier on the CPU, each test well under two seconds. Expected values come from
hand computations or plain PyTorch, never from routerlab.train itself."""
import copy
import math
import types
import warnings

import pytest
import torch

from routerlab.config import load_config
from routerlab.errors import ConfigError, RunStopped
from routerlab.train import Trainer, check_compatible
from test_trainer_definitions import TINY, hand_loss, trainer


def grad_norm_by_hand(model, batch):
    ref = copy.deepcopy(model).train()
    task, aux = hand_loss(ref, batch)
    (task + aux).backward()
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters() if p.grad is not None))), float((task + aux).detach())


def test_a_finite_loss_term_with_a_nan_gradient_stops_before_the_update(tmp_path):
    # sqrt at 0: the value is 0 but its gradient is inf, times 0 gives NaN; no plugin router to register (the
    # mutation pass runs the tests twice in one process, and a registered name cannot be registered again)
    t = trainer(tmp_path, "router.name=switch")  # switch: an aux loss, part of the printed total
    head = t.model.head.weight
    t.add_loss_term("nan_grad", lambda: (torch.sqrt(head - head.detach()) * 0).sum() + 0.25)
    batch = t.next_batch()
    _, total = grad_norm_by_hand(t.model, batch)
    before = [p.detach().clone() for p in t.model.parameters()]
    with pytest.raises(RunStopped, match=rf"^step 1: the loss \({total + 0.25:.4g}\) or gradient norm \(nan\) is not finite"):
        t.train_step(batch)
    assert all(torch.equal(p, q) for p, q in zip(t.model.parameters(), before))
    assert t.step == 0 and t.losses == []


def test_an_infinite_loss_with_finite_gradients_prints_their_norm(tmp_path):
    t = trainer(tmp_path)
    t.add_loss_term("inf", lambda: torch.tensor(float("inf")))  # a constant: no gradient of its own
    batch = t.next_batch()
    norm, _ = grad_norm_by_hand(t.model, batch)
    with pytest.raises(RunStopped, match=rf"the loss \(inf\) or gradient norm \({norm:.4g}\) is not finite"):
        t.train_step(batch)


def test_skipped_steps_are_counted_logged_and_hidden_from_the_router(tmp_path):
    # bias_balanced learns from each step's routing statistics (after_step): only from steps that were applied
    t = trainer(tmp_path, "router.name=bias_balanced", "train.on_nonfinite=skip", "train.log_every=1", log=True)
    logged = []
    t.board.scalars = lambda values, step: logged.append((step, dict(values)))
    router = t.layers[0].router
    assert torch.equal(router.bias, torch.zeros(4))
    t.train_step()
    load = t.layers[0].stats.load.float()
    want = router.params.update_rate * torch.sign(load.mean() - load)
    assert want.abs().sum() > 0 and torch.allclose(router.bias, want)
    bad = t.add_loss_term("inf", lambda: torch.tensor(float("inf")))
    t.train_step()
    t.train_step()
    assert torch.allclose(router.bias, want)  # two skipped steps: the router saw neither
    assert t.skipped_steps == 2 and t.step == 3 and len(t.losses) == 1
    assert [(s, v) for s, v in logged if "train/skipped_steps" in v] == [(2, {"train/skipped_steps": 2 - 1}), (3, {"train/skipped_steps": 2})]
    t._loss_terms.pop("inf") and bad
    t.close()


def test_the_step_hook_gets_the_step_and_its_loss_and_the_eval_hook_the_metrics(tmp_path):
    t = trainer(tmp_path, "train.steps=2", "train.eval_every=2")
    steps, evals = [], []
    t.on_step(lambda step, loss: steps.append((step, loss)))
    t.on_eval(lambda step, metrics: evals.append((step, metrics)))
    t.fit()
    assert steps == [(1, t.losses[0]), (2, t.losses[1])] and all(isinstance(v, float) for _, v in steps)
    assert len(evals) == 1 and evals[0][0] == 2 and evals[0][1] is not None and evals[0][1]["loss"] == t.last_eval["loss"]


def test_the_step_log_holds_the_seconds_of_each_step(tmp_path):
    import time

    t = trainer(tmp_path)
    start = time.perf_counter()
    t.train_step()
    wall = time.perf_counter() - start
    ((seconds, tokens),) = t.step_log
    assert 0 < seconds <= wall and tokens == 8


def test_the_logged_training_loss_is_the_mean_of_the_last_window(tmp_path):
    t = trainer(tmp_path, "train.log_every=3", log=True)
    logged = {}
    t.board.scalars = lambda values, step: logged.update({step: values["train/loss"]})
    for _ in range(7):
        t.train_step()
    t.close()
    assert sorted(logged) == [3, 6]
    assert logged[3] == pytest.approx(sum(t.losses[:3]) / 3) and logged[6] == pytest.approx(sum(t.losses[3:6]) / 3)


def test_each_step_after_the_first_draws_one_batch_the_next_step_takes(tmp_path):
    """The next step's batch is drawn ahead, while this one finishes, and taken by that step: the same stream of
    batches as drawing each one at its own step (routerlab/prefetch.py), one task draw per step."""
    t = trainer(tmp_path, "train.batch_size=4", "train.micro_batches=2")
    twin = trainer(tmp_path / "twin", "train.batch_size=4", "train.micro_batches=2")
    draws = []
    batch = t.task.batch
    t.task.batch = lambda split, size, generator: draws.append(size) or batch(split, size, generator)
    seen = []
    t.on_step(lambda step, loss: seen.append(loss))
    for _ in range(3):
        t.train_step()
    assert draws == [8, 8, 8, 8]  # the first step's own batch, then one drawn ahead at each step
    assert t.prefetch.drawn is not None and t.prefetch.drawn.size == 8
    assert seen == [twin.train_step(twin.next_batch()) for _ in range(3)]  # the batches a step draws for itself
    draws.clear()
    t.train_step(twin.next_batch())  # a batch handed in: nothing drawn from the task
    assert draws == []


def test_k_eff_of_a_single_token_is_its_slot_count(tmp_path):
    import dataclasses

    t = trainer(tmp_path)
    t.train_step()
    one = dataclasses.replace(t.layers[0].stats, tokens=torch.tensor(1.0), load=torch.tensor([1.0, 1.0, 0.0, 0.0]))  # k = 2 slots
    total = sum(p.numel() for p in t.model.parameters())
    experts = sum(p.numel() for p in t.layers[0].experts.parameters())
    assert t.param_counts([one])["params_active"] == pytest.approx(total - experts * (1 - 2 / 4))
    t.layers[0].stats = one
    linear = sum(m.weight.numel() for m in t.model.modules() if isinstance(m, torch.nn.Linear))
    assert t.flops_per_token() == pytest.approx(6.0 * (linear + experts * 2 / 4))


def test_attention_flops_scale_with_the_number_of_layers(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    t = trainer(tmp_path, "task.name=chars", f"task.corpus={tmp_path / 'corpus.txt'}", "task.block_size=8", "model.n_layers=2")  # d_model 16
    linear = sum(m.weight.numel() for m in t.model.modules() if isinstance(m, torch.nn.Linear))
    assert all(layer.stats is None for layer in t.layers)  # before any step: matmul weights and attention only
    assert t.flops_per_token() == pytest.approx(6.0 * linear + 12.0 * 2 * 16 * 8)


def test_a_cpu_run_reports_no_gpu_memory(tmp_path):
    t = trainer(tmp_path)
    t.train_step()
    assert set(t.perf_metrics()) == {"tokens_per_s", "step_time_ms"}


def test_the_progress_line_refreshes_every_log_window_and_at_the_end(tmp_path, monkeypatch):
    from rich.progress import Progress

    updates, added = [], []
    original_update, original_add = Progress.update, Progress.add_task
    monkeypatch.setattr(Progress, "update", lambda self, job, **kw: updates.append(kw) or original_update(self, job, **kw))
    monkeypatch.setattr(Progress, "add_task", lambda self, name, **kw: added.append((name, kw)) or original_add(self, name, **kw))
    t = Trainer(load_config(None, TINY + ["train.steps=5", "train.log_every=2", "train.eval_every=2"]), run_dir=tmp_path / "run", log=False, progress=True)
    t.fit(until=3)
    assert added == [(t.config.run_name(), {"total": 3, "completed": 0, "info": ""})]
    assert [u["completed"] for u in updates] == [2, 3]
    evaluated = t.last_eval  # step 3: the end of this fit evaluates after the loop, so the line shows step 2's evaluation
    assert evaluated["step"] == 3
    assert updates[1]["info"].startswith(f"loss {(t.losses[1] + t.losses[2]) / 2:.4f}  eval ")
    assert updates[0]["info"].startswith(f"loss {(t.losses[0] + t.losses[1]) / 2:.4f}  eval ") and "  load_cv " in updates[0]["info"]
    updates.clear(), added.clear()
    t.fit()  # resumes the bar at step 3 of 5
    assert added[0][1]["completed"] == 3 and added[0][1]["total"] == 5 and [u["completed"] for u in updates] == [4, 5]


def test_the_progress_line_reads_name_bar_count_and_info(tmp_path, capsys, monkeypatch):
    import rich

    # wide enough for every column; the process-wide console may exist already (an earlier test), so COLUMNS is too late
    monkeypatch.setattr(rich.get_console(), "_width", 240)
    t = Trainer(load_config(None, TINY + ["train.steps=3", "train.log_every=1"]), run_dir=tmp_path / "run", log=False, progress=True)
    t.fit()
    line = [s for s in capsys.readouterr().out.splitlines() if s.strip()][-1]
    assert line.startswith(t.config.run_name() + " ") and " 3/3 " in line
    assert line.rstrip().endswith(f"loss {t.losses[-1]:.4f}  eval {t.last_eval['loss']:.4f}  load_cv {t.last_eval['load_cv']:.2f}")


def test_fit_without_steps_warns_nothing(tmp_path):
    t = trainer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would be one
        assert math.isnan(t.fit(until=0)["train_loss"])


def test_hyperparameters_are_recorded_once_the_run_reaches_its_last_step(tmp_path):
    t = trainer(tmp_path, "train.steps=2", "train.eval_every=1", log=True)
    recorded = []
    t.board.hparams = lambda config, metrics: recorded.append(metrics["step"])
    t.fit(until=1)
    assert recorded == []
    t.fit()
    t.close()
    assert recorded == [2]


def test_a_checkpoint_from_other_data_names_the_file_and_both_checksums(tmp_path):
    a = trainer(tmp_path)
    a.data_info = {"data_checksum": "a" * 64}
    path = a.save(tmp_path / "ck.pt")
    b = trainer(tmp_path / "b")
    b.data_info = {"data_checksum": "0123456789abcdef" * 4}
    with pytest.raises(ConfigError, match=rf"^checkpoint {str(path)!r} was trained on data a{{12}}, but this task's data is 0123456789ab; resume"):
        b.load(path)


def test_a_run_without_logging_writes_and_locks_nothing(tmp_path):
    from routerlab import outputs

    t = trainer(tmp_path, log=False)
    assert t._lock is None and t.board is None and not (tmp_path / "run").exists()
    assert str((tmp_path / "run").resolve()) not in outputs._held


def test_an_unwritable_run_dir_is_named_run_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^run\.dir '.*' cannot be created"):
        Trainer(load_config(None, TINY), run_dir=tmp_path / "file" / "run", log=True)


def test_the_task_given_is_the_task_trained(tmp_path):
    from routerlab.tasks import build_task

    config = load_config(None, TINY)
    task = build_task(config.task)
    t = Trainer(config, task=task, run_dir=tmp_path / "run", log=False)
    assert t.task is task


def test_compile_auto_leaves_the_model_eager_on_cpu(tmp_path):
    t = trainer(tmp_path)
    assert t.compiled == []
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in t.model.modules())


def test_tf32_is_a_cuda_switch_a_cpu_run_leaves_alone(tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        trainer(tmp_path, "train.tf32=true")
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_the_update_is_adamw_with_betas_0_9_0_95_and_the_configured_weight_decay(tmp_path):
    t = trainer(tmp_path, "train.weight_decay=0.3", "train.lr_schedule=constant", "train.lr=0.01")
    ref = copy.deepcopy(t.model).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.3)  # plain PyTorch
    for _ in range(3):
        batch = t.next_batch()
        t.train_step(batch)
        opt.zero_grad(set_to_none=True)
        sum(hand_loss(ref, batch)).backward()
        opt.step()
    for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_cuda_without_an_index_is_the_first_gpu_of_a_one_gpu_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # the index check passes; building on a GPU this machine does not have fails later, in torch
    with pytest.raises(Exception) as err:
        trainer(tmp_path, "train.device=cuda")
    assert "this machine has" not in str(err.value)


def test_a_non_causal_router_without_the_opt_in_field_is_refused_on_an_lm_task():
    router = types.SimpleNamespace(needs_token_ids=False, causal=False, params=types.SimpleNamespace())  # a plugin's params
    model = types.SimpleNamespace(moe_layers=lambda: [types.SimpleNamespace(router=router)])
    task = types.SimpleNamespace(name="chars", kind="lm", has_token_ids=True)
    config = load_config(None, ["router.name=expert_choice"])
    with pytest.raises(ConfigError, match="is not causal"):
        check_compatible(model, task, config)
    router.params.allow_noncausal = True
    check_compatible(model, task, config)


def test_resume_on_the_cpu_from_a_checkpoint_with_a_cuda_rng_state(tmp_path):
    from routerlab.checkpoint import load_checkpoint, save_checkpoint

    a = trainer(tmp_path)
    a.train_step()
    path = a.save(tmp_path / "ck.pt")
    state = load_checkpoint(path, a.config.fingerprint())
    state["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)  # written by a GPU run
    save_checkpoint(path, state)
    b = Trainer(a.config, run_dir=tmp_path / "b", log=False, resume=path)
    assert b.step == 1


def test_resume_with_logging_drops_the_events_a_killed_run_left_past_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a = trainer(tmp_path, "train.steps=4", "train.log_every=1", "train.eval_every=2", log=True)
    a.fit(until=2)  # evaluated and checkpointed at step 2
    a.train_step()  # step 3 logged, then the run dies
    a.close()
    b = Trainer(a.config, run_dir=tmp_path / "run", log=True, resume=a.checkpoint_path)
    b.train_step()
    b.close()
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0}).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [1, 2, 3] and loss[2][1] == pytest.approx(b.losses[2])  # step 3: the resumed run's
    assert [e.step for e in events.Scalars("eval/loss")] == [2]  # the checkpoint's own evaluation is kept


def test_a_resumed_boards_purge_comes_after_the_killed_runs_events_within_one_second(tmp_path, monkeypatch):
    """TensorBoard reads event files in name order, and the writer's counter in the name is not zero-padded: a file made
    in the same second with counter 10 sorts before counter 9's. The resumed board waits for the next second instead
    (this failed once in the full suite, where one worker had made nine writers before)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    from routerlab.board import Board

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    killed = Board(tmp_path)
    killed.scalars({"train/loss": 3.0}, 3)  # past the checkpoint at step 2
    killed.close()
    resumed = Board(tmp_path, purge_step=2)
    resumed.scalars({"train/loss": 1.5}, 3)
    resumed.close()
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert names[0].endswith(".9") and names[1].endswith(".10"), "the killed run's file reads first"
    loss = [(e.step, e.value) for e in EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload().Scalars("train/loss")]
    assert loss == [(3, 1.5)]


def test_before_any_evaluation_there_are_no_metrics_and_no_loads(tmp_path):
    t = trainer(tmp_path)
    assert t.last_eval == {} and t.last_loads == []


def test_the_data_description_is_recorded_only_with_logging(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from routerlab.tasks import build_task

    config = load_config(None, TINY)
    task = build_task(config.task)
    task.data_info = lambda: {"data_checksum": "c" * 64}  # what a corpus task records
    Trainer(config, task=task, run_dir=tmp_path / "quiet", log=False)  # nothing to record it in: no error
    t = Trainer(config, task=task, run_dir=tmp_path / "run", log=True)
    t.close()
    texts = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0}).Reload().Tensors("data/text_summary")
    assert len(texts) == 1 and "c" * 64 in texts[0].tensor_proto.string_val[0].decode()


def test_a_run_dir_another_process_holds_is_refused_by_its_config_name(tmp_path):
    from test_reliability import hold_lock

    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=rf"^run\.dir '.*' is already in use by PID {holder.pid}"):
            trainer(tmp_path, log=True)
    finally:
        holder.kill()
        holder.wait()
