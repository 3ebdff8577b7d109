"""results.csv (one row per cell and seed), summary.md (mean +- std over seeds per group) and the rich table."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from routerlab.ablate.spec import DEFAULT_METRICS, Plan
from routerlab.checkpoint import atomic_write_text

HEADERS = {
    "loss": "loss", "accuracy": "accuracy", "perplexity": "perplexity", "load_cv": "load CV", "max_vio": "MaxVio",
    "dropped_frac": "dropped", "dead_experts": "dead", "router_entropy": "router H", "specialization": "special.",
    "fluctuation": "fluct.", "tokens_per_s": "tokens/s", "params_active": "params active", "params_total": "params total",
    "train_loss": "train loss", "usage_entropy": "usage H", "z_value": "z", "max_logit": "max abs logit", "switch_balance": "switch bal.",
}


def axis_names(plan: Plan) -> list[str]:
    names: list[str] = []
    for cell in plan.cells:
        for key in cell.labels:
            if key not in names:
                names.append(key)
    return names


def rows(plan: Plan, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per finished cell, in plan order."""
    out = []
    for cell in plan.cells:
        result = results.get(cell.id)
        if result is None:
            continue
        row: dict[str, Any] = {"cell": cell.id, **cell.labels, "seed": cell.seed}
        row.update({k: v for k, v in result["metrics"].items() if "/" not in k})
        row["wall_s"] = result["wall_s"]
        row["cpu_s"] = result.get("cpu_s", float("nan"))
        out.append(row)
    return out


def write_csv(path: Path, plan: Plan, table: list[dict[str, Any]]) -> None:
    fixed = ["cell", *axis_names(plan), "seed"]
    metric_cols = [m for m in DEFAULT_METRICS if any(m in r for r in table)]
    metric_cols += sorted({k for r in table for k in r} - set(fixed) - set(metric_cols) - {"wall_s", "cpu_s"}) + ["wall_s", "cpu_s"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fixed + metric_cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: row.get(k, "") for k in fixed + metric_cols})
    atomic_write_text(path, buffer.getvalue())


def group_stats(plan: Plan, table: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """Per group (all axes but seed): {labels..., n, metric: (mean, std)}; std over seeds (0 for one seed)."""
    names = axis_names(plan)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in table:
        groups.setdefault(tuple(row.get(n, "") for n in names), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(names, key))
        entry["n"] = len(members)
        for m in metrics:
            values = [r[m] for r in members if m in r and r[m] is not None and math.isfinite(r[m])]
            if values:
                entry[m] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        out.append(entry)
    return out


def fmt_value(metric: str, mean: float, std: float, n: int) -> str:
    if metric in ("tokens_per_s", "params_active", "params_total"):
        text = f"{mean:,.0f}"
        return text + (f" ± {std:,.0f}" if n > 1 and metric == "tokens_per_s" else "")
    digits = ".2f" if metric == "dead_experts" else ".3f"
    return f"{mean:{digits}}" + (f" ± {std:{digits}}" if n > 1 else "")


def summary_columns(plan: Plan, stats: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    names = axis_names(plan)
    names = [n for n in names if len({s.get(n) for s in stats}) > 1 or n in ("task", "router")]
    metrics = [m for m in plan.spec.metrics if any(m in s for s in stats)]
    return names, metrics


def summary_markdown(plan: Plan, stats: list[dict[str, Any]], errors: dict[str, str], command: str) -> str:
    spec = plan.spec
    names, metrics = summary_columns(plan, stats)
    seeds = sorted({c.seed for c in plan.cells})
    lines = [f"# Ablation `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [
        f"{len(plan.cells)} runs ({len({c.group for c in plan.cells})} settings x seeds {', '.join(map(str, seeds))}); "
        f"values are mean ± std over seeds of the final evaluation; routing metrics are means over MoE layers.",
        "",
        "| " + " | ".join(names + ["n"] + [HEADERS.get(m, m) for m in metrics]) + " |",
        "|" + "|".join(["---"] * len(names) + ["--:"] * (1 + len(metrics))) + "|",
    ]
    for s in stats:
        cells = [str(s.get(n, "")) for n in names] + [str(s["n"])]
        cells += [fmt_value(m, *s[m], s["n"]) if m in s else "-" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if plan.skipped:
        lines += ["", "Skipped (cannot run):", ""]
        lines += [f"- {' / '.join(labels.values())}: {reason}" for labels, reason in plan.skipped]
    if errors:
        lines += ["", "Failed (rerun the command to retry):", ""]
        lines += [f"- {cid}: {err}" for cid, err in errors.items()]
    missing = len(plan.cells) - sum(s["n"] for s in stats)
    if missing:
        lines += ["", f"**Incomplete: {missing} of {len(plan.cells)} runs have no result yet.**"]
    lines += [
        "",
        "Plots: `quality_vs_balance.png`, `loads.png`, `curves.png`. Per-run TensorBoard: "
        f"`tensorboard --logdir {plan.cells[0].config.run.dir}`.",
        "",
        f"Reproduce: `{command}`  ",
        f"Ablation config hash: `{spec.config_hash()}`",
        "",
    ]
    return "\n".join(lines)


def rich_table(plan: Plan, stats: list[dict[str, Any]]):
    from rich.table import Table

    names, metrics = summary_columns(plan, stats)
    table = Table(title=f"ablation {plan.spec.name}: mean ± std over seeds", header_style="bold")
    for n in names:
        table.add_column(n, no_wrap=True)
    for m in metrics:
        table.add_column(HEADERS.get(m, m), justify="right")
    for s in stats:
        table.add_row(*[str(s.get(n, "")) for n in names], *[fmt_value(m, *s[m], s["n"]) if m in s else "-" for m in metrics])
    return table
