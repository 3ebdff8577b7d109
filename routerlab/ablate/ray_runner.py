"""`routerlab ablate FILE --ray ADDRESS`: every unfinished cell as one Ray task on an existing cluster.

A task asks for one GPU when its cell trains on CUDA (Ray sets CUDA_VISIBLE_DEVICES, so it trains on
cuda:0 of what it sees), else for `cpus` CPUs. It returns its result; the driver (where the command runs)
writes `<out>/cells/<id>.json`, so results gather there and a rerun skips them as with local workers.

Ray's own task retries are off: the driver re-submits a cell whose worker or node died (up to
MAX_ATTEMPTS) and records the attempts in the result, so a cell lost with a node runs again, and a cell
is written once, by the driver, whatever ran twice. A cell that raises (out of memory, NaN) is recorded as
failed with its reason and is not retried.

Every node needs routerlab importable (the same checkout and Python environment) and, for the TensorBoard
folders it writes, the run folder path; a relative `run.dir` resolves against the driver's folder.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable

from routerlab.ablate.runner import describe_error, load_done, train_cell, write_result
from routerlab.ablate.spec import Plan

MAX_ATTEMPTS = 3


def _ray_cell(cell_id: str, config_data: dict[str, Any], labels: dict[str, str], device: str | None, data_checksum: str) -> dict[str, Any]:
    import ray

    result = train_cell(cell_id, config_data, labels, device, data_checksum)
    result["node"] = ray.get_runtime_context().get_node_id()
    result["host"] = socket.gethostname()
    return result


def run_plan_ray(
    plan: Plan,
    out: str | Path,
    address: str,
    on_update: Callable[[int, int, int], None] | None = None,
    cpus: float = 1.0,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run every cell not already done as a Ray task; returns ({cell id: result}, {cell id: error})."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    out = Path(out)
    done = load_done(out, plan)
    todo = [c for c in plan.cells if c.id not in done]
    errors: dict[str, str] = {}
    update = on_update or (lambda *a: None)
    update(len(done), 0, len(todo))
    if not todo:
        return done, errors
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    remote = ray.remote(max_retries=0)(_ray_cell)
    attempts: dict[str, int] = {}

    def submit(cell):
        data = cell.config.model_dump(mode="json")
        data["run"]["dir"] = str(Path(data["run"]["dir"]).absolute())  # the same folder on every node
        cuda = cell.config.train.device.startswith("cuda")
        attempts[cell.id] = attempts.get(cell.id, 0) + 1
        options = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": cpus}
        return remote.options(**options).remote(cell.id, data, cell.labels, "cuda:0" if cuda else None, cell.data_checksum)

    running = {submit(cell): cell for cell in todo}
    update(len(done), len(running), 0)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            cell = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as err:  # the cell itself raised: recorded with its reason, not retried
                errors[cell.id] = describe_error(getattr(err, "cause", None) or err)
            except RayError as err:  # its worker or node died: run it again elsewhere
                if attempts[cell.id] < MAX_ATTEMPTS:
                    running[submit(cell)] = cell
                else:
                    errors[cell.id] = f"lost {MAX_ATTEMPTS} times with its worker or node: {describe_error(err)}"
            else:
                result["attempts"] = attempts[cell.id]
                write_result(out, result)
                done[cell.id] = result
        update(len(done), len(running), 0)
    return done, errors
