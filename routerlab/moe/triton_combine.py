"""Fused gather kernels for permute-backward and combine (Triton, CUDA only; imported lazily by layer).

Slot j of token t is j * T + t; inv[slot] is its row among the expert-sorted rows; a slot is kept when
inv[slot] < n_kept (a device scalar, so nothing waits on the host). Padding rows may hold anything.

  gather_rows     out[row] = x[token_of_row[row]] for row < n_kept               (permute forward)
  gather_reduce   out[t] = sum_j kept * w[t, j] * src[inv[j, t]]      (combine forward; permute backward, w = 1)
  combine_grads   grad_y[inv[j, t]] = w[t, j] * grad[t];  grad_w[t, j] = <y[inv[j, t]], grad[t]>   (kept slots)

One pass over the real rows each, fp32 accumulation; padding rows are neither read nor written, so they
cost nothing however many there are (the fixed-exchange receiver's plan is half padding, parallel.py).
The torch versions in layer.py are the fallback and reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ROW_PROGRAMS = 8192  # gather_rows: programs along the rows, each looping over rows below n_kept


@triton.jit
def _gather_reduce(src, inv, n_kept, w, out, T, d, k, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < d
    n = tl.load(n_kept)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, k):
        row = tl.load(inv + j * T + t)
        keep = row < n
        scale = 1.0
        if HAS_W:
            scale = tl.load(w + t * k + j).to(tl.float32)
        vals = tl.load(src + row * d + cols, mask=cols < tl.where(keep, d, 0), other=0.0).to(tl.float32)
        acc += tl.where(keep, vals * scale, 0.0)
    tl.store(out + t * d + cols, acc.to(out.dtype.element_ty), mask=cmask)


@triton.jit
def _gather_rows(x, token_of_row, n_kept, out, d, BLOCK: tl.constexpr):
    # programs loop over the rows below n_kept (read on the device): padding rows cost no program
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    for r in range(tl.program_id(0), tl.load(n_kept), tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        t = tl.load(token_of_row + row)
        tl.store(out + row * d + cols, tl.load(x + t * d + cols, mask=mask), mask=mask)


@triton.jit
def _combine_grads(y, grad, inv, n_kept, w, grad_y, grad_w, T, d, k, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.load(n_kept)
    for j in range(0, k):
        slot = j * T + t
        row = tl.load(inv + slot)
        keep = row < n
        scale = tl.where(keep, tl.load(w + t * k + j).to(tl.float32), 0.0)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, d, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            g = tl.load(grad + t * d + cols, mask=cols < d, other=0.0).to(tl.float32)
            kmask = cols < tl.where(keep, d, 0)  # a padding slot's row is neither read nor written
            yv = tl.load(y + row * d + cols, mask=kmask, other=0.0).to(tl.float32)
            dot += yv * g
            tl.store(grad_y + row * d + cols, (g * scale).to(grad_y.dtype.element_ty), mask=kmask)
        tl.store(grad_w + t * k + j, tl.where(keep, tl.sum(dot, 0), 0.0))


def _block(d: int) -> int:
    return min(1024, triton.next_power_of_2(d))


def gather_reduce(src: Tensor, inv: Tensor, n_kept: Tensor, weights: Tensor | None, num_tokens: int, k: int) -> Tensor:
    d = src.shape[1]
    out = torch.empty(num_tokens, d, device=src.device, dtype=src.dtype)
    if num_tokens:
        block = _block(d)
        w = weights.contiguous() if weights is not None else src  # dummy pointer when unweighted
        _gather_reduce[(num_tokens, triton.cdiv(d, block))](src.contiguous(), inv, n_kept, w, out, num_tokens, d, k,
                                                            HAS_W=weights is not None, BLOCK=block, num_warps=4)
    return out


def gather_rows(x: Tensor, token_of_row: Tensor, n_kept: Tensor) -> Tensor:
    rows, d = token_of_row.numel(), x.shape[1]
    out = torch.empty(rows, d, device=x.device, dtype=x.dtype)
    if rows:
        block = _block(d)
        _gather_rows[(min(rows, ROW_PROGRAMS), triton.cdiv(d, block))](x.contiguous(), token_of_row, n_kept, out, d, BLOCK=block, num_warps=4)
    return out


def combine_grads(y: Tensor, grad: Tensor, inv: Tensor, n_kept: Tensor, weights: Tensor, num_tokens: int, k: int) -> tuple[Tensor, Tensor]:
    d = y.shape[1]
    grad_y = torch.empty_like(y)
    grad_w = torch.empty(num_tokens, k, device=y.device, dtype=torch.float32)
    if num_tokens:
        _combine_grads[(num_tokens,)](y, grad.contiguous(), inv, n_kept, weights.contiguous(), grad_y, grad_w,
                                      num_tokens, d, k, BLOCK=_block(d), num_warps=4)
    return grad_y, grad_w
