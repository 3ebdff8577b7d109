"""ExpertBank: all experts' weights stacked ([E, d, h], [E, h, d]) so one grouped matmul serves them all.

Rows of the input arrive sorted by expert, `counts[e]` rows for expert e. Backends:
  loop     one matmul per expert (the reference: always correct, any device and dtype)
  grouped  torch grouped matmul over the sorted rows (CUDA bf16/fp16; CPU bf16/fp16)
  padded   rows scattered into an [E, C, d] buffer, C = largest count, then batched matmul
Every backend equals `loop` (tests/test_moe_core.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("auto", "loop", "grouped", "padded")
ACTIVATIONS = ("swiglu", "gelu")

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: Tensor) -> bool:
    """grouped_mm needs bf16/fp16 (its fp32 backward fails on CPU) and, on CUDA, a Hopper-class GPU."""
    if _grouped_mm is None or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


def choose_backend(backend: str, x: Tensor) -> str:
    if backend != "auto":
        return backend
    if grouped_mm_supported(x):
        return "grouped"
    return "loop"


class ExpertBank(nn.Module):
    """E feed-forward experts (SwiGLU or GELU) with stacked weights."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.d_model, self.hidden, self.activation = num_experts, d_model, hidden, activation
        self.w1 = nn.Parameter(torch.randn(num_experts, d_model, hidden) / math.sqrt(d_model))
        self.w3 = nn.Parameter(torch.randn(num_experts, d_model, hidden) / math.sqrt(d_model)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, d_model) / math.sqrt(hidden))

    def _act(self, a: Tensor, b: Tensor | None) -> Tensor:
        return F.silu(a) * b if b is not None else F.gelu(a)

    def forward(self, x: Tensor, counts: Tensor, backend: str = "auto") -> Tensor:
        """x: [N, d] rows sorted by expert; counts: int [E] rows per expert (sum N)."""
        backend = choose_backend(backend, x)
        if backend == "loop":
            return self._loop(x, counts)
        if backend == "grouped":
            return self._grouped(x, counts)
        if backend == "padded":
            return self._padded(x, counts)
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")

    def _loop(self, x: Tensor, counts: Tensor) -> Tensor:
        outs = []
        for e, rows in enumerate(x.split(counts.tolist())):
            if rows.shape[0] == 0:
                continue
            gate = rows @ self.w3[e] if self.w3 is not None else None
            outs.append(self._act(rows @ self.w1[e], gate) @ self.w2[e])
        return torch.cat(outs) if outs else x.new_zeros(0, self.d_model)

    def _grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        if not grouped_mm_supported(x):
            raise ValueError(f"backend 'grouped' needs bf16/fp16 on CPU or a CUDA GPU of compute capability >= 9; got {x.dtype} on {x.device}")
        offs = counts.cumsum(0).to(torch.int32)
        gate = _grouped_mm(x, self.w3, offs=offs) if self.w3 is not None else None
        return _grouped_mm(self._act(_grouped_mm(x, self.w1, offs=offs), gate), self.w2, offs=offs)

    def _padded(self, x: Tensor, counts: Tensor) -> Tensor:
        E = self.num_experts
        capacity = int(counts.max()) if x.shape[0] else 0
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=x.shape[0])
        starts = counts.cumsum(0) - counts
        slot = expert_of_row * capacity + torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
        buf = x.new_zeros(E * capacity, x.shape[1]).index_copy(0, slot, x).view(E, capacity, -1)
        gate = torch.bmm(buf, self.w3) if self.w3 is not None else None
        y = torch.bmm(self._act(torch.bmm(buf, self.w1), gate), self.w2)
        return y.reshape(E * capacity, -1)[slot]
