"""results.csv (one row per cell and seed), summary.csv and summary.md (per row: mean, std and a 95%
t-interval over seeds; with a baseline row, every row's difference from it paired by seed) and the rich table.
"""
from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routerlab.ablate.spec import DEFAULT_METRICS, Plan, group_label
from routerlab.checkpoint import atomic_write_text

HEADERS = {
    "loss": "loss", "accuracy": "accuracy", "perplexity": "perplexity", "load_cv": "load CV", "max_vio": "MaxVio",
    "dropped_frac": "dropped", "dead_experts": "dead", "router_entropy": "router H", "specialization": "special.",
    "fluctuation": "fluct.", "tokens_per_s": "tokens/s", "params_active": "params active", "params_total": "params total",
    "train_loss": "train loss", "usage_entropy": "usage H", "z_value": "z", "max_logit": "max abs logit", "switch_balance": "switch bal.",
    "loss_se": "eval SE", "test_loss": "test loss", "test_loss_se": "test SE", "test_accuracy": "test acc.",
    "regret": "regret", "mrr": "MRR", "top1_is_best": "top-1 best",
}
SE_OF = {"loss": "loss_se", "test_loss": "test_loss_se"}  # a loss column is followed by its evaluation's own SE
COUNTS = ("tokens_per_s", "params_active", "params_total")
TWINNED = ("load_cv", "max_vio")  # balance columns shown beside their train-mode (noise on) measurement


def header(metric: str) -> str:
    if metric.endswith("_as_trained"):
        return HEADERS.get(metric[: -len("_as_trained")], metric) + " (train mode)"
    return HEADERS.get(metric, metric)


@dataclass(frozen=True)
class Summary:
    """mean, std (ddof 1) and the 95% t-interval half-width over n values (half = nan when n < 2)."""

    mean: float
    std: float
    n: int
    half: float

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def summarize(values: list[float]) -> Summary:
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return Summary(mean, 0.0, n, float("nan"))
    std = float(np.std(values, ddof=1))
    return Summary(mean, std, n, t_quantile(n - 1) * std / math.sqrt(n))


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
        row["train_tokens"] = result.get("train_tokens", float("nan"))
        row["wall_s"] = result["wall_s"]
        row["cpu_s"] = result.get("cpu_s", float("nan"))
        out.append(row)
    return out


def write_csv(path: Path, plan: Plan, table: list[dict[str, Any]]) -> None:
    fixed = ["cell", *axis_names(plan), "seed"]
    tail = ["train_tokens", "wall_s", "cpu_s"]
    metric_cols = [m for m in DEFAULT_METRICS if any(m in r for r in table)]
    metric_cols += sorted({k for r in table for k in r} - set(fixed) - set(metric_cols) - set(tail)) + tail
    _write_table(path, fixed + metric_cols, table)


