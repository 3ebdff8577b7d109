"""`train.overlap_optimizer`: a graphed step's AdamW update runs inside the next step's graph, beside its forward.

Why: the E=64 preset moves 8x the dense twin's parameter bytes through AdamW (4.2 ms of a 40 ms step on an H200, at
memory speed), while the forward's GEMMs leave the memory bus mostly idle. On a second stream the update hides
under them: replayed with the graph alongside, 3.1 of its 4.2 ms disappeared (benchmarks/step_overlap.py,
docs/benchmarks.md issue 19 v8).

The arithmetic is the step's own, in the same order: step N's update reads step N's gradients, gradient scale
(the clip), found_inf and learning rate, which `defer` keeps in tensors of its own; the next replay applies it
stage by stage (the parameters in the order the forward first reads them: embeddings, each block, the head),
and the forward waits for a stage's update before it reads that stage's weights (CUDA events inside the graph).
Step N+1's backward, which overwrites the gradients, comes after the whole forward, so after every stage.

Between the two, the weights are one update behind. Whatever reads them through the model settles the pending
update first (`apply`): an eager forward (evaluation, an app running the model), `state_dict` and
`load_state_dict` of the model or the optimizer (checkpoints, `Trainer.weights`), and `Trainer.close`. Code that
reads a parameter's tensor directly between two steps sees the previous weights; `Trainer.settle()` applies them.
"""
from __future__ import annotations

import torch
from torch import nn

from routerlab import triton_adamw
from routerlab.adamw import AdamW


def forward_stages(model: nn.Module) -> list[nn.Module]:
    """The modules of the model in the order its forward first reads their parameters (its `forward_stages()`, or
    the model as one stage)."""
    stages = getattr(model, "forward_stages", None)
    return list(stages()) if stages is not None else [model]


class StageNotReached(RuntimeError):
    """A stage module the captured forward never called: its weights would be read before its update."""


class DeferredUpdate:
    """One optimizer step, kept pending by `defer`, run by `capture`'s graph (or eagerly by `apply`)."""

    stream_priority = 0  # the update's stream (benchmarks/step_overlap.py --priority tries -1, CUDA's highest)

    def __init__(self, optimizer: AdamW, model: nn.Module, params: list[torch.Tensor]) -> None:
        self.optimizer, self.model, self.params = optimizer, model, params
        device = params[0].device
        self.skip = torch.ones((), device=device)  # found_inf of the pending update; 1 = none pending
        self.scale = torch.ones((), device=device)  # its grad_scale
        self.lr = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]
        self.pending = False
        self.stale = True  # not yet pointed at the graph's gradients, or the optimizer state was loaded since (its
        # step counts are new tensors, while the graph adds to the old ones: the step graph captures again)
        # CPU: Triton's interpreter (tests)
        self.side = torch.cuda.Stream(device, priority=self.stream_priority) if device.type == "cuda" else None
        group_of = {p: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        left = set(params)
        self.modules, self.stages = [], []  # stage: [(group index, dtype, params, Launch)]
        for module in forward_stages(model):
            mine = [p for p in module.parameters() if p in left]
            left -= set(mine)
            if mine:
                self.modules.append(module)
                self.stages.append(mine)
        if left:  # parameters no stage module holds: with the first stage, before the forward reads anything
            self.stages[0] = [p for p in params if p in left] + self.stages[0]
        self.stages = [self._launches(stage, group_of) for stage in self.stages]
        for stage in self.stages:
            for *_, launch in stage:
                launch.empty_table()  # before the capture: the captured kernels read these tensors

    @staticmethod
    def _launches(params: list[torch.Tensor], group_of: dict) -> list[tuple]:
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_key.setdefault((group_of[p], p.dtype), []).append(p)
        return [(index, dtype, ps, triton_adamw.Launch([p.numel() for p in ps], ps[0].device)) for (index, dtype), ps in by_key.items()]

    def point_at(self, grads: dict[torch.Tensor, torch.Tensor]) -> None:
        """Write the launches' address tables (in place: the captured kernels read them) for these gradients."""
        for stage in self.stages:
            for _, _, ps, launch in stage:
                launch.tensors([self.optimizer.row(p, grads[p]) for p in ps], in_place=True)
        self.stale = False

    def _run_stage(self, stage: list[tuple]) -> None:
        groups = self.optimizer.param_groups
        for index, dtype, ps, launch in stage:
            steps = [self.optimizer.state[p]["step"] for p in ps]
            torch._foreach_add_(steps, 1)
            triton_adamw.step(launch, launch.empty_table(), dtype, lr=self.lr[index], grad_scale=self.scale,
                              found_inf=self.skip, **self.optimizer.constants(groups[index]))
            torch._foreach_sub_(steps, [self.skip] * len(steps))

    def defer(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor) -> None:
        """Keep this step's update pending: its gradient scale, found_inf and learning rates, as of now."""
        for lr, group in zip(self.lr, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        self.scale.copy_(grad_scale) if grad_scale is not None else self.scale.fill_(1.0)
        self.skip.copy_(found_inf)
        self.pending = True

    def apply(self) -> None:
        """Run the pending update now (eagerly, on the current stream); nothing when none is pending."""
        if self.pending and not (self.side is not None and torch.cuda.is_current_stream_capturing()):
            for stage in self.stages:
                self._run_stage(stage)
            self.skip.fill_(1.0)
            self.pending = False

    def capture(self, forward_backward):
        """Inside a graph capture: the pending update on a side stream, stage by stage, and forward_backward() on
        the capturing stream, each stage's module waiting for its update. Returns forward_backward()'s result."""
        main, side = torch.cuda.current_stream(), self.side
        side.wait_stream(main)
        events = []
        with torch.cuda.stream(side):
            for stage in self.stages:
                self._run_stage(stage)
                events.append(torch.cuda.Event())
                events[-1].record(side)
            self.skip.fill_(1.0)  # consumed: the next replay updates nothing unless defer() is called again
        fired = set()

        def wait(index: int):
            def hook(module, args):
                fired.add(index)
                main.wait_event(events[index])
            return hook

        hooks = [module.register_forward_pre_hook(wait(i)) for i, module in enumerate(self.modules)]
        try:
            out = forward_backward()
        finally:
            for hook in hooks:
                hook.remove()
        main.wait_stream(side)  # joined before the capture ends (and before the next step's defer writes skip)
        if len(fired) < len(self.modules):
            missed = next(type(m).__name__ for i, m in enumerate(self.modules) if i not in fired)
            raise StageNotReached(f"the forward never called a {missed} of its forward_stages()")
        return out

    def settle_on_reads(self) -> list:
        """Hooks that apply the pending update before the model runs eagerly or a state dict is read or loaded."""
        settle = lambda *args, **kwargs: self.apply()  # noqa: E731
        stale = lambda *args, **kwargs: setattr(self, "stale", True)  # noqa: E731 - a loaded state: new tensors
        return [self.model.register_forward_pre_hook(settle), self.model.register_state_dict_pre_hook(settle),
                self.model.register_load_state_dict_pre_hook(settle), self.optimizer.register_state_dict_pre_hook(settle),
                self.optimizer.register_load_state_dict_pre_hook(settle), self.optimizer.register_load_state_dict_post_hook(stale)]
