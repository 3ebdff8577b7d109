"""`routerlab federate`: registered on the routerlab CLI by routerlab/cli.py."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from routerlab.cli import console, user_errors

    @app.command()
    @user_errors
    def federate(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="federated YAML config; omitted: federated/digits.yaml"),
        set_: List[str] = typer.Option([], "--set", "-s", help="override a key: --set federated.strategy=fedavg --set federated.alpha=0.1"),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="output folder; default runs/fed-<task>-<strategy>-...-<time> (one per run)"),
        engine: str = typer.Option("simulation", "--engine", help="simulation (Flower's Ray runtime) or inprocess (same apps in this process, no Ray; for sweeps)"),
        verbose: bool = typer.Option(False, "--verbose", help="show Flower's and Ray's log"),
    ) -> None:
        """Federated training with Flower's simulation runtime (Ray): one ServerApp, num_clients ClientApps."""
        from rich.table import Table

        from federated.config import load_setup
        from federated.simulation import simulate
        from routerlab.errors import ConfigError

        if engine not in ("simulation", "inprocess"):
            raise ConfigError(f"unknown engine {engine!r}; valid engines: simulation, inprocess")
        setup = load_setup(config, set_)
        f = setup.fed
        console.print(f"[bold]federate[/] {setup.config.task.name}: {f.num_clients} clients, {f.rounds} rounds, strategy {f.strategy}, partition {f.partition}")
        with console.status("simulating (Ray starts first; the first round is slow)" if engine == "simulation" else "running in process"):
            if engine == "simulation":
                summary = simulate(setup, run_dir, verbose=verbose)
            else:
                from federated.inprocess import run_inprocess
                from federated.simulation import default_run_dir

                summary = run_inprocess(setup, run_dir or default_run_dir(setup))
        table = Table(title=f"after round {summary['rounds']}", header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in summary["final"].items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row("rounds_to_target", str(summary["rounds_to_target"]))
        table.add_row("wall_s", f"{summary['wall_s']:.1f}")
        table.add_row("bytes_per_round", f"{summary['bytes_per_round']:.0f} (dense: {summary['dense_bytes_per_round']:.0f})")
        if "startup_s" in summary:
            table.add_row("startup_s", f"{summary['startup_s']:.1f}")
        table.add_row("aggregate_s", f"{summary['aggregate_s']:.3f}")
        table.add_row("client_train_s (sum)", f"{summary['client_train_s']:.1f}")
        console.print(table)
        console.print(f"rounds table: {summary['run_dir']}/rounds.md   TensorBoard: tensorboard --logdir {summary['run_dir']}")
