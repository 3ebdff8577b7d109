"""Expert parallelism over torch.distributed: E experts split over the P ranks of an expert-parallel group.

ExpertParallelMoELayer is an MoELayer whose `compute` step puts an exchange inside the core's own
plan_dispatch / permute / combine (routerlab/moe/layer.py); route and record are MoELayer's. Per layer:
  1. sender plan: `plan_dispatch` over each token's destination ranks ([T, P]: rank p, or -1 when none of
     the token's kept experts lives there), so `permute` lays out one row per (destination, token), grouped
     by destination, padding last: each token travels ONCE to every rank that holds one of its experts
     (not once per slot: with k=6 of 64 experts on 2 ranks, 3x less traffic);
  2. one small all_gather of every rank's rows and (row, expert) pairs per destination (and k): the split
     sizes reach the host (the layer's only host synchronization) and every rank knows every split before
     any variable-size collective, so no rank waits forever;
  3. variable-split `all_to_all_single` of the rows and of their metadata (k combine weights in fp32 and
     k local expert ids, -1 for slots computed elsewhere), one autograd node;
  4. the receiver runs the single-process computation on the rows it got (plan_dispatch over local ids,
     permute, ExpertBank, combine with the weights -> one row per received row), cut to its real
     (row, expert) pairs (`first_rows`: the pair count came with the split sizes), so no padding slot is
     copied or computed;
  5. the reverse exchange, then `combine(rows, None, sender plan)` sums each token's returned rows.
Backward of each exchange is the reverse exchange (same autograd node on every rank, see _ANCHOR).

Capacity (capacity_factor set): C = capacity_for(T_global, k, E, cf), T_global the tokens of the whole
expert-parallel group, and the slots kept are exactly those one process would keep on the concatenated
batch (rank order): choice-major, then rank, then token; one more small all_gather, no extra host sync.
Dropless (the default) keeps every slot.

Imports torch only.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from routerlab.moe.experts import ExpertBank
from routerlab.moe.layer import DispatchPlan, MoELayer, combine, permute, plan_dispatch
from routerlab.routers.base import Routing

# Leaf that requires grad, passed into every exchange so its backward runs on every rank whenever grad mode
# is on, whether or not this rank's own input requires grad (a rank that skipped it would hang the others).
_ANCHOR = torch.zeros((), requires_grad=True)


def _exchange(xs: tuple[Tensor, ...], out_splits: list[int], in_splits: list[int], group, out_rows: int) -> tuple[Tensor, ...]:
    """Send the first sum(in_splits) rows of each x; receive sum(out_splits) rows into buffers of out_rows rows
    (rows past the received ones are padding, zeroed)."""
    n_out = sum(out_splits)
    outs = []
    for x in xs:
        out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
        if out_rows > n_out:
            out[n_out:].zero_()
        dist.all_to_all_single(out[:n_out], x[: sum(in_splits)].contiguous(), out_splits, in_splits, group=group)
        outs.append(out)
    return tuple(outs)


class _AllToAll(torch.autograd.Function):
    """Several tensors in one node, so every rank runs their backward exchanges together, in the same order."""

    @staticmethod
    def forward(ctx, out_splits: list[int], in_splits: list[int], group, out_rows: int, anchor: Tensor, *xs: Tensor):
        ctx.splits, ctx.group, ctx.in_rows = (out_splits, in_splits), group, [x.shape[0] for x in xs]
        return _exchange(xs, out_splits, in_splits, group, out_rows)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        out_splits, in_splits = ctx.splits
        back = [_exchange((g,), in_splits, out_splits, ctx.group, rows)[0] for g, rows in zip(grads, ctx.in_rows)]
        return (None, None, None, None, None, *back)


def all_to_all(xs: tuple[Tensor, ...], out_splits: list[int], in_splits: list[int], group=None, out_rows: int | None = None) -> tuple[Tensor, ...]:
    """Differentiable variable-split all_to_all_single of the rows of each x (splits per rank of `group`).

    Sends the first sum(in_splits) rows (later rows: padding, not sent); returns out_rows rows
    (default sum(out_splits)), the received ones first, then zero padding.
    """
    out_rows = sum(out_splits) if out_rows is None else out_rows
    if torch.is_grad_enabled():
        return _AllToAll.apply(out_splits, in_splits, group, out_rows, _ANCHOR, *xs)
    return _exchange(xs, out_splits, in_splits, group, out_rows)


def all_gather_rows(x: Tensor, group=None) -> Tensor:
    """[P, *x.shape]: x of every rank of the group (same shape on every rank)."""
    size = dist.get_world_size(group)
    if dist.get_backend(group) != "nccl":  # gloo has only the list form
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)
    out = x.new_empty((size,) + tuple(x.shape))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def global_capacity_mask(experts: Tensor, num_experts: int, capacity_factor: float, group, rank: int) -> Tensor:
    """[T, k] bool: slots kept under a capacity agreed by the whole group, the same slots one process keeps.

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
    capacity = (capacity_factor * every[:, E * E + 1].sum().double() * every[:, E * E + 2].max() / E).ceil().clamp(min=1)
    per_rank = every[:, : E * E].view(-1, E, E)  # [P, choice, expert]
    per_choice = per_rank.sum(0)
    base = (per_choice.cumsum(0) - per_choice) + per_rank[:rank].sum(0)  # slots ahead of this rank's, per (choice, expert)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    starts = torch.searchsorted(sorted_key, torch.arange(E * E + 1, device=device))
    within = torch.arange(key.numel(), device=device) - starts[sorted_key]
    never = base.new_full((1,), torch.iinfo(torch.long).max // 2)  # unused slots are never kept
    keep_sorted = torch.cat([base.reshape(-1), never])[sorted_key] + within < capacity
    keep_flat = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
    return keep_flat.view(k, T).t()


class ExpertParallelMoELayer(MoELayer):
    """An MoELayer whose ExpertBank holds only this rank's E/P experts (a contiguous block of expert ids).

    Same contract as MoELayer: forward(x, token_ids) -> output; keeps stats (this rank's tokens; the
    trainer reduces them over ranks), top1 and aux_losses. Parameter names are unchanged, so a full
    state_dict sliced along dim 0 of the `experts.*` tensors loads into it.
    """

    def __init__(self, layer: MoELayer, group=None) -> None:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        full = layer.experts
        if full.num_experts % size:
            raise ValueError(f"num_experts={full.num_experts} must be divisible by the expert-parallel size {size}")
        local = full.num_experts // size
        bank = ExpertBank(local, full.d_model, full.hidden, full.activation)
        source = next(full.parameters())
        bank.to(source.device, source.dtype)
        with torch.no_grad():  # the same initial values as the unsharded bank (built from the same seed)
            for name, param in bank.named_parameters():
                param.copy_(full.get_parameter(name)[rank * local : (rank + 1) * local])
        super().__init__(layer.router, bank, layer.capacity_factor, layer.backend)
        self.group, self.ep_size, self.ep_rank = group, size, rank
        self.num_experts, self.local_experts = full.num_experts, local

    def compute(self, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        experts, weights = routing.experts, routing.weights
        T, k = experts.shape
        P, El = self.ep_size, self.local_experts
        if self.capacity_factor is None:
            kept = experts >= 0
        else:
            kept = global_capacity_mask(experts, self.num_experts, self.capacity_factor, self.group, self.ep_rank)

        # sender plan: "experts" = destination ranks; slot p of token t is (rank p, token t), kept if it goes there
        dest = torch.where(kept, experts // El, P)  # [T, k]; P = nowhere
        goes = torch.zeros(T, P + 1, dtype=torch.bool, device=x.device).scatter_(1, dest, True)[:, :P]
        plan = plan_dispatch(torch.where(goes, torch.arange(P, device=x.device), -1), P, None)
        pairs = torch.zeros(P + 1, dtype=plan.counts.dtype, device=x.device).index_add_(0, dest.reshape(-1), torch.ones_like(dest.reshape(-1)))[:P]

        # the only host sync: rows and (row, expert) pairs per destination, and k, of every rank.
        # k goes in by a fill (torch.full), not a host-to-device copy, which would be a second sync.
        counts = torch.cat([plan.counts, pairs, torch.full((1,), k, dtype=plan.counts.dtype, device=x.device)])
        sizes = all_gather_rows(counts, self.group).cpu()
        k_max = int(sizes[:, 2 * P].max())
        send_splits, recv_splits = sizes[self.ep_rank, :P].tolist(), sizes[:, self.ep_rank].tolist()
        n_send, n_pairs = sum(send_splits), int(sizes[:, P + self.ep_rank].sum())

        # metadata of each row: per slot, its weight and local expert id if its destination computes it
        plan = first_rows(plan, n_send)
        row_token, row_dest = plan.token_of_row, plan.order // max(T, 1)
        mine = dest.index_select(0, row_token) == row_dest[:, None]  # [n_send + 1, k]
        ids = torch.where(mine, experts.index_select(0, row_token) - row_dest[:, None] * El, -1)
        w = torch.where(mine, weights.index_select(0, row_token), 0).float()
        pad = k_max - k  # routers with a variable number of slots: pad to the agreed width
        meta = torch.cat([w, w.new_zeros(w.shape[0], pad), ids.float(), ids.new_full((ids.shape[0], pad), -1).float()], 1)
        recv_x, recv_meta = all_to_all((permute(x, plan), meta), recv_splits, send_splits, self.group)

        # receiver: the single-process MoE computation on the rows it got, over its n_pairs real
        # (row, local expert) pairs only: the permute copies no padding slot (about half of R*k here)
        if recv_x.shape[0]:
            recv_ids = recv_meta[:, k_max:].detach().long()
            local = first_rows(plan_dispatch(recv_ids, El, None), n_pairs)
            y = self.experts(permute(recv_x, local), local.counts, self.backend)
            rows = combine(y, recv_meta[:, :k_max], local)
        else:  # nothing to compute here; some backends dislike empty inputs
            rows = recv_x
        (back,) = all_to_all((rows,), send_splits, recv_splits, self.group, out_rows=plan.order.numel())
        return combine(back, None, plan), kept


def first_rows(plan: DispatchPlan, n_kept: int) -> DispatchPlan:
    """The plan over its first n_kept + 1 sorted rows (n_kept: its kept slots, known on the host): every
    padding slot points at the one spare row n_kept, which nothing reads (it is not kept), so permute,
    the experts and combine touch n_kept + 1 rows instead of T*k. The core's functions take it as is:
    they size their work by len(order) and read rows through inv, masked by kept."""
    rows = min(n_kept + 1, plan.order.numel())
    return dataclasses.replace(plan, order=plan.order[:rows], inv=plan.inv.clamp(max=rows - 1))


def shard_experts(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Replace every MoELayer of `model` by an ExpertParallelMoELayer holding this rank's experts (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MoELayer) and not isinstance(module, ExpertParallelMoELayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ExpertParallelMoELayer(module, group))
    return model
