"""PNG plots of an ablation: quality against balance, per-layer expert-load heatmaps, training curves."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from routerlab.ablate.spec import Plan
from routerlab.checkpoint import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
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


def quality_vs_balance(plan: Plan, results: dict[str, dict[str, Any]], path: Path) -> None:
    groups = _by_group(plan, results)
    tasks = sorted({_split_task(plan, g)[0] for g in groups})
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for group, members in groups.items():
            t, label = _split_task(plan, group)
            cv = [m["metrics"].get("load_cv") for m in members]
            if t != task or None in cv:
                continue  # dense models have no load to balance
            loss = [m["metrics"]["loss"] for m in members]
            sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
            ax.errorbar(np.mean(cv), np.mean(loss), xerr=sd(cv), yerr=sd(loss), fmt="o", capsize=3, label=label)
            ax.annotate(label, (np.mean(cv), np.mean(loss)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("load CV (lower = more balanced)")
        ax.set_ylabel("eval loss (lower = better)")
        ax.set_title(f"{task or plan.spec.name}: quality vs balance", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def load_heatmaps(plan: Plan, results: dict[str, dict[str, Any]], path: Path) -> None:
    groups = [(g, m) for g, m in _by_group(plan, results).items() if m[0]["loads"]]
    plt = _plt()
    if not groups:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no MoE layers", ha="center")
        ax.axis("off")
        _save(fig, path)
        return
    cols = min(len(groups), 4)
    rows = math.ceil(len(groups) / cols)
    layers = max(len(m[0]["loads"]) for _, m in groups)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, (0.45 * layers + 1.4) * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, (group, members) in zip(axes.flat, groups):
        shares = np.mean([[np.asarray(l) / max(sum(l), 1.0) for l in m["loads"]] for m in members], axis=0)
        im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(" / ".join(group), fontsize=8)
        ax.set_yticks(range(shares.shape[0]))
        ax.set_xticks(range(0, shares.shape[1], max(1, shares.shape[1] // 8)))
        ax.set_ylabel("layer", fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("share of token-slots per expert (final evaluation, mean over seeds)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def training_curves(plan: Plan, results: dict[str, dict[str, Any]], path: Path) -> None:
    groups = _by_group(plan, results)
    tasks = sorted({_split_task(plan, g)[0] for g in groups})
    fig, axes = _panels(len(tasks), width=6.0)
    for ax, task in zip(axes, tasks):
        for group, members in groups.items():
            t, label = _split_task(plan, group)
            if t != task:
                continue
            n = min(len(m["train_curve"]) for m in members)
            steps = [p[0] for p in members[0]["train_curve"][:n]]
            loss = np.mean([[p[1] for p in m["train_curve"][:n]] for m in members], axis=0)
            ax.plot(steps, loss, label=label, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_title(task or plan.spec.name, fontsize=10)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_plots(plan: Plan, results: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    paths = [out / "quality_vs_balance.png", out / "loads.png", out / "curves.png"]
    quality_vs_balance(plan, results, paths[0])
    load_heatmaps(plan, results, paths[1])
    training_curves(plan, results, paths[2])
    return paths
