"""Routing traces: for a fixed probe set, each MoE layer's chosen experts and weights per token (optionally
the router logits), with the token ids, domain labels and per-token loss.

Format: one NumPy `.npz` per (run, step), written atomically. NumPy rather than Parquet because the GPU
machine has torch and numpy but no pyarrow, and a trace is a handful of dense arrays (no nesting, no
strings) that `np.load(..., allow_pickle=False)` reads back without running any code. Arrays:

    format        "routerlab-trace-v1"
    meta          JSON: run, step, fingerprint, task, label_name, num_labels, num_experts, num_layers, probe
    token_ids     int64 [N]   token ids in the order the MoE layers see them (-1: the task has none)
    labels        int64 [N]   domain label of each token (cluster, class, character category)
    token_loss    float32 [N] task loss of each token under the recorded routing
    layer{i}.experts  int64 [N, k] (-1 = unused slot), layer{i}.weights float32 [N, k],
    layer{i}.logits   float32 [N, E] (optional)

`probe` in meta is a checksum of the probe inputs, so two traces are compared only on the same tokens.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from routerlab.checkpoint import atomic_write
from routerlab.errors import ConfigError

FORMAT = "routerlab-trace-v1"


@dataclass
class LayerTrace:
    experts: np.ndarray  # int64 [N, k]
    weights: np.ndarray  # float32 [N, k]
    logits: np.ndarray | None = None  # float32 [N, E]


@dataclass
class Trace:
    meta: dict[str, Any]
    token_ids: np.ndarray
    labels: np.ndarray
    token_loss: np.ndarray
    layers: list[LayerTrace] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    def loads(self) -> list[np.ndarray]:
        """Token-slots per expert of each layer (float64 [E])."""
        E = self.num_experts
        return [np.bincount(l.experts[l.experts >= 0].ravel(), minlength=E).astype(np.float64) for l in self.layers]


def probe_checksum(batches) -> str:
    """sha256 of the probe inputs (and token ids), so traces of different probe sets are never compared."""
    h = hashlib.sha256()
    for b in batches:
        h.update(b.inputs.detach().cpu().contiguous().numpy().tobytes())
        if b.token_ids is not None:
            h.update(b.token_ids.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def probe_batches(trainer, num_batches: int = 1, batch_size: int | None = None) -> list:
    """The fixed probe set: validation batches drawn with the evaluation seed, the same for every run of a
    task (with the default batch size they are the trainer's first evaluation batches)."""
    from routerlab.train import EVAL_SEED

    if num_batches < 1:
        raise ConfigError(f"probe batches must be >= 1, got {num_batches}")
    rng = torch.Generator().manual_seed(EVAL_SEED)
    size = batch_size or trainer.config.train.batch_size
    return [trainer.task.batch("val", size, rng) for _ in range(num_batches)]


def model_place(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def router_name(config) -> str:
    return config.router.name


@torch.no_grad()
def token_losses(model, batch) -> torch.Tensor:
    """Per-token task loss [N] (float64, CPU) of one batch, tokens in the order the MoE layers see them."""
    device, dtype = model_place(model)
    batch = batch.to(device, dtype)
    logits = model(batch.inputs, batch.token_ids)
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(logits, batch.targets.reshape(-1), reduction="none").double().cpu()


@contextmanager
def capture_routing(layers) -> Iterator[list[list]]:
    """Record every layer's `Routing` (through a forward hook on its router) while the block runs."""
    seen: list[list] = [[] for _ in layers]
    handles = [layer.router.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(out)) for i, layer in enumerate(layers)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record_trace(trainer, batches, *, logits: bool = False) -> Trace:
    """Run the probe batches through the trainer's model in evaluation mode and record the routing."""
    model, layers = trainer.model, trainer.layers
    was_training = model.training
    model.eval()
    ids, labels, losses = [], [], []
    try:
        with capture_routing(layers) as seen:
            for batch in batches:
                losses.append(token_losses(model, batch).float())
                labels.append(batch.labels.reshape(-1).cpu())
                n = batch.labels.numel()
                ids.append(batch.token_ids.reshape(-1).cpu() if batch.token_ids is not None else torch.full((n,), -1, dtype=torch.long))
    finally:
        model.train(was_training)
    layer_traces = []
    for routings in seen:
        experts = torch.cat([r.experts.detach().long().cpu() for r in routings]).numpy()
        weights = torch.cat([r.weights.detach().float().cpu() for r in routings]).numpy()
        lg = None
        if logits and all(r.logits is not None for r in routings):
            lg = torch.cat([r.logits.detach().float().cpu() for r in routings]).numpy()
        layer_traces.append(LayerTrace(experts, weights, lg))
    cfg = trainer.config
    meta = {
        "run": str(trainer.run_dir), "step": int(trainer.step), "fingerprint": cfg.fingerprint(),
        "router": router_name(cfg), "task": cfg.task.name, "label_name": trainer.task.label_name,
        "num_labels": int(trainer.task.num_labels), "num_experts": int(cfg.model.num_experts),
        "num_layers": len(layers), "probe": probe_checksum(batches), "probe_batches": len(batches),
    }
    return Trace(meta, torch.cat(ids).numpy().astype(np.int64), torch.cat(labels).numpy().astype(np.int64),
                 torch.cat(losses).numpy().astype(np.float32), layer_traces)


def save_trace(path: str | Path, trace: Trace) -> Path:
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT), "meta": np.array(json.dumps(trace.meta, sort_keys=True)),
        "token_ids": trace.token_ids, "labels": trace.labels, "token_loss": trace.token_loss,
    }
    for i, layer in enumerate(trace.layers):
        arrays[f"layer{i}.experts"] = layer.experts
        arrays[f"layer{i}.weights"] = layer.weights
        if layer.logits is not None:
            arrays[f"layer{i}.logits"] = layer.logits

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a path
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


def load_trace(path: str | Path) -> Trace:
    """Read a trace; a missing, damaged or foreign file is a ConfigError that says what a trace is."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trace {str(p)!r} does not exist; write one with 'routerlab trace RUN'")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # zipfile, ValueError, OSError: all mean 'not a trace'
        raise ConfigError(f"trace {str(p)!r} is not a readable .npz routing trace ({type(err).__name__})") from None
    if str(arrays.get("format", "")) != FORMAT:
        raise ConfigError(f"{str(p)!r} is not a routerlab routing trace (expected format {FORMAT})")
    meta = json.loads(str(arrays["meta"]))
    layers = [LayerTrace(arrays[f"layer{i}.experts"], arrays[f"layer{i}.weights"], arrays.get(f"layer{i}.logits"))
              for i in range(int(meta["num_layers"]))]
    return Trace(meta, arrays["token_ids"], arrays["labels"], arrays["token_loss"], layers)


def trace_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "traces" / f"step{step:07d}.npz"


def run_traces(run_dir: str | Path) -> list[Path]:
    """A run's traces, by step."""
    return sorted((Path(run_dir) / "traces").glob("step*.npz"))
