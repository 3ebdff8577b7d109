"""The dropless dispatch plan as a counting sort in three Triton kernels (CUDA; imported lazily by layer.plan_dispatch).

The plan orders the T*k token-slots (slot j of token t is j * T + t) by expert, slots in order within an expert, unused
slots (expert -1) last: a stable sort of small integer keys. PyTorch spends 13 small kernels a layer on it (a radix
sort, searchsorted, the inverse permutation's scatter, counts, casts); a counting sort needs three:

  _plan_histogram   each program counts the keys of its chunk of C slots                        hist [chunks, EB]
  _plan_offsets     one program: where each (chunk, key) run starts in the sorted order, less the run's start
                    inside its chunk's own sorted keys; also counts [E] and n_kept            shift [chunks, EB]
  _plan_place       each program sorts its chunk's (key, slot) pairs (tl.sort; the chunk's keys are few) and
                    writes sorted position i to order[shift[chunk, key] + i], and inv, kept for each slot

The same order as the stable sort, element for element (tests/test_triton_kernels.py). Key EB - 1 marks the lanes past
the last slot: EB >= E + 2 leaves it apart from the experts' keys 0..E-1 and the unused slots' E.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_CHUNKS = 128  # _plan_offsets holds [chunks, EB] counts in one program
MAX_CHUNK = 4096  # slots a program sorts; with MAX_CHUNKS, plans of up to 512k slots take the kernels
MAX_BUCKETS = 256


@triton.jit
def _keys(experts, T, k, n_slots, E, chunk, C: tl.constexpr, EB: tl.constexpr):
    local = tl.arange(0, C)
    slot = chunk.to(tl.int64) * C + local
    valid = slot < n_slots
    e = tl.load(experts + (slot % T) * k + slot // T, mask=valid, other=-1)
    key = tl.where((e >= 0) & (e < E), e, E)  # unused slots sort after every expert
    return tl.where(valid, key, EB - 1).to(tl.int32), local


@triton.jit
def _plan_histogram(experts, hist, T, k, n_slots, E, C: tl.constexpr, EB: tl.constexpr):
    chunk = tl.program_id(0)
    key, _ = _keys(experts, T, k, n_slots, E, chunk, C, EB)
    tl.store(hist + chunk * EB + tl.arange(0, EB), tl.histogram(key, EB))


@triton.jit
def _plan_offsets(hist, shift, counts, n_kept, chunks, E, NCH: tl.constexpr, EB: tl.constexpr):
    rows = tl.arange(0, NCH)
    cols = tl.arange(0, EB)
    at = rows[:, None] * EB + cols[None, :]
    real = rows[:, None] < chunks
    h = tl.load(hist + at, mask=real, other=0)
    totals = tl.sum(h, 0)
    key_start = tl.cumsum(totals, 0) - totals  # where each key's rows start in the sorted order
    earlier_chunks = tl.cumsum(h, 0) - h  # the key's slots in earlier chunks
    inside_chunk = tl.cumsum(h, 1) - h  # where the key's run starts among the chunk's own sorted keys
    tl.store(shift + at, key_start[None, :] + earlier_chunks - inside_chunk, mask=real)
    tl.store(counts + cols, totals.to(tl.int64), mask=cols < E)
    tl.store(n_kept, tl.sum(tl.where(cols < E, totals, 0), 0).to(tl.int64))


@triton.jit
def _plan_place(experts, shift, order, inv, kept, T, k, n_slots, E, C: tl.constexpr, EB: tl.constexpr):
    chunk = tl.program_id(0)
    key, local = _keys(experts, T, k, n_slots, E, chunk, C, EB)
    pair = tl.sort(key * C + local)  # by key, then by slot: stable
    key, local = pair // C, pair % C
    real = key < EB - 1
    position = tl.load(shift + chunk * EB + key, mask=real, other=0).to(tl.int64) + tl.arange(0, C)
    slot = chunk.to(tl.int64) * C + local
    tl.store(order + position, slot, mask=real)
    tl.store(inv + slot, position, mask=real)
    tl.store(kept + slot, key < E, mask=real)


def chunking(n_slots: int, num_experts: int) -> tuple[int, int, int] | None:
    """(slots a chunk, chunks, key buckets) of a plan the kernels take, or None (too large: the PyTorch sort)."""
    buckets = triton.next_power_of_2(num_experts + 2)
    chunk = max(1024, triton.next_power_of_2(triton.cdiv(n_slots, MAX_CHUNKS)))
    if chunk > MAX_CHUNK or buckets > MAX_BUCKETS or n_slots == 0:
        return None
    return chunk, triton.cdiv(n_slots, chunk), buckets


def plan(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(order, inv, kept, counts, n_kept) of the dropless plan of experts [T, k] (ids, -1 unused); see layer.DispatchPlan.
    The caller checks `chunking` first."""
    T, k = experts.shape
    n_slots = T * k
    C, chunks, EB = chunking(n_slots, num_experts)
    experts = experts.contiguous()
    device = experts.device
    hist = torch.empty(chunks, EB, device=device, dtype=torch.int32)
    shift = torch.empty(chunks, EB, device=device, dtype=torch.int32)
    order = torch.empty(n_slots, device=device, dtype=torch.int64)
    inv = torch.empty(n_slots, device=device, dtype=torch.int64)
    kept = torch.empty(n_slots, device=device, dtype=torch.bool)
    counts = torch.empty(num_experts, device=device, dtype=torch.int64)
    n_kept = torch.empty((), device=device, dtype=torch.int64)
    _plan_histogram[(chunks,)](experts, hist, T, k, n_slots, num_experts, C=C, EB=EB, num_warps=4)
    _plan_offsets[(1,)](hist, shift, counts, n_kept, chunks, num_experts, NCH=triton.next_power_of_2(chunks), EB=EB, num_warps=8)
    _plan_place[(chunks,)](experts, shift, order, inv, kept, T, k, n_slots, num_experts, C=C, EB=EB, num_warps=8)
    return order, inv, kept, counts, n_kept
