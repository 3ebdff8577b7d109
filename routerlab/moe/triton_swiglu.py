"""Fused SwiGLU kernels (Triton, CUDA only; imported lazily by experts.swiglu).

Input h13 [N, 2h] (gate | up, contiguous). Forward reads it once and writes silu(gate) * up [N, h];
backward reads h13 and the output gradient once and writes the input gradient [N, 2h] (and, if asked, the
forward's output again: the grouped FFN recomputes it rather than keeping it). Math in fp32.
`n_rows` (optional, a 1-element int tensor on the device, e.g. the grouped offsets' last entry): rows
at or past it are padding, neither read nor written (their outputs are unspecified), so a plan with
many padding rows, such as the fixed-exchange receiver's (parallel.py), costs only its real rows.
The pure-PyTorch `kernels.swiglu_reference` is the fallback and the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024
# Programs along the rows; each loops over rows program, program + PROGRAMS, ... up to the real row count,
# so padding rows cost no program at all: one program per row (the v5 kernels) spent ~0.2 ms per call
# launching and retiring ~200k empty programs on the fixed-exchange receiver (docs/benchmarks.md, v6).
PROGRAMS = 8192


@triton.jit
def _real_rows(n_rows, rows, HAS_LIMIT: tl.constexpr):
    end = rows
    if HAS_LIMIT:
        end = tl.minimum(tl.load(n_rows), rows)
    return end


@triton.jit
def _gate_up(h13, row, hidden, cols, mask):
    a = tl.load(h13 + row * 2 * hidden + cols, mask=mask).to(tl.float32)
    b = tl.load(h13 + row * 2 * hidden + hidden + cols, mask=mask).to(tl.float32)
    return a, b


@triton.jit
def _fwd(h13, out, n_rows, rows, hidden, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    for r in range(tl.program_id(0), _real_rows(n_rows, rows, HAS_LIMIT), tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        a, b = _gate_up(h13, row, hidden, cols, mask)
        tl.store(out + row * hidden + cols, (a * tl.sigmoid(a) * b).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(h13, grad, grad_h13, out, n_rows, rows, hidden, HAS_LIMIT: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    for r in range(tl.program_id(0), _real_rows(n_rows, rows, HAS_LIMIT), tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        a, b = _gate_up(h13, row, hidden, cols, mask)
        g = tl.load(grad + row * hidden + cols, mask=mask).to(tl.float32)
        s = tl.sigmoid(a)
        if HAS_OUT:  # the forward's output again, from the same read of h13 (bit for bit _fwd's)
            tl.store(out + row * hidden + cols, (a * s * b).to(out.dtype.element_ty), mask=mask)
        grad_a = g * b * s * (1.0 + a * (1.0 - s))
        grad_b = g * a * s
        tl.store(grad_h13 + row * 2 * hidden + cols, grad_a.to(grad_h13.dtype.element_ty), mask=mask)
        tl.store(grad_h13 + row * 2 * hidden + hidden + cols, grad_b.to(grad_h13.dtype.element_ty), mask=mask)


def _grid(rows: int, hidden: int) -> tuple[int, int]:
    return min(rows, PROGRAMS), triton.cdiv(hidden, BLOCK)


def forward(h13: Tensor, n_rows: Tensor | None = None) -> Tensor:
    rows, width = h13.shape
    hidden = width // 2
    out = torch.empty(rows, hidden, device=h13.device, dtype=h13.dtype)
    if rows:
        limit = n_rows if n_rows is not None else h13  # dummy pointer when every row is real
        _fwd[_grid(rows, hidden)](h13, out, limit, rows, hidden, HAS_LIMIT=n_rows is not None, BLOCK=BLOCK, num_warps=4)
    return out


def backward(h13: Tensor, grad: Tensor, n_rows: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """The input gradient [N, 2h]; with `out` [N, h] given, also writes the forward's output into it."""
    rows, width = h13.shape
    hidden = width // 2
    grad = grad.contiguous()
    grad_h13 = torch.empty_like(h13)
    if rows:
        limit = n_rows if n_rows is not None else h13
        _bwd[_grid(rows, hidden)](h13, grad, grad_h13, h13 if out is None else out, limit, rows, hidden, HAS_LIMIT=n_rows is not None,
                                  HAS_OUT=out is not None, BLOCK=BLOCK, num_warps=4)
    return grad_h13
