"""`routerlab ablate FILE [--workers N | --per-gpu N | --ray ADDRESS] [--out results/NAME] [--runs DIR]`."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from routerlab.cli import console, user_errors

    @app.command()
    @user_errors
    def ablate(
        file: Path = typer.Argument(..., help="ablation YAML (see docs/ablations.md)"),
        workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="parallel runs; default one per CPU core (one per GPU on CUDA)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="results folder; default results/<ablation name>"),
        runs: Optional[Path] = typer.Option(None, "--runs", help="TensorBoard folder; default <base run.dir>/<name of --out>"),
        dry_run: bool = typer.Option(False, "--dry-run", help="validate and list the cells, run nothing"),
        set_: List[str] = typer.Option([], "--set", "-s", help="override a key of the base config: --set train.steps=50"),
        per_gpu: int = typer.Option(1, "--per-gpu", min=1, help="cells trained at once on each GPU (CUDA cells; default workers = GPUs x this)"),
        ray: Optional[str] = typer.Option(None, "--ray", help="run each cell as a Ray task on the cluster at ADDRESS (host:port, or auto); results gather here"),
        report_only: bool = typer.Option(False, "--report-only", help="train nothing: write the tables and plots from the cells finished so far"),
    ) -> None:
        """Run a grid of routers x tasks x settings x seeds in parallel; resumable; writes CSV, summary and plots."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from routerlab.ablate.study import plan_ablation, run_ablation

        if dry_run:
            plan, out_dir = plan_ablation(file, out, runs, set_)
            for cell in plan.cells:
                console.print(f"{cell.id}  {' / '.join(cell.labels.values())}  seed {cell.seed}", highlight=False)
            for labels, reason in plan.skipped:
                console.print(f"[yellow]skip[/] {' / '.join(labels.values())}: {reason}", highlight=False)
            console.print(f"{len(plan.cells)} runs, {len(plan.skipped)} skipped; results would go to {out_dir}")
            return

        command = "routerlab ablate " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 and sys.argv[1] == "ablate" else None
        columns = [TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"), TimeElapsedColumn()]
        bar = Progress(*columns, console=console, transient=False)
        job = bar.add_task("cells", total=None, state="")
        try:
            def on_plan(plan, total):  # the bar starts once the plan is valid and its folders locked
                bar.start()
                for labels, reason in plan.skipped:
                    bar.console.print(f"[yellow]skip[/] {' / '.join(labels.values())}: {reason}", highlight=False, soft_wrap=True)
                bar.update(job, total=total)

            def on_update(done, running, left):
                state = f"done {done}  running {running}  left {left}"
                bar.update(job, completed=done, state=state)
                if not bar.console.is_terminal:  # logs and CI get one line per change instead of a live bar
                    bar.console.print(f"cells: {state}", highlight=False)

            result = run_ablation(file, out=out, runs=runs, workers=workers, per_gpu=per_gpu, ray=ray, report_only=report_only, command=command, on_plan=on_plan, on_update=on_update, overrides=set_)
        finally:
            if bar.live.is_started:
                bar.stop()
        from rich.console import Console

        from routerlab.ablate.report import rich_table

        wide = Console(width=max(console.width, 170))  # a dozen metric columns; let a narrow terminal wrap lines
        wide.print(rich_table(result.plan, result.stats))
        console.print(f"trained {result.ran} runs now, {len(result.results) - result.ran} were done before; results: {result.out}/summary.md, results.csv, *.png")
        console.print(f"TensorBoard: [bold]tensorboard --logdir {result.plan.cells[0].config.run.dir}[/]")
        if result.errors:
            for cid, err in result.errors.items():
                console.print(f"[red]failed[/] {cid}: {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
