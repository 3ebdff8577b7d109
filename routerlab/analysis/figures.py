"""The analysis PNGs (matplotlib, Agg backend, imported lazily). Each function returns a Figure."""
from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmaps(tables: list[np.ndarray], title: str, xlabel: str, ylabel: str, yticks: list[str] | None = None, cmap: str = "viridis"):
    """One heatmap per MoE layer, side by side."""
    plt = _plt()
    n = len(tables)
    rows, cols = tables[0].shape
    fig, axes = plt.subplots(1, n, figsize=(min(3.2 * n, 12) + 0.6, 0.32 * rows + 1.6), squeeze=False)
    for i, (ax, table) in enumerate(zip(axes[0], tables)):
        im = ax.imshow(table, aspect="auto", cmap=cmap, vmin=0)
        ax.set_title(f"layer {i}", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xticks(range(cols))
        ax.tick_params(labelsize=6)
        if i == 0:
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_yticks(range(rows))
            if yticks:
                ax.set_yticklabels(yticks)
        else:
            ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def histograms(values: list[np.ndarray], title: str, xlabel: str, bins: int = 30):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    for i, v in enumerate(values):
        v = v[np.isfinite(v)]
        if v.size:
            ax.hist(v, bins=bins, histtype="step", label=f"layer {i}")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("tokens", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def bars(groups: dict[str, list[float]], title: str, ylabel: str, xlabels: list[str]):
    """Grouped bars: one group per x label, one bar per key of `groups`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(xlabels) + 2), 2.8))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(xlabels))
    for j, (name, vals) in enumerate(groups.items()):
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(xlabels, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def save_png(fig, path) -> None:
    """Atomic PNG write, small (dpi 80); the figure stays open (TensorBoard's add_figure closes it)."""
    from routerlab.checkpoint import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
