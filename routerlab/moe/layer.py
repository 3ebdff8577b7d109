"""MoELayer: route, dispatch (sort token-slots by expert, drop over capacity), compute, combine.

The layer knows nothing about any particular router. It keeps, for the last forward:
  stats       RoutingStats (loads, drops, entropy, logit scale) for metrics and router.after_step
  top1        [T] highest-weight expert of each token (-1 if none), for specialization and fluctuation
  aux_losses  the router's already-scaled auxiliary losses

forward = route -> compute -> record. compute is the layer's dispatcher (one protocol, swapped when the
model is sharded, as torchtitan swaps its token dispatchers):
    dispatcher(layer, x [T, d], routing) -> (out [T, d], kept [T, k] bool: slots that were computed)
  local        LocalDispatch, here: every expert in this process (the default)
  all_to_all   parallel.AllToAllDispatch: variable splits, any token counts
  all_gather   parallel.AllGatherDispatch: all_gather + reduce_scatter, static splits, no host sync
On CUDA an eager layer replays its local computation from CUDA graphs once it has seen an input signature twice
(graph_core, moe/core_graph.py): the router's with it where the router's forward is pure (Router.forward_is_pure).
The stages of the local computation are separate functions so that the distributed dispatchers put their
exchanges between them:
  plan = plan_dispatch(experts, E, capacity)   which slot goes where (no data moved, no host sync)
  xs   = permute(x, plan)                      [T*k, d] rows grouped by expert, padding rows last
  y    = expert_bank(xs, plan.counts)          any backend
  out  = combine(y, weights, plan)             [T, d] weighted sum of each token's kept slots
(moe_compute runs the four.)

Shapes are static (T*k rows whatever the routing), so the dropless GPU path never waits on the host:
dropped and unused (-1) slots become padding rows at the end, which nothing reads.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from routerlab.kernel_choice import triton_device, uses_triton
from routerlab.moe import core_graph
from routerlab.moe.experts import ExpertBank
from routerlab.moe.stats import RoutingStats, stats_from_routing
from routerlab.registry import Registry
from routerlab.routers.base import Router, Routing


def capacity_for(num_tokens: int, k: int, num_experts: int, capacity_factor: float | None, min_capacity: int = 1) -> int | None:
    """Slots per expert: max(min_capacity, ceil(capacity_factor * T * k / E)); None means dropless.

    The one meaning of capacity_factor in routerlab (core, gshard_top2, the RL environment): a multiple of
    the balanced share of token-slots, T * k / E; 1.0 fits a perfectly balanced router exactly."""
    if capacity_factor is None:
        return None
    return max(1, min_capacity, math.ceil(capacity_factor * num_tokens * k / num_experts))


@dataclass
class DispatchPlan:
    """Where every token-slot goes. Slots are numbered slot-major: slot j of token t is j * T + t.

    order   [T*k] slot at each sorted position: kept slots grouped by expert, then padding slots
    inv     [T*k] sorted position of each slot (the inverse permutation of order)
    kept    [T*k] bool, slot was computed (valid expert and within capacity)
    counts  [E]   kept slots per expert
    n_kept  []    counts.sum(), on the device: rows at or past it are padding
    """

    order: Tensor
    inv: Tensor
    kept: Tensor
    counts: Tensor
    n_kept: Tensor
    num_tokens: int
    k: int

    @property
    def token_of_row(self) -> Tensor:
        """[T*k] token whose hidden state fills each sorted row."""
        return self.order % self.num_tokens

    def kept_per_token(self) -> Tensor:
        return self.kept.view(self.k, self.num_tokens).sum(0)


def stable_order(key: Tensor, largest: int) -> Tensor:
    """argsort(key, stable=True) of integer keys in [0, largest], sorted as the narrowest integer type that holds them:
    CUDA's radix sort makes a pass per 8 bits of the key type (8 for int64, 2 for int16). The same order."""
    dtype = torch.int16 if largest < 2**15 else torch.int32 if largest < 2**31 else key.dtype
    return torch.argsort(key.to(dtype), stable=True)


