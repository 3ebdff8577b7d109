"""Run a study: every trial trains through routerlab's one Trainer and is a TensorBoard run.

    run_worker(spec, storage_url)          # one process: trials until the study holds n_trials finished ones
    run_study(args, workers)               # starts `workers` such processes (same command) and waits

Finished = COMPLETE or PRUNED. `n_trials` is the study's total, so a rerun (same command) continues a
killed or finished study up to it; concurrent workers may overshoot by at most workers - 1 trials.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from routerlab.config import make_config
from routerlab.errors import ConfigError, RunStopped
from studies.space import StudySpec
from studies.storage import default_url, open_storage

FINISHED = ("COMPLETE", "PRUNED")
RECORDED_METRICS = ("loss", "accuracy", "perplexity", "load_cv", "max_vio", "dropped_frac", "dead_experts",
                    "specialization", "tokens_per_s", "params_active", "train_loss", "step")


def make_sampler(spec: StudySpec, worker_index: int):
    import optuna

    seed = spec.sampler.seed + worker_index  # workers sharing a seed would propose the same first points
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.n_trials // 3)))


def make_pruner(spec: StudySpec):
    import optuna

    p = spec.pruner
    if p is None or p.type == "none":
        return optuna.pruners.NopPruner()
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    train = spec.base["train"]  # the resource is the training step; reports come every eval_every steps
    min_resource = min(p.min_resource or train["eval_every"], train["steps"])
    return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=train["steps"], reduction_factor=p.reduction_factor)


def open_study(spec: StudySpec, storage_url: str | None = None, heartbeat: int = 10, worker_index: int = 0):
    """Create the study or load it (load_if_exists); enqueue the baseline and fixed trials once."""
    import optuna

    url = storage_url or default_url(spec.run_dir)
    storage = open_storage(url, heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(5):  # workers starting together race to create the tables and the study
        try:
            study = optuna.create_study(
                study_name=spec.name, storage=storage, directions=spec.directions, sampler=make_sampler(spec, worker_index),
                pruner=make_pruner(spec), load_if_exists=True,
            )
            break
        except ValueError as err:  # same name, other directions
            raise ConfigError(f"study {spec.name!r} in {url!r} exists with other objectives: {err}") from None
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    if study.directions != [optuna.study.StudyDirection[d.upper()] for d in spec.directions]:
        raise ConfigError(f"study {spec.name!r} in {url!r} exists with directions {study.directions}; this definition wants {spec.directions}; use another name or storage")
    study.set_metric_names([o.metric for o in spec.objectives])
    fixed = ([spec.baseline_params()] if spec.baseline else []) + spec.enqueue
    for params in fixed:
        study.enqueue_trial(params, user_attrs={"fixed": True}, skip_if_exists=True)
    return study


class Objective:
    """Sample params, build the config, train with Trainer, report evaluations for pruning."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec

    def __call__(self, trial) -> float | list[float]:
        import optuna

        from routerlab.train import Trainer

        spec = self.spec
        values = spec.sample(trial)
        data = spec.config_data(values)
        data["run"] = {**data.get("run", {}), "checkpoint": False, "name": f"{spec.name}-trial-{trial.number}"}
        config = make_config(data)  # a ConfigError fails this trial (optimize(catch=...)), not the study
        run_dir = spec.run_dir / f"trial-{trial.number}"
        trial.set_user_attr("config", config.model_dump(mode="json"))
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        metric = spec.objectives[0].metric

        def report(step: int, metrics: dict[str, float]) -> None:
            if spec.multi_objective:
                return  # Optuna prunes single-objective studies only
            trial.report(metrics[metric], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric}={metrics[metric]:.4g} at step {step}")

        trainer = Trainer(config, run_dir=run_dir, progress=False)
        try:
            try:
                result = trainer.fit(on_eval=report)
            except optuna.TrialPruned:
                trainer.log_hparams(trainer.last_eval)  # pruned runs keep their hparams too
                raise
        finally:
            trainer.close()
        for key in RECORDED_METRICS:
            if key in result:
                trial.set_user_attr(key, float(result[key]))
        missing = [o.metric for o in spec.objectives if o.metric not in result]
        if missing:
            raise ConfigError(f"metric {missing} is not reported for task {config.task.name!r}")
        out = [float(result[o.metric]) for o in spec.objectives]
        return out if spec.multi_objective else out[0]


