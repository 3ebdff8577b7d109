"""`routerlab study` and `routerlab study-report` (registered on the main app by routerlab/cli.py)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from routerlab.errors import ConfigError

STORAGE_ENV = "ROUTERLAB_STUDY_STORAGE"  # how a storage URL (and its password) reaches worker processes


def register(app: typer.Typer) -> None:
    from routerlab.cli import console, fail, user_errors

    @app.command()
    @user_errors
    def study(
        name: str = typer.Argument(..., help="a study in studies/defs (for example clusters_softmax_topk) or a path to a study .yaml"),
        storage: Optional[str] = typer.Option(None, "--storage", envvar=STORAGE_ENV, show_envvar=True, help="sqlite:///f.db | journal:f.log | postgresql://user:pw@host/db (give a URL with a password through the environment variable, not the command line); default: sqlite file under run.dir/studies/NAME"),
        n_trials: Optional[int] = typer.Option(None, "--n-trials", min=0, help="finished trials the study should hold (default: the definition's n_trials); reruns continue to it"),
        workers: int = typer.Option(1, "--workers", min=1, help="worker processes on this machine (on CUDA spread over its GPUs)"),
        per_gpu: Optional[int] = typer.Option(None, "--per-gpu", min=1, help="CUDA studies: workers = GPUs x this, each on its GPU"),
        timeout: Optional[float] = typer.Option(None, "--timeout", min=0, help="stop starting trials after this many seconds"),
        set_: List[str] = typer.Option([], "--set", "-s", help="override the study's base config: --set train.steps=50"),
        heartbeat: int = typer.Option(10, "--heartbeat", min=1, help="seconds between heartbeats (RDB storages); a trial silent for 3x this is failed and retried"),
        worker_index: int = typer.Option(0, "--worker-index", min=0, help="offsets the sampler seed; give each machine's worker its own"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Run (or continue) an Optuna study; every trial trains with the one trainer and logs to TensorBoard."""
        from studies.runner import count_finished, fail_orphaned_trials, open_study, run_study, run_worker, worker_devices
        from studies.space import load_study
        from studies.storage import default_url, redact

        spec = load_study(name, set_)
        url = storage or default_url(spec.run_dir)
        target = spec.n_trials if n_trials is None else n_trials
        device = str(spec.base.get("train", {}).get("device", "cpu"))
        cuda_count = 0
        if device.startswith("cuda"):
            import torch

            cuda_count = torch.cuda.device_count()
            if per_gpu is not None:
                workers = max(1, cuda_count) * per_gpu
        if workers > 1:
            with_storage = open_study(spec, url, heartbeat)  # checks the storage and creates the study once
            if count_finished(with_storage) >= target:
                workers = 1  # nothing left to run: no processes to start
        if workers > 1:
            args = [name, "--n-trials", str(target), "--heartbeat", str(heartbeat)]  # the storage URL goes by environment
            args += [f"--set={s}" for s in set_] + (["--timeout", str(timeout)] if timeout is not None else [])
            code, worker_ids = run_study(args, workers, url, worker_devices(device, workers, cuda_count), worker_index)
            study_obj = open_study(spec, url, heartbeat)
            lost = fail_orphaned_trials(study_obj, worker_ids)
            if code or lost:
                what = f"trials {', '.join(map(str, lost))} were left RUNNING by a dead worker and are now FAIL (queued again)" if lost else "a worker failed"
                fail(f"study {spec.name}: {what}; rerun the same command to continue", 1)
        else:
            study_obj = run_worker(spec, url, target, timeout, heartbeat, worker_index, progress and sys.stderr.isatty())
        states = {}
        for t in study_obj.get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        console.print(f"study {spec.name}: {count_finished(study_obj)} finished of {target} ({', '.join(f'{k.lower()} {v}' for k, v in sorted(states.items()))})")
        console.print(f"storage: {redact(url)}   TensorBoard: tensorboard --logdir {spec.run_dir}   report: routerlab study-report {name}" + (f" --storage {redact(url)}" if storage else ""))

    @app.command("study-report")
    @user_errors
    def study_report(
        name: str = typer.Argument(..., help="the study's name or .yaml path, as given to `routerlab study`"),
        storage: Optional[str] = typer.Option(None, "--storage", help="as given to `routerlab study`"),
        out: Optional[Path] = typer.Option(None, "--out", help="output folder (default results/studies/NAME)"),
        set_: List[str] = typer.Option([], "--set", "-s", help="the same --set as the study (run.dir locates the default storage)"),
    ) -> None:
        """Best config (ready for `routerlab train`), trials and Pareto front (CSV, PNG), parameter importances."""
        import optuna

        from studies.report import write_report
        from studies.space import load_study
        from studies.storage import default_url, open_storage

        spec = load_study(name, set_)
        url = storage or default_url(spec.run_dir)
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise ConfigError(f"no study storage at {url}; run `routerlab study {name}` first or pass --storage")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study_obj = optuna.load_study(study_name=spec.name, storage=open_storage(url))
        except KeyError:
            raise ConfigError(f"storage {url!r} holds no study named {spec.name!r}") from None
        files = write_report(spec, study_obj, out or Path("results") / "studies" / spec.name)
        for key, path in files.items():
            console.print(f"{key:12s} {path}")