def plan_dispatch(experts: Tensor, num_experts: int, capacity: int | None, priority: Tensor | None = None) -> DispatchPlan:
    """Order token-slots by expert and drop those past capacity, without a host synchronization.

    Slots are taken slot-major (all first choices before second choices), token order within, so
    capacity drops later choices and later tokens first (GShard's priority: drop by position). With
    priority [T, k] (the combine weights: drop by probability), each expert keeps its highest-priority
    slots and drops its lowest first (ties: the position order).
    """
    num_tokens, k = experts.shape
    if capacity is None and triton_device(experts):
        from routerlab.moe import triton_plan

        if triton_plan.chunking(num_tokens * k, num_experts) is not None:  # three kernels, the same plan
            return DispatchPlan(*triton_plan.plan(experts, num_experts), num_tokens, k)
    flat = experts.t().reshape(-1)
    key = torch.where(flat >= 0, flat, num_experts)  # unused slots sort last
    if capacity is not None and priority is not None:
        ahead = torch.argsort(-priority.detach().t().reshape(-1).float(), stable=True)
        order = ahead[stable_order(key[ahead], num_experts)]
    else:
        order = stable_order(key, num_experts)
    sorted_key = key[order]
    bounds = torch.searchsorted(sorted_key, torch.arange(num_experts + 1, device=key.device, dtype=key.dtype))
    counts = bounds[1:] - bounds[:-1]
    if capacity is not None:
        position = torch.arange(order.numel(), device=order.device) - bounds[sorted_key.clamp(max=num_experts - 1)]
        keep = (sorted_key < num_experts) & (position < capacity)
        # a stable second sort moves the overflow to the end and keeps everything else in place
        order = order[stable_order(torch.where(keep, sorted_key, num_experts), num_experts)]
        counts = counts.clamp(max=capacity)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    n_kept = counts.sum()
    return DispatchPlan(order, inv, inv < n_kept, counts, n_kept, num_tokens, k)


def _fused(t: Tensor) -> bool:
    """Use the Triton gather kernels (triton_combine) where they compute exactly (kernels.uses_triton)."""
    return uses_triton(t)


class _Permute(torch.autograd.Function):
    """rows = x[token_of_row]. Backward gathers each token's k row gradients and sums the kept ones
    (a gather and a reduce: no atomics, deterministic)."""

    @staticmethod
    def forward(ctx, x: Tensor, token_of_row: Tensor, inv: Tensor, kept: Tensor, n_kept: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv, kept, n_kept)
        ctx.k, ctx.num_tokens = k, x.shape[0]
        if _fused(x):
            from routerlab.moe import triton_combine

            return triton_combine.gather_rows(x, token_of_row, n_kept)  # padding rows skipped (left unset)
        return x.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inv, kept, n_kept = ctx.saved_tensors
        if _fused(grad):
            from routerlab.moe import triton_combine

            return triton_combine.gather_reduce(grad, inv, n_kept, None, ctx.num_tokens, ctx.k), None, None, None, None, None
        rows = grad.index_select(0, inv).view(ctx.k, -1, grad.shape[1])
        # where, not a product: padding rows may hold anything, NaN included
        grad_x = torch.where(kept.view(ctx.k, -1, 1), rows, 0).sum(0)
        return grad_x, None, None, None, None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum over kept slots j of w[t, j] * y[inv[j, t]]. Saves y, not the gathered copy."""

    @staticmethod
    def forward(ctx, y: Tensor, weights: Tensor, order: Tensor, inv: Tensor, kept: Tensor, n_kept: Tensor, num_tokens: int) -> Tensor:
        k = weights.shape[1]
        ctx.num_tokens, ctx.k, ctx.weights_dtype = num_tokens, k, weights.dtype
        if _fused(y):
            from routerlab.moe import triton_combine

            ctx.save_for_backward(y, weights, inv, n_kept)
            return triton_combine.gather_reduce(y, inv, n_kept, weights, num_tokens, k)
        w = torch.where(kept, weights.t().reshape(-1).to(y.dtype), 0)
        rows = torch.where(kept[:, None], y.index_select(0, inv), 0).view(k, num_tokens, y.shape[1])
        ctx.save_for_backward(y, w, order, inv, kept)
        return (rows * w.view(k, num_tokens, 1)).sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        T, k = ctx.num_tokens, ctx.k
        if _fused(grad):
            from routerlab.moe import triton_combine

            y, weights, inv, n_kept = ctx.saved_tensors
            grad_y, grad_w = triton_combine.combine_grads(y, grad, inv, n_kept, weights, T, k)
            return grad_y, grad_w.to(ctx.weights_dtype), None, None, None, None, None
        y, w, order, inv, kept = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            # padding rows get weight 0, so their gradient is exactly 0
            grad_y = grad.index_select(0, order % T) * w.index_select(0, order)[:, None]
        if ctx.needs_input_grad[1]:
            rows = y.index_select(0, inv).view(k, T, -1)
            dots = (rows * grad.view(1, T, -1)).sum(-1, dtype=torch.promote_types(y.dtype, torch.float32)).reshape(-1)  # fp32 at least, float64 kept
            grad_w = torch.where(kept, dots, 0).view(k, T).t().to(ctx.weights_dtype)
        return grad_y, grad_w, None, None, None, None, None


class _SumSlots(torch.autograd.Function):
    """out[t] = sum over kept slots j of y[inv[j, t]]: combine without weights, the transpose of permute.
    Backward is permute's forward gather, with padding rows set to 0."""

    @staticmethod
    def forward(ctx, y: Tensor, token_of_row: Tensor, inv: Tensor, kept: Tensor, n_kept: Tensor, num_tokens: int, k: int) -> Tensor:
        ctx.save_for_backward(token_of_row, n_kept)
        if _fused(y):
            from routerlab.moe import triton_combine

            return triton_combine.gather_reduce(y, inv, n_kept, None, num_tokens, k)
        return torch.where(kept[:, None], y.index_select(0, inv), 0).view(k, num_tokens, y.shape[1]).sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        token_of_row, n_kept = ctx.saved_tensors
        real = torch.arange(token_of_row.numel(), device=grad.device) < n_kept
        return torch.where(real[:, None], grad.index_select(0, token_of_row), 0), None, None, None, None, None, None