class StudyBoard:
    """Study-level TensorBoard writer (runs/studies/NAME/study): best value(s) over trial numbers."""

    def __init__(self, spec: StudySpec) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.spec = spec
        self.writer = SummaryWriter(str(spec.run_dir / "study"))

    def __call__(self, study, trial) -> None:
        if trial.state.name != "COMPLETE":
            return
        names = [o.metric for o in self.spec.objectives]
        for name, value in zip(names, trial.values):
            self.writer.add_scalar(f"trial/{name}", value, trial.number)
        if self.spec.multi_objective:
            self.writer.add_scalar("study/pareto_size", len(study.best_trials), trial.number)
            for i, (name, direction) in enumerate(zip(names, self.spec.directions)):
                done = [t.values[i] for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
                self.writer.add_scalar(f"study/best_{name}", min(done) if direction == "minimize" else max(done), trial.number)
        else:
            self.writer.add_scalar(f"study/best_{names[0]}", study.best_value, trial.number)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def count_finished(study) -> int:
    return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))


def run_worker(spec: StudySpec, storage_url: str | None = None, n_trials: int | None = None, timeout: float | None = None,
               heartbeat: int = 10, worker_index: int = 0, progress: bool = False):
    """Run trials in this process until the study holds n_trials finished trials (or timeout)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    target = spec.n_trials if n_trials is None else n_trials
    study = open_study(spec, storage_url, heartbeat, worker_index)
    remaining = target - count_finished(study)
    if remaining <= 0:
        return study
    board = StudyBoard(spec)
    callbacks = [MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED)), board]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress) as bar:
        job = bar.add_task(f"study {spec.name}", total=target, completed=target - remaining)
        callbacks.append(lambda s, t: bar.update(job, completed=count_finished(s)))
        try:
            # n_trials bounds this worker (failing trials cannot loop forever); MaxTrialsCallback the study
            study.optimize(Objective(spec), n_trials=remaining, timeout=timeout, callbacks=callbacks,
                           catch=(ConfigError, RunStopped), gc_after_trial=True)
        finally:
            board.close()
    return study


def worker_devices(device: str, workers: int, cuda_count: int) -> list[str | None]:
    """The device of each worker: on CUDA spread over the GPUs as ablation cells are (cuda:0, cuda:1, cuda:0, ...);
    None (the config's own device) otherwise."""
    if not device.startswith("cuda") or cuda_count < 1:
        return [None] * workers
    from routerlab.ablate.runner import device_slots

    slots = device_slots(cuda_count, -(-workers // cuda_count))
    return slots[:workers]


def run_study(args: list[str], workers: int, storage_url: str, devices: list[str | None] | None = None,
              machine_index: int = 0) -> tuple[int, set[str]]:
    """Start `workers` worker processes (the same command with --workers 1) and wait for them.

    Open the study first (open_study), so the workers do not race to create its tables. devices[i] (if not
    None) is worker i's train.device. Worker i's index (its sampler seed offset) is machine_index x 1000 + i,
    so the workers of machines started with distinct --worker-index never share a seed. The storage URL (it
    may hold a password) goes through the environment, never the command line that `ps` shows. The workers
    die with this process. Returns (0 only if every worker exited 0, else 1; the workers' "host:pid").
    """
    from routerlab.procs import set_parent_death_signal
    from studies.cli import STORAGE_ENV

    env = {**os.environ, STORAGE_ENV: storage_url, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "routerlab", "study", *args, "--workers", "1", "--worker-index", str(machine_index * 1000 + i), "--no-progress"]
        device = (devices or [None] * workers)[i]
        if device is not None:
            cmd.append(f"--set=train.device={device}")
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=set_parent_death_signal))
    codes = [p.wait() for p in procs]
    return (0 if all(c == 0 for c in codes) else 1), {f"{socket.gethostname()}:{p.pid}" for p in procs}


def fail_orphaned_trials(study, workers: set[str]) -> list[int]:
    """Mark FAIL the trials still RUNNING whose worker ("host:pid") is one of `workers`, all exited (killed
    mid-trial), and queue their parameters again; returns their numbers. Other machines' trials are left alone."""
    from optuna.trial import TrialState

    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") not in workers:
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        lost.append(t.number)
    return lost

