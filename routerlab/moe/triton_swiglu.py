"""Fused SwiGLU kernels (Triton, CUDA only; imported lazily by experts.swiglu).

Input h13 [N, 2h] (gate | up, contiguous). Forward reads it once and writes silu(gate) * up [N, h];
backward reads h13 and the output gradient once and writes the input gradient [N, 2h]. Math in fp32.
The pure-PyTorch `experts.swiglu_reference` is the fallback and the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _fwd(h13, out, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    a = tl.load(h13 + row * 2 * hidden + cols, mask=mask).to(tl.float32)
    b = tl.load(h13 + row * 2 * hidden + hidden + cols, mask=mask).to(tl.float32)
    g = a * tl.sigmoid(a) * b
    tl.store(out + row * hidden + cols, g.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(h13, grad, grad_h13, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    a = tl.load(h13 + row * 2 * hidden + cols, mask=mask).to(tl.float32)
    b = tl.load(h13 + row * 2 * hidden + hidden + cols, mask=mask).to(tl.float32)
    g = tl.load(grad + row * hidden + cols, mask=mask).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    grad_a = g * b * s * (1.0 + a * (1.0 - s))
    grad_b = g * silu
    tl.store(grad_h13 + row * 2 * hidden + cols, grad_a.to(grad_h13.dtype.element_ty), mask=mask)
    tl.store(grad_h13 + row * 2 * hidden + hidden + cols, grad_b.to(grad_h13.dtype.element_ty), mask=mask)


def forward(h13: Tensor) -> Tensor:
    rows, width = h13.shape
    hidden = width // 2
    out = torch.empty(rows, hidden, device=h13.device, dtype=h13.dtype)
    if rows:
        _fwd[(rows, triton.cdiv(hidden, BLOCK))](h13, out, hidden, BLOCK=BLOCK, num_warps=4)
    return out


def backward(h13: Tensor, grad: Tensor) -> Tensor:
    rows, width = h13.shape
    hidden = width // 2
    grad = grad.contiguous()
    grad_h13 = torch.empty_like(h13)
    if rows:
        _bwd[(rows, triton.cdiv(hidden, BLOCK))](h13, grad, grad_h13, hidden, BLOCK=BLOCK, num_warps=4)
    return grad_h13
