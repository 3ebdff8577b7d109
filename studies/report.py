"""`routerlab study-report NAME`: the best parameters as a ready `routerlab train` config, every trial
as CSV, the Pareto front (CSV and PNG), the optimization history (PNG) and parameter importances.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from routerlab.checkpoint import atomic_write, atomic_write_text
from routerlab.config import make_config
from routerlab.errors import ConfigError
from studies.space import StudySpec


def complete_trials(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]


def best_trial(study, spec: StudySpec):
    """Single objective: the best trial. Multi-objective: the Pareto trial best on the first objective."""
    if not complete_trials(study):
        raise ConfigError(f"study {spec.name!r} has no complete trial yet; run `routerlab study {spec.name}` first")
    if not spec.multi_objective:
        return study.best_trial
    sign = 1 if spec.directions[0] == "minimize" else -1
    return min(study.best_trials, key=lambda t: sign * t.values[0])


def config_yaml(spec: StudySpec, trial, label: str = "best") -> str:
    data = dict(trial.user_attrs["config"])
    data["run"] = {"dir": "runs", "name": f"{spec.name}-{label}", "checkpoint": True}
    make_config(data)  # what we hand out must load
    values = ", ".join(f"{o.metric}={v:.4g}" for o, v in zip(spec.objectives, trial.values))
    header = (f"# {label.capitalize()} trial {trial.number} of study {spec.name!r} ({values}).\n"
              f"# Train it: routerlab train --config <this file>\n"
              f"# Searched parameters: {json.dumps(trial.params)}\n")
    return header + yaml.safe_dump(data, sort_keys=False)


def trials_csv(spec: StudySpec, trials: list, metrics: tuple[str, ...]) -> str:
    params = sorted({p for t in trials for p in t.params})
    names = [o.metric for o in spec.objectives]
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["number", "state", *[f"value_{n}" for n in names], *params, *metrics, "retry_of"])
    for t in trials:
        values = list(t.values) if t.values is not None else [""] * len(names)
        w.writerow([t.number, t.state.name, *values, *[t.params.get(p) for p in params],  # None: an empty field
                    *[t.user_attrs.get(m) for m in metrics], t.system_attrs.get("failed_trial")])
    return out.getvalue()


def _pyplot():
    """pyplot on the Agg backend: the report is written where no display is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    """Lay out, write (atomically) and close a report figure."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _pyplot().close(fig)


def pareto_png(spec: StudySpec, study, path: Path) -> None:
    """Pairwise scatter of the objectives: every complete trial in grey, the Pareto front in colour."""
    plt = _pyplot()
    names = [o.metric for o in spec.objectives]
    done = complete_trials(study)
    front = {t.number for t in study.best_trials}
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
    families = sorted({t.user_attrs["config"]["router"]["name"] for t in done})
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for ax, (i, j) in zip(axes[0], pairs):
        rest = [t for t in done if t.number not in front]
        ax.scatter([t.values[i] for t in rest], [t.values[j] for t in rest], c="lightgrey", s=18, label="dominated")
        for family in families:
            pts = [t for t in done if t.number in front and t.user_attrs["config"]["router"]["name"] == family]
            if pts:
                ax.scatter([t.values[i] for t in pts], [t.values[j] for t in pts], color=colours[family], s=36, edgecolor="k", label=f"front: {family}")
        ax.set_xlabel(f"{names[i]} ({spec.directions[i]})")
        ax.set_ylabel(f"{names[j]} ({spec.directions[j]})")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"study {spec.name}: Pareto front of {len(done)} complete trials", fontsize=10)
    _save_png(fig, path)


def history_png(spec: StudySpec, study, path: Path) -> None:
    plt = _pyplot()
    done = complete_trials(study)
    name, direction = spec.objectives[0].metric, spec.directions[0]
    xs = [t.number for t in done]
    ys = [t.values[0] for t in done]
    best, run = [], None
    for y in ys:
        run = y if run is None else (min(run, y) if direction == "minimize" else max(run, y))
        best.append(run)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys, s=16, label="trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    if study.get_trials(deepcopy=False)[0].user_attrs.get("fixed") and done and done[0].number == 0:
        ax.axhline(ys[0], color="grey", ls="--", lw=1, label="trial 0 (baseline)")
    ax.set_xlabel("trial")
    ax.set_ylabel(name)
    ax.legend(fontsize=8)
    ax.set_title(f"study {spec.name}", fontsize=10)
    _save_png(fig, path)


def importances(spec: StudySpec, study) -> dict[str, Any]:
    """fANOVA importance of every parameter for every objective (needs a few complete trials)."""
    # from the module itself: `optuna.importance` may be optuna's lazy-import proxy or the module, depending on what
    # imported it first
    from optuna.importance import get_param_importances

    out: dict[str, Any] = {}
    for i, o in enumerate(spec.objectives):
        try:
            values = get_param_importances(study, target=lambda t, i=i: t.values[i])
            out[o.metric] = {k: round(float(v), 4) for k, v in values.items()}
        except (ValueError, RuntimeError) as err:  # too few trials, or a single point
            out[o.metric] = {"unavailable": str(err).splitlines()[0]}
    return out


def write_report(spec: StudySpec, study, out_dir: Path) -> dict[str, Path]:
    from studies.runner import RECORDED_METRICS

    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    if not trials:
        raise ConfigError(f"study {spec.name!r} has no trials in this storage; run `routerlab study {spec.name}` first")
    files = {"trials": atomic_write_text(out_dir / "trials.csv", trials_csv(spec, trials, RECORDED_METRICS))}
    best = best_trial(study, spec)
    files["best_config"] = atomic_write_text(out_dir / "best_config.yaml", config_yaml(spec, best))
    first = trials[0]
    if spec.baseline and first.user_attrs.get("fixed") and first.state.name == "COMPLETE":
        files["baseline_config"] = atomic_write_text(out_dir / "baseline_config.yaml", config_yaml(spec, first, "baseline"))
    if spec.multi_objective:
        front = sorted(study.best_trials, key=lambda t: t.number)
        files["pareto_csv"] = atomic_write_text(out_dir / "pareto.csv", trials_csv(spec, front, RECORDED_METRICS))
        files["pareto_png"] = out_dir / "pareto.png"
        pareto_png(spec, study, files["pareto_png"])
    files["history_png"] = out_dir / "history.png"
    history_png(spec, study, files["history_png"])
    files["importances"] = atomic_write_text(out_dir / "importances.json", json.dumps(importances(spec, study), indent=2) + "\n")
    return files
