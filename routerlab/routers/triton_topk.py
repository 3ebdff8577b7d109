"""Softmax, its log-normalizer and top-k selection of the router's logits in one Triton kernel, and their
gradient in one more (CUDA; imported lazily by GatedRouter.route_topk, routers/gated.py).

Eager PyTorch spends ~15 kernels a layer on what a top-k softmax router computes from its [T, E] logits:
softmax, topk (a radix select and a sort), gather, the renormalization, logsumexp for the z-loss, and their
backward; the preset's 64 experts fit one register tile per block of tokens, so a kernel reads the logits once.

  forward   probs = softmax(l), lse = logsumexp(l), experts = the k largest logits (lowest index first among
            equal ones, NaN first as in torch.topk; always k distinct experts), weights = probs[experts], divided by their sum if RENORM
  backward  grad_l = p * (g_p + g_w* - <g_p + g_w*, p>) + g_lse * p                      (RENORM off)
            grad_l = p * (g_p - <g_p, p>) + g_lse * p + w* * (g_w* - <g_w, w>)          (RENORM on)
            where x* scatters a [T, k] value to its experts' columns: renormalized weights are the softmax of the
            chosen logits alone, so the other logits get no gradient from them.
With loss coefficients given, the kernels also compute the router's two usual aux losses, already scaled, where
the selection has everything they need (PyTorch spent ~16 small kernels a layer on them and their gradient):
  balance   c_b * E * sum_e f_e P_e   (Switch; f_e the share of the T*k chosen slots, P_e the mean probability)
  z         c_z * mean_t lse_t^2      (ST-MoE)
Each program writes its column sums of p, its counts of chosen slots and its sum of lse^2; one small kernel sums
those in a fixed order (deterministic) into the two losses and the balance loss's gradient per probability,
c_b * E * f_e / T, which the backward adds to g_p, as it adds g_z * 2 c_z lse_t / T to g_lse.
All math in float32; logits float32 (the gate's default); rows of BLOCK_T tokens per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from routerlab.routers.triton_sums import column_sums


@triton.jit
def _topk_softmax(logits, probs, lse, experts, weights, partials, T, E, K: tl.constexpr, KP: tl.constexpr, RENORM: tl.constexpr,
                  LOSSES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, KP)
    rmask = rows < T
    mask = rmask[:, None] & (cols[None, :] < E)
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    l = tl.load(logits + offs, mask=mask, other=-float("inf"))
    m = tl.where(rmask, tl.max(l, 1), 0.0)  # rows past T: neither -inf - -inf nor 0 / 0
    e = tl.exp(l - m[:, None])
    s = tl.where(rmask, tl.sum(e, 1), 1.0)
    p = e / s[:, None]
    tl.store(probs + offs, p, mask=mask)
    row_lse = m + tl.log(s)
    tl.store(lse + rows, row_lse, mask=rmask)
    # each choice is the largest logit among the real experts not yet taken, the lowest index among equal ones; NaN
    # ranks first, as in torch.topk, and -inf logits are still real experts: k distinct experts whatever the values
    cur = tl.where(l == l, l, float("inf"))
    free = (cols[None, :] < E) & (rows[:, None] >= 0)
    chosen_e = tl.zeros([BLOCK_T, KP], dtype=tl.int64)
    chosen_p = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(tl.where(free, cur, -float("inf")), 1)
        idx = tl.min(tl.where(free & (cur == best[:, None]), cols[None, :], BLOCK_E), 1)
        hit = cols[None, :] == idx[:, None]
        pj = tl.sum(tl.where(hit, p, 0.0), 1)
        chosen_e = tl.where(slots[None, :] == j, idx[:, None].to(tl.int64), chosen_e)
        chosen_p = tl.where(slots[None, :] == j, pj[:, None], chosen_p)
        free = free & ~hit
    if RENORM:
        chosen_p = chosen_p / tl.maximum(tl.sum(chosen_p, 1), 1e-9)[:, None]
    if LOSSES:  # this program's row of partials: sum_t p[t, :], chosen slots per expert, sum_t lse_t^2
        part = partials + tl.program_id(0).to(tl.int64) * (2 * BLOCK_E + 1)
        tl.store(part + cols, tl.sum(tl.where(mask, p, 0.0), 0))
        taken = mask & ~free  # `free` is False where a real expert of a real row was chosen
        tl.store(part + BLOCK_E + cols, tl.sum(taken.to(tl.float32), 0))
        tl.store(part + 2 * BLOCK_E, tl.sum(tl.where(rmask, row_lse * row_lse, 0.0), 0))
    out = rows[:, None].to(tl.int64) * K + slots[None, :]
    kmask = rmask[:, None] & (slots[None, :] < K)
    tl.store(experts + out, chosen_e, mask=kmask)
    tl.store(weights + out, chosen_p, mask=kmask)


@triton.jit
def _router_losses(partials, programs, T, E, balance_coef, z_coef, losses, grad_p, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program: losses[0] = balance, losses[1] = z from the forward's partials, summed in program order; grad_p[e]
    = d balance / d p[t, e] = c_b * E * f_e / T (the same for every t: f is detached)."""
    cols = tl.arange(0, BLOCK_E)
    width = 2 * BLOCK_E + 1
    sum_p = column_sums(partials, 0, programs, width, 0, BLOCK_P, BLOCK_E)
    counts = column_sums(partials, 0, programs, width, BLOCK_E, BLOCK_P, BLOCK_E)
    sum_z = tl.sum(column_sums(partials, 0, programs, width, 2 * BLOCK_E, BLOCK_P, 1), 0)
    f = counts / tl.maximum(tl.sum(counts, 0), 1.0)
    tl.store(losses, balance_coef * E * tl.sum(f * (sum_p / T), 0))
    tl.store(losses + 1, z_coef * (sum_z / T))
    tl.store(grad_p + cols, balance_coef * E * f / T, mask=cols < E)


