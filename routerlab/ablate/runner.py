"""Runs an ablation's cells in parallel worker processes, each a normal `Trainer` run.

Every finished cell writes `<out>/cells/<cell id>.json` atomically, and only then counts as done; a rerun
skips the cells whose file exists. A killed ablation so loses at most its in-flight cells, whose
half-written TensorBoard folders are cleared when they run again. A cell that fails (out of memory, a
non-finite loss, any exception) is recorded with its reason and the grid goes on; a rerun retries it.

On CUDA every GPU of the machine takes `per_gpu` cells at once: the parent hands each cell the least
loaded GPU that has a free slot when it starts (`DevicePool`). `routerlab.ablate.ray_runner` runs the
same cells as Ray tasks on a cluster.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterable

from routerlab.ablate.spec import Cell, Plan
from routerlab.checkpoint import atomic_write_text
from routerlab.procs import init_worker  # workers die with this process: a kill -9 leaves none behind

WORKER_DIED = "a worker process died (killed, or out of memory) while this cell ran; rerun the same command to continue"
CURVE_POINTS = 100  # training-loss points kept per cell for the curve plot


class CellFailed(RuntimeError):
    """A cell that trained but produced no usable result (a non-finite loss)."""


def cell_path(out: Path, cell_id: str) -> Path:
    return out / "cells" / f"{cell_id}.json"


def train_cell(cell_id: str, config_data: dict[str, Any], labels: dict[str, str], device: str | None = None,
               data_checksum: str = "") -> dict[str, Any]:
    """Train one cell and return its result (writes only its TensorBoard folder)."""
    from routerlab.ablate.measure import has_split, heldout, routing_as_trained
    from routerlab.analysis.regret import probe_regret
    from routerlab.config import make_config
    from routerlab.train import Trainer

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
        if not math.isfinite(metrics["loss"]):  # (a non-finite training step already stopped the run, unless skipped)
            bad = next((i + 1 for i, v in enumerate(trainer.losses) if not math.isfinite(v)), None)
            raise CellFailed("non-finite evaluation loss" + (f" (training loss first NaN/inf at step {bad})" if bad else ""))
        metrics.update(routing_as_trained(trainer))
        metrics.update(probe_regret(trainer))  # routerlab.analysis: regret / MRR against the single-expert oracle
        if has_split(trainer.task, "test"):
            metrics.update(heldout(trainer, "test"))
    finally:
        trainer.close()
    every = max(1, math.ceil(len(trainer.losses) / CURVE_POINTS))
    losses = trainer.losses
    curve = [(min(i + every, len(losses)), sum(losses[i : i + every]) / len(losses[i : i + every])) for i in range(0, len(losses), every)]
    return {
        "id": cell_id,
        "labels": labels,
        "seed": config.seed,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "loads": trainer.last_loads,
        "train_curve": curve,
        "eval_curve": evals,
        "train_tokens": trainer.train_tokens,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,  # this process's CPU time: the honest cost on a shared machine
        "run_dir": str(run_dir),
        "device": config.train.device,
        "device_name": _device_name(trainer.device),
        "host": socket.gethostname(),
        "data_checksum": data_checksum,
    }


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def write_result(out: Path, result: dict[str, Any]) -> None:
    atomic_write_text(cell_path(out, result["id"]), json.dumps(result, allow_nan=True))


def run_cell(cell_id: str, config_data: dict[str, Any], labels: dict[str, str], out: str, device: str | None = None,
             data_checksum: str = "") -> dict[str, Any]:
    """Train one cell and write its result file. Runs in a worker process (or in-process with one worker)."""
    result = train_cell(cell_id, config_data, labels, device, data_checksum)
    write_result(Path(out), result)
    return result


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def device_slots(cuda_count: int, per_gpu: int = 1) -> list[str]:
    """Every GPU once per cell it may hold at a time, spread first: (2, 2) -> cuda:0, cuda:1, cuda:0, cuda:1."""
    return [f"cuda:{i}" for _ in range(per_gpu) for i in range(cuda_count)]


class DevicePool:
    """Free cell slots per device; a starting cell takes the least loaded device with a free slot."""

    def __init__(self, devices: Iterable[str], per_device: int = 1) -> None:
        self.capacity = {d: per_device for d in dict.fromkeys(devices)}
        self.busy = {d: 0 for d in self.capacity}

    @property
    def slots(self) -> int:
        return sum(self.capacity.values())

    def acquire(self) -> str | None:
        free = [d for d in self.capacity if self.busy[d] < self.capacity[d]]
        if not free:
            return None
        device = min(free, key=lambda d: self.busy[d])  # ties: the first listed
        self.busy[device] += 1
        return device

    def release(self, device: str) -> None:
        self.busy[device] -= 1


def schedule(
    cells: list[Cell],
    submit: Callable[[Cell, str | None], Future],
    slots: int,
    pool: DevicePool | None = None,
    on_done: Callable[[Cell, Any], None] = lambda cell, result: None,
    on_error: Callable[[Cell, BaseException], None] = lambda cell, err: None,
    on_update: Callable[[int, int], None] = lambda running, left: None,
) -> None:
    """Start cells while a slot (and, with a pool, a device slot) is free; hand every end to on_done/on_error."""
    pending = list(cells)
    running: dict[Future, tuple[Cell, str | None]] = {}
    while pending or running:
        while pending and len(running) < slots:  # submit only what runs now, so 'running' is true
            device = pool.acquire() if pool is not None else None
            if pool is not None and device is None:
                break
            cell = pending.pop(0)
            running[submit(cell, device)] = (cell, device)
        on_update(len(running), len(pending))
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            cell, device = running.pop(future)
            if pool is not None and device is not None:
                pool.release(device)
            try:
                result = future.result()
            except Exception as err:  # one failing cell must not stop the others
                on_error(cell, err)
            else:
                on_done(cell, result)


def default_workers(plan: Plan, per_gpu: int = 1) -> int:
    uses_cuda = any(c.config.train.device.startswith("cuda") for c in plan.cells)
    if uses_cuda:
        import torch

        return max(1, torch.cuda.device_count()) * per_gpu
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


def describe_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def payload(cell: Cell, out: Path) -> tuple:
    return (cell.id, cell.config.model_dump(mode="json"), cell.labels, str(out))


def run_plan(
    plan: Plan,
    out: str | Path,
    workers: int | None = None,
    on_update: Callable[[int, int, int], None] | None = None,
    per_gpu: int = 1,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run every cell not already done. Returns ({cell id: result}, {cell id: error}) for all planned cells.

    on_update(done, running, left) is called whenever a cell starts or ends. On CUDA, each GPU holds up to
    `per_gpu` cells at once (default workers: GPUs x per_gpu).
    """
    out = Path(out)
    done = load_done(out, plan)
    todo = [c for c in plan.cells if c.id not in done]
    errors: dict[str, str] = {}
    workers = min(workers or default_workers(plan, per_gpu), max(1, len(todo)))
    update = on_update or (lambda *a: None)
    update(len(done), 0, len(todo))
    if not todo:
        return done, errors
    uses_cuda = any(c.config.train.device.startswith("cuda") for c in todo)
    if workers == 1 and not uses_cuda:
        for i, cell in enumerate(todo):
            update(len(done), 1, len(todo) - i - 1)
            try:
                done[cell.id] = run_cell(*payload(cell, out), None, cell.data_checksum)
            except Exception as err:  # one failing cell must not stop the others
                errors[cell.id] = describe_error(err)
        update(len(done), 0, 0)
        return done, errors

    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch has started threads is fragile
    device_pool = None
    if uses_cuda:
        import torch

        device_pool = DevicePool([f"cuda:{i}" for i in range(max(1, torch.cuda.device_count()))], per_gpu)
        workers = min(workers, device_pool.slots)
    threads = max(1, (os.cpu_count() or 1) // workers)

    def on_done(cell: Cell, result: dict[str, Any]) -> None:
        done[cell.id] = result

    def on_error(cell: Cell, err: BaseException) -> None:
        errors[cell.id] = WORKER_DIED if isinstance(err, BrokenProcessPool) else describe_error(err)

    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                             initargs=(os.getpid(), "routerlab.ablate.runner:_init_worker", threads)) as pool:
        try:
            schedule(
                todo, lambda cell, device: pool.submit(run_cell, *payload(cell, out), device, cell.data_checksum), workers,
                device_pool, on_done, on_error, lambda running, left: update(len(done), running, left),
            )
        except BrokenProcessPool:  # a worker died (kill, out of memory): report every unfinished cell, exit non-zero
            for cell in todo:
                if cell.id not in done and cell.id not in errors:
                    errors[cell.id] = "not run: " + WORKER_DIED
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()  # in-flight cells are lost by design; their json never appeared
            raise
    update(len(done), 0, 0)
    return done, errors
