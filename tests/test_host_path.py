"""The trainer's host path between steps: the next batch drawn before the step's host read (routerlab/prefetch.py: the
same batches, the same numbers, the same data generator in checkpoints, whatever happens between steps; pinned copies
on CUDA, run on the GPU machine: docs/benchmarks.md, v5), the one host read, the stats' one copy to the host, and the
trainer bench's view of the host path."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from routerlab.bench.trainer import gc_pauses, host_ops_during, host_times, steady_tokens_per_s, union
from routerlab.config import load_config
from routerlab.moe.stats import RoutingStats, stats_on_host
from routerlab.prefetch import BatchPrefetch
from routerlab.tasks import Batch, build_task
from routerlab.train import Trainer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny(tmp_path, *extra: str, device: str = "cpu") -> Trainer:
    overrides = ["model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.num_experts=4", "model.expert_hidden=16",
                 "train.steps=20", "train.batch_size=4", "train.eval_batches=1", "task.name=chars", "task.block_size=16",
                 f"train.device={device}", "train.cuda_graph=false", f"run.dir={tmp_path}", *extra]
    return Trainer(load_config(None, overrides), run_dir=tmp_path / "run", log=False)


def reference_batches(trainer: Trainer, n: int, seed: int) -> list[Batch]:
    """What drawing each step's batch at its start gives: n task batches from the data generator's seed."""
    rng = torch.Generator().manual_seed(seed)
    return [trainer.task.batch("train", trainer.config.train.batch_size, rng) for _ in range(n)]


def seen_inputs(trainer: Trainer) -> list[torch.Tensor]:
    """The inputs of every forward of the model, on the CPU."""
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().cpu().clone()))
    return seen


@pytest.mark.parametrize("device", DEVICES)
def test_the_model_trains_on_the_batches_drawn_at_each_steps_start(tmp_path, device):
    t = tiny(tmp_path, device=device)
    seen = seen_inputs(t)
    for _ in range(5):
        t.train_step()
    assert t.prefetch.drawn is not None  # the sixth step's batch is drawn already
    expected = reference_batches(t, 5, t.config.seed + 1)
    assert len(seen) == 5 and all(torch.equal(a, b.inputs) for a, b in zip(seen, expected))


def test_losses_equal_those_of_the_same_batches_given_one_by_one(tmp_path):
    """Given batches are never prefetched: that trainer draws nothing ahead, and its losses must match bit for bit."""
    ahead = tiny(tmp_path / "a")
    given = tiny(tmp_path / "b")
    batches = reference_batches(given, 6, given.config.seed + 1)
    assert [ahead.train_step() for _ in batches] == [given.train_step(b) for b in batches]
    assert given.prefetch.drawn is None


def test_what_happens_between_steps_sees_the_generator_as_if_nothing_were_drawn_ahead(tmp_path):
    ahead = tiny(tmp_path / "a")
    plain = tiny(tmp_path / "b")
    plain.prefetch.draw = lambda *args: None  # draws each batch at its step's start, as before
    for t in (ahead, plain):
        t.train_step()
        t.train_step()
    assert torch.equal(ahead.state_dict()["data_rng"], reference_generator_state(ahead, 2))  # a checkpoint now resumes at batch 3
    log = {}

    def between(t: Trainer, name: str) -> None:
        t.reseed_data(7)  # a federated round
        log.setdefault(name, []).append(t.train_step())
        t.next_batch()  # a draw by hand
        log[name].append(t.train_step())
        t.train_step(reference_batches(t, 1, 99)[0])  # a given batch leaves the stream where it was
        log[name].append(t.train_step())
        t.set_data_source(lambda size, rng: t.task.batch("train", size, rng))  # another source, drawing from the generator
        log[name].append(t.train_step())
        t.set_data_source(None)
        log[name].append(t.train_step())
        t.data_rng.set_state(t.data_rng.get_state())  # the same state set again (a resume): the drawn batch still fits
        log[name].append(t.train_step())

    between(ahead, "ahead")
    between(plain, "plain")
    assert log["ahead"] == log["plain"]
    assert ahead.losses == plain.losses


def test_a_batch_that_fails_to_draw_fails_at_its_own_step_as_before(tmp_path):
    t = tiny(tmp_path)
    draws = []
    real = t.task.batch

    def third_fails(split, size, generator):
        draws.append(split)
        if len(draws) >= 3:  # from the third draw on
            raise ValueError("corpus file vanished")
        return real(split, size, generator)

    t.task.batch = third_fails
    t.train_step()
    t.train_step()  # drawing the third batch ahead fails here: this step still finishes and counts
    assert t.step == 2 and len(t.losses) == 2 and t.prefetch.drawn is None
    with pytest.raises(ValueError, match="vanished"):
        t.train_step()  # ... and the failure comes where it always came: when the third step draws its batch
    assert t.step == 2


def reference_generator_state(trainer: Trainer, draws: int) -> torch.Tensor:
    rng = torch.Generator().manual_seed(trainer.config.seed + 1)
    for _ in range(draws):
        trainer.task.batch("train", trainer.config.train.batch_size, rng)
    return rng.get_state()


def test_take_gives_the_drawn_batch_only_for_the_same_task_size_and_generator_state():
    task = build_task({"name": "clusters"})
    other = build_task({"name": "clusters"})
    for take_args, used in [((task, 8), True), ((other, 8), False), ((task, 4), False)]:
        rng = torch.Generator().manual_seed(3)
        prefetch = BatchPrefetch(torch.device("cpu"), torch.float32)
        prefetch.draw(task, 8, rng)
        assert torch.equal(rng.get_state(), torch.Generator().manual_seed(3).get_state())  # drawn with a copy
        batch = prefetch.take(*take_args, rng)
        assert (batch is not None) == used and prefetch.drawn is None
        if used:  # the batch a draw now gives, and the generator moved past it as that draw moves it
            again = torch.Generator().manual_seed(3)
            assert torch.equal(batch.inputs, task.batch("train", 8, again).inputs)
            assert torch.equal(rng.get_state(), again.get_state())
    rng = torch.Generator().manual_seed(3)
    prefetch.draw(task, 8, rng)
    torch.randint(10, (1,), generator=rng)  # the generator moved on since
    assert prefetch.take(task, 8, rng) is None


@pytest.mark.parametrize("device", DEVICES)
def test_a_tensor_that_is_two_fields_moves_once_and_values_arrive_intact(device):
    task = build_task({"name": "chars", "block_size": 8})
    batch = task.batch("train", 4, torch.Generator().manual_seed(0))
    assert batch.token_ids is batch.inputs and not batch.inputs.is_contiguous()  # windows of one tensor
    source = batch.pin_memory() if device == "cuda" else batch
    if device == "cuda":
        assert all(t.is_pinned() and t.is_contiguous() for t in (source.inputs, source.targets, source.labels))
    moved = source.to(device, torch.bfloat16, non_blocking=device == "cuda")
    assert moved.token_ids is moved.inputs and moved.inputs.dtype == torch.long  # integer inputs keep their dtype
    for ours, theirs in ((moved.inputs, batch.inputs), (moved.targets, batch.targets), (moved.labels, batch.labels)):
        assert ours.device.type == device and torch.equal(ours.cpu(), theirs)
    floats = Batch(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert floats.to(device, torch.bfloat16).inputs.dtype == torch.bfloat16  # float inputs take the model's dtype
    assert torch.equal(floats.to(device, torch.bfloat16).inputs.cpu(), floats.inputs.to(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host copy of stats on the GPU needs one (run on the H200: docs/benchmarks.md, v5)")
def test_stats_move_to_the_host_in_one_copy_with_their_values_and_dtypes():
    gpu = RoutingStats(load=torch.tensor([3.0, 0.0, 1.5]), kept=torch.tensor([2.0, 0.0, 1.0]), tokens=torch.tensor(4.0),
                       dropped_tokens=torch.tensor(1.0), max_logit=torch.tensor(0.1 + 2**-20))
    other = RoutingStats(load=torch.tensor([1.0, 1.0, 1.0]), kept=torch.ones(3), tokens=torch.tensor(2.0), dropped_tokens=torch.tensor(0.0))
    cpu = [gpu, other]
    moved = stats_on_host([RoutingStats(**{k: None if v is None else v.cuda() for k, v in vars(s).items()}) for s in cpu])
    for ours, theirs in zip(moved, cpu):
        for name, value in vars(theirs).items():
            got = getattr(ours, name)
            assert (got is None) == (value is None) and (value is None or (got.device.type == "cpu" and got.dtype == value.dtype and torch.equal(got, value)))


def test_stats_on_the_cpu_are_returned_as_they_are():
    stats = [RoutingStats(load=torch.ones(2), kept=torch.ones(2), tokens=torch.tensor(2.0), dropped_tokens=torch.tensor(0.0))]
    assert stats_on_host(stats) is stats


def test_union_of_intervals_and_the_gaps_between_them():
    # [0,2] + [1,3] overlap (busy 3); gap 3-5; [5,6] inside nothing; gap 6-10; [10,12]
    busy, gaps = union([(0, 2), (1, 3), (5, 6), (10, 12)])
    assert busy == 3 + 1 + 2 and gaps == [(3, 5), (6, 10)]
    assert union([(0, 5), (1, 2)]) == (5, [])  # contained


def test_host_ops_during_stalls_count_overlap_and_python_time():
    def event(name, start, end, parent=None, device="CPU"):
        from torch.autograd import DeviceType
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), cpu_parent=parent, device_type=getattr(DeviceType, device))

    events = [event("aten::item", 0, 30), event("aten::zeros", 40, 45), event("cudaGraphLaunch", 90, 200),
              event("aten::fill_", 41, 44, parent="aten::zeros"),  # a child: its parent counts
              event("kernel", 10, 20, device="CUDA")]  # not a host op
    by_op = host_ops_during(events, [(20, 100)])  # 80 us: item 10, zeros 5, graph launch 10, nothing 55
    assert by_op == {"aten::item": 10, "aten::zeros": 5, "cudaGraphLaunch": 10, "(no torch op: Python)": 55}


def test_host_times_reports_the_parts_of_steps_and_leaves_the_trainer_as_it_was(tmp_path):
    t = tiny(tmp_path)
    t.train_step()
    own, batch_to, optimizer_step = set(vars(t)), Batch.to, t.optimizer.step
    times = host_times(t, steps=3)
    assert t.step == 4 and set(vars(t)) == own and Batch.to is batch_to and t.optimizer.step == optimizer_step
    assert "step" not in vars(t.scheduler) and "train" not in vars(t.model) and "draw" not in vars(t.prefetch)
    parts = ("model.train()", "optimizer.zero_grad", "eager forward_backward", "optimizer.step", "prefetch.draw", "prefetch.take", "Batch.to")
    assert all(0 < times[p] < times["train_step (all)"] for p in parts)
    assert "next_batch (draw)" not in times  # every step took the batch drawn ahead
    assert 0 < times["read -> next forward (GPU has nothing queued)"] < times["train_step (all)"]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_benchs_tokens_per_second_count_a_steps_whole_batch(tmp_path, micro_batches):
    """A step trains on micro_batches x batch_size sequences (v11's two-micro-batch figures counted one micro-batch)."""
    t = tiny(tmp_path, f"train.micro_batches={micro_batches}")
    tokens_per_s, ms_per_step, _, _ = steady_tokens_per_s(t, warmup=1, steps=2)
    assert tokens_per_s * ms_per_step / 1e3 == pytest.approx(4 * micro_batches * 16)


def test_gc_pauses_add_the_collectors_time_by_generation():
    import gc

    seconds = {"Python GC, generation 2": 1.0}  # adds to what is there
    with gc_pauses(seconds):
        gc.collect(2)
        gc.collect(0)
    assert seconds["Python GC, generation 2"] > 1.0 and seconds["Python GC, generation 0"] > 0
    assert all(cb.__name__ != "collection" for cb in gc.callbacks)  # removed afterwards
