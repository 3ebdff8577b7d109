"""The one trainer. The CLI, ablations, Optuna objectives, Flower clients and the RL environment all
train through `Trainer`; nobody writes a second loop. Its public interface is in the class docstring.

    trainer = Trainer(config)          # builds task, model, optimizer; seeds everything
    metrics = trainer.fit()            # trains to config.train.steps, evaluates, logs, checkpoints
    Trainer(config, resume="runs/x/checkpoint.pt").fit()   # continues bit-exactly on CPU
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from routerlab.adamw import AdamW
from routerlab.board import Board
from routerlab.checkpoint import load_checkpoint, save_checkpoint
from routerlab.compile import compile_model, resolve_compile, set_tf32
from routerlab.config import Config
from routerlab.distributed import setup_parallel
from routerlab.errors import ConfigError, RunStopped
from routerlab.models import build_model
from routerlab.outputs import check_writable, lock_output_dir
from routerlab.prefetch import BatchPrefetch
from routerlab.moe.stats import RoutingStats, fluctuation, routing_metrics, specialization, stats_on_host
from routerlab.routers.base import Router
from routerlab.step_graph import StepGraph, unsafe_router, why_not
from routerlab.tasks import Batch, Task, build_task

EVAL_SEED = 1234  # the evaluation batches are the same for every run of a task

# train.precision -> (dtype of weights and optimizer state, autocast compute dtype or None)
PRECISIONS = {"fp32": (torch.float32, None), "bf16-mixed": (torch.float32, torch.bfloat16), "bf16-pure": (torch.bfloat16, None)}

# dense bf16 tensor-core peaks (FLOP/s) by device-name substring, for MFU when train.peak_flops is unset
KNOWN_PEAKS = {
    "H200": (989e12, "H200 SXM spec, dense bf16"),
    "H100": (989e12, "H100 SXM spec, dense bf16"),
    "A100": (312e12, "A100 spec, dense bf16"),
}


def check_compatible(model, task: Task, config: Config) -> None:
    """Refuse router/task pairs that cannot work, with the reason and the way out."""
    name = config.router.name
    for layer in model.moe_layers():
        router = layer.router
        if router.needs_token_ids and not task.has_token_ids:
            raise ConfigError(f"router {name!r} routes by token id, but task {task.name!r} has no token ids; use a task with tokens (chars) or a router that reads hidden states (for example lsh)")
        if task.kind == "lm" and not router.causal and not getattr(router.params, "allow_noncausal", False):
            raise ConfigError(f"router {name!r} is not causal (a token's routing depends on later tokens), so it would leak the future in the causal LM task {task.name!r}; set router.allow_noncausal=true to run it anyway")


def lr_lambda(config: Config) -> Callable[[int], float]:
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine to 10% of lr

    return factor


class Trainer:
    """Trains one model on one task; the only training loop of the project.

    Public interface (apps use this and nothing else):

    Build and run
      Trainer(config, *, task=None, run_dir=None, log=True, progress=False, resume=None)
          task: a Task to use instead of building config.task (a federated client's partition, a wrapped
          task); resume: a checkpoint to continue from (its config fingerprint must match).
      fit(until=None, on_eval=None) -> metrics   train to step `until` (default config.train.steps)
      train_step(batch=None) -> loss             one optimizer step; batch=None draws from the data source
      evaluate() -> metrics                      task and routing metrics on the fixed evaluation batches
      save(path=None) -> path, load(path), close()

    Hooks (each registration returns the function, so they work as decorators)
      on_step(fn)            fn(step, loss) after every optimizer step
      on_eval(fn)            fn(step, metrics) after every evaluation inside fit (Optuna reports and
                             prunes here; fit's own on_eval argument is one more such hook)
      add_loss_term(name, fn) fn() -> scalar tensor added to the training loss before backward on every
                             step (FedProx's proximal term); logged as train/aux/<name>
      set_data_source(fn)    fn(batch_size, generator) -> Batch replaces task.batch("train", ...) as the
                             source of training batches; None restores the task
      reseed_data(seed)      restart the training-batch stream from seed (one stream per client and round)

    Read
      config, task (the Task protocol: kind, batch, num_examples, subset), step, losses (train loss of
      every step), last_eval, last_loads, tokens_per_s
      model                  the nn.Module: forward(inputs, token_ids) -> logits; run it, do not replace it
      layers                 the model's MoE layers (router, experts, stats of the last forward)
      weights() / load_weights(state)   the model's state dict; load_weights accepts a partial dict
                             (keys not given keep their values)
      log_hparams(metrics)   record hyperparameters with these metrics (a run that ends early)
    """

    def __init__(
        self,
        config: Config,
        *,
        task: Task | None = None,
        run_dir: str | Path | None = None,
        log: bool = True,
        progress: bool = False,
        resume: str | Path | None = None,
    ) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.parallel = setup_parallel(config.parallel.expert, config.train.device)  # one process unless torchrun
        self.progress = progress and self.parallel.is_main
        self.device = self.parallel.device(config.train.device)
        self.on_cuda = self.device.type == "cuda"  # CUDA-only work below: TF32, the fused optimizer, syncs, peaks, RNG
        if self.on_cuda and not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA GPU is available; use train.device=cpu")
        if self.on_cuda and (self.device.index or 0) >= (count := torch.cuda.device_count()):
            raise ConfigError(f"train.device is {str(self.device)!r} but this machine has {count} CUDA GPU{'s' * (count != 1)} "
                              f"(cuda:0 .. cuda:{count - 1}); choose one of them")
        self.dtype, self.autocast_dtype = PRECISIONS[config.train.precision]
        self.run_dir = Path(run_dir) if run_dir is not None else Path(config.run.dir) / config.run_name()
        writes = log and self.parallel.is_main
        if writes:  # before any work: an unwritable run.dir fails now, not after the task and model are built
            check_writable(self.run_dir, "run.dir")
        self.task = task if task is not None else build_task(config.task)
        self.data_info = self.task.data_info()  # checksum, sizes, unigram baseline: recorded with the run
        with self.parallel.building():  # expert parallelism: each rank builds its own experts only
            model = build_model(config.model, config.router, self.task)
        self.model = self.parallel.shard(model).to(self.device, self.dtype)
        self.layers = self.model.moe_layers()
        check_compatible(self.model, self.task, config)
        t = config.train
        if self.on_cuda:  # every float32 matmul: fp32 runs, and the float32 router gates of bf16 runs
            set_tf32(t.tf32)
        self.compiled = compile_model(self.model, resolve_compile(t.compile, self.device))
        # routers that read RoutingStats after each step; the others' stats are computed only for logging
        self._router_uses_stats = [type(layer.router).after_step is not Router.after_step for layer in self.layers]
        # CUDA: one kernel pass over the parameters (an 840M-parameter MoE steps 8x the dense twin's bytes) that skips a
        # non-finite update on the device (found_inf, as GradScaler does): no host sync before the step
        # train.optimizer_kernel: the same update in routerlab's Triton kernel (fewer bytes) or torch's fused one
        adamw = torch.optim.AdamW
        if self.on_cuda:
            adamw = AdamW if t.optimizer_kernel == "triton" else functools.partial(torch.optim.AdamW, fused=True)
        self.optimizer = adamw(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
        # train.cuda_graph: forward + backward replayed from a CUDA graph where safe (routerlab/step_graph.py)
        self.cuda_graph_off = why_not(self)
        self.step_graph = StepGraph(self) if self.cuda_graph_off is None else None
        # where the step is not graphed for another reason than its routers (processes, device), each MoE layer's core
        # is (routerlab/moe/core_graph.py; while loss terms keep the step eager, StepGraph turns it on); a router that
        # is not graph-safe may change its shapes every step
        core = t.cuda_graph and self.step_graph is None and unsafe_router(self) is None
        for layer in self.layers:
            layer.graph_core = core
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.data_rng = torch.Generator().manual_seed(config.seed + 1)
        self.prefetch = BatchPrefetch(self.device, self.dtype)  # the next step's batch, drawn before this step's host read
        eval_rng = torch.Generator().manual_seed(EVAL_SEED)
        # drawn as global batches and split like training batches: micro_batches never changes what is evaluated
        self.eval_set = [part for _ in range(t.eval_batches) for part in self.task.batch("val", t.batch_size * t.micro_batches, eval_rng).chunks(t.micro_batches)]
        self.step = 0
        self.losses: list[float] = []  # training loss of every step
        self.probe_top1: list[torch.Tensor] | None = None  # for routing fluctuation
        self.last_eval: dict[str, float] = {}
        self.last_loads: list[list[float]] = []  # token-slots per expert of each MoE layer in the last evaluation
        self.step_log: list[tuple[float, int]] = []  # (seconds, tokens) of every training step of this process
        self.skipped_steps = 0  # updates dropped for a non-finite loss or gradient (train.on_nonfinite=skip)
        if resume is not None:
            self.load(resume)
        self._lock = lock_output_dir(self.run_dir, "run.dir") if writes else None  # one process per run folder
        self.board = Board(self.run_dir, purge_step=self.step) if log and self.parallel.is_main else None
        if self.board and self.data_info:
            self.board.text("data", self.data_info, self.step)
        self._step_hooks: list[Callable[[int, float], None]] = []
        self._eval_hooks: list[Callable[[int, dict[str, float]], None]] = []
        self._loss_terms: dict[str, Callable[[], torch.Tensor]] = {}
        self._data_source: Callable[[int, torch.Generator], Batch] | None = None
        self._pending_log: dict | None = None  # a logged CUDA step's metrics, written during the next step

    # ---- the public hooks -------------------------------------------------------------------------
    def on_step(self, fn: Callable[[int, float], None]) -> Callable[[int, float], None]:
        self._step_hooks.append(fn)
        return fn

    def on_eval(self, fn: Callable[[int, dict[str, float]], None]) -> Callable[[int, dict[str, float]], None]:
        self._eval_hooks.append(fn)
        return fn

    def add_loss_term(self, name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        self._loss_terms[name] = fn
        return fn

    def set_data_source(self, fn: Callable[[int, torch.Generator], Batch] | None) -> None:
        self._data_source = fn

    def reseed_data(self, seed: int) -> None:
        self.data_rng.manual_seed(seed)

    def next_batch(self) -> Batch:
        """The next training batch (all micro-batches of a step) from the data source (default: the task's train split)."""
        size = self.config.train.batch_size * self.config.train.micro_batches
        if self._data_source is not None:
            return self._data_source(size, self.data_rng)
        return self.task.batch("train", size, self.data_rng)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        full = self.model.state_dict()
        unknown = set(state) - set(full)
        if unknown:
            raise ConfigError(f"weights for {len(unknown)} unknown parameter(s) (for example {sorted(unknown)[0]!r}); this model has {len(full)}")
        full.update(state)
        self.model.load_state_dict(full)

    def log_hparams(self, metrics: dict[str, float]) -> None:
        if self.board:
            self.board.hparams(self.config, metrics)

    # ---- one step -------------------------------------------------------------------------------
    def token_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token task loss [N] (in the order the MoE layers see the tokens) and logits [N, C]."""
        with self.autocast():
            logits = self.model(batch.inputs, batch.token_ids)
        logits = logits.reshape(-1, logits.shape[-1]).float()
        return F.cross_entropy(logits, batch.targets.reshape(-1), reduction="none"), logits

    def task_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        token_loss, logits = self.token_losses(batch)
        return token_loss.mean(), logits

    def autocast(self):
        """bf16-mixed: compute in bfloat16 on float32 weights; a no-op context for fp32 and bf16-pure."""
        # no cast cache: a CUDA graph capture cannot hold it (each weight is cast once per forward anyway)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None, cache_enabled=False)

    def forward_backward(self, batch: Batch, weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch: its task loss (mean over its tokens) plus every aux loss, times `weight` (its share
        of the step's tokens), backpropagated; gradients add up over the micro-batches of a step.

        Aux (balance) losses are therefore computed per micro-batch and averaged: a global-batch balance
        loss would replace this per-micro-batch sum (issue 17). Returns the unscaled loss and aux, detached.
        """
        token_loss, _ = self.token_losses(batch)
        loss = token_loss.mean()
        aux = self.model.aux_losses()
        for i, layer in enumerate(self.layers):  # routers rewarded per token (REINFORCE) add their losses here
            aux.update({f"layer{i}/{k}": v for k, v in layer.router.observe_token_loss(token_loss.detach()).items()})
        aux.update({name: fn() for name, fn in self._loss_terms.items()})
        total = loss + sum(aux.values()) if aux else loss
        self.parallel.backward(total * weight if weight != 1 else total)
        return loss.detach(), {k: v.detach() for k, v in aux.items()}

    def train_step(self, batch: Batch | None = None) -> float:
        """One optimizer step on a global batch of micro_batches x batch_size sequences (drawn at once, then
        split, so N micro-batches of B see exactly the data of one batch of N*B)."""
        self.model.train()
        t = self.config.train
        drawn_here = batch is None
        if batch is None:
            batch = self.prefetch.take(self.task, t.batch_size * t.micro_batches, self.data_rng) if self._data_source is None else None
            batch = batch or self.next_batch()
        global_tokens = batch.num_tokens
        micro = batch.chunks(t.micro_batches)
        self._synchronize()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device) if len(micro) > 1 else None
        aux: dict[str, torch.Tensor] = {}
        merged: list[RoutingStats | None] = [None] * len(self.layers)
        for index, part in enumerate(micro):
            weight = part.num_tokens / global_tokens
            part = self.parallel.shard_batch(part.to(self.device, self.dtype))  # every rank draws the global batch and keeps its slice
            if self.step_graph is not None:
                part_loss, part_aux = self.step_graph.forward_backward(part, weight, index, len(micro))
            else:
                part_loss, part_aux = self.forward_backward(part, weight)
            if len(micro) == 1:  # the step's values are the micro-batch's: no small kernels to weigh and add them
                loss, aux = part_loss.float(), dict(part_aux)
                continue
            loss = loss + weight * part_loss.float()
            for k, v in part_aux.items():
                aux[k] = aux.get(k, 0) + weight * v
            merged = [l.stats if m is None else m.merge(l.stats) for m, l in zip(merged, self.layers)]  # the step's: their sum
        if len(micro) > 1:
            for layer, stats in zip(self.layers, merged):
                layer.stats = stats
        self.parallel.sync_grads(self.model)
        for layer in self.layers:
            layer.router.before_step()
        on_device = bool(self.optimizer.defaults.get("fused"))
        max_norm = self.config.train.grad_clip or math.inf
        if on_device and self.parallel.world_size == 1:
            # the fused step divides each gradient by grad_scale as it reads it: clipping without a pass of its own
            # (clip_grad_norm_'s factor max_norm / (norm + 1e-6), at most 1, as a divisor)
            norm = self.optimizer.grad_norm() if isinstance(self.optimizer, AdamW) else None  # one read, float32
            if norm is None:
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None], foreach=True)
            self.optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp_min(1.0) if math.isfinite(max_norm) else None
        else:  # max_norm=inf leaves the gradients as they are but still returns their (global) norm
            norm = self.parallel.clip_grad_norm_(self.model, max_norm)
        total = loss.detach() + torch.stack([v.detach() for v in aux.values()]).sum() if aux else loss.detach()  # with the aux losses
        bad = ~(torch.isfinite(total) & torch.isfinite(norm))
        if on_device:  # the fused kernels skip the whole update (moments and step count too) where found_inf is set
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        if drawn_here and self._data_source is None:  # while the GPU runs this step: after the read, the next one starts at once
            self.prefetch.draw(self.task, t.batch_size * t.micro_batches, self.data_rng)
        self._flush_log()  # the previous logged step's metrics, while the GPU runs this step
        logged = self.board is not None and (self.step + 1) % t.log_every == 0
        for layer, uses_stats in zip(self.layers, self._router_uses_stats):
            if logged or uses_stats:  # the statistics this step reads after its host read: their kernels queued before it
                layer.stats
        copies = self._log_copies(aux) if logged and self.on_cuda else None  # queued too, before the host read
        # the step's one host read (loss and finite flag together); stats summed over ranks before routers see them
        value, finite = self.parallel.reduce_step(self.layers, loss, bad)
        if not finite and self.config.train.on_nonfinite == "stop":  # the update did not happen: weights stay good
            raise RunStopped(
                f"step {self.step + 1}: the loss ({float(total):.4g}) or gradient norm ({float(norm):.4g}) "
                "is not finite; stopped without saving, the last good checkpoint is kept; lower train.lr, set train.grad_clip, "
                "or set train.on_nonfinite=skip to skip such updates")
        if finite and not on_device:
            self.optimizer.step()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        self.scheduler.step()
        for layer, uses_stats in zip(self.layers, self._router_uses_stats):
            if uses_stats and finite:  # a router does not learn from the statistics of a skipped, non-finite step
                layer.router.after_step(layer.stats)
        self.parallel.sync_buffers(self.model)
        self._synchronize()
        self.step_log.append((time.perf_counter() - start, global_tokens))
        self.step += 1
        if not finite:
            if self.board:
                self.board.scalars({"train/skipped_steps": self.skipped_steps}, self.step)
            return value
        self.losses.append(value)
        # training routing metrics: the logged step's batch. Stats are computed only then (and for routers
        # that read them after every step): 15% of an E=64 step on an H200 when computed every step (docs/benchmarks.md)
        if copies is not None:  # written during the next step, while the GPU runs it (or at close, fit's end)
            self._pending_log = self._log_snapshot(copies)
        elif logged:
            self._log_train(aux)
        for hook in self._step_hooks:
            hook(self.step, value)
        return value

    def _synchronize(self) -> None:
        if self.on_cuda:  # kernels run asynchronously: time what the GPU did, not the launches
            torch.cuda.synchronize(self.device)

    def _log_train(self, aux: dict[str, torch.Tensor]) -> None:
        self._write_log(self._log_snapshot(self._log_copies(aux)))

    def _log_copies(self, aux: dict[str, torch.Tensor]) -> tuple:
        """A logged step's device values (aux losses, routing statistics) copied to the host: on CUDA queued into pinned
        memory behind the step's kernels, with an event to wait on (the next replay overwrites the graph's aux
        tensors; the copies come first)."""
        aux_values = torch.stack([v.detach().reshape(()) for v in aux.values()]).double().to("cpu", non_blocking=True) if aux else None
        stats = stats_on_host([layer.stats for layer in self.layers], non_blocking=True)
        copied = torch.cuda.Event() if self.on_cuda else None
        if copied is not None:
            copied.record()
        return list(aux), aux_values, stats, copied

    def _log_snapshot(self, copies: tuple) -> dict:
        """What a logged step writes, taken after its host read: its host values and its device values' copies."""
        window = self.config.train.log_every
        values = {"train/loss": float(np.mean(self.losses[-window:])), "train/lr": self.scheduler.get_last_lr()[0]}
        for i, layer in enumerate(self.layers):  # router-specific scalars (adversary prices, critic loss)
            values.update({f"routing/{k}/layer{i}": v for k, v in layer.router.extra_metrics().items()})
        names, aux_values, stats, copied = copies
        return {"step": self.step, "values": values, "aux": (names, aux_values), "stats": stats, "copied": copied}

    def _write_log(self, snapshot: dict | None) -> None:
        if snapshot is None or self.board is None:
            return
        if snapshot["copied"] is not None:
            snapshot["copied"].synchronize()  # long done when written during the next step
        names, aux_values = snapshot["aux"]
        values = {**snapshot["values"], **{f"train/aux/{k}": v for k, v in zip(names, aux_values.tolist() if names else [])}}
        stats = snapshot["stats"]
        values.update({f"perf/{k}": v for k, v in self.perf_metrics(stats).items()})
        self.board.scalars(values, snapshot["step"])
        self.board.routing("routing", [routing_metrics(s, self.config.parallel.expert) for s in stats], snapshot["step"])

    def _flush_log(self) -> None:
        pending, self._pending_log = self._pending_log, None
        self._write_log(pending)

    @property
    def train_tokens(self) -> int:
        """Training tokens of the steps this process ran (all of them, warm-up included)."""
        return sum(n for _, n in self.step_log)

    @property
    def train_time(self) -> float:
        """Seconds in training steps this process ran (evaluation excluded, warm-up included)."""
        return sum(s for s, _ in self.step_log)

    def steady_steps(self) -> list[tuple[float, int]]:
        """(seconds, tokens) of the steps after the first train.timing_skip (all steps while there are no more)."""
        skip = self.config.train.timing_skip
        return self.step_log[skip:] if len(self.step_log) > skip else self.step_log

    @property
    def tokens_per_s(self) -> float:
        """Steady-state training tokens per second: evaluation and the first timing_skip steps left out."""
        steps = self.steady_steps()
        seconds = sum(s for s, _ in steps)
        return sum(n for _, n in steps) / seconds if seconds > 0 else 0.0

    def flops_per_token(self, stats: list[RoutingStats | None] | None = None) -> float:
        """Training FLOPs per token on the weights a token uses: 6 x (its matmul weights) + 12 x layers x d_model
        x block (attention scores and values over the whole block; PaLM's count). Expert weights count
        k_eff / E, k_eff = token-slots per token in the last step (`stats`: its stats per layer, default the
        layers' own); embeddings and norms are not matmuls."""
        matmul = sum(m.weight.numel() for m in self.model.modules() if isinstance(m, torch.nn.Linear))
        for layer, stats in zip(self.layers, stats or [layer.stats for layer in self.layers]):
            if stats is not None:
                k_eff = float(stats.load.sum() / stats.tokens.clamp_min(1))
                matmul += self.parallel.num_params(layer.experts) * k_eff / layer.router.num_experts
        flops = 6.0 * matmul
        if self.task.kind == "lm":
            flops += 12.0 * self.config.model.n_layers * self.config.model.d_model * self.task.block_size
        return flops

    def peak_flops(self) -> tuple[float | None, str]:
        """The card's bf16 peak FLOP/s for MFU and where it comes from (config, or the card's name)."""
        if self.config.train.peak_flops is not None:
            return self.config.train.peak_flops, "train.peak_flops"
        if self.on_cuda:
            name = torch.cuda.get_device_name(self.device)
            for key, (peak, source) in KNOWN_PEAKS.items():
                if key in name:
                    return peak, source
        return None, "unknown (set train.peak_flops)"

    def perf_metrics(self, stats: list[RoutingStats | None] | None = None) -> dict[str, float]:
        """Steady-state tokens/s, step time, peak GPU memory and model FLOPs utilization (MFU, against the bf16
        peak whatever train.precision is; `stats` as in flops_per_token)."""
        steps = self.steady_steps()
        out = {"tokens_per_s": self.tokens_per_s, "step_time_ms": 1e3 * sum(s for s, _ in steps) / max(1, len(steps))}
        if self.on_cuda:
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        peak, _ = self.peak_flops()
        if peak is not None:
            out["mfu"] = self.flops_per_token(stats) * self.tokens_per_s / peak
        return out

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Task and routing metrics on the fixed evaluation batches (per layer and mean over layers)."""
        self.model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        row_losses = []  # mean loss per example (sequence): tokens of one sequence are not independent
        stats: list[RoutingStats | None] = [None] * len(self.layers)
        top1: list[list[torch.Tensor]] = [[] for _ in self.layers]
        labels = []
        for batch in self.eval_set:
            batch = batch.to(self.device, self.dtype)
            token_loss, logits = self.token_losses(batch)
            n = batch.targets.numel()
            loss_sum += token_loss.mean().item() * n
            row_losses.append(token_loss.reshape(batch.targets.shape[0], -1).mean(1).double().cpu())
            correct += int((logits.argmax(-1) == batch.targets.reshape(-1)).sum())
            count += n
            labels.append(batch.labels.reshape(-1).cpu())
            for i, layer in enumerate(self.layers):
                stats[i] = layer.stats if stats[i] is None else stats[i].merge(layer.stats)
                top1[i].append(layer.top1.cpu())
        self.model.train()

        metrics: dict[str, float] = {"loss": loss_sum / count}
        rows = torch.cat(row_losses)
        metrics["loss_se"] = float(rows.std() / math.sqrt(len(rows))) if len(rows) > 1 else float("nan")  # the eval's own noise
        if self.task.kind == "lm":
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        metrics["accuracy"] = correct / count
        all_labels = torch.cat(labels)
        per_layer = []
        for i, layer in enumerate(self.layers):
            m = routing_metrics(stats[i], self.config.parallel.expert)
            m["specialization"] = specialization(all_labels, torch.cat(top1[i]), self.task.num_labels, layer.router.num_experts)
            if self.probe_top1 is not None:
                m["fluctuation"] = fluctuation(self.probe_top1[i], top1[i][0])
            per_layer.append(m)
        self.probe_top1 = [t[0] for t in top1]
        for name in per_layer[0] if per_layer else {}:
            metrics[name] = float(np.mean([m[name] for m in per_layer]))
            for i, m in enumerate(per_layer):
                metrics[f"layer{i}/{name}"] = m[name]
        metrics.update(self.param_counts(stats))
        metrics.update(self.perf_metrics())
        metrics["step"] = self.step
        self.last_eval = metrics
        self.last_loads = [s.load.double().cpu().tolist() for s in stats]  # per layer, per expert (ablation heatmaps)
        if self.board:
            self.board.scalars({f"eval/{k}": metrics[k] for k in ("loss", "accuracy", "perplexity") if k in metrics}, self.step)
            self.board.routing("eval_routing", per_layer, self.step)
            self.board.loads([s.load.double().cpu().numpy() for s in stats], self.step)
        return metrics

    def param_counts(self, stats: list[RoutingStats]) -> dict[str, float]:
        """Total parameters, and those a token uses: expert weights count k_eff/E, k_eff = slots per token."""
        total = self.parallel.num_params(self.model)  # expert shards counted on every rank
        active = total
        for layer, s in zip(self.layers, stats):
            expert_params = self.parallel.num_params(layer.experts)
            k_eff = float(s.load.sum() / s.tokens.clamp_min(1))
            active -= expert_params * (1 - k_eff / layer.router.num_experts)
        return {"params_total": float(total), "params_active": float(active)}

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, until: int | None = None, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
        """Train to step `until` (default: config.train.steps), evaluating every eval_every steps and at the end.

        on_eval(step, metrics) is called after each evaluation, after the hooks registered with on_eval().
        Returns the last evaluation's metrics (plus train_loss, the mean of the last log window).
        """
        t = self.config.train
        until = t.steps if until is None else min(until, t.steps)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, disable=not self.progress, transient=False) as bar:
            job = bar.add_task(self.config.run_name(), total=until, completed=self.step, info="")
            while self.step < until:
                self.train_step()
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    metrics = self.evaluate()
                    for hook in self._eval_hooks + ([on_eval] if on_eval is not None else []):
                        hook(self.step, metrics)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.config.run.checkpoint:
                    self.save()
                if self.step % t.log_every == 0 or self.step == until:
                    info = f"loss {np.mean(self.losses[-t.log_every:]):.4f}"
                    if self.last_eval:
                        info += f"  eval {self.last_eval['loss']:.4f}  load_cv {self.last_eval.get('load_cv', 0):.2f}"
                    bar.update(job, completed=self.step, info=info)
        if not self.last_eval or self.last_eval.get("step") != self.step:
            self.evaluate()
        result = dict(self.last_eval)
        result["train_loss"] = float(np.mean(self.losses[-t.log_every:])) if self.losses else float("nan")
        if self.config.run.checkpoint:
            self.save()
        self._flush_log()
        if self.board and self.step >= t.steps:
            self.board.hparams(self.config, result)
        if self.board:
            self.board.writer.flush()
        return result

    def close(self) -> None:
        self._flush_log()
        if self.board:
            self.board.close()
            self.board = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.parallel.close()

    # ---- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def state_dict(self) -> dict:
        model_state, optimizer_state = self.parallel.full_state(self.model, self.optimizer)  # full expert tensors
        state = {
            "fingerprint": self.config.fingerprint(),
            "data_checksum": self.data_info.get("data_checksum"),
            "config": self.config.model_dump(mode="json"),
            "step": self.step,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "data_rng": self.data_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "probe_top1": self.probe_top1,
        }
        if self.on_cuda:
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.checkpoint_path)
        state = self.state_dict()  # a collective under torchrun: every rank gathers, rank 0 writes
        if self.parallel.is_main:
            save_checkpoint(path, state)
        self.parallel.barrier()
        return path

    def load(self, path: str | Path) -> None:
        state = load_checkpoint(path, self.config.fingerprint())
        ours, theirs = self.data_info.get("data_checksum"), state.get("data_checksum")
        if ours and theirs and ours != theirs:
            raise ConfigError(f"checkpoint {str(path)!r} was trained on data {theirs[:12]}, but this task's data is {ours[:12]}; resume on the same corpus")
        try:
            model_state, optimizer_state = self.parallel.local_state(self.model, self.optimizer, state["model"], state["optimizer"])
            self.model.load_state_dict(model_state)
            # this device's kind of step, not the saving run's: torch takes `fused` from the saved groups (a CPU run's
            # is None: its steps would stay unfused, without the found_inf and grad_scale the trainer gives them)
            fused = self.optimizer.defaults.get("fused")
            optimizer_state = {**optimizer_state, "param_groups": [{**g, "fused": fused} for g in optimizer_state["param_groups"]]}
            self.optimizer.load_state_dict(optimizer_state)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"checkpoint {str(path)!r} does not fit this model: {str(err).splitlines()[0]}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.on_cuda:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = state["step"]
        self.losses = state["losses"].tolist()
        self.probe_top1 = state["probe_top1"]


def train(config: Config, **kwargs) -> dict[str, float]:
    """Train one run to the end and return its final metrics."""
    trainer = Trainer(config, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()
