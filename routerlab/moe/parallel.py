"""Expert parallelism over torch.distributed: E experts split over the P ranks of an expert-parallel group.

Two dispatchers (the MoELayer's `compute`, routerlab/moe/layer.py), swapped in by `shard_experts`, put an
exchange inside the core's own plan_dispatch / permute / combine: AllToAllDispatch (variable splits, below)
and AllGatherDispatch (fixed splits); route and record stay MoELayer's. Per layer, the
rank's tokens are cut into `chunks` contiguous chunks, each with its own exchanges, so that one chunk's
all-to-all can run while another chunk's experts compute (forward and backward, see Exchange). Default 1:
on 2 x H200 two chunks were slower (44.4 vs 40.3 ms/step; NCCL kernels and the grouped GEMM share the SMs,
and half-size GEMMs are less efficient; docs/benchmarks.md, expert parallelism v4).
  1. sender plan per chunk: `plan_dispatch` over each token's destination ranks ([T, P]: rank p, or -1 when
     none of the token's kept experts lives there), so `permute` lays out one row per (destination, token),
     grouped by destination, padding last: each token travels ONCE to every rank that holds one of its
     experts (not once per slot: with k=6 of 64 experts on 2 ranks, 3x less traffic);
  2. one small all_gather of every rank's rows and (row, expert) pairs per destination and chunk (and k): the
     split sizes reach the host (the layer's only host synchronization) and every rank knows every split
     before any variable-size collective, so no rank waits forever;
  3. every chunk's variable-split `all_to_all_single` of its rows and their metadata (k combine weights in
     fp32 and k local expert ids, -1 for slots computed elsewhere) is started (async) before any is waited for;
  4. chunk by chunk, the receiver waits for its rows and runs the single-process computation on them
     (plan_dispatch over local ids, permute, ExpertBank, combine with the weights -> one row per received
     row), cut to its real (row, expert) pairs (`first_rows`: the pair count came with the split sizes),
     then starts the reverse exchange while the next chunk computes;
  5. `combine(rows, None, sender plan)` sums each token's returned rows.
Backward of each exchange is the reverse exchange, started in one autograd node and waited for in another,
so the autograd engine runs a chunk's expert backward while another chunk's gradients travel. Every
exchange is tied to _ANCHOR, so every rank runs the same backward collectives, in the same order.

Fixed exchange (`exchange="fixed"`, or "auto" on groups of <= 4 ranks; the trainer uses "auto"): steps 1-2
and 5 change so that no split size needs the host. Every chunk's Tc tokens go to EVERY rank, with one
[Tc, 2k] metadata tensor (weights, global expert ids): an all_gather, whose sizes are static, so no count
exchange and no host sync. The receiver runs the single-process computation on the slots of its own experts
(an uncut plan of P*Tc*k slots, padding last: the kernels skip it) and returns one partial row per received
row; a reduce_scatter sums each token's P partials on its own rank (no copies for the P blocks or the sum,
which the all_to_all version paid: 1.1 ms a step on 2 x H200). Precondition: every rank of the group passes the same
number of tokens (the trainer's equal batch slices do); a rank with a different count would make the
collectives mismatch. Costs: on 2 ranks with E=64, k=6 ~1.2% more rows travel; with P ranks the receiver's
plan and buffers grow with P, hence "auto" = fixed only for P <= 4 (measured), and the variable path stays
for any token counts.

Capacity (capacity_factor set): C = capacity_for(T_global, k, E, cf, min_capacity), T_global the tokens of
the whole expert-parallel group, and the slots kept are exactly those one process would keep on the
concatenated batch (rank order). Drop by position: choice-major, then rank, then token; one more small
all_gather, no extra host sync. Drop by probability: each expert keeps its C highest-weight slots of the
whole group, ties in that position order; every rank gathers every rank's slot ids and weights (T_global * k
pairs, small next to the hidden states) and runs the one-process plan on them, which needs the ranks' token
counts on the host first (one more host sync per layer, with this policy only). Dropless (the default)
keeps every slot.

Imports torch only.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from routerlab.moe.layer import DISPATCHERS, DispatchPlan, MoELayer, capacity_for, combine, permute, plan_dispatch, register_dispatcher, stable_order
from routerlab.routers.base import Routing

EXCHANGES = ("variable", "fixed", "auto")
# "auto" uses fixed splits up to this group size, the largest measured: on 4 x H200 fixed splits ran 39.4 ms
# a step against 43.2 for variable ones (docs/benchmarks.md, expert parallelism v7). The fixed receiver's
# static plan has P * T * k slots (about T * k real ones) and every token travels to every rank, so the
# padding grows with P; untested beyond 4 ranks, where variable splits stay.
AUTO_FIXED_MAX_RANKS = 4

# Leaf that requires grad, passed into every exchange so its backward runs on every rank whenever grad mode
# is on, whether or not this rank's own input requires grad (a rank that skipped it would hang the others).
_ANCHOR = torch.zeros((), requires_grad=True)


# torch >= 2.13 names them *_single (the *_tensor names warn there); the GPU machine's 2.11 has only *_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class AllToAll:
    """Variable-split all_to_all_single: sends the first sum(in_splits) rows (later rows: padding, not sent)
    into a buffer whose first sum(out_splits) rows are received (later rows: zero padding)."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group=None) -> None:
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group

    def rows(self, in_rows: int) -> int:
        return sum(self.out_splits)

    def start(self, x: Tensor, out_rows: int):
        n_out = sum(self.out_splits)
        out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
        if out_rows > n_out:
            out[n_out:].zero_()
        work = dist.all_to_all_single(out[:n_out], x[: sum(self.in_splits)].contiguous(), self.out_splits, self.in_splits, group=self.group, async_op=True)
        return out, work

    def reverse(self) -> AllToAll:
        return AllToAll(self.in_splits, self.out_splits, self.group)


