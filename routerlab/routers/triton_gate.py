"""The float32 gate of a bf16 router in four Triton kernels (CUDA; imported lazily by GatedRouter.raw_logits).

The gate's float32 default, `F.linear(x.float(), W.float())`, moves x's bytes four more times than the logits need:
it writes a float32 copy of x (twice x's bytes), keeps it for the weight gradient, and in the backward writes a
float32 input gradient that a cast reads again to round it to bf16: 0.078 ms of kernels a layer at the E=64 preset
(T=16384, d=1024) for GEMMs of 2 GFLOP. These kernels read x as it is (0.056 ms; docs/benchmarks.md, issue 19 v9):

  forward   logits [T, E] float32 = x @ W^T: bf16 products (exact in fp32), fp32 sums
  backward  grad_logits enters the bf16 tensor cores as [hi | lo], two bf16 numbers a logit whose sum carries 16
            of its 24 significant bits (a [T, 2E] tensor, a kernel of its own); then
            grad_x = [hi | lo] @ [W; W], one product rounded once to bf16, and
            grad_W = hi^T @ x + lo^T @ x as fp32 sums over fixed blocks of rows (a split-K GEMM), then summed over
            the blocks in order: the same numbers every run

So the forward sums the same exact products as the cast path's TF32 GEMM (TF32 holds every bf16 value) and the
backward carries grad_logits more precisely than TF32 (11 bits) does; only the order of fp32 sums differs. Taken
only where TF32 is on (train.tf32, the default: with it off the cast path computes the backward in full fp32) and
inside a captured CUDA graph (gated.py: uses_gate_kernel says why).
Why bf16 operands read from memory: Hopper's TF32 tensor-core instructions read only K-major operands, and both
backward products need a transposed one; a first version (TF32 operands, then hi/lo made in registers, one kernel
for both gradients) ran the backward at ~1.2 TB/s, slower than the cast path (docs/benchmarks.md, issue 19 v9).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T, BLOCK_D = 64, 128
WEIGHT_BLOCK_D = 64  # the weight gradient's [2E, columns] fp32 accumulator stays in registers
PROGRAMS = 256  # the weight gradient's target grid: ~2 programs an H200 SM, each summing over 1,024 rows at the preset
# Triton 3.9's interpreter returns garbage from a bf16 tl.dot: there (the CPU tests) the operands are widened to
# float32 first, which computes the same exact products
UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gate_logits(x, w, logits, T, D, E, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    rmask, emask = rows < T, experts < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        xt = tl.load(x + rows[:, None].to(tl.int64) * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        wt = tl.load(w + experts[None, :] * D + cols[:, None], mask=emask[None, :] & cmask[:, None], other=0.0)  # W^T tile
        acc = _mm(xt, wt, acc, UPCAST)
    tl.store(logits + rows[:, None].to(tl.int64) * E + experts[None, :], acc, mask=rmask[:, None] & emask[None, :])


@triton.jit
def _split_hi_lo(g, g2, T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """g2 [T, 2E] bf16 = [hi | lo] of g [T, E] float32: hi = bf16(g), lo = bf16(g - hi)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    mask = (rows < T)[:, None] & (cols < E)[None, :]
    v = tl.load(g + rows[:, None].to(tl.int64) * E + cols[None, :], mask=mask, other=0.0)
    hi = v.to(tl.bfloat16)
    out = g2 + rows[:, None].to(tl.int64) * (2 * E) + cols[None, :]
    tl.store(out, hi, mask=mask)
    tl.store(out + E, (v - hi.to(tl.float32)).to(tl.bfloat16), mask=mask)


