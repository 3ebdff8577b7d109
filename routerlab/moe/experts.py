"""ExpertBank: all experts' weights stacked, so one grouped matmul serves them all.

Weights: `w_in` [E, d, 2h] (SwiGLU: gate columns [:h], up columns [h:]) or [E, d, h] (GELU), and
`w_out` [E, h, d]. Gate and up share one matrix so the first expert GEMM is one wide product.

Input rows arrive sorted by expert: `counts[e]` rows for expert e, then possibly padding rows (slots
that were dropped or unused) at the end. Padding rows' values and outputs are unspecified (the GPU
permute leaves them unset, NaN included): no result depends on rows past counts.sum() (see layer.combine).
How the experts are computed is the backend's business (routerlab/moe/backends.py: loop, grouped, padded, auto).

Sharded banks (expert parallelism): a bank may hold only a contiguous block of the experts, `num_experts` of
`total_experts` starting at `first_expert`. Built inside `expert_shard(rank, size)`, a bank draws the same
initial values as the whole bank would from the same seed but keeps only its block: the whole bank is never
built (routerlab/distributed.py builds the model that way under torchrun).
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.moe.backends import expert_backend
from routerlab.moe.kernels import swiglu

ACTIVATIONS = ("swiglu", "gelu")

_SHARD: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("expert_shard", default=None)


@contextmanager
def expert_shard(rank: int, size: int):
    """ExpertBanks built inside hold only block `rank` of `size` equal blocks of their experts."""
    token = _SHARD.set((rank, size))
    try:
        yield
    finally:
        _SHARD.reset(token)


def _randn_block(total: int, shape: tuple[int, ...], first: int, count: int) -> Tensor:
    """torch.randn(total, *shape)[first:first + count] from the global generator, leaving it where the full
    draw would, without holding the full tensor when the CPU generator allows: it fills normals in groups of
    16 numbers, so for items of a multiple of 16 numbers, item by item is the same stream (tests pin this)."""
    numel = math.prod(shape)
    if count == total:
        return torch.randn(total, *shape)
    if numel < 16 or numel % 16:
        return torch.randn(total, *shape)[first : first + count].clone()
    out = torch.empty(count, *shape)
    for e in range(total):
        item = torch.randn(shape)
        if first <= e < first + count:
            out[e - first] = item
    return out


class ExpertBank(nn.Module):
    """E feed-forward experts (SwiGLU or GELU) with stacked weights (or a block of them, see expert_shard)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu", shard: tuple[int, int] | None = None, init: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        rank, size = shard if shard is not None else (_SHARD.get() or (0, 1))
        if num_experts % size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel size {size}")
        local = num_experts // size
        self.num_experts, self.total_experts, self.first_expert = local, num_experts, rank * local
        self.d_model, self.hidden, self.activation = d_model, hidden, activation
        width = 2 * hidden if activation == "swiglu" else hidden
        if not init:  # values set by the caller (block); the generator is not touched
            self.w_in, self.w_out = nn.Parameter(torch.empty(local, d_model, width)), nn.Parameter(torch.empty(local, hidden, d_model))
            return
        self.w_in = nn.Parameter(_randn_block(num_experts, (d_model, width), self.first_expert, local) / math.sqrt(d_model))
        self.w_out = nn.Parameter(_randn_block(num_experts, (hidden, d_model), self.first_expert, local) / math.sqrt(hidden))

    @property
    def sharded(self) -> bool:
        return self.num_experts != self.total_experts

    def block(self, rank: int, size: int) -> ExpertBank:
        """A bank holding block `rank` of `size` of this (whole) bank's experts, with their current values."""
        if self.sharded:
            raise ValueError("block() takes a whole bank; this one is already a shard")
        bank = ExpertBank(self.num_experts, self.d_model, self.hidden, self.activation, shard=(rank, size), init=False)
        source = next(self.parameters())
        bank.to(source.device, source.dtype)
        with torch.no_grad():
            for name, param in bank.named_parameters():
                param.copy_(self.get_parameter(name)[bank.first_expert : bank.first_expert + bank.num_experts])
        return bank

    def act(self, h: Tensor) -> Tensor:
        return swiglu(h) if self.activation == "swiglu" else F.gelu(h)

    def forward(self, x: Tensor, counts: Tensor, backend: str = "auto") -> Tensor:
        """x: [N, d] rows sorted by expert (padding rows last); counts: int [E] rows per (local) expert."""
        if torch.is_autocast_enabled(x.device.type):
            # mixed precision: the backends' own kernels (grouped_mm, Triton) sit outside autocast, so cast here:
            # the float32 master weights stay the parameters, their bf16 copies carry the gradient back to them
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return expert_backend(backend)(BankOn(self, self.w_in.to(dtype), self.w_out.to(dtype)), x.to(dtype), counts)
        return expert_backend(backend)(self, x, counts)


class BankOn:
    """What a backend reads of an ExpertBank, on other tensors standing for its weights: their compute-dtype casts
    (mixed precision, differentiably), or leaves sharing their memory (core_graph's capture, which must not touch the
    parameters' own autograd nodes). Called like the bank."""

    def __init__(self, bank: ExpertBank, w_in: Tensor, w_out: Tensor) -> None:
        self.w_in, self.w_out = w_in, w_out
        self.act, self.activation, self.d_model, self.num_experts, self.hidden = bank.act, bank.activation, bank.d_model, bank.num_experts, bank.hidden

    def __call__(self, x: Tensor, counts: Tensor, backend: str = "auto") -> Tensor:
        return ExpertBank.forward(self, x, counts, backend)
