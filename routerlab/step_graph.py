"""`train.cuda_graph`: the training step's forward + backward captured once as a CUDA graph, then replayed.

Why: a ~110M-active MoE language model on one H200 is launch-bound. Its step issues thousands of small kernels one
by one from Python (router, plan, permute, combine, norms); a replayed graph issues them in one call. What stays
eager around the replay: router hooks, gradient clipping, the (fused) optimizer, the scheduler, logging.

When (`why_not`, checked at the trainer's start): CUDA, one process, and every router's own class declares
`cuda_graph_safe = True`: its forward and backward keep no Python state that changes from step to step (a replay
re-runs the captured kernels, not the Python) and never read a device value on the host. At run time also: no extra
loss terms (`add_loss_term` runs arbitrary Python each step; while there are, each MoE layer's router and core are
graphed instead: MoELayer.graph_core). Then:
  steps 1..WARMUP_STEPS   eager (Triton compiles, grouped-GEMM and cuBLAS set-up); the last one under CUDA's sync
                          debug mode: a host sync anywhere in forward or backward, which a capture cannot hold, leaves
                          the run eager with one warning
  next step               its first micro-batch captured (grads set to None first, so the captured backward writes them
                          rather than adds), then replayed; a failed capture also leaves the run eager with one warning
  every step after        each micro-batch copied into the captured input tensors, one replay each
The replay writes the loss, the aux losses, every gradient and each MoE layer's routing record into the same tensors
each time; after it, p.grad and each layer's record are pointed back at them (an evaluation's eager forward, or
zero_grad, replaces them in between). With several micro-batches (train.micro_batches) the graph holds one micro-batch,
its loss weighed by its share of the step's tokens; each replay's gradients are copied (the first) or added (the others)
into buffers of the step's sums, one foreach kernel over all parameters each, which p.grad points at after the last: the
same bf16 or fp32 additions as eager accumulation. A micro-batch of another size (a batch the caller passed) runs
eagerly, and so does the rest of its step. Parameters are read at their addresses: in-place loads keep them valid; a
replaced parameter, or a batch of another shape, is noticed and the step captured again.
"""
from __future__ import annotations

import warnings

import torch

from routerlab.tasks import Batch

WARMUP_STEPS = 2  # eager steps before the capture


def why_not(trainer) -> str | None:
    """Why this trainer's steps cannot be graphed (None: they can)."""
    t = trainer.config.train
    if not t.cuda_graph:
        return "train.cuda_graph is false"
    if trainer.parallel.world_size > 1:
        return "several processes"
    unsafe = unsafe_router(trainer)
    if unsafe is not None:
        return f"router class {unsafe} does not declare cuda_graph_safe"
    if trainer.device.type != "cuda":
        return "not on CUDA"
    return None


def unsafe_router(trainer) -> str | None:
    """The name of the first router class that does not declare cuda_graph_safe (the class's own word: a subclass may add
    Python state), or None."""
    for layer in trainer.layers:
        if not vars(type(layer.router)).get("cuda_graph_safe", False):
            return type(layer.router).__name__
    return None


def is_sync_warning(w: warnings.WarningMessage) -> bool:
    """A warning of CUDA's sync debug mode about a synchronizing call (not its note that the mode is a prototype)."""
    return "synchronizing CUDA operation" in str(w.message)