@triton.jit
def _gate_input_grad(g2, w2, grad_x, T, D, E2, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """grad_x tile = [hi | lo] [BLOCK_T, 2E] @ [W; W] [2E, BLOCK_D]: one product of K = 2E, rounded once."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, BLOCK_E)
    rmask, cmask, kmask = rows < T, cols < D, k < E2
    a = tl.load(g2 + rows[:, None].to(tl.int64) * E2 + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    b = tl.load(w2 + k[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
    out = _mm(a, b, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), UPCAST)
    tl.store(grad_x + rows[:, None].to(tl.int64) * D + cols[None, :], out.to(grad_x.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _gate_weight_grad(g2, x, parts, T, D, E2, rows_per_program, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """parts[p] = [hi | lo]^T @ x over rows [p * rows_per_program, ...), columns of program axis 1: a split-K GEMM
    whose operands both come from memory as they are."""
    part = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, BLOCK_E)
    cmask, kmask = cols < D, k < E2
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    start = part * rows_per_program
    for r0 in range(start, start + rows_per_program, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        a = tl.load(g2 + rows[None, :].to(tl.int64) * E2 + k[:, None], mask=kmask[:, None] & rmask[None, :], other=0.0)
        b = tl.load(x + rows[:, None].to(tl.int64) * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc = _mm(a, b, acc, UPCAST)
    tl.store(parts + part.to(tl.int64) * E2 * D + k[:, None] * D + cols[None, :], acc, mask=kmask[:, None] & cmask[None, :])


def _block_e(E: int) -> int:
    return max(16, triton.next_power_of_2(E))  # tl.dot's least tile side is 16


def _row_parts(T: int, D: int) -> tuple[int, int]:
    """(parts, rows a part) of the weight gradient: ~PROGRAMS programs over the column blocks, whole row blocks."""
    row_blocks = triton.cdiv(max(T, 1), BLOCK_T)
    parts = min(row_blocks, max(1, triton.cdiv(PROGRAMS, triton.cdiv(D, WEIGHT_BLOCK_D))))
    rows = triton.cdiv(row_blocks, parts) * BLOCK_T
    return triton.cdiv(max(T, 1), rows), rows


def split_hi_lo(g: Tensor) -> Tensor:
    """[T, 2E] bf16 [hi | lo] of a [T, E] tensor: hi + lo = g to 16 significant bits."""
    g = g.float().contiguous()
    T, E = g.shape
    g2 = torch.empty(T, 2 * E, device=g.device, dtype=torch.bfloat16)
    if T:
        _split_hi_lo[(triton.cdiv(T, BLOCK_T),)](g, g2, T, E, BLOCK_T=BLOCK_T, BLOCK_E=_block_e(E), num_warps=4)
    return g2


class Fp32Gate(torch.autograd.Function):
    """float32 logits [..., E] = x [..., d] @ weight [E, d]^T for a bf16 x and weight (no bias)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        weight = weight.contiguous()
        (T, D), E = x2.shape, weight.shape[0]
        logits = torch.empty(T, E, device=x.device, dtype=torch.float32)
        if T:
            _gate_logits[(triton.cdiv(T, BLOCK_T),)](x2, weight, logits, T, D, E, UPCAST=UPCAST, BLOCK_T=BLOCK_T,
                                                     BLOCK_E=_block_e(E), BLOCK_D=BLOCK_D, num_warps=4)
        ctx.save_for_backward(x2, weight)
        ctx.shape = shape
        return logits.view(*shape[:-1], E)

    @staticmethod
    def backward(ctx, grad_logits: Tensor):
        x2, weight = ctx.saved_tensors
        needs_x, needs_w = ctx.needs_input_grad
        (T, D), E = x2.shape, weight.shape[0]
        g2 = split_hi_lo(grad_logits.reshape(T, E))
        block_e = _block_e(2 * E)
        grad_x = grad_w = None
        if needs_x:
            grad_x = torch.empty_like(x2)
            if T:
                _gate_input_grad[(triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))](
                    g2, torch.cat([weight, weight]), grad_x, T, D, 2 * E, UPCAST=UPCAST, BLOCK_T=BLOCK_T, BLOCK_E=block_e,
                    BLOCK_D=BLOCK_D, num_warps=4)
            grad_x = grad_x.view(ctx.shape)
        if needs_w:
            parts, rows = _row_parts(T, D)
            sums = (torch.empty if T else torch.zeros)(parts, 2, E, D, device=x2.device, dtype=torch.float32)
            if T:  # every program writes its whole tile: no zeroing
                _gate_weight_grad[(parts, triton.cdiv(D, WEIGHT_BLOCK_D))](
                    g2, x2, sums, T, D, 2 * E, rows, UPCAST=UPCAST, BLOCK_T=BLOCK_T, BLOCK_E=block_e,
                    BLOCK_D=WEIGHT_BLOCK_D, num_warps=8)
            grad_w = sums.sum((0, 1)).to(weight.dtype)  # over the row blocks and hi, lo: one reduction, a fixed order
        return grad_x, grad_w
