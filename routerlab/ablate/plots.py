"""PNG plots of an ablation: quality against balance, per-seed expert-load heatmaps, loss curves.

Readability rules: legends instead of in-plot labels (labels never overlap), one colour scale across all
load panels (so shades compare between panels), loads per seed (averaging seeds hides a collapse onto
different experts), the dense baseline drawn in quality-vs-balance, evaluation curves with a band.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from routerlab.ablate.spec import Plan
from routerlab.checkpoint import atomic_write

MARKERS = "osD^vP*Xhp<>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)


def _by_group(plan: Plan, results: dict[str, dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in plan.cells:
        if cell.id in results:
            groups.setdefault(cell.group, []).append(results[cell.id])
    return groups


def _split_task(plan: Plan, group: tuple) -> tuple[str, str]:
    """(task label, the rest of the group's label) — tasks get their own panels, their losses differ in scale."""
    names = list(plan.cells[0].labels)
    labels = dict(zip(names, group))
    task = labels.pop("task", "")
    return task, " / ".join(labels.values()) or "base"


def _panels(n: int, width: float = 5.0, height: float = 4.0):
    plt = _plt()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def _sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _metric(members, name) -> list[float]:
    return [m["metrics"][name] for m in members if isinstance(m["metrics"].get(name), (int, float)) and math.isfinite(m["metrics"][name])]


def quality_vs_balance(plan: Plan, results: dict[str, dict[str, Any]], path: Path) -> None:
    groups = _by_group(plan, results)
    tasks = sorted({_split_task(plan, g)[0] for g in groups})
    fig, axes = _panels(len(tasks), width=6.0)
    colours = _plt().rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes, tasks):
        for i, (group, members) in enumerate(groups.items()):
            t, label = _split_task(plan, group)
            if t != task:
                continue
            loss = _metric(members, "loss")
            cv = _metric(members, "load_cv")
            style = dict(color=colours[i % len(colours)])
            if not cv:  # a dense model has no load to balance: its quality is a horizontal band
                ax.axhline(np.mean(loss), linestyle="--", label=f"{label} (dense)", **style)
                ax.axhspan(np.mean(loss) - _sd(loss), np.mean(loss) + _sd(loss), alpha=0.12, **style)
                continue
            ax.errorbar(np.mean(cv), np.mean(loss), xerr=_sd(cv), yerr=_sd(loss), fmt=MARKERS[i % len(MARKERS)],
                        capsize=3, label=label, **style)
            trained = _metric(members, "load_cv_as_trained")
            if trained:  # the same routing with noise on: hollow marker joined to the inference point
                ax.plot([np.mean(cv), np.mean(trained)], [np.mean(loss)] * 2, linestyle=":", linewidth=0.8, **style)
                ax.plot(np.mean(trained), np.mean(loss), MARKERS[i % len(MARKERS)], mfc="none", **style)
        ax.set_xlabel("load CV (lower = more balanced); hollow: train mode (noise on)")
        ax.set_ylabel("eval loss (lower = better), ± std over seeds")
        ax.set_title(f"{task or plan.spec.name}: quality vs balance", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    _save(fig, path)


def load_heatmaps(plan: Plan, results: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per row of the grid; inside it one line per (seed, layer); one colour scale for all panels."""
    groups = [(g, m) for g, m in _by_group(plan, results).items() if m[0]["loads"]]
    plt = _plt()
    if not groups:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no MoE layers", ha="center")
        ax.axis("off")
        _save(fig, path)
        return
    shares_of = {}
    for group, members in groups:
        lines, names = [], []
        for m in sorted(members, key=lambda r: r["seed"]):
            for layer, load in enumerate(m["loads"]):
                lines.append(np.asarray(load) / max(sum(load), 1.0))
                names.append(f"s{m['seed']} L{layer}")
        shares_of[group] = (np.array(lines), names)
    top = max(float(s.max()) for s, _ in shares_of.values())
    cols = min(len(groups), 4)
    rows = math.ceil(len(groups) / cols)
    height = max(len(n) for _, n in shares_of.values())
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, (0.22 * height + 1.4) * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    image = None
    for ax, (group, _) in zip(axes.flat, groups):
        shares, names = shares_of[group]
        image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_title(" / ".join(group), fontsize=8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        ax.set_xticks(range(0, shares.shape[1], max(1, shares.shape[1] // 8)))
        ax.set_xlabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=list(axes.flat), fraction=0.02, label="share of token-slots (one scale for all panels)")
    fig.suptitle("expert load per seed (s) and MoE layer (L), final evaluation (noise off)", fontsize=9)
    _save(fig, path)


def training_curves(plan: Plan, results: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: training loss (mean over seeds). Right: evaluation loss, mean with a ± std band over seeds."""
    groups = _by_group(plan, results)
    tasks = sorted({_split_task(plan, g)[0] for g in groups})
    plt = _plt()
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4 * len(tasks)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (train_ax, eval_ax), task in zip(axes, tasks):
        for i, (group, members) in enumerate(groups.items()):
            t, label = _split_task(plan, group)
            if t != task:
                continue
            colour = colours[i % len(colours)]
            n = min(len(m["train_curve"]) for m in members)
            steps = [p[0] for p in members[0]["train_curve"][:n]]
            loss = np.mean([[p[1] for p in m["train_curve"][:n]] for m in members], axis=0)
            train_ax.plot(steps, loss, label=label, linewidth=1, color=colour)
            n = min(len(m["eval_curve"]) for m in members)
            if n:
                steps = [p[0] for p in members[0]["eval_curve"][:n]]
                values = np.array([[p[1] for p in m["eval_curve"][:n]] for m in members])
                mean, sd = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(n)
                eval_ax.plot(steps, mean, marker="o", markersize=3, label=label, linewidth=1, color=colour)
                eval_ax.fill_between(steps, mean - sd, mean + sd, alpha=0.15, color=colour)
        train_ax.set_ylabel("training loss (mean over seeds)")
        eval_ax.set_ylabel("eval loss (mean, band ± std over seeds)")
        for ax in (train_ax, eval_ax):
            ax.set_xlabel("step")
            ax.set_title(task or plan.spec.name, fontsize=10)
            ax.grid(alpha=0.3)
        eval_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    _save(fig, path)


def write_plots(plan: Plan, results: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    paths = [out / "quality_vs_balance.png", out / "loads.png", out / "curves.png"]
    quality_vs_balance(plan, results, paths[0])
    load_heatmaps(plan, results, paths[1])
    training_curves(plan, results, paths[2])
    return paths