def catching_syncs(fn):
    """fn() under CUDA's sync debug mode: (its result, the host-sync warnings, every other warning it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if is_sync_warning(w)]
    return out, syncs, [w for w in caught if not is_sync_warning(w)]


def _fields(batch: Batch) -> tuple:
    return batch.inputs, batch.targets, batch.token_ids


class StepGraph:
    """Forward + backward of one micro-batch (Trainer.forward_backward), replayed from a CUDA graph."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self.off: str | None = None  # why the graph was given up (a sync, a failed capture), or None
        self.sums: list[torch.Tensor] | None = None  # the step's gradient sums over its micro-batches
        self.summing = False  # sums hold this step's replays so far, not yet in p.grad
        self.eager_rest = False  # a micro-batch of this step ran eagerly: so do the others

    def forward_backward(self, batch: Batch, weight: float = 1.0, index: int = 0, count: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Micro-batch `index` of `count` in this step, its loss weighed by `weight` (Trainer.forward_backward)."""
        if index == 0:
            self.eager_rest = False
        with_terms = bool(self.trainer._loss_terms) and self.off is None
        for layer in self.trainer.layers:  # while loss terms keep the step eager, each layer graphs its router and core
            layer.graph_core = with_terms    # (moe/core_graph.py; not after a failed capture or a sync: it could fail alike)
        if self.off is not None or with_terms or self.eager_rest:
            return self._eager(batch, weight)
        if self.graph is not None and not self._fits(batch, weight):
            if index > 0:  # a last micro-batch of another size: this step ends eagerly, the graph stays
                return self._eager(batch, weight)
            self.graph, self.eager_steps = None, WARMUP_STEPS - 1  # one checked eager step, then capture again
        if self.graph is None:
            if index == 0 and self.eager_steps >= WARMUP_STEPS:  # captures start a step, whose gradients are unset
                self._capture(batch, weight)
            if self.graph is None:
                self.eager_steps += index == 0
                checked = index == 0 and self.eager_steps == WARMUP_STEPS
                return self._checked(batch, weight) if checked else self._eager(batch, weight)
        return self._replay(batch, index, count)

    def _eager(self, batch: Batch, weight: float):
        if self.summing:  # the replays' sums so far become the gradients the eager backward adds to
            self._hand_over()
        self.eager_rest = self.graph is not None
        return self.trainer.forward_backward(batch, weight)

    def _hand_over(self) -> None:
        for p, g in zip(self.params, self.sums):
            p.grad = g
        self.summing = False

    def _give_up(self, reason: str) -> None:
        self.off = reason
        warnings.warn(f"train.cuda_graph: running eagerly: {reason}", stacklevel=3)

    def _checked(self, batch: Batch, weight: float):
        """An eager step under CUDA's sync debug mode; a host sync in it rules the graph out."""
        out, syncs, others = catching_syncs(lambda: self.trainer.forward_backward(batch, weight))
        for w in others:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if syncs:
            self._give_up(f"a host sync in forward or backward ({str(syncs[0].message).splitlines()[0][:160]}, {syncs[0].filename}:{syncs[0].lineno})")
        return out

    def _capture(self, batch: Batch, weight: float) -> None:
        trainer = self.trainer
        static = Batch(batch.inputs.clone(), batch.targets.clone(), batch.labels, None if batch.token_ids is None else batch.token_ids.clone())
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None  # the captured backward then writes each gradient instead of adding to it
        for layer in trainer.layers:  # the last eager step's aux losses keep its autograd graph alive, and with it
            layer.restore((None, {}, layer.sequence_length))  # AccumulateGrad nodes bound to the default stream: capture fails
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(trainer.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks go back, so the graph's own pool can take that memory
        try:
            with torch.cuda.graph(graph):
                outputs = trainer.forward_backward(static, weight)
        except RuntimeError as err:
            for p in params:
                p.grad = None
            first = err.__context__ or err  # the error inside the capture, not the capture's end reporting it
            self._give_up(f"capture failed: {str(first).splitlines()[0][:200]}")
            return
        self.graph, self.static, self.outputs, self.weight = graph, static, outputs, weight
        self.params, self.grads = params, [p.grad for p in params]
        self.addresses = [p.data_ptr() for p in params]
        self.sums = None
        self.records = []
        for layer in trainer.layers:  # detached: the same memory, without the captured autograd graph behind it
            pending, aux, length = layer.recorded()
            self.records.append((pending, {k: v.detach() for k, v in aux.items()}, length))

    def _fits(self, batch: Batch, weight: float) -> bool:
        if weight != self.weight:
            return False
        for ours, theirs in zip(_fields(self.static), _fields(batch)):
            if (ours is None) != (theirs is None) or (ours is not None and (ours.shape != theirs.shape or ours.dtype != theirs.dtype)):
                return False
        return all(p.data_ptr() == a for p, a in zip(self.params, self.addresses))

    def _replay(self, batch: Batch, index: int, count: int):
        for ours, theirs in zip(_fields(self.static), _fields(batch)):
            if ours is not None:
                ours.copy_(theirs)
        self.graph.replay()
        if count == 1:
            for p, g in zip(self.params, self.grads):
                p.grad = g
        else:  # the next replay rewrites the graph's gradients: sum them in buffers of the step's own
            if self.sums is None:
                self.sums = [None if g is None else torch.empty_like(g) for g in self.grads]  # None: a parameter no loss reached
                self.summed = [s for s in self.sums if s is not None], [g for g in self.grads if g is not None]
            (torch._foreach_copy_ if index == 0 else torch._foreach_add_)(*self.summed)
            self.summing = True
            if index == count - 1:
                self._hand_over()
        for layer, record in zip(self.trainer.layers, self.records):
            layer.restore(record)
        return self.outputs
