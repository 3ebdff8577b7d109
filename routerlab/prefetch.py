"""The next training batch, drawn and on its way to the device while the GPU still runs the current step.

Why: a training step ends in one host read (the loss and the finite flag). Until the next step is launched after
it, the GPU idles; drawing the next batch on the host and copying it from pageable memory (a synchronizing copy per
tensor) used to be part of that idle time. The trainer calls `draw` after it has launched a step's update and before
that read, so the host draws while the GPU computes, and the copy (from pinned memory, non-blocking, on the step's
stream) is queued behind the step's kernels; after the read the next step starts at once.

Same numbers as drawing at the step's start: the batch is drawn with a copy of the trainer's data generator, whose
own state is left alone until the batch is used (`take` then advances it to where the draw left the copy). So a
checkpoint, `reseed_data`, `next_batch`, a loaded state or another data source in between see the generator as if
nothing had been drawn; `take` uses the batch only if the generator and the task are still those it was drawn from,
and otherwise returns None (the trainer draws as before). Only the task's own batches are prefetched (the Task
protocol: `batch` is a function of the split and the generator it is given); a data source set with
`set_data_source` may keep state of its own, so its batches are drawn when needed, as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from routerlab.tasks import Batch, Task


@dataclass
class _Drawn:
    task: Task
    size: int
    before: torch.Tensor  # the data generator's state the batch was drawn from
    after: torch.Tensor  # its state after the draw
    batch: Batch  # on the device (a copy in flight, queued on the current stream)


class BatchPrefetch:
    """At most one training batch drawn ahead of its step (module docstring)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.pin = device.type == "cuda"  # pinned host memory: the copy runs asynchronously, no host sync
        self.drawn: _Drawn | None = None

    def draw(self, task: Task, size: int, generator: torch.Generator) -> None:
        """Draw task.batch("train", size) with a copy of `generator` and start moving it to the device."""
        before = generator.get_state()
        ahead = torch.Generator().set_state(before)
        self.drawn = None
        try:
            batch = task.batch("train", size, ahead)
        except Exception:  # noqa: BLE001 - the next step draws this batch itself and raises there, as it always did
            return  # (here the step being finished would be left half done: updated, not counted)
        if self.pin:
            batch = batch.pin_memory()
        self.drawn = _Drawn(task, size, before, ahead.get_state(), batch.to(self.device, self.dtype, non_blocking=self.pin))

    def take(self, task: Task, size: int, generator: torch.Generator) -> Batch | None:
        """The drawn batch if it is the one `task.batch("train", size, generator)` would draw now (then the generator
        moves past it, as that draw would have moved it), else None. Either way nothing stays drawn."""
        drawn, self.drawn = self.drawn, None
        if drawn is None or drawn.task is not task or drawn.size != size or not torch.equal(drawn.before, generator.get_state()):
            return None
        generator.set_state(drawn.after)
        return drawn.batch
