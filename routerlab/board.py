"""TensorBoard output of a training run: scalars, per-expert load histograms, the load heatmap,
hparams, and a custom-scalars layout that groups the routing dashboards.

Tags:  train/loss, train/aux/<layer>/<name>, train/lr,
       perf/tokens_per_s, perf/step_time_ms, perf/peak_mem_gb (CUDA), perf/mfu (known card or train.peak_flops),
       data (text: the corpus tasks' checksum, token counts and val unigram entropy),
       eval/loss, eval/accuracy | eval/perplexity,
       routing/<metric>/layer<i> (training batches), eval_routing/<metric>/layer<i> (evaluation),
       load/layer<i> (histogram: bucket e = expert e, centred on e), load/heatmap (figure).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ROUTING_METRICS = (
    "load_cv", "max_vio", "dropped_frac", "dead_experts", "router_entropy", "usage_entropy",
    "z_value", "max_logit", "switch_balance", "specialization", "fluctuation",
    "max_vio_batch", "max_vio_seq", "mean_k", "rank_overload",
)


EVAL_ONLY_METRICS = ("specialization", "fluctuation")  # need labels / a fixed probe set: evaluation only
HPARAM_METRICS = ("loss", "accuracy", "perplexity", "load_cv", "max_vio", "dropped_frac", "dead_experts",
                  "specialization", "router_entropy", "tokens_per_s", "train_loss")  # the HParams table's columns


def custom_layout() -> dict:
    def charts(prefix: str, skip: tuple[str, ...] = ()) -> dict:
        return {m: ["Multiline", [rf"{prefix}/{m}/.*"]] for m in ROUTING_METRICS if m not in skip}

    return {  # accuracy (0-1) and perplexity (1-vocab) on separate charts: one axis would flatten accuracy
        "task": {"loss": ["Multiline", [r"train/loss", r"eval/loss"]], "accuracy": ["Multiline", [r"eval/accuracy"]],
                 "perplexity": ["Multiline", [r"eval/perplexity"]]},
        "routing (training batches)": charts("routing", EVAL_ONLY_METRICS),
        "routing (evaluation)": charts("eval_routing"),
        "auxiliary losses": {"aux": ["Multiline", [r"train/aux/.*"]]},
    }


def load_heatmap(loads: list[np.ndarray], title: str = "expert load (share of token-slots)"):
    """Figure: rows = MoE layers, columns = experts, colour = share of the layer's token-slots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = np.stack([l / max(l.sum(), 1.0) for l in loads])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * shares.shape[1] + 2), 0.6 * shares.shape[0] + 1.5))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_xticks(range(shares.shape[1]))  # integer expert indices
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(shares.shape[0]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def expert_histogram(tag: str, load: np.ndarray):
    """A TensorBoard histogram whose bucket e is [e - 0.5, e + 0.5) with count load[e], every expert included.

    Written directly as the histogram plugin's [left, right, count] tensor: an old-style HistogramProto
    loses its empty end buckets (a dead expert 0 or E-1) and stretches its outer buckets to min/max on
    reading, which put expert mass at fractional indices."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.histogram import metadata
    from tensorboard.util import tensor_util

    idx = np.arange(len(load), dtype=np.float64)
    buckets = np.stack([idx - 0.5, idx + 0.5, np.asarray(load, dtype=np.float64)], 1)
    meta = metadata.create_summary_metadata(display_name=tag, description="token-slots per expert (bucket e is expert e)")
    return Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor_util.make_tensor_proto(buckets))])


def flat_hparams(config) -> dict[str, Any]:
    """Config as the flat scalar dict TensorBoard's hparams plugin wants; router.name and task.name first,
    so the table's leading columns say which router a row is."""
    out: dict[str, Any] = {"router.name": config.router["name"], "task.name": config.task["name"], "seed": config.seed}
    for section in ("task", "router"):
        for key, value in getattr(config, section).items():
            out[f"{section}.{key}"] = value
    for section in ("model", "train"):
        for key, value in getattr(config, section).model_dump().items():
            out[f"{section}.{key}"] = value
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in out.items()}


def after_earlier_event_files(run_dir: Path) -> None:
    """Wait, if need be, for the second after the newest event file's in run_dir was created. TensorBoard reads a run's
    event files in name order, and a name is `events.out.tfevents.<second>.<host>.<pid>.<counter>` with the counter not
    zero-padded: a resumed writer made within the second of the one it resumes may sort before it (...9 > ...10, or
    another pid), and its purge of the killed run's later events would then come first and purge nothing."""
    import time

    seconds = []
    for path in run_dir.glob("events.out.tfevents.*"):
        try:
            seconds.append(int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    wait = max(seconds, default=0) + 1 - time.time()
    if wait > 0:
        time.sleep(wait)


class Board:
    """A SummaryWriter with routerlab's layout. `purge_step` drops events a killed run left past it."""

    def __init__(self, run_dir: str | Path, purge_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard drops the events at purge_step and after it; those at the checkpoint's own step (its
        # evaluation, its training scalars) came before the checkpoint was written, so they stay
        # max_queue: a logged step's ~100 scalars (E=64, 8 layers) go to the writer's thread without waiting on it;
        # at the default 10 the step blocked until that thread had written most of them (docs/benchmarks.md, v6)
        if purge_step:
            after_earlier_event_files(Path(run_dir))
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step + 1 if purge_step else None, max_queue=1000)
        if not purge_step:
            self.writer.add_custom_scalars(custom_layout())

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, data: dict, step: int) -> None:
        import json

        self.writer.add_text(tag, "```\n" + json.dumps(data, indent=1) + "\n```", step)

    def routing(self, prefix: str, per_layer: list[dict[str, float]], step: int) -> None:
        for i, metrics in enumerate(per_layer):
            for name, value in metrics.items():
                if name in ROUTING_METRICS:
                    self.writer.add_scalar(f"{prefix}/{name}/layer{i}", value, step)

    def loads(self, loads: list[np.ndarray], step: int) -> None:
        for i, load in enumerate(loads):
            self.writer._get_file_writer().add_summary(expert_histogram(f"load/layer{i}", load), step)
        if loads:
            self.writer.add_figure("load/heatmap", load_heatmap(loads), step)

    def hparams(self, config, metrics: dict[str, float]) -> None:
        # a few whole-model metrics, not one column per layer (layer<i>/...) and per counter
        final = {f"hparam/{k}": metrics[k] for k in HPARAM_METRICS
                 if isinstance(metrics.get(k), (int, float)) and np.isfinite(metrics[k])}
        self.writer.add_hparams(flat_hparams(config), final, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
