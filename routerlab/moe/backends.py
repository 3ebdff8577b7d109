"""Expert backends: how an ExpertBank computes its experts on rows sorted by expert. One protocol, one class each.

    backend(bank, x, counts) -> y     x [N, d] rows sorted by expert (counts[e] rows for expert e, padding
                                      rows last), y [N, d]; rows past counts.sum() are unspecified
    backend.supports(x) -> bool       whether it runs on x's device and dtype

  loop     one matmul per expert (the reference: always correct, any device and dtype)
  grouped  torch grouped matmul over the sorted rows (CUDA sm90+ bf16/fp16; CPU bf16/fp16); no host sync
  padded   rows scattered into an [E, C, d] buffer, C = largest count, then batched matmul
  auto     grouped where it runs, else loop (which beat padded in every idle-CPU run, docs/benchmarks.md)
Every backend equals `loop` forward and backward (tests/test_moe_core.py). A new backend is one class in any
file (a plugin file too, routerlab/registry.py) decorated `@register_backend("name")`; `model.backend=name` finds it.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from routerlab.moe.kernels import GroupedSwiGLUFFN, grouped_mm, grouped_mm_supported
from routerlab.registry import Registry

# classes registered by name (stateless: one instance each, made on first use); no parameters
BACKEND_REGISTRY = Registry("expert backend", name_attribute="name")
register_backend = BACKEND_REGISTRY.register


class ExpertBackend(Protocol):
    name: str  # set by register_backend

    def supports(self, x: Tensor) -> bool: ...

    def __call__(self, bank, x: Tensor, counts: Tensor) -> Tensor: ...


def _pad_rows(y: Tensor, rows: int) -> Tensor:
    return y if y.shape[0] == rows else torch.cat([y, y.new_zeros(rows - y.shape[0], y.shape[1])])


@register_backend("loop")
class Loop:

    def supports(self, x: Tensor) -> bool:
        return True

    def __call__(self, bank, x: Tensor, counts: Tensor) -> Tensor:
        sizes = counts.tolist()
        # unbind, not w[e]: indexing would give every expert its own full-size gradient buffer
        w_in, w_out = bank.w_in.unbind(0), bank.w_out.unbind(0)
        outs = []
        for e, rows in enumerate(x[: sum(sizes)].split(sizes)):
            if rows.shape[0]:
                outs.append(bank.act(rows @ w_in[e]) @ w_out[e])
        y = torch.cat(outs) if outs else x.new_zeros(0, bank.d_model)
        return _pad_rows(y, x.shape[0])


@register_backend("grouped")
class Grouped:

    def supports(self, x: Tensor) -> bool:
        return grouped_mm_supported(x)

    def __call__(self, bank, x: Tensor, counts: Tensor) -> Tensor:
        if not self.supports(x):
            raise ValueError(f"backend 'grouped' needs bf16/fp16 on CPU or a CUDA GPU of compute capability >= 9; got {x.dtype} on {x.device}")
        offs = counts.cumsum(0).to(torch.int32)
        if bank.activation == "swiglu":
            return GroupedSwiGLUFFN.apply(x, bank.w_in, bank.w_out, offs)
        return grouped_mm(bank.act(grouped_mm(x, bank.w_in, offs=offs)), bank.w_out, offs=offs)


@register_backend("padded")
class Padded:

    def supports(self, x: Tensor) -> bool:
        return True

    def __call__(self, bank, x: Tensor, counts: Tensor) -> Tensor:
        E = bank.num_experts
        capacity = int(counts.max()) if x.shape[0] else 0
        kept = int(counts.sum())
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=kept)
        starts = counts.cumsum(0) - counts
        slot = expert_of_row * capacity + torch.arange(kept, device=x.device) - starts[expert_of_row]
        buf = x.new_zeros(E * capacity, x.shape[1]).index_copy(0, slot, x[:kept]).view(E, capacity, x.shape[1])  # not -1: capacity may be 0
        y = torch.bmm(bank.act(torch.bmm(buf, bank.w_in)), bank.w_out)  # act takes the 3-D [E, C, 2h] tensor
        return _pad_rows(y.flatten(0, 1)[slot], x.shape[0])  # flatten, not reshape(-1): capacity may be 0 (nothing kept)


@register_backend("auto")
class Auto:
    """grouped where it runs; else the per-expert loop, which beat `padded` in every run of `routerlab bench`
    on an idle 2-core CPU (fp32; docs/benchmarks.md)."""

    def choose(self, x: Tensor) -> ExpertBackend:
        return expert_backend("grouped") if expert_backend("grouped").supports(x) else expert_backend("loop")

    def supports(self, x: Tensor) -> bool:
        return True

    def __call__(self, bank, x: Tensor, counts: Tensor) -> Tensor:
        return self.choose(x)(bank, x, counts)


BACKENDS = ("auto", "loop", "grouped", "padded")  # the built-in ones
_INSTANCES: dict[type, ExpertBackend] = {}


def expert_backend(name: str) -> ExpertBackend:
    """The backend registered as `name` (ConfigError naming the valid ones otherwise)."""
    cls = BACKEND_REGISTRY.entry(name).obj
    if cls not in _INSTANCES:
        _INSTANCES[cls] = cls()
    return _INSTANCES[cls]


def choose_backend(backend: str, x: Tensor) -> str:
    """The name of the backend that `backend` runs on x (auto resolved)."""
    chosen = expert_backend(backend)
    return chosen.choose(x).name if isinstance(chosen, Auto) else chosen.name
