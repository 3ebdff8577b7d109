"""The AdamW update of many parameters as one Triton launch (CUDA; imported lazily by routerlab.adamw).

Each program updates one block of one parameter: it finds its parameter in a table of addresses (parameter,
gradient, both moments, step count, size), reads the four tensors once and writes the parameter and the moments
once: 14 bytes a bf16 parameter, the least AdamW can move. One launch for all parameters of a dtype: the host
issues one kernel a step, not one per parameter. Math in fp32, in the order of torch's fused AdamW (ATen's
FusedAdamWKernel), so the two agree to rounding. `found_inf` (a [] float tensor, 1 = skip) and `grad_scale` (a []
float tensor the gradient is divided by as it is read) are read on the device: no host sync.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # elements a program updates (the fastest of a sweep on the H200: benchmarks/optimizer_step.py)
NUM_WARPS = 4
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _update(param, grad, exp_avg, exp_avg_sq, offs, mask, t, grad_scale, lr, beta1, beta2, log2_beta1, log2_beta2, eps,
            weight_decay, DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr):
    p = tl.load(param + offs, mask=mask).to(tl.float32)
    g = tl.load(grad + offs, mask=mask).to(tl.float32)
    m = tl.load(exp_avg + offs, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq + offs, mask=mask).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(grad_scale)
    bias_correction1 = 1.0 - tl.exp2(t * log2_beta1)
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    p = p - lr * weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    step_size = lr / bias_correction1
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - step_size * m / denom
    tl.store(param + offs, p.to(DTYPE), mask=mask)
    tl.store(exp_avg + offs, m.to(DTYPE), mask=mask)
    tl.store(exp_avg_sq + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _adamw(tensors, block_tensor, block_start, grad_scale, found_inf, lr, beta1, beta2, log2_beta1, log2_beta2, eps,
           weight_decay, DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, BLOCK: tl.constexpr):
    skip = False
    if HAS_INF:
        skip = tl.load(found_inf) == 1.0
    if not skip:
        pid = tl.program_id(0)
        row = tensors + tl.load(block_tensor + pid).to(tl.int64) * 6  # 6 columns (Launch.tensors)
        # addresses read from a table carry no alignment the compiler can see: the hints (16 bytes, checked on the
        # host; blocks start at multiples of BLOCK) and an unmasked path for whole blocks let it move 16 bytes a
        # thread at a time (2 bytes without them: 2.5x slower on the H200, docs/benchmarks.md v6)
        param = tl.multiple_of(tl.load(row).to(tl.pointer_type(DTYPE)), 16)
        grad = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(DTYPE)), 16)
        exp_avg = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(DTYPE)), 16)
        exp_avg_sq = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(DTYPE)), 16)
        t = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))  # the step count, already counting this step
        start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
        n = tl.load(row + 5)
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            _update(param, grad, exp_avg, exp_avg_sq, offs, None, t, grad_scale, lr, beta1, beta2, log2_beta1,
                    log2_beta2, eps, weight_decay, DTYPE, HAS_SCALE)
        else:  # a parameter's last block
            _update(param, grad, exp_avg, exp_avg_sq, offs, offs < n, t, grad_scale, lr, beta1, beta2, log2_beta1,
                    log2_beta2, eps, weight_decay, DTYPE, HAS_SCALE)


@triton.jit
def _grad_sq_sums(tensors, block_tensor, block_start, n_blocks, sums, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCKS: tl.constexpr):
    """sums[p] = the float32 sum of squares of the gradient blocks p * BLOCKS .. (p + 1) * BLOCKS - 1."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(BLOCKS):
        b = tl.program_id(0) * BLOCKS + i
        if b < n_blocks:
            row = tensors + tl.load(block_tensor + b).to(tl.int64) * 2  # 2 columns: the gradient, its size
            grad = tl.multiple_of(tl.load(row).to(tl.pointer_type(DTYPE)), 16)
            start = tl.multiple_of(tl.load(block_start + b), BLOCK)
            n = tl.load(row + 1)
            offs = start + tl.arange(0, BLOCK)
            if start + BLOCK <= n:  # unmasked: 16-byte loads, as in _adamw
                g = tl.load(grad + offs).to(tl.float32)
            else:
                g = tl.load(grad + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc += g * g
    tl.store(sums + tl.program_id(0), tl.sum(acc, 0))


class Launch:
    """The tables of one launch over a fixed list of parameter sizes: each program's tensor and first element
    (made once), and the tensors' addresses (remade only when a gradient or state tensor moves)."""

    def __init__(self, sizes: list[int], device: torch.device) -> None:
        self.block, self.num_warps = BLOCK, NUM_WARPS
        blocks = torch.tensor([triton.cdiv(n, BLOCK) for n in sizes])
        self.block_tensor = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), blocks).to(device)
        first = torch.cumsum(blocks, 0) - blocks  # each tensor's first program
        self.block_start = ((torch.arange(int(blocks.sum())) - torch.repeat_interleave(first, blocks)) * BLOCK).to(device)
        self.sizes, self.device = sizes, device
        self.addresses: tuple[int, ...] = ()
        self.table: Tensor | None = None

    def tensors(self, rows: list[tuple[Tensor, ...]]) -> Tensor:
        addresses = tuple(t.data_ptr() for row in rows for t in row)
        if addresses != self.addresses:  # every eager step: backward allocates new gradients
            table = torch.tensor([[*(t.data_ptr() for t in row), n] for row, n in zip(rows, self.sizes)], dtype=torch.int64)
            # from pinned memory the copy is queued; from pageable memory CUDA first waits for the stream to drain,
            # a host sync before every eager update (the dense twin's eager step: 33.8 ms, not 29.8; docs/benchmarks.md v6)
            self.table = (table.pin_memory() if self.device.type == "cuda" else table).to(self.device, non_blocking=True)
            self.addresses = addresses
        return self.table


def step(launch: Launch, rows: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]], *, lr: float, beta1: float,
         beta2: float, eps: float, weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Update in place every (parameter, gradient, exp_avg, exp_avg_sq, step) row: the four tensors contiguous, of
    one dtype for all rows; each step count already incremented."""
    table = launch.tensors(rows)
    dummy = rows[0][4]  # a pointer for the flags a constexpr switches off
    _adamw[(launch.block_tensor.numel(),)](
        table, launch.block_tensor, launch.block_start, grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy, lr, beta1, beta2, math.log2(beta1), math.log2(beta2), eps,
        weight_decay, DTYPE=TRITON_DTYPES[rows[0][0].dtype], HAS_SCALE=grad_scale is not None,
        HAS_INF=found_inf is not None, BLOCK=launch.block, num_warps=launch.num_warps)


NORM_BLOCKS = 4  # blocks a program of the norm reads: 8 KB of a bf16 gradient


def grad_sq_sums(launch: Launch, grads: list[Tensor]) -> Tensor:
    """float32 partial sums of squares of the gradients (contiguous, of one dtype, 16-byte aligned), one a program:
    their sum is the squared L2 norm, the same every run (a fixed order, no atomics)."""
    table = launch.tensors([(g,) for g in grads])
    n_blocks = launch.block_tensor.numel()
    programs = triton.cdiv(n_blocks, NORM_BLOCKS)
    sums = torch.empty(programs, device=grads[0].device, dtype=torch.float32)
    _grad_sq_sums[(programs,)](table, launch.block_tensor, launch.block_start, n_blocks, sums,
                               DTYPE=TRITON_DTYPES[grads[0].dtype], BLOCK=launch.block, BLOCKS=NORM_BLOCKS,
                               num_warps=launch.num_warps)
    return sums
