"""The `routerlab` command line. Bad input ends with one line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys
from functools import wraps
from pathlib import Path
from typing import Callable, List, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from routerlab.errors import ConfigError, RunStopped

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="routerlab: a playground for Mixture-of-Experts routing policies.")
# Piped output (logs, CI, `| tee`) is not cut at 80 columns: a wrapped checkpoint path cannot be copied.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape  # messages hold brackets ('.[all]', 'cuda[:N]'); they are not markup

    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def write_error_log(err: BaseException) -> str:
    """Write the traceback of an internal error to a log file; return its path."""
    import tempfile
    import time
    import traceback

    folder = Path(tempfile.gettempdir()) / "routerlab-errors"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"routerlab {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(err)), encoding="utf-8")
    return str(path)


def one_line(err: BaseException) -> None:
    """Every exception that escapes a command ends as one line: 2 for bad input, 1 otherwise (with a log)."""
    if isinstance(err, ConfigError):
        fail(str(err))
    if isinstance(err, RunStopped):
        fail(str(err), 1)
    if isinstance(err, KeyboardInterrupt):
        fail("interrupted; finished work is kept, rerun the same command to continue", 130)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    try:
        where = f"; traceback in {write_error_log(err)}"
    except OSError:
        where = ""
    fail(f"internal error: {type(err).__name__}: {first}{where}", 1)


def user_errors(fn: Callable) -> Callable:
    """Turn every exception into one line without a traceback: ConfigError (bad input) exits 2, others 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as err:
            one_line(err)

    return wrapper


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if "/" in key:
            continue
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        table.add_row(key, text)
    return table


@app.command()
@user_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; omitted: built-in defaults"),
    set_: List[str] = typer.Option([], "--set", "-s", help="override a key: --set router.name=switch --set train.steps=500"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue from this checkpoint"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    trace_steps: str = typer.Option("", "--trace-steps", help="record routing traces at these steps (0,100,300) and log regret at evaluations; docs/analysis.md"),
) -> None:
    """Train one model with one router; logs to TensorBoard under run.dir."""
    from routerlab.analysis.recorder import parse_steps, record_during
    from routerlab.config import load_config
    from routerlab.train import Trainer

    steps = parse_steps(trace_steps)
    cfg = load_config(config, set_)
    trainer = Trainer(cfg, progress=progress and sys.stderr.isatty(), resume=resume)
    recorder = None
    try:
        recorder = record_during(trainer, steps)
        metrics = trainer.fit()
    finally:
        trainer.close()
        if recorder is not None:
            recorder.close()
    if trainer.parallel.is_main:  # under torchrun, one table, not one per rank
        console.print(metrics_table(metrics, f"{cfg.run_name()} after {trainer.step} steps"))
        if "unigram_entropy_val" in trainer.data_info:
            info = trainer.data_info
            console.print(f"data {info['data_checksum'][:12]}: {info['tokens']} tokens ({info['tokenizer']}); "
                          f"unigram entropy of val {info['unigram_entropy_val']:.4f} nats (eval loss must beat it)")
        console.print(f"TensorBoard: [bold]tensorboard --logdir {cfg.run.dir}[/]   checkpoint: {trainer.checkpoint_path}")


@app.command()
@user_errors
def routers() -> None:
    """List every registered router with its parameters and defaults."""
    from routerlab.routers import describe_routers

    table = Table(show_header=True, header_style="bold", show_lines=False)
    table.add_column("router")
    table.add_column("what it does")
    table.add_column("parameters (defaults)")
    for name, doc, params in describe_routers():
        table.add_row(name, doc, ", ".join(f"{k}={v}" for k, v in params.items()) or "-")
    console.print(table)


@app.command()
@user_errors
def tasks() -> None:
    """List the tasks with their parameters and defaults."""
    from routerlab.tasks import describe_tasks

    table = Table(show_header=True, header_style="bold")
    table.add_column("task")
    table.add_column("what it is")
    table.add_column("parameters (defaults)")
    for name, doc, params in describe_tasks():
        table.add_row(name, doc, ", ".join(f"{k}={v}" for k, v in params.items()))
    console.print(table)


def register_commands(app: typer.Typer) -> None:
    """Add the commands that other parts declare as `routerlab.commands` entry points (pyproject.toml):
    ablate (routerlab.ablate), study (studies), federate (federated), rl (environments), bench. Going
    through entry points keeps routerlab from importing the packages that build on it."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group="routerlab.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ModuleNotFoundError as err:  # its optional extra (rl, studies, federated) is not installed
            register = missing_extra_command(entry.name, err.name)
        register(app)


def missing_extra_command(name: str, module: str) -> Callable[[typer.Typer], None]:
    """A stand-in command that says which package to install, so `routerlab` works without every extra."""

    def register(app: typer.Typer) -> None:
        @app.command(name=name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                     help=f"(unavailable: needs the Python package {module!r})")
        def unavailable() -> None:
            fail(f"'routerlab {name}' needs the Python package {module!r}; install routerlab with its extras: pip install -e '.[all]'")

    return register


register_commands(app)
from routerlab.analysis.cli import register as register_analysis  # noqa: E402  (part of routerlab: no entry point needed)

register_analysis(app)


def main() -> None:
    try:
        app()
    except (Exception, KeyboardInterrupt) as err:  # outside any command (registration, argument parsing)
        try:
            one_line(err)
        except typer.Exit as exit_:
            sys.exit(exit_.exit_code)


if __name__ == "__main__":
    main()
