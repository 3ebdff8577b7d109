"""`routerlab analyze RUN`: every analysis on a finished run's checkpoint, as PNGs, a summary table
(summary.md, summary.json) under <run>/analysis/, and the same figures and scalars in the run's TensorBoard.

Steps: load the checkpoint; trace the probe set (kept as <run>/traces/step<N>.npz); regret against the
oracle (its choices kept as <run>/analysis/oracle.npz, which the `oracle` router replays); overlap of this
trace with the run's earliest trace (drift over training) and with `--against` traces; margin,
co-activation and domain x expert tables; the placement simulator on the recorded loads.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from routerlab.analysis import figures, placement, structure
from routerlab.analysis.regret import LayerRegret, layer_regrets
from routerlab.analysis.trace import LayerTrace, Trace, load_trace, probe_batches, record_trace, run_traces, save_trace, trace_path
from routerlab.checkpoint import atomic_write_text, load_checkpoint
from routerlab.errors import ConfigError

# The H200 expert-parallel measurements of docs/benchmarks.md (v7, 2026-11-28): 1-GPU step and expert
# compute from benchmarks/h200/2026-11-28-h200x2-ep-v7c-final.txt, collectives alone at 2 ranks from that
# log and at 4 ranks from 2026-11-28-h200x4-ep-v7-4gpu.txt.
H200_SHAPE = placement.Shape(tokens=16384, d_model=2048, hidden=1408, k=6, layers=2, num_experts=64)
H200_RATES = placement.Rates(one_gpu_ms=33.11, expert_ms=19.12, all_gather_ms={2: 0.296, 4: 0.666}, reduce_scatter_ms={2: 0.313, 4: 0.677})


def load_trainer(run_dir: Path):
    """A Trainer at the run's checkpoint (no logging), built from the config saved in the checkpoint."""
    from routerlab.config import make_config
    from routerlab.train import Trainer

    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint.pt; give the folder of a finished run (run.checkpoint=true)")
    state = load_checkpoint(ckpt)
    # the weights, not resume: a config re-read from its dump can fingerprint differently (defaults that
    # were implicit become explicit), and nothing here continues training
    trainer = Trainer(make_config(state["config"]), run_dir=run_dir, log=False)
    try:
        trainer.model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        trainer.close()
        raise ConfigError(f"checkpoint {str(ckpt)!r} does not fit its own config: {str(err).splitlines()[0]}") from None
    trainer.step = int(state["step"])
    return trainer


def trace_run(run_dir: str | Path, *, probe: int = 1, logits: bool = True, out: str | Path | None = None) -> tuple[Path, Any]:
    """Trace a run's checkpoint on the probe set; written to `out` or <run>/traces/step<N>.npz."""
    run_dir = Path(run_dir)
    trainer = load_trainer(run_dir)
    try:
        trace = record_trace(trainer, probe_batches(trainer, probe), logits=logits)
    finally:
        trainer.close()
    path = Path(out) if out is not None else trace_path(run_dir, trace.meta["step"])
    return save_trace(path, trace), trace


def oracle_trace(trace: Trace, regrets: list[LayerRegret]) -> Trace:
    """The oracle's routing of the probe set: each token's best single expert, weight 1."""
    layers = [LayerTrace(r.best[:, None].astype(np.int64), np.ones((len(r.best), 1), np.float32)) for r in regrets]
    loss = np.mean([r.expert_loss.min(1) for r in regrets], 0).astype(np.float32)
    return replace(trace, meta={**trace.meta, "router": "oracle"}, token_loss=loss, layers=layers)


