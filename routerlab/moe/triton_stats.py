"""A layer's RoutingStats in two Triton kernels (CUDA; imported lazily by stats.stats_from_routing).

PyTorch spends ~35 small kernels a layer on them (two scatter counts, a log-softmax, sums, maxima); a logged step
launched them eagerly after the graph's replay, ~2 ms of the step (docs/benchmarks.md, issue 19 v10). Here:

  _stats_partials   each program reads BLOCK_T tokens' expert ids, kept flags and logits once and writes one row:
                    slots per expert, kept slots per expert, sum of probabilities per expert, then tokens with no
                    kept slot, sum of H(p), sum of logsumexp^2, max |logit|
  _stats_finish     one program sums the rows in program order (deterministic), computes the batch's MaxVio and each
                    sequence's (a sequence is a run of whole programs: the caller checks BLOCK_T divides its length)
                    and writes every field into one [3E + 9] float32 buffer, which the RoutingStats fields view

The same numbers as stats.compute_stats (counts exactly; sums to float32 rounding: tests/test_triton_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from routerlab.routers.triton_sums import column_sums

MAX_EXPERTS = 1024  # a program holds BLOCK_T tokens' logits in registers


@triton.jit
def _stats_partials(experts, kept, logits, partials, T, E, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    mask = rmask[:, None] & (cols[None, :] < E)
    l = tl.load(logits + rows[:, None].to(tl.int64) * E + cols[None, :], mask=mask, other=-float("inf"))
    m = tl.where(rmask, tl.max(l, 1), 0.0)
    shifted = l - m[:, None]
    s = tl.where(rmask, tl.sum(tl.exp(shifted), 1), 1.0)
    logp = shifted - tl.log(s)[:, None]
    p = tl.where(mask, tl.exp(logp), 0.0)
    lse = m + tl.log(s)
    load = tl.zeros([BLOCK_E], dtype=tl.float32)
    kept_load = tl.zeros([BLOCK_E], dtype=tl.float32)
    any_kept = tl.zeros([BLOCK_T], dtype=tl.int1)
    for j in tl.static_range(K):
        e = tl.load(experts + rows.to(tl.int64) * K + j, mask=rmask, other=-1)
        kj = tl.load(kept + rows.to(tl.int64) * K + j, mask=rmask, other=0) != 0
        hit = (cols[None, :] == e[:, None]) & (e[:, None] >= 0)
        load += tl.sum(hit.to(tl.float32), 0)
        kept_load += tl.sum((hit & kj[:, None]).to(tl.float32), 0)
        any_kept = any_kept | kj
    row = partials + pid.to(tl.int64) * (3 * BLOCK_E + 4)
    tl.store(row + cols, load)
    tl.store(row + BLOCK_E + cols, kept_load)
    tl.store(row + 2 * BLOCK_E + cols, tl.sum(p, 0))
    tl.store(row + 3 * BLOCK_E, tl.sum((rmask & ~any_kept).to(tl.float32), 0))
    tl.store(row + 3 * BLOCK_E + 1, -tl.sum(tl.sum(tl.where(mask, p * logp, 0.0), 1), 0))
    tl.store(row + 3 * BLOCK_E + 2, tl.sum(tl.where(rmask, lse * lse, 0.0), 0))
    tl.store(row + 3 * BLOCK_E + 3, tl.max(tl.max(tl.where(mask, tl.abs(l), 0.0), 1), 0))


@triton.jit
def _max_vio(load, E):
    mean = tl.sum(load, 0) / E
    return tl.where(mean > 0, tl.max(load, 0) / tl.maximum(mean, 1e-12) - 1.0, 0.0)


@triton.jit
def _stats_finish(partials, programs, sequence_programs, sequences, T, E, out, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    width = 3 * BLOCK_E + 4
    load = column_sums(partials, 0, programs, width, 0, BLOCK_P, BLOCK_E)
    kept_load = column_sums(partials, 0, programs, width, BLOCK_E, BLOCK_P, BLOCK_E)
    prob = column_sums(partials, 0, programs, width, 2 * BLOCK_E, BLOCK_P, BLOCK_E)
    sums = column_sums(partials, 0, programs, width, 3 * BLOCK_E, BLOCK_P, 4)  # dropped, entropy, z (and a sum of maxima)
    which = tl.arange(0, 4)
    max_abs = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, programs, BLOCK_P):
        prog = start + tl.arange(0, BLOCK_P)
        max_abs = tl.maximum(max_abs, tl.load(partials + prog.to(tl.int64) * width + 3 * BLOCK_E + 3, mask=prog < programs, other=0.0))
    vio_seq = tl.full([], 0.0, tl.float32)
    for seq in range(0, sequences):  # each sequence's loads: the sum of its programs' rows
        vio_seq += _max_vio(column_sums(partials, seq * sequence_programs, sequence_programs, width, 0, BLOCK_P, BLOCK_E), E)
    emask = cols < E
    tl.store(out + cols, load, mask=emask)
    tl.store(out + E + cols, kept_load, mask=emask)
    tl.store(out + 2 * E + cols, prob, mask=emask)
    tail = out + 3 * E
    tl.store(tail, T * 1.0)
    tl.store(tail + 1, tl.sum(tl.where(which == 0, sums, 0.0), 0))
    tl.store(tail + 2, tl.sum(tl.where(which == 1, sums, 0.0), 0))
    tl.store(tail + 3, tl.sum(tl.where(which == 2, sums, 0.0), 0))
    tl.store(tail + 4, tl.max(max_abs, 0))
    tl.store(tail + 5, _max_vio(load, E))
    tl.store(tail + 6, 1.0)
    tl.store(tail + 7, vio_seq)
    tl.store(tail + 8, sequences * 1.0)


def blocks(num_experts: int) -> tuple[int, int]:
    """(tokens a program reads, padded experts)."""
    block_e = triton.next_power_of_2(num_experts)
    return max(1, 4096 // block_e), block_e


def supports(logits: Tensor | None, num_experts: int, tokens: int, sequence_length: int) -> bool:
    """Whether the kernels compute these stats: float32 logits over the E experts, and each sequence whole programs."""
    if logits is None or logits.dtype != torch.float32 or logits.dim() != 2 or logits.shape[1] != num_experts:
        return False
    block_t, _ = blocks(num_experts)
    return 0 < num_experts <= MAX_EXPERTS and tokens > 0 and (sequence_length == tokens or sequence_length % block_t == 0)


def routing_stats(experts: Tensor, logits: Tensor, kept: Tensor, num_experts: int, sequence_length: int) -> Tensor:
    """[3E + 9] float32: load, kept, prob_sum ([E] each), then tokens, dropped_tokens, entropy_sum, z_sum, max_logit,
    vio_batch_sum, batches, vio_seq_sum, sequences (stats.RoutingStats' fields). The caller checks `supports`."""
    T, k = experts.shape
    E = num_experts
    block_t, block_e = blocks(E)
    programs = triton.cdiv(T, block_t)
    partials = logits.new_empty(programs, 3 * block_e + 4)
    out = logits.new_empty(3 * E + 9)
    _stats_partials[(programs,)](experts.contiguous(), kept.contiguous(), logits.contiguous(), partials, T, E, K=k, BLOCK_T=block_t,
                                 BLOCK_E=block_e, num_warps=4)
    sequences = T // sequence_length
    _stats_finish[(1,)](partials, programs, programs // sequences, sequences, T, E, out, BLOCK_P=max(1, 4096 // block_e),
                        BLOCK_E=block_e, num_warps=4)
    return out
