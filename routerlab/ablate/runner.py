"""Runs an ablation's cells in parallel worker processes, each a normal `Trainer` run.

Every finished cell writes `<out>/cells/<cell id>.json` atomically, and only then counts as done; a rerun
skips the cells whose file exists. A killed ablation so loses at most its in-flight cells, whose
half-written TensorBoard folders are cleared when they run again.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

from routerlab.ablate.spec import Cell, Plan
from routerlab.checkpoint import atomic_write_text

WORKER_DIED = "a worker process died (killed, or out of memory) while this cell ran; rerun the same command to continue"
CURVE_POINTS = 100  # training-loss points kept per cell for the curve plot


def cell_path(out: Path, cell_id: str) -> Path:
    return out / "cells" / f"{cell_id}.json"


def run_cell(cell_id: str, config_data: dict[str, Any], labels: dict[str, str], out: str, device: str | None = None) -> dict[str, Any]:
    """Train one cell and write its result file. Runs in a worker process (or in-process with one worker)."""
    from routerlab.config import make_config
    from routerlab.train import Trainer

    if device is None:
        device = _WORKER_DEVICE
    if device is not None:
        config_data = {**config_data, "train": {**config_data["train"], "device": device}}
    config = make_config(config_data)
    run_dir = Path(config.run.dir) / cell_id
    if run_dir.exists():  # left by a killed earlier attempt: its events would mix with this run's
        shutil.rmtree(run_dir)
    evals: list[tuple[int, float]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer = Trainer(config, run_dir=run_dir, progress=False)
    try:
        metrics = trainer.fit(on_eval=lambda step, m: evals.append((step, m["loss"])))
    finally:
        trainer.close()
    every = max(1, math.ceil(len(trainer.losses) / CURVE_POINTS))
    losses = trainer.losses
    curve = [(min(i + every, len(losses)), sum(losses[i : i + every]) / len(losses[i : i + every])) for i in range(0, len(losses), every)]
    result = {
        "id": cell_id,
        "labels": labels,
        "seed": config.seed,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "loads": trainer.last_loads,
        "train_curve": curve,
        "eval_curve": evals,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,  # this process's CPU time: the honest cost on a shared machine
        "run_dir": str(run_dir),
    }
    atomic_write_text(cell_path(Path(out), cell_id), json.dumps(result, allow_nan=True))
    return result


_WORKER_DEVICE: str | None = None


def _init_worker(threads: int, devices, parent: int | None = None) -> None:
    global _WORKER_DEVICE
    from routerlab.procs import die_with_parent

    die_with_parent(parent)  # a kill -9 of `routerlab ablate` must not leave workers training on
    import torch

    torch.set_num_threads(threads)
    if devices is not None:
        _WORKER_DEVICE = devices.get()  # one device per worker


def default_workers(plan: Plan) -> int:
    uses_cuda = any(c.config.train.device.startswith("cuda") for c in plan.cells)
    if uses_cuda:
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, os.cpu_count() or 1)


def load_done(out: Path, plan: Plan) -> dict[str, dict[str, Any]]:
    done = {}
    for cell in plan.cells:
        path = cell_path(out, cell.id)
        if path.is_file():
            try:
                done[cell.id] = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                path.unlink()  # cannot happen with atomic writes, but never trust a broken file as done
    return done


def run_plan(
    plan: Plan,
    out: str | Path,
    workers: int | None = None,
    on_update: Callable[[int, int, int], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run every cell not already done. Returns ({cell id: result}, {cell id: error}) for all planned cells.

    on_update(done, running, left) is called whenever a cell starts or ends.
    """
    out = Path(out)
    done = load_done(out, plan)
    todo = [c for c in plan.cells if c.id not in done]
    errors: dict[str, str] = {}
    workers = min(workers or default_workers(plan), max(1, len(todo)))
    update = on_update or (lambda *a: None)
    update(len(done), 0, len(todo))
    if not todo:
        return done, errors
    payload = lambda c: (c.id, c.config.model_dump(mode="json"), c.labels, str(out))  # noqa: E731
    uses_cuda = any(c.config.train.device.startswith("cuda") for c in todo)
    if workers == 1 and not uses_cuda:
        for i, cell in enumerate(todo):
            update(len(done), 1, len(todo) - i - 1)
            try:
                done[cell.id] = run_cell(*payload(cell))
            except Exception as err:  # one failing cell must not stop the others
                errors[cell.id] = f"{type(err).__name__}: {err}"
        update(len(done), 0, 0)
        return done, errors

    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch has started threads is fragile
    devices = None
    if uses_cuda:
        import torch

        devices = ctx.Queue()
        for i in range(workers):
            devices.put(f"cuda:{i % max(1, torch.cuda.device_count())}")
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = list(todo)
    running: dict[Future, Cell] = {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, devices, os.getpid())) as pool:
        try:
            while pending or running:
                while pending and len(running) < workers:  # submit only what runs now, so 'running' is true
                    cell = pending.pop(0)
                    running[pool.submit(run_cell, *payload(cell))] = cell
                update(len(done), len(running), len(pending))
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    cell = running.pop(future)
                    try:
                        done[cell.id] = future.result()
                    except BrokenProcessPool:
                        errors[cell.id] = WORKER_DIED
                    except Exception as err:
                        errors[cell.id] = f"{type(err).__name__}: {err}"
                if any(e == WORKER_DIED for e in errors.values()):  # the pool is unusable: stop, report, exit non-zero
                    for cell in list(running.values()) + pending:
                        errors.setdefault(cell.id, "not run: " + WORKER_DIED)
                    running.clear()
                    pending.clear()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()  # in-flight cells are lost by design; their json never appeared
            raise
    update(len(done), 0, 0)
    return done, errors