def _write_table(path: Path, columns: list[str], table: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")  # every key of a row is a column
    writer.writeheader()
    writer.writerows(table)  # a column a row lacks is left empty
    atomic_write_text(path, buffer.getvalue())


def _finite(row: dict[str, Any], metric: str) -> bool:
    value = row.get(metric)
    return isinstance(value, (int, float)) and math.isfinite(value)


def group_stats(plan: Plan, table: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """Per group (all axes but seed): {labels..., row, n, seeds, metric: Summary over seeds}."""
    names = axis_names(plan)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in table:
        groups.setdefault(tuple(row.get(n, "") for n in names), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(names, key))
        entry["row"] = group_label({n: v for n, v in zip(names, key) if v != ""})
        entry["n"] = len(members)
        entry["seeds"] = {r["seed"]: r for r in members}
        for m in metrics:
            values = [r[m] for r in members if _finite(r, m)]
            if values:
                entry[m] = summarize(values)
        out.append(entry)
    return out


def paired_differences(stats: list[dict[str, Any]], baseline: str, metrics: list[str]) -> list[dict[str, Any]]:
    """Every other row minus the baseline row, seed by seed over the seeds both have: {row, n, metric: Summary}."""
    base = next((s for s in stats if s["row"] == baseline), None)
    if base is None:
        return []
    out = []
    for s in stats:
        if s is base:
            continue
        entry: dict[str, Any] = {"row": s["row"]}
        for m in metrics:
            diffs = [s["seeds"][seed][m] - base["seeds"][seed][m] for seed in s["seeds"]
                     if seed in base["seeds"] and _finite(s["seeds"][seed], m) and _finite(base["seeds"][seed], m)]
            if diffs:
                entry[m] = summarize(diffs)
        entry["n"] = max((entry[m].n for m in metrics if m in entry), default=0)
        out.append(entry)
    return out


def _digits(metric: str) -> str:
    return ".2f" if metric.startswith("dead_experts") else ".4f" if metric.endswith("loss_se") or metric in SE_OF else ".3f"


def fmt_value(metric: str, s: Summary, compact: bool = False) -> str:
    """mean ± 95% half-width (std; left out when compact); counts are plain."""
    if metric in COUNTS:
        return f"{s.mean:,.0f}"
    d = _digits(metric)
    if metric.endswith("_se"):  # the evaluation's own standard error: its mean over seeds
        return f"{s.mean:{d}}"
    if s.n < 2:
        return f"{s.mean:{d}}"
    return f"{s.mean:{d}} ± {s.half:{d}}" + ("" if compact else f" (sd {s.std:{d}})")


def fmt_diff(metric: str, s: Summary) -> str:
    d = _digits(metric)
    if s.n < 2:
        return f"{s.mean:+{d}} (1 pair)"
    mark = " *" if s.excludes_zero else ""
    return f"{s.mean:+{d}} [{s.low:+{d}}, {s.high:+{d}}]{mark}"


def shown_metrics(plan: Plan, stats: list[dict[str, Any]]) -> list[str]:
    """The file's metrics, each loss followed by its evaluation SE and each balance metric by its train-mode twin."""
    out = []
    listed = list(plan.spec.metrics)
    if "loss" in listed and "test_loss" not in listed and any("test_loss" in s for s in stats):
        listed.insert(listed.index("loss") + 1, "test_loss")
    for m in listed:
        out.append(m)
        for twin in (SE_OF.get(m), f"{m}_as_trained" if m in TWINNED else None):
            if twin and twin not in listed and any(twin in s for s in stats):
                out.append(twin)
    return [m for m in out if any(m in s for s in stats)]


def summary_columns(plan: Plan, stats: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    names = axis_names(plan)
    names = [n for n in names if len({s.get(n) for s in stats}) > 1 or n in ("task", "router")]
    return names, shown_metrics(plan, stats)


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return commit + (" (with uncommitted changes)" if dirty else "") if commit else "unknown (not a git checkout)"


def provenance(plan: Plan, results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What a reader needs to rerun the table: code commit, torch, data checksums, working directory, card."""
    import torch

    named = os.environ.get("ROUTERLAB_COMMIT")  # a copied tree (a GPU machine): the copier names the commit
    commit = f"{named} (copied tree; named by ROUTERLAB_COMMIT)" if named else _git_commit()
    checksums: dict[str, str] = {}
    for cell in plan.cells:
        task = cell.labels.get("task", cell.config.task.name)
        checksums.setdefault(task, cell.data_checksum)
    cards = sorted({f"{r.get('device_name', '?')} ({r.get('device', '?')}) on {r.get('host', '?')}" for r in results.values()})
    return {
        "commit": commit,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "data sha256": "; ".join(f"{t}: {c[:16]}" for t, c in checksums.items()),
        "working directory": os.getcwd(),
        "ran on": "; ".join(cards) or "-",
    }


def scale_line(plan: Plan, stats: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> str:
    cfg = plan.cells[0].config
    tokens = [r.get("train_tokens") for r in results.values() if r.get("train_tokens")]
    active = [s["params_active"].mean for s in stats if "params_active" in s]
    total = [s["params_total"].mean for s in stats if "params_total" in s]
    parts = [f"{cfg.train.steps} steps x batch {cfg.train.batch_size}"]
    if tokens:
        parts.append(f"{min(tokens) / 1e6:.2f}M training tokens per run" if min(tokens) == max(tokens)
                     else f"{min(tokens) / 1e6:.2f}M-{max(tokens) / 1e6:.2f}M training tokens per run")
    if active and total:
        parts.append(f"parameters active {min(active):,.0f}-{max(active):,.0f} of total {min(total):,.0f}-{max(total):,.0f}")
    evaluated = cfg.train.eval_batches * cfg.train.batch_size
    parts.append(f"evaluation: {evaluated} examples (sequences) per run, fixed across runs")
    return "; ".join(parts)


def summary_markdown(plan: Plan, stats: list[dict[str, Any]], errors: dict[str, str], command: str,
                     results: dict[str, dict[str, Any]] | None = None) -> str:
    spec = plan.spec
    results = results or {}
    names, metrics = summary_columns(plan, stats)
    seeds = sorted({c.seed for c in plan.cells})
    lines = [f"# Ablation `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [
        f"{len(plan.cells)} runs ({len({c.group for c in plan.cells})} settings x seeds {', '.join(map(str, seeds))}). "
        f"Values: mean ± half-width of the 95% t-interval over seeds (sd = std over seeds) of the final evaluation; "
        f"eval/test SE = the evaluation's own standard error (over sequences), mean over seeds; routing metrics "
        f"are means over MoE layers, as the model infers (noise off) and, marked train mode, as it trains (noise on).",
        "",
        f"Scale: {scale_line(plan, stats, results)}.",
        "",
        "| " + " | ".join(names + ["n"] + [header(m) for m in metrics]) + " |",
        "|" + "|".join(["---"] * len(names) + ["--:"] * (1 + len(metrics))) + "|",
    ]
    for s in stats:
        cells = [str(s[n]) for n in names] + [str(s["n"])]  # every row holds every axis
        cells += [fmt_value(m, s[m]) if m in s else "-" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if spec.baseline is not None:
        compared = [m for m in metrics if m not in COUNTS and not m.endswith("_se")]
        diffs = paired_differences(stats, spec.baseline, compared)
        lines += [
            "",
            f"Paired difference from the baseline row `{spec.baseline}` (row minus baseline, seed by seed): mean "
            f"[95% t-interval]; * = the interval excludes 0.",
            "",
            "| row | pairs | " + " | ".join(header(m) for m in compared) + " |",
            "|---|--:|" + "|".join(["--:"] * len(compared)) + "|",
        ]
        for d in diffs:
            lines.append(f"| {d['row']} | {d['n']} | " + " | ".join(fmt_diff(m, d[m]) if m in d else "-" for m in compared) + " |")
    if plan.skipped:
        lines += ["", "Skipped (cannot run):", ""]
        lines += [f"- {' / '.join(labels.values())}: {reason}" for labels, reason in plan.skipped]
    if errors:
        lines += ["", "Failed (recorded with the reason; rerun the command to retry):", ""]
        lines += [f"- {cid}: {err}" for cid, err in errors.items()]
    missing = len(plan.cells) - sum(s["n"] for s in stats)
    if missing:
        lines += ["", f"**Incomplete: {missing} of {len(plan.cells)} runs have no result yet.**"]
    lines += [
        "",
        "Plots: `quality_vs_balance.png`, `loads.png`, `curves.png`. Per-run TensorBoard: "
        f"`tensorboard --logdir {plan.cells[0].config.run.dir}`.",
        "",
        "Reproduce:",
        "",
        f"- command: `{command}`",
        *(f"- {key}: `{value}`" for key, value in provenance(plan, results).items()),
        f"- ablation config hash: `{spec.config_hash()}`",
        "",
    ]
    return "\n".join(lines)


def write_summary_csv(path: Path, plan: Plan, stats: list[dict[str, Any]]) -> None:
    """summary.csv: per row and metric, n, mean, std, the 95% interval, and (with a baseline) the paired difference."""
    metrics = shown_metrics(plan, stats)
    diffs = {d["row"]: d for d in paired_differences(stats, plan.spec.baseline, metrics)} if plan.spec.baseline else {}
    table = []
    for s in stats:
        for m in metrics:
            if m not in s:
                continue
            v = s[m]
            row = {"row": s["row"], "metric": m, "n": v.n, "mean": v.mean, "std": v.std, "ci95_low": v.low, "ci95_high": v.high}
            d = diffs.get(s["row"], {}).get(m)
            if d is not None:
                row.update({"diff_vs_baseline": d.mean, "diff_ci95_low": d.low, "diff_ci95_high": d.high, "pairs": d.n})
            table.append(row)
    columns = ["row", "metric", "n", "mean", "std", "ci95_low", "ci95_high", "diff_vs_baseline", "diff_ci95_low", "diff_ci95_high", "pairs"]
    _write_table(path, columns, table)


def rich_table(plan: Plan, stats: list[dict[str, Any]]):
    from rich.table import Table

    names, metrics = summary_columns(plan, stats)
    table = Table(title=f"ablation {plan.spec.name}: mean ± 95% interval over seeds", header_style="bold")
    for n in names:
        table.add_column(n, no_wrap=True)
    for m in metrics:
        table.add_column(header(m), justify="right")
    for s in stats:
        table.add_row(*[str(s[n]) for n in names], *[fmt_value(m, s[m], compact=True) if m in s else "-" for m in metrics])
    return table
