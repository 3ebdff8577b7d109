"""Expert parallelism over torch.distributed: E experts split over the P ranks of an expert-parallel group.

Each rank routes its own tokens with its own copy of the router, then (docs/distributed.md):
  1. agrees shapes: one small all_gather of every rank's row counts per destination (and k; with a
     capacity also the token counts and the per-(choice, expert) slot counts), so split sizes and capacity
     are known to every rank before any variable-size collective and no rank waits forever;
  2. sends each token ONCE to every rank that holds at least one of its kept experts (not once per slot:
     with k=6 of 64 experts on 2 ranks that is 3x less traffic), with its k combine weights and local
     expert ids, by variable-split `all_to_all_single`;
  3. the receiver expands rows to slots, sorts them by local expert, runs its `ExpertBank` with the same
     backends as one process, weights and sums the slots of each row, and sends one row back;
  4. the sender adds the returned rows into its tokens.
Gradients flow through a small autograd wrapper around `all_to_all_single` (backward = the reverse exchange).

Capacity (capacity_factor set): C = capacity_for(T_global, k, E, cf), T_global the tokens of the whole
expert-parallel group, and the slots kept are exactly those one process would keep on the concatenated
batch (rank order): choice-major, then rank, then token. Dropless (the default) keeps every slot.

Imports torch only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from routerlab.moe.experts import ExpertBank
from routerlab.moe.layer import MoELayer, capacity_for
from routerlab.moe.stats import compute_stats

# Leaf that requires grad, passed into every exchange so its backward runs on every rank whenever grad mode
# is on, whether or not this rank's own input requires grad (a rank that skipped it would hang the others).
_ANCHOR = torch.zeros((), requires_grad=True)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group, anchor: Tensor) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Differentiable variable-split all_to_all_single (rows of x; splits per rank of `group`)."""
    if torch.is_grad_enabled():
        return _AllToAll.apply(x, out_splits, in_splits, group, _ANCHOR)
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


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

    Two small all_gathers: (T, k) of every rank, then slot counts per (choice, expert) of every rank.
    """
    T, k = experts.shape
    sizes = all_gather_rows(torch.tensor([T, k], device=experts.device), group)
    total_tokens, k_max = int(sizes[:, 0].sum()), int(sizes[:, 1].max())
    if k < k_max:  # a router with a variable number of slots: pad with unused ones
        experts = torch.cat([experts, experts.new_full((T, k_max - k), -1)], 1)
    capacity = capacity_for(total_tokens, k_max, num_experts, capacity_factor)
    valid = experts >= 0
    choice = torch.arange(k_max, device=experts.device).expand(T, k_max)
    key = torch.where(valid, choice * num_experts + experts, k_max * num_experts)  # [T, k], invalid last
    flat = key.t().reshape(-1)  # choice-major, token order within: GShard's priority
    counts = torch.bincount(flat, minlength=k_max * num_experts + 1)[:-1]
    every = all_gather_rows(counts, group).view(-1, k_max, num_experts)  # [P, k, E]
    per_choice = every.sum(0)
    base = (per_choice.cumsum(0) - per_choice) + every[:rank].sum(0)  # slots ahead of this rank's, per (choice, expert)
    order = torch.argsort(flat, stable=True)
    sorted_key = flat[order]
    hist = torch.bincount(sorted_key, minlength=k_max * num_experts + 1)
    within = torch.arange(flat.numel(), device=flat.device) - (hist.cumsum(0) - hist)[sorted_key]
    never = base.new_full((1,), capacity)  # unused slots are never kept
    keep_sorted = torch.cat([base.reshape(-1), never])[sorted_key] + within < capacity
    keep_flat = torch.zeros_like(keep_sorted).index_copy_(0, order, keep_sorted)
    return keep_flat.view(k_max, T).t()[:, :k]


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

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if token_ids is not None:
            token_ids = token_ids.reshape(-1)
        routing = self.router(x, token_ids=token_ids)
        experts, weights = routing.experts, routing.weights
        T, k = experts.shape
        E, P, El = self.num_experts, self.ep_size, self.local_experts
        if self.capacity_factor is None:
            kept = experts >= 0
        else:
            kept = global_capacity_mask(experts, E, self.capacity_factor, self.group, self.ep_rank)

        # one row per (destination rank, token) with at least one kept slot there; destination-major
        dest = torch.where(kept, experts // El, P)  # [T, k]; P = nowhere
        goes = torch.zeros(T, P + 1, dtype=torch.bool, device=x.device)
        goes.scatter_(1, dest, True)
        row_dest, row_token = goes[:, :P].t().nonzero(as_tuple=True)
        rows_per_dest = torch.bincount(row_dest, minlength=P)
        sizes = all_gather_rows(torch.cat([rows_per_dest, rows_per_dest.new_tensor([k])]), self.group).cpu()
        k_max = int(sizes[:, P].max())
        send_splits, recv_splits = sizes[self.ep_rank, :P].tolist(), sizes[:, self.ep_rank].tolist()

        mine = dest[row_token] == row_dest[:, None]  # [R, k] slots of each row that its destination computes
        row_ids = torch.where(mine, experts[row_token] - row_dest[:, None] * El, -1)
        row_weights = torch.where(mine, weights[row_token], 0).to(x.dtype)
        if k < k_max:  # routers with a variable number of slots: pad to the agreed width
            row_ids = torch.cat([row_ids, row_ids.new_full((row_ids.shape[0], k_max - k), -1)], 1)
            row_weights = torch.cat([row_weights, row_weights.new_zeros(row_weights.shape[0], k_max - k)], 1)
        d = x.shape[1]
        received = all_to_all(torch.cat([x[row_token], row_weights], 1), recv_splits, send_splits, self.group)
        recv_ids = _plain_all_to_all(row_ids, recv_splits, send_splits, self.group)

        # receiver: rows -> slots sorted by local expert -> experts -> weighted sum per row
        valid = recv_ids >= 0
        key = torch.where(valid, recv_ids, El).reshape(-1)
        order = torch.argsort(key, stable=True)[: int(valid.sum())]
        slot_row = order // k_max
        counts = torch.bincount(key, minlength=El + 1)[:El]
        if slot_row.numel():
            y = self.experts(received[slot_row, :d], counts, self.backend)
        else:  # nothing to compute here; some backends dislike empty inputs
            y = received.new_zeros(0, d)
        slot_weights = received[:, d:].reshape(-1)[order]
        partial = received.new_zeros(received.shape[0], d).index_add_(0, slot_row, y * slot_weights[:, None])

        back = all_to_all(partial, send_splits, recv_splits, self.group)
        out = torch.zeros_like(x).index_add_(0, row_token, back.to(x.dtype))

        kept_experts = experts[kept]
        self.stats = compute_stats(experts, routing.logits, torch.bincount(kept_experts, minlength=E), kept.sum(1))
        self.top1 = experts.gather(1, weights.detach().argmax(1, keepdim=True)).squeeze(1)
        self.aux_losses = routing.aux
        return out.reshape(shape)


def _plain_all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Non-differentiable exchange (integer metadata)."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def shard_experts(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Replace every MoELayer of `model` by an ExpertParallelMoELayer holding this rank's experts (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MoELayer) and not isinstance(module, ExpertParallelMoELayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ExpertParallelMoELayer(module, group))
    return model