@triton.jit
def _topk_softmax_grad(probs, grad_probs, grad_lse, experts, weights, grad_weights, grad_logits, lse, grad_balance, grad_z, grad_p,
                       z_scale, T, E, K: tl.constexpr, RENORM: tl.constexpr, HAS_GP: tl.constexpr, HAS_GL: tl.constexpr,
                       HAS_GW: tl.constexpr, HAS_GB: tl.constexpr, HAS_GZ: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    mask = rmask[:, None] & (cols[None, :] < E)
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    p = tl.load(probs + offs, mask=mask, other=0.0)
    g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_GP:
        g += tl.load(grad_probs + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GB:  # the balance loss: the same gradient for every token's probabilities
        g += tl.load(grad_balance) * tl.load(grad_p + cols, mask=cols < E, other=0.0)[None, :]
    if HAS_GW:
        gw_dense = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        w_dense = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for j in tl.static_range(K):
            at = rows.to(tl.int64) * K + j
            ej = tl.load(experts + at, mask=rmask, other=-1)
            hit = cols[None, :] == ej[:, None]
            gw_dense = tl.where(hit, tl.load(grad_weights + at, mask=rmask, other=0.0).to(tl.float32)[:, None], gw_dense)
            w_dense = tl.where(hit, tl.load(weights + at, mask=rmask, other=0.0)[:, None], w_dense)
        if not RENORM:
            g += gw_dense  # weights are probs gathered: their gradient joins the probs'
    grad = p * (g - tl.sum(g * p, 1)[:, None])
    if HAS_GL:
        grad += tl.load(grad_lse + rows, mask=rmask, other=0.0).to(tl.float32)[:, None] * p
    if HAS_GZ:  # the z-loss: d/d lse_t of c_z * mean lse^2 is 2 c_z lse_t / T (z_scale = 2 c_z / T)
        grad += (tl.load(grad_z) * z_scale * tl.load(lse + rows, mask=rmask, other=0.0))[:, None] * p
    if HAS_GW:
        if RENORM:
            grad += w_dense * (gw_dense - tl.sum(gw_dense * w_dense, 1)[:, None])
    tl.store(grad_logits + offs, grad, mask=mask)


def _blocks(E: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(E)
    return max(1, 4096 // block_e), block_e  # a 4096-element register tile per program


class TopKSoftmax(torch.autograd.Function):
    """(probs [T, E], lse [T], experts [T, k] int64, weights [T, k], balance, z) of float32 logits [T, E]; experts carry
    no grad. balance and z are the aux losses (0-dim, already scaled) when `losses` = (c_b, c_z) is given, else None."""

    @staticmethod
    def forward(ctx, logits: Tensor, k: int, renormalize: bool, losses: tuple[float, float] | None = None):
        ctx.set_materialize_grads(False)  # an output nobody uses gets no gradient kernel or zero-filled buffer
        logits = logits.contiguous()
        T, E = logits.shape
        probs, lse = torch.empty_like(logits), logits.new_empty(T)
        experts = torch.empty(T, k, device=logits.device, dtype=torch.int64)
        weights = logits.new_empty(T, k)
        block_t, block_e = _blocks(E)
        programs = triton.cdiv(T, block_t)
        with_losses = losses is not None and T > 0
        partials = logits.new_empty(programs, 2 * block_e + 1) if with_losses else probs  # probs: an unread pointer
        if T:
            _topk_softmax[(programs,)](logits, probs, lse, experts, weights, partials, T, E, K=k, KP=triton.next_power_of_2(k),
                                       RENORM=renormalize, LOSSES=with_losses, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4)
        balance = z = None
        grad_p = probs  # unread without losses
        if with_losses:
            out, grad_p = logits.new_empty(2), logits.new_empty(E)
            _router_losses[(1,)](partials, programs, T, E, float(losses[0]), float(losses[1]), out, grad_p,
                                 BLOCK_P=max(1, 4096 // block_e), BLOCK_E=block_e, num_warps=4)
            balance, z = out[0], out[1]
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(probs, experts, weights, lse, grad_p)
        ctx.renormalize, ctx.z_scale = renormalize, 2.0 * losses[1] / max(T, 1) if losses is not None else 0.0
        return probs, lse, experts, weights, balance, z

    @staticmethod
    def backward(ctx, grad_probs, grad_lse, _grad_experts, grad_weights, grad_balance, grad_z):
        probs, experts, weights, lse, grad_p = ctx.saved_tensors
        T, E = probs.shape
        k = experts.shape[1]
        grad_logits = torch.empty_like(probs)
        block_t, block_e = _blocks(E)
        dummy = probs  # pointer for an absent gradient (its flag keeps the kernel from reading it)
        if T:
            _topk_softmax_grad[(triton.cdiv(T, block_t),)](
                probs, dummy if grad_probs is None else grad_probs.contiguous(), dummy if grad_lse is None else grad_lse.contiguous(),
                experts, weights, dummy if grad_weights is None else grad_weights.contiguous(), grad_logits, lse,
                dummy if grad_balance is None else grad_balance, dummy if grad_z is None else grad_z, grad_p, ctx.z_scale, T, E, K=k,
                RENORM=ctx.renormalize, HAS_GP=grad_probs is not None, HAS_GL=grad_lse is not None, HAS_GW=grad_weights is not None,
                HAS_GB=grad_balance is not None, HAS_GZ=grad_z is not None,
                BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4)
        return grad_logits, None, None, None
