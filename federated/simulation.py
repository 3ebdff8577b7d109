"""`routerlab federate`: the federation in Flower's simulation runtime (Ray), from Python.

Flower's telemetry, update check and dependency installation are switched off here (the variables
are only set when the caller has not set them).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from federated.config import FederatedSetup

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def run_dir_for(setup: FederatedSetup) -> Path:
    c, f = setup.config, setup.fed
    name = c.run.name or f"fed-{c.task.name}-{f.strategy}-{f.partition}{f.alpha if f.partition == 'dirichlet' else ''}-n{f.num_clients}-s{c.seed}-{c.fingerprint()}"
    return Path(c.run.dir) / name


def default_run_dir(setup: FederatedSetup) -> Path:
    """runs/fed-...-<time>: one folder per run under the caller's directory, so a run never overwrites the last."""
    base = run_dir_for(setup)
    return base.with_name(f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def simulate(setup: FederatedSetup, run_dir: str | Path | None = None, verbose: bool = False) -> dict:
    """Run the federation with `num_clients` simulated SuperNodes; return summary.json's content
    plus `wall_s` (whole call) and `startup_s` (call start to the first round: Ray, actors, global model)."""
    offline_env()
    import logging

    from flwr.simulation import run_simulation

    from federated.client_app import app as client_app
    from federated.server_app import make_server_app

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(setup)
    run_dir = run_dir.resolve()
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    started = time.time()
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": setup.fed.sim_cpus, "num_gpus": 0, "include_dashboard": False, "logging_level": "error", "log_to_driver": verbose},
    }
    run_simulation(server_app=make_server_app(setup, run_dir), client_app=client_app, num_supernodes=setup.fed.num_clients + setup.fed.unseen_clients,
                   backend_config=backend_config, verbose_logging=verbose)
    if not summary_path.is_file():
        failed = run_dir / "failed.json"
        reason = json.loads(failed.read_text())["error"] if failed.is_file() else "no summary.json"
        raise RuntimeError(f"the federation failed: {reason}; run with --verbose to see Flower's log")
    summary = json.loads(summary_path.read_text())
    summary["wall_s"] = time.time() - started
    summary["startup_s"] = summary["first_round_at"] - started
    summary["run_dir"] = str(run_dir)
    return summary