def placement_rows(layer_loads: list[np.ndarray], ranks=(2, 4, 8), shape=H200_SHAPE, rates=H200_RATES) -> list[dict[str, Any]]:
    E = len(layer_loads[0])
    rows = []
    for R in ranks:
        if E % R or R > E:
            continue
        for strategy in placement.STRATEGIES:
            redundant = R if strategy == "eplb" else 0
            p = placement.project_step_ms(layer_loads, R, strategy, shape, rates, redundant)
            rows.append({"ranks": R, "strategy": strategy + (f"(+{redundant})" if redundant else ""), **p})
    return rows


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def analyze_run(run_dir: str | Path, *, probe: int = 1, against: list[str] = (), ranks=(2, 4, 8), tensorboard: bool = True) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {str(run_dir)!r} does not exist; give a folder under run.dir that holds checkpoint.pt")
    others = [load_trace(p) for p in against]  # bad files fail before anything is written
    trainer = load_trainer(run_dir)
    try:
        batches = probe_batches(trainer, probe)
        trace = record_trace(trainer, batches, logits=True)
        regrets = layer_regrets(trainer, batches)
    finally:
        trainer.close()
    out = run_dir / "analysis"
    step, E = trace.meta["step"], trace.num_experts
    own = trace_path(run_dir, step)
    if not own.is_file():
        save_trace(own, trace)
    save_trace(out / "oracle.npz", oracle_trace(trace, regrets))

    traces = [load_trace(p) for p in run_traces(run_dir)]
    same_probe = [t for t in traces if t.meta["probe"] == trace.meta["probe"]]
    first = min(same_probe, key=lambda t: t.meta["step"]) if same_probe else trace
    by_probe: dict[str, list[Trace]] = {}
    for t in traces:
        by_probe.setdefault(t.meta["probe"], []).append(t)
    history = max(by_probe.values(), key=len) if by_probe else []  # the drift figure: the largest series of one probe set
    drift = structure.set_change(first, trace)
    against_change = [structure.set_change(t, trace) for t in others]

    margins = [structure.margins(l, E) for l in trace.layers]
    coact = [structure.coactivation(l, E) for l in trace.layers]
    domain = [structure.domain_expert(trace.labels, l, int(trace.meta["num_labels"]), E) for l in trace.layers]
    domain_share = [t / np.maximum(t.sum(1, keepdims=True), 1) for t in domain]
    loads = trace.loads()
    places = placement_rows(loads, ranks)

    layers = []
    for i, r in enumerate(regrets):
        m = r.metrics()
        layers.append({"layer": i, **m, "margin": float(np.nanmean(margins[i])) if np.isfinite(margins[i]).any() else float("nan"),
                       **({f"changed_since_step{first.meta['step']}": drift[i]} if first is not trace else {}),
                       **{f"changed_vs_{Path(p).stem}": c[i] for p, c in zip(against, against_change)},
                       "load_cv": float(loads[i].std() / loads[i].mean()) if loads[i].mean() > 0 else 0.0})
    summary = {"run": str(run_dir), "step": step, "router": trace.meta["router"], "task": trace.meta["task"],
               "probe_tokens": trace.num_tokens, "layers": layers, "placement": places,
               "placement_rates": "H200, docs/benchmarks.md expert parallelism v7 (benchmarks/h200/*ep-v7*)"}

    label_names = _label_names(trace)
    figs = {
        "coactivation": figures.heatmaps(coact, "co-activation: share of probe tokens sent to both experts", "expert", "expert"),
        "domain_expert": figures.heatmaps(domain_share, f"{trace.meta['label_name']} x expert (row share of token-slots)", "expert", trace.meta["label_name"], label_names),
        "margin": figures.histograms(margins, "router margin: top-1 minus top-2 probability", "margin"),
        "regret": figures.histograms([r.regret for r in regrets], "regret: chosen-route loss minus best single expert", "regret (nats)"),
        "expert_loss": figures.bars({f"layer {i}": list(r.expert_loss.mean(0)) + [r.chosen_loss.mean(), r.expert_loss.min(1).mean()] for i, r in enumerate(regrets)},
                                    "mean probe loss: each expert forced, the router, the oracle", "loss", [f"e{e}" for e in range(E)] + ["router", "oracle"]),
    }
    if history and len(history) > 1:
        steps = sorted(t.meta["step"] for t in history)
        by_step = {t.meta["step"]: t for t in history}
        figs["drift"] = figures.bars({f"layer {i}": [structure.set_change(by_step[steps[0]], by_step[s])[i] for s in steps] for i in range(len(trace.layers))},
                                     f"share of probe tokens whose expert set differs from step {steps[0]}", "share changed", [str(s) for s in steps])
    if places:
        Rs = sorted({p["ranks"] for p in places})
        strategies = list(dict.fromkeys(p["strategy"].split("(")[0] for p in places))
        figs["placement"] = figures.bars({s: [next(p["overload"] for p in places if p["ranks"] == R and p["strategy"].startswith(s)) for R in Rs] for s in strategies},
                                         "overload (busiest rank / mean) of the recorded loads", "overload factor", [f"{R} ranks" for R in Rs])
    for name, fig in figs.items():
        figures.save_png(fig, out / f"{name}.png")
    summary["figures"] = sorted(f"{name}.png" for name in figs)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, allow_nan=True))
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir))
        for row in layers:
            for key in ("regret", "mrr", "top1_is_best", "oracle_loss", "margin"):
                writer.add_scalar(f"analysis/{key}/layer{row['layer']}", row[key], step)
        for name, fig in figs.items():
            writer.add_figure(f"analysis/{name}", fig, step)  # closes the figure
        writer.close()
    else:
        import matplotlib.pyplot as plt

        for fig in figs.values():
            plt.close(fig)
    return summary


def _label_names(trace: Trace) -> list[str] | None:
    if trace.meta["task"] == "chars":
        from routerlab.tasks.chars import CATEGORIES

        return list(CATEGORIES)
    return None


def summary_markdown(summary: dict[str, Any]) -> str:
    layers = summary["layers"]
    keys = [k for k in layers[0] if k != "layer"]
    lines = [f"# Routing analysis: {summary['run']} (step {summary['step']}, router {summary['router']}, task {summary['task']})", "",
             f"Probe set: {summary['probe_tokens']} tokens. regret and oracle_loss in nats; mrr = mean reciprocal rank of the router's top-1 expert among single experts.", "",
             "| layer | " + " | ".join(keys) + " |", "|--:|" + "--:|" * len(keys)]
    lines += ["| " + " | ".join([str(r["layer"])] + [_fmt(r[k]) for k in keys]) + " |" for r in layers]
    if summary["placement"]:
        lines += ["", f"Expert placement of the recorded loads at the H200 benchmark's scale ({summary['placement_rates']}):", "",
                  "| ranks | placement | overload | projected ms/step | expert ms | exchange ms |", "|--:|---|--:|--:|--:|--:|"]
        lines += [f"| {p['ranks']} | {p['strategy']} | {p['overload']:.3f} | {p['step_ms']:.2f} | {p['expert_ms']:.2f} | {p['exchange_ms']:.2f} |" for p in summary["placement"]]
    lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in summary["figures"]), ""]
    return "\n".join(lines)