class AllGather:
    """[R, ...] -> [P*R, ...]: the rows of every rank of the group, in rank order. Reverse: ReduceScatter."""

    def __init__(self, group=None) -> None:
        self.group = group

    def rows(self, in_rows: int) -> int:
        return in_rows * dist.get_world_size(self.group)

    def start(self, x: Tensor, out_rows: int):
        out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
        return out, _all_gather_single(out, x.contiguous(), group=self.group, async_op=True)

    def reverse(self) -> ReduceScatter:
        return ReduceScatter(self.group)


class ReduceScatter:
    """[P*R, ...] -> [R, ...]: block p of the sum over the ranks of the group goes to rank p. Reverse: AllGather."""

    def __init__(self, group=None) -> None:
        self.group = group

    def rows(self, in_rows: int) -> int:
        return in_rows // dist.get_world_size(self.group)

    def start(self, x: Tensor, out_rows: int):
        out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
        return out, _reduce_scatter_single(out, x.contiguous(), group=self.group, async_op=True)

    def reverse(self) -> AllGather:
        return AllGather(self.group)


Collective = AllToAll | AllGather | ReduceScatter


def _start(xs: tuple[Tensor, ...], collective: Collective, out_rows: int) -> tuple[list[Tensor], list]:
    """Start the collective on each x (async); the buffers are valid once every work is waited on."""
    outs, works = [], []
    for x in xs:
        out, work = collective.start(x, out_rows)
        outs.append(out)
        works.append(work)
    return outs, works


def _wait(works: list) -> None:
    # NCCL: the current stream waits for the exchange (no host sync); gloo: the host waits
    for work in works:
        work.wait()


class _Link:
    """What the two autograd nodes of one exchange share: the collective and the works in flight (forward, then backward)."""

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        self.works: list = []
        self.in_rows: list[int] = []
        self.back: list[Tensor] = []
        self.back_works: list = []


class _Start(torch.autograd.Function):
    """Starts the exchange; its outputs are valid only after _Finish. Backward waits for the reverse exchange
    that _Finish.backward started, so whatever autograd runs between the two overlaps it."""

    @staticmethod
    def forward(ctx, link: _Link, out_rows: int, anchor: Tensor, *xs: Tensor):
        ctx.link = link
        link.in_rows = [x.shape[0] for x in xs]
        outs, link.works = _start(xs, link.collective, out_rows)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        link = ctx.link
        _wait(link.back_works)
        back, link.back, link.back_works = link.back, [], []
        return (None, None, None, *back)


