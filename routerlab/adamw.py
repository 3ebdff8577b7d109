"""The trainer's optimizer: torch's AdamW, whose step on CUDA is one Triton launch for all parameters of a dtype.

It is `torch.optim.AdamW(fused=True)` in everything but the kernel: the same state (a float32 `step` tensor on the
parameter's device, `exp_avg`, `exp_avg_sq`), so checkpoints load into either; the same device-side `found_inf`
(skip the update, step count included) and `grad_scale` (divide each gradient as it is read: the trainer's clip).
One difference: torch's step writes the divided gradients back into `.grad`; this one leaves them as they were.
Why a kernel of our own: torch's fused AdamW makes that write and moves its tensors through multi-tensor chunks:
5.4 ms a step for the 840M-parameter E=64 preset in bf16, where a copy of the bytes AdamW must move (read four
tensors, write three) takes 2.8 ms; this kernel takes 3.2-3.5 (docs/benchmarks.md, issue 19 v6). Where the kernel
cannot run (CPU, float64, amsgrad, a tensor lr) the step is torch's own.
"""
from __future__ import annotations

import torch

from routerlab.kernel_choice import uses_triton


class AdamW(torch.optim.AdamW):
    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, fused=True, **kwargs)
        self._launches: dict[tuple, object] = {}  # (group index or "norm", device, dtype, sizes) -> triton_adamw.Launch

    def _kernel_runs(self, group: dict, params: list[torch.Tensor]) -> bool:
        plain = not (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"])
        scalars = all(isinstance(group[k], float) for k in ("lr", "weight_decay", "eps")) and all(
            isinstance(b, float) and 0 < b < 1 for b in group["betas"])
        return plain and scalars and _kernel_reads(params)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor | None:
        """The L2 norm of every gradient (a [] float32 tensor on their device) from one Triton launch a dtype, or None
        where the kernel cannot read them (CPU, float64, several devices): the caller then takes torch's norm.
        Why: torch's foreach norm reads the preset's 1.7 GB of bf16 gradients at ~2.4 TB/s on an H200 (0.70 ms a
        step) and rounds the norm to bf16; this one sums squares in float32 and rounds nothing."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params or not _kernel_reads(params) or len({p.device for p in params}) > 1:
            return None
        from routerlab import triton_adamw

        sums = []
        for (device, dtype), same in _by_device_and_dtype(params).items():
            key = ("norm", device, dtype, tuple(p.numel() for p in same))
            if key not in self._launches:
                self._launches[key] = triton_adamw.Launch(list(key[3]), device)
            sums.append(triton_adamw.grad_sq_sums(self._launches[key], [p.grad for p in same]))
        return torch.cat(sums).sum().sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        if closure is not None or not all(self._kernel_runs(g, ps) for g, ps in groups if ps):
            return super().step(closure)
        from routerlab import triton_adamw

        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for index, (group, params) in enumerate(groups):
            for p in params:
                state = self.state[p]
                if not state:  # as torch's fused AdamW makes it
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device or state["step"].dtype != torch.float32:
                    # a state saved by a CPU run: torch's unfused AdamW keeps the step on the host, where the kernel
                    # cannot read it
                    state["step"] = state["step"].to(p.device, torch.float32)
            for (device, dtype), same in _by_device_and_dtype(params).items():
                steps = [self.state[p]["step"] for p in same]
                torch._foreach_add_(steps, 1)
                key = (index, device, dtype, tuple(p.numel() for p in same))
                if key not in self._launches:
                    self._launches[key] = triton_adamw.Launch(list(key[3]), device)
                rows = [(p, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"], self.state[p]["step"]) for p in same]
                beta1, beta2 = group["betas"]
                triton_adamw.step(self._launches[key], rows, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                  weight_decay=group["weight_decay"], grad_scale=grad_scale, found_inf=found_inf)
                if found_inf is not None:  # a skipped step does not count, as in torch's
                    torch._foreach_sub_(steps, [found_inf] * len(steps))
        return None


def _kernel_reads(params: list[torch.Tensor]) -> bool:
    # the kernels read 16 bytes at a time: every tensor they touch starts on a 16-byte boundary (a gradient that
    # is a view into a flat buffer may not; the moments are made by the allocator, aligned)
    return all(uses_triton(p) and p.grad.dtype == p.dtype and p.is_contiguous() and p.grad.is_contiguous()
               and p.data_ptr() % 16 == 0 and p.grad.data_ptr() % 16 == 0 for p in params)


def _by_device_and_dtype(params: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return groups
