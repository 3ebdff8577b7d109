"""`routerlab trace RUN` and `routerlab analyze RUN` (registered by routerlab/cli.py)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def parse_ranks(text: str) -> tuple[int, ...]:
    from routerlab.errors import ConfigError

    try:
        ranks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--ranks expects comma-separated rank counts such as 2,4,8, got {text!r}") from None
    if not ranks or min(ranks) < 2:
        raise ConfigError(f"--ranks expects rank counts >= 2 such as 2,4,8, got {text!r}")
    return ranks


def register(app: typer.Typer) -> None:
    from routerlab.cli import console, user_errors

    @app.command()
    @user_errors
    def trace(
        run: Path = typer.Argument(..., help="run folder (holds checkpoint.pt)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="trace file; default <run>/traces/step<N>.npz"),
        probe: int = typer.Option(1, "--probe", help="probe batches (validation batches drawn with the evaluation seed)"),
        logits: bool = typer.Option(True, "--logits/--no-logits", help="also record the router logits [N, E]"),
    ) -> None:
        """Record the routing of a run's checkpoint on the fixed probe set (.npz: experts, weights, logits per layer)."""
        from routerlab.analysis.report import trace_run

        path, t = trace_run(run, probe=probe, logits=logits, out=out)
        console.print(f"trace of step {t.meta['step']}: {t.num_tokens} tokens x {len(t.layers)} MoE layer(s) -> {path}")

    @app.command()
    @user_errors
    def analyze(
        run: Path = typer.Argument(..., help="run folder (holds checkpoint.pt)"),
        probe: int = typer.Option(1, "--probe", help="probe batches"),
        against: List[Path] = typer.Option([], "--against", help="another trace of the same probe set to measure overlap with (repeatable)"),
        ranks: str = typer.Option("2,4,8", "--ranks", help="rank counts for the placement simulator"),
        tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard", help="also add the figures and scalars to the run's TensorBoard"),
    ) -> None:
        """Regret against the oracle, drift, margin, co-activation, domain x expert and placement of a finished run."""
        from rich.table import Table

        from routerlab.analysis.report import analyze_run

        summary = analyze_run(run, probe=probe, against=[str(a) for a in against], ranks=parse_ranks(ranks), tensorboard=tensorboard)
        table = Table(title=f"routing analysis: {summary['router']} on {summary['task']}, step {summary['step']}", header_style="bold")
        keys = [k for k in summary["layers"][0] if k != "layer"]
        table.add_column("layer", justify="right")
        for k in keys:
            table.add_column(k.replace("_", " "), justify="right")
        for row in summary["layers"]:
            table.add_row(str(row["layer"]), *[f"{row[k]:.3f}" for k in keys])
        console.print(table)
        console.print(f"figures, summary.md and oracle.npz in {Path(run) / 'analysis'}")
