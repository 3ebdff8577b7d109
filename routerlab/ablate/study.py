"""One ablation from file to report: plan, run what is not done, assemble CSV, summary and plots."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from routerlab.ablate import plots, report
from routerlab.ablate.runner import run_plan
from routerlab.ablate.spec import Plan, expand, load_spec
from routerlab.checkpoint import atomic_write_text
from routerlab.config import apply_overrides
from routerlab.outputs import check_writable, lock_output_dir


@dataclass
class AblationReport:
    plan: Plan
    out: Path
    results: dict[str, dict[str, Any]]
    errors: dict[str, str]
    ran: int  # cells trained by this call (the rest were done before)
    stats: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def resolve_paths(spec, out: str | Path | None, runs: str | Path | None) -> tuple[Path, Path]:
    out = Path(out) if out is not None else Path("results") / spec.name
    base_runs = spec.base.get("run", {}).get("dir", "runs")
    runs = Path(runs) if runs is not None else Path(base_runs) / out.name
    return out, runs


def plan_ablation(path: str | Path, out: str | Path | None = None, runs: str | Path | None = None,
                  overrides: list[str] = ()) -> tuple[Plan, Path]:
    spec = load_spec(path)
    if overrides:  # `--set key=value` changes the base config of every cell
        spec = dataclasses.replace(spec, base=apply_overrides(spec.base, list(overrides)))
    out, runs_dir = resolve_paths(spec, out, runs)
    return expand(spec, runs_dir), out


def run_ablation(
    path: str | Path,
    *,
    out: str | Path | None = None,
    runs: str | Path | None = None,
    workers: int | None = None,
    per_gpu: int = 1,
    ray: str | None = None,
    report_only: bool = False,
    command: str | None = None,
    on_plan: Callable[[Plan, int], None] | None = None,
    on_update: Callable[[int, int, int], None] | None = None,
    overrides: list[str] = (),
) -> AblationReport:
    """Validate every cell, run the unfinished ones (here, or as Ray tasks on the cluster at `ray`), then write
    results.csv, summary.csv, summary.md and the plots.

    The results folder and the TensorBoard folder (--runs) are checked and locked before any cell runs: a
    second ablation on the same --out or --runs stops with "already in use by PID N" instead of running
    every cell again or clearing the other's live run folders."""
    plan, out = plan_ablation(path, out, runs, overrides)
    runs_dirs = sorted({c.config.run.dir for c in plan.cells})
    for runs_dir in runs_dirs:
        check_writable(runs_dir, "ablate --runs")
    held = [lock_output_dir(out, "ablate --out")]  # held until this function returns (FolderLock.__del__)
    if not report_only:  # a cell clears its run folder before it trains: two ablations must not share --runs
        held += [lock_output_dir(runs_dir, "ablate --runs") for runs_dir in runs_dirs]
    if on_plan is not None:
        on_plan(plan, len(plan.cells))
    before = sum(1 for c in plan.cells if (out / "cells" / f"{c.id}.json").is_file())
    if report_only:  # the finished cells, e.g. of a grid cut short or still running elsewhere
        from routerlab.ablate.runner import load_done

        results, errors = load_done(out, plan), {}
    elif ray is not None:
        from routerlab.ablate.ray_runner import run_plan_ray

        results, errors = run_plan_ray(plan, out, ray, on_update)
    else:
        results, errors = run_plan(plan, out, workers, on_update, per_gpu)
    table = report.rows(plan, results)
    fixed = {"cell", "seed", *report.axis_names(plan)}
    metrics = list(dict.fromkeys(k for row in table for k in row if k not in fixed))
    stats = report.group_stats(plan, table, metrics)
    command = command or f"routerlab ablate {path} --out {out}"
    files = [out / "results.csv", out / "summary.md", out / "summary.csv"]
    report.write_csv(files[0], plan, table)
    atomic_write_text(files[1], report.summary_markdown(plan, stats, errors, command, results))
    report.write_summary_csv(files[2], plan, stats)
    if results:
        files += plots.write_plots(plan, results, out)
    return AblationReport(plan, out, results, errors, len(results) - before, stats, files)