def permute(x: Tensor, plan: DispatchPlan) -> Tensor:
    """[T, d] -> [T*k, d]: each token's hidden state once per slot, rows grouped by expert."""
    return _Permute.apply(x, plan.token_of_row, plan.inv, plan.kept, plan.n_kept, plan.k)


def combine(y: Tensor, weights: Tensor | None, plan: DispatchPlan) -> Tensor:
    """[T*k, d] expert outputs -> [T, d]; dropped and unused slots contribute nothing. weights None: plain sum."""
    if weights is None:
        return _SumSlots.apply(y, plan.token_of_row, plan.inv, plan.kept, plan.n_kept, plan.num_tokens, plan.k)
    return _Combine.apply(y, weights, plan.order, plan.inv, plan.kept, plan.n_kept, plan.num_tokens)


def moe_compute(x: Tensor, experts: Tensor, weights: Tensor, bank: ExpertBank, capacity: int | None, backend: str = "auto",
                priority: Tensor | None = None) -> tuple[Tensor, DispatchPlan]:
    """plan -> permute -> experts -> weighted combine: out [T, d] for routing (experts [T, k] ids of `bank`, -1 unused).

    The whole single-process MoE computation; the expert-parallel layer runs it on each receiver's rows.
    """
    plan = plan_dispatch(experts, bank.num_experts, capacity, priority)
    y = bank(permute(x, plan), plan.counts, backend)
    return combine(y, weights, plan), plan