class _Finish(torch.autograd.Function):
    """Waits for the exchange. Backward starts the reverse collective on the grads (the adjoint: all_to_all
    along the swapped splits, reduce_scatter for all_gather and back)."""

    @staticmethod
    def forward(ctx, link: _Link, *outs: Tensor):
        ctx.link = link
        _wait(link.works)
        link.works = []
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        link = ctx.link
        reverse = link.collective.reverse()
        for g, rows in zip(grads, link.in_rows):
            (out,), works = _start((g,), reverse, rows)
            link.back.append(out)
            link.back_works += works
        # _Start ignores these (it returns the reverse exchange's result); they only carry autograd on to it
        return (None, *grads)


class Exchange:
    """A collective (AllToAll, AllGather, ReduceScatter) over the rows of several tensors, started now and
    finished later, so other work (the experts of another chunk) runs while it is in flight, forward and backward.

    Differentiable: backward is the reverse collective, also started in one node (_Finish) and waited for in
    another (_Start). Every exchange is tied to _ANCHOR, so every rank runs the same backward collectives.
    out_rows: rows of each result (default collective.rows(rows of x)); AllToAll pads past the received ones.
    """

    def __init__(self, xs: tuple[Tensor, ...], collective: Collective, out_rows: int | None = None) -> None:
        out_rows = collective.rows(xs[0].shape[0]) if out_rows is None else out_rows
        self.link = _Link(collective)
        if torch.is_grad_enabled():
            self.outs = _Start.apply(self.link, out_rows, _ANCHOR, *xs)
        else:
            self.outs, self.link.works = _start(xs, collective, out_rows)

    def finish(self) -> tuple[Tensor, ...]:
        if torch.is_grad_enabled():
            return _Finish.apply(self.link, *self.outs)
        _wait(self.link.works)
        return tuple(self.outs)


def all_gather_rows(x: Tensor, group=None) -> Tensor:
    """[P, *x.shape]: x of every rank of the group (same shape on every rank)."""
    size = dist.get_world_size(group)
    if dist.get_backend(group) != "nccl":  # gloo has only the list form
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)
    out = x.new_empty((size,) + tuple(x.shape))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