def flatten_tokens(x: Tensor, token_ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return x.reshape(-1, x.shape[-1]), None if token_ids is None else token_ids.reshape(-1)


# dispatchers registered by name: `@register_dispatcher("name")` on a class built as cls(group, chunks) for the
# expert-parallel ones (routerlab/moe/parallel.py), cls() for the local one
DISPATCHERS = Registry("dispatcher", name_attribute="name")
register_dispatcher = DISPATCHERS.register


@register_dispatcher("local")
class LocalDispatch:
    """Every expert in this process: plan -> permute -> experts -> combine (moe_compute)."""

    def __call__(self, layer: MoELayer, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        if layer.experts.sharded:
            raise ValueError("this layer's ExpertBank holds a block of the experts; shard the model (routerlab.moe.parallel.shard_experts) to dispatch across ranks")
        capacity = capacity_for(x.shape[0], routing.experts.shape[1], layer.num_experts, layer.active_capacity_factor, layer.min_capacity)
        if core_graph.applies(layer, x, (routing.weights, *core_graph.expert_params(layer))):
            return core_graph.compute(layer, x, routing.experts, routing.weights, capacity)
        return local_compute(layer, x, routing.experts, routing.weights, capacity)


def local_compute(layer: MoELayer, x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None, bank=None) -> tuple[Tensor, Tensor]:
    """(out [T, d], kept [T, k]) of every expert of `layer` in this process, eagerly (moe_compute); bank: what stands
    for layer.experts (experts.BankOn), if not the bank itself."""
    priority = weights if layer.drop_policy == "probability" else None
    out, plan = moe_compute(x, experts, weights, layer.experts if bank is None else bank, capacity, layer.backend, priority)
    return out, plan.kept.view(plan.k, plan.num_tokens).t()


class MoELayer(nn.Module):
    def __init__(self, router: Router, experts: ExpertBank, capacity_factor: float | None = None, backend: str = "auto", dispatcher=None,
                 shared: nn.Module | None = None, eval_capacity_factor: float | str | None = "train", min_capacity: int = 1,
                 drop_policy: str = "position", graph_core: bool = True) -> None:
        super().__init__()
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
        if not (eval_capacity_factor in ("train", None) or (isinstance(eval_capacity_factor, (int, float)) and eval_capacity_factor > 0)):
            raise ValueError(f"eval_capacity_factor must be 'train' (the training factor), None (dropless) or > 0, got {eval_capacity_factor!r}")
        if drop_policy not in ("position", "probability"):
            raise ValueError(f"drop_policy must be 'position' or 'probability', got {drop_policy!r}")
        if min_capacity < 1:
            raise ValueError(f"min_capacity must be >= 1, got {min_capacity}")
        self.eval_capacity_factor, self.min_capacity, self.drop_policy = eval_capacity_factor, min_capacity, drop_policy
        self.router = router
        self.experts = experts
        self.capacity_factor = capacity_factor
        self.backend = backend
        self.num_experts = experts.total_experts  # all experts (a sharded bank holds a block of them)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatch()
        self.shared = shared  # always-on experts (moe/shared.py) added to every token's output, or None
        self._stats = None
        self._top1 = None
        self._pending = None  # what stats and top1 are computed from, on first read (off the hot path)
        self.stats_fn = stats_from_routing  # routerlab/compile.py swaps in a compiled one
        self.sequence_length: int | None = None  # tokens per sequence of the last forward (None: not a sequence model)
        self.aux_losses: dict[str, Tensor] = {}
        # eager CUDA training: dispatch, experts and combine (and a pure router) replayed from CUDA graphs
        # (moe/core_graph.py); the trainer turns it off where it graphs the whole step
        self.graph_core = graph_core
        self.core_graphs = core_graph.CoreGraphs()

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        tokens, token_ids = flatten_tokens(x, token_ids)
        self.sequence_length = x.shape[-2] if x.dim() >= 3 else None  # for per-sequence balance and MaxVio
        self.router.sequence_length = self.sequence_length
        if self.graphs_router(tokens):
            routing, out, kept = core_graph.route_and_compute(self, tokens, token_ids)
        else:
            routing = self.route(tokens, token_ids)
            out, kept = self.compute(tokens, routing)
        if self.shared is not None:
            out = out + self.shared(tokens)
        self.record(routing, kept)
        return out.reshape(x.shape)

    @property
    def active_capacity_factor(self) -> float | None:
        """The training capacity factor in training; at evaluation eval_capacity_factor ('train': the same)."""
        if self.training or self.eval_capacity_factor == "train":
            return self.capacity_factor
        return self.eval_capacity_factor

    def graphs_router(self, x: Tensor) -> bool:
        """Whether this forward's router runs inside the core's CUDA graphs (moe/core_graph.py): a pure router, every
        expert in this process."""
        params = itertools.chain(self.router.parameters(), core_graph.expert_params(self))  # read only on CUDA
        return (type(self.dispatcher) is LocalDispatch and not self.experts.sharded and core_graph.applies(self, x, params)
                and isinstance(self.router, Router) and self.router.forward_is_pure())

    # The steps of forward.

    def route(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        """x [T, d] -> the router's decision for every token."""
        return self.router(x, token_ids=token_ids)

    def compute(self, x: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        """(out [T, d], kept [T, k] bool: slots that were computed). Dispatch, experts and combine."""
        return self.dispatcher(self, x, routing)

    def record(self, routing: Routing, kept: Tensor) -> None:
        """Keep what stats and top1 are computed from (on first read, off the hot path) and the aux losses."""
        logits = routing.logits.detach() if routing.logits is not None else None
        self._pending = (routing.experts, routing.weights.detach(), logits, kept)
        self._stats = self._top1 = None
        self.aux_losses = routing.aux

    def recorded(self) -> tuple:
        """What record() kept of the last forward; `restore` puts it back (a replayed CUDA graph of the training
        step rewrites these tensors in place, while an eager forward in between, an evaluation, replaces them)."""
        return self._pending, self.aux_losses, self.sequence_length

    def restore(self, recorded: tuple) -> None:
        self._pending, self.aux_losses, self.sequence_length = recorded
        self._stats = self._top1 = None  # recomputed from the restored tensors when read

    @property
    def stats(self) -> RoutingStats | None:
        """RoutingStats of the last forward (computed when first read)."""
        if self._stats is None and self._pending is not None:
            experts, _, logits, kept = self._pending
            self._stats = self.stats_fn(experts, logits, kept, self.num_experts, self.sequence_length)
        return self._stats

    @stats.setter
    def stats(self, value: RoutingStats | None) -> None:  # e.g. stats merged over ranks
        self._stats, self._pending = value, None if value is None else self._pending

    @property
    def top1(self) -> Tensor | None:
        """[T] highest-weight expert of each token in the last forward (-1 if none)."""
        if self._top1 is None and self._pending is not None:
            experts, weights, _, _ = self._pending
            self._top1 = experts.gather(1, weights.argmax(1, keepdim=True)).squeeze(1)
        return self._top1

    @top1.setter
    def top1(self, value: Tensor | None) -> None:
        self._top1 = value