def global_capacity_mask(experts: Tensor, num_experts: int, capacity_factor: float, group, rank: int, min_capacity: int = 1) -> Tensor:
    """[T, k] bool: slots kept by position under a capacity agreed by the whole group, the same slots one process keeps.

    One small all_gather (slot counts per (choice, expert), T and k of every rank); no host sync: the
    capacity is computed on the device, in float64 like capacity_for.
    """
    T, k = experts.shape
    E = num_experts
    if k > E:
        raise ValueError(f"a router with k={k} slots per token over {E} experts is not supported")
    device = experts.device
    choice = torch.arange(k, device=device).expand(T, k)
    key = torch.where(experts >= 0, choice * E + experts, E * E).t().reshape(-1)  # choice-major, token order within
    counts = torch.zeros(E * E + 3, dtype=torch.long, device=device).index_add_(0, key, torch.ones_like(key))
    counts[E * E + 1], counts[E * E + 2] = T, k
    every = all_gather_rows(counts, group)  # [P, E*E + 3]
    capacity = (capacity_factor * every[:, E * E + 1].sum().double() * every[:, E * E + 2].max() / E).ceil().clamp(min=max(1, min_capacity))
    per_rank = every[:, : E * E].view(-1, E, E)  # [P, choice, expert]
    per_choice = per_rank.sum(0)
    base = (per_choice.cumsum(0) - per_choice) + per_rank[:rank].sum(0)  # slots ahead of this rank's, per (choice, expert)
    order = stable_order(key, E * E)
    sorted_key = key[order]
    starts = torch.searchsorted(sorted_key, torch.arange(E * E + 1, device=device))
    within = torch.arange(key.numel(), device=device) - starts[sorted_key]
    never = base.new_full((1,), torch.iinfo(torch.long).max // 2)  # unused slots are never kept
    keep_sorted = torch.cat([base.reshape(-1), never])[sorted_key] + within < capacity
    keep_flat = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
    return keep_flat.view(k, T).t()


def global_priority_mask(experts: Tensor, priority: Tensor, num_experts: int, capacity_factor: float, group, rank: int,
                         min_capacity: int = 1) -> Tensor:
    """[T, k] bool: slots kept by probability (each expert its highest-priority slots) under the group's capacity,
    the same slots one process keeps on the concatenated batch.

    Every rank's [T, k] ids and priorities, padded to the largest T and k (padding: id -1, never kept and
    after every real slot of its rank and choice, so the real slots keep their order), are gathered and the
    one-process plan runs on them. One host sync: the ranks' T and k, to size the gather.
    """
    T, k = experts.shape
    sizes = all_gather_rows(torch.tensor([T, k], device=experts.device), group).cpu()  # [P, 2]
    T_max, k_max = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    ids = experts.new_full((T_max, k_max), -1)
    ids[:T, :k] = experts
    weights = torch.zeros(T_max, k_max, device=experts.device)
    weights[:T, :k] = priority.detach().float()
    every_ids = all_gather_rows(ids, group).flatten(0, 1)  # [P * T_max, k_max], rank order
    every_weights = all_gather_rows(weights, group).flatten(0, 1)
    capacity = capacity_for(int(sizes[:, 0].sum()), k_max, num_experts, capacity_factor, min_capacity)
    plan = plan_dispatch(every_ids, num_experts, capacity, every_weights)
    kept = plan.kept.view(k_max, -1).t()  # slot (choice c, row t) is flat index c * rows + t
    return kept[rank * T_max : rank * T_max + T, :k]


class _ExpertParallelDispatch:
    """What both expert-parallel dispatchers share: the group, the token chunks, the capacity agreed by the group.

    The layer's ExpertBank holds this rank's block of E/P experts (a contiguous block of expert ids); the
    layer's contract is unchanged: forward(x, token_ids) -> output; stats (this rank's tokens; the trainer
    reduces them over ranks), top1 and aux_losses. Parameter names are unchanged, so a full state_dict sliced
    along dim 0 of the `experts.*` tensors loads into it.
    """

    name = ""

    def __init__(self, group=None, chunks: int = 1) -> None:
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.group, self.chunks = group, chunks  # chunks: one chunk's exchange can run while another's experts compute
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def kept(self, layer: MoELayer, routing: Routing) -> Tensor:
        experts, cf = routing.experts, layer.active_capacity_factor
        if cf is None:
            return experts >= 0
        if layer.drop_policy == "probability":  # the one-process layer's priority: the combine weights
            return global_priority_mask(experts, routing.weights, layer.num_experts, cf, self.group, self.rank, layer.min_capacity)
        return global_capacity_mask(experts, layer.num_experts, cf, self.group, self.rank, layer.min_capacity)

    def lengths(self, T: int) -> list[int]:
        """The tokens in C contiguous chunks (split, so backward is one cat, not C zero-filled copies of x)."""
        C = self.chunks
        return [T // C + (c < T % C) for c in range(C)]


@register_dispatcher("all_to_all")
class AllToAllDispatch(_ExpertParallelDispatch):
    """Variable splits (steps 1-5 of the module docstring): any token counts, one host sync per layer."""

    def __call__(self, layer: MoELayer, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        experts, weights = routing.experts, routing.weights
        T, k = experts.shape
        P, El = self.size, layer.experts.num_experts
        kept = self.kept(layer, routing)
        dest = torch.where(kept, experts // El, P)  # [T, k]; P = nowhere
        chunks = list(zip(*(t.split(self.lengths(T)) for t in (x, dest, experts, weights))))

        # sender plans, one per chunk: "experts" = destination ranks; slot p of token t is (rank p, token t)
        plans, counts = [], []
        for _, dest_c, _, _ in chunks:
            Tc = dest_c.shape[0]
            goes = torch.zeros(Tc, P + 1, dtype=torch.bool, device=x.device).scatter_(1, dest_c, True)[:, :P]
            plan = plan_dispatch(torch.where(goes, torch.arange(P, device=x.device), -1), P, None)
            flat = dest_c.reshape(-1)
            pairs = torch.zeros(P + 1, dtype=plan.counts.dtype, device=x.device).index_add_(0, flat, torch.ones_like(flat))[:P]
            plans.append(plan)
            counts += [plan.counts, pairs]

        # the only host sync: rows and (row, expert) pairs per destination and chunk, and k, of every rank.
        # k goes in by a fill (torch.full), not a host-to-device copy, which would be a second sync.
        counts.append(torch.full((1,), k, dtype=plans[0].counts.dtype, device=x.device))
        sizes = all_gather_rows(torch.cat(counts), self.group).cpu()  # [P, C * 2P + 1]
        k_max = int(sizes[:, -1].max())

        # send every chunk's rows and metadata; all exchanges start before any is waited for
        sent = []
        for c, (x_c, dest_c, experts_c, weights_c) in enumerate(chunks):
            base = 2 * P * c
            send_splits, recv_splits = sizes[self.rank, base : base + P].tolist(), sizes[:, base + self.rank].tolist()
            n_pairs = int(sizes[:, base + P + self.rank].sum())
            plan = first_rows(plans[c], sum(send_splits))
            meta = self._metadata(plan, dest_c, experts_c, weights_c, k_max, El)
            sent.append((plan, send_splits, recv_splits, n_pairs, Exchange((permute(x_c, plan), meta), AllToAll(recv_splits, send_splits, self.group))))

        # receive chunk c and compute its experts while the later chunks' exchanges are in flight;
        # then start returning its rows while the next chunk computes
        returned = []
        for plan, send_splits, recv_splits, n_pairs, exchange in sent:
            recv_x, recv_meta = exchange.finish()
            rows = self._receiver(layer, recv_x, recv_meta, k_max, n_pairs)
            returned.append(Exchange((rows,), AllToAll(send_splits, recv_splits, self.group), out_rows=plan.order.numel()))

        # each token's returned rows summed (the core's combine over the sender plan)
        outs = [combine(back.finish()[0], None, sent[c][0]) for c, back in enumerate(returned)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), kept

    @staticmethod
    def _metadata(plan: DispatchPlan, dest: Tensor, experts: Tensor, weights: Tensor, k_max: int, El: int) -> Tensor:
        """[rows, 2 * k_max] fp32: per slot of each sent row, its combine weight and local expert id if the
        row's destination computes it (else 0 and -1); padded to the width every rank agreed on."""
        T, k = experts.shape
        row_token, row_dest = plan.token_of_row, plan.order // max(T, 1)
        mine = dest.index_select(0, row_token) == row_dest[:, None]  # [rows, k]
        ids = torch.where(mine, experts.index_select(0, row_token) - row_dest[:, None] * El, -1)
        w = torch.where(mine, weights.index_select(0, row_token), 0).float()
        pad = k_max - k  # routers with a variable number of slots: pad to the agreed width
        return torch.cat([w, w.new_zeros(w.shape[0], pad), ids.float(), ids.new_full((ids.shape[0], pad), -1).float()], 1)

    @staticmethod
    def _receiver(layer: MoELayer, recv_x: Tensor, recv_meta: Tensor, k_max: int, n_pairs: int) -> Tensor:
        """The single-process MoE computation on the received rows, over their n_pairs real (row, local
        expert) pairs only (`first_rows`): no padding slot is copied or computed. One row per received row."""
        if not recv_x.shape[0]:  # nothing to compute here; some backends dislike empty inputs
            return recv_x
        recv_ids = recv_meta[:, k_max:].detach().long()
        local = first_rows(plan_dispatch(recv_ids, layer.experts.num_experts, None), n_pairs)
        y = layer.experts(permute(recv_x, local), local.counts, layer.backend)
        return combine(y, recv_meta[:, :k_max], local)


@register_dispatcher("all_gather")
class AllGatherDispatch(_ExpertParallelDispatch):
    """Fixed splits (the module docstring): static sizes, no host sync; every rank of the group must pass
    the same number of tokens."""

    def __call__(self, layer: MoELayer, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        """Every rank's tokens go to every rank (an all_gather of each chunk's Tc tokens and their metadata:
        k combine weights in fp32, k global expert ids, -1 for dropped or unused slots); the receiver keeps the
        slots of its own experts and returns one partial output row per received row (zero where none of its
        experts was chosen); a reduce_scatter sums each token's P partials on its own rank. Backward: the same
        two collectives, swapped. With E=64, k=6 on 2 ranks ~98.8% of tokens go to both ranks anyway."""
        experts, weights = routing.experts, routing.weights
        kept = self.kept(layer, routing)
        lengths = self.lengths(experts.shape[0])
        meta = torch.cat([weights.float(), torch.where(kept, experts, -1).float()], 1)  # [T, 2k]; ids exact in fp32 below 2^24
        sent = [Exchange((x_c, meta_c), AllGather(self.group)) for x_c, meta_c in zip(x.split(lengths), meta.split(lengths))]
        returned = []
        for exchange in sent:
            recv_x, recv_meta = exchange.finish()
            returned.append(Exchange((self._receiver(layer, recv_x, recv_meta),), ReduceScatter(self.group)))
        outs = [back.finish()[0] for back in returned]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), kept

    @staticmethod
    def _receiver(layer: MoELayer, recv_x: Tensor, recv_meta: Tensor) -> Tensor:
        """The single-process computation on every received row, over the slots of this rank's experts; the
        plan is not cut (its size is static: rows * k slots, padding last, which the kernels skip)."""
        if not recv_x.shape[0]:
            return recv_x
        k = recv_meta.shape[1] // 2
        bank = layer.experts
        ids = recv_meta[:, k:].detach().long()
        first, El = bank.first_expert, bank.num_experts
        local = torch.where((ids >= first) & (ids < first + El), ids - first, -1)
        plan = plan_dispatch(local, El, None)
        y = bank(permute(recv_x, plan), plan.counts, layer.backend)
        return combine(y, recv_meta[:, :k], plan)


EXCHANGE_DISPATCHERS = {"variable": "all_to_all", "fixed": "all_gather"}  # shard_experts' exchange -> dispatcher name


def first_rows(plan: DispatchPlan, n_kept: int) -> DispatchPlan:
    """The plan over its first n_kept + 1 sorted rows (n_kept: its kept slots, known on the host): every
    padding slot points at the one spare row n_kept, which nothing reads (it is not kept), so permute,
    the experts and combine touch n_kept + 1 rows instead of T*k. The core's functions take it as is:
    they size their work by len(order) and read rows through inv, masked by kept."""
    rows = min(n_kept + 1, plan.order.numel())
    return dataclasses.replace(plan, order=plan.order[:rows], inv=plan.inv.clamp(max=rows - 1))


def shard_experts(model: torch.nn.Module, group=None, chunks: int = 1, exchange: str = "variable") -> torch.nn.Module:
    """Give every MoELayer of `model` this rank's block of experts and an expert-parallel dispatcher (in place).

    A bank built inside `expert_shard(rank, size)` already is that block (the whole bank was never built);
    a whole bank is cut to it. chunks: token chunks per layer whose exchanges overlap the other chunks'
    expert compute; exchange: "variable" (AllToAllDispatch: any token counts, one host sync per layer),
    "fixed" (AllGatherDispatch: static splits, no host sync; every rank of the group must pass the same
    number of tokens) or "auto" (fixed when the group has <= 4 ranks)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {exchange!r}")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if exchange == "auto":
        exchange = "fixed" if size <= AUTO_FIXED_MAX_RANKS else "variable"
    for module in model.modules():
        if not isinstance(module, MoELayer) or module.dispatcher.name != "local":
            continue
        bank = module.experts
        if bank.total_experts % size:
            raise ValueError(f"num_experts={bank.total_experts} must be divisible by the expert-parallel size {size}")
        if not bank.sharded:
            module.experts = bank.block(rank, size)
        elif bank.num_experts * size != bank.total_experts or bank.first_expert != rank * bank.num_experts:
            raise ValueError(f"this bank holds experts {bank.first_expert}..{bank.first_expert + bank.num_experts - 1} of {bank.total_experts}, not block {rank} of {size}")
        module.dispatcher = DISPATCHERS.entry(EXCHANGE_DISPATCHERS[exchange]).obj(group, chunks)
    return model
