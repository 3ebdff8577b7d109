"""`MoELayer.graph_core`: an eager layer's dispatch, experts and combine replayed from CUDA graphs.

Why: at issue 19's small shapes an eager layer is host-bound. On an H200's host, issuing one forward + backward of the
layer took 2.3-3.1 ms for 31 kernels whose GPU time is 0.6-2.4 ms (benchmarks/eager_layer_host.py). The trainer graphs
the whole step where it can (routerlab/step_graph.py); this serves a layer used outside the trainer and the steps the
trainer cannot graph whole though every router is graph-safe (several micro-batches or processes, extra loss terms).
The router decides eagerly; the core's ~20 kernels (plan, permute, grouped experts, combine and their backward) become
one replay each way: they read only tensors whose shapes the input fixes.

When (`applies`): the layer's local dispatcher on CUDA, a backend that never reads the host (grouped), gradients wanted,
and not already inside a capture (train.cuda_graph's step) or a torch.compile trace. Per input signature (shapes,
dtypes, capacity, what needs a gradient, autocast, the expert weights' addresses):
  first call      eager, as without the switch (Triton compiles, grouped-GEMM set-up)
  second call     one more eager forward + backward on the capture stream, then the forward and the backward of
                  x, the routing weights and the expert weights captured (one memory pool), then replayed
  later calls     inputs copied into the graph's tensors, the forward replayed; backward: the output gradient copied in,
                  the backward replayed
Nothing the graphs write leaves the layer: the output, the kept mask and every gradient are copies, so a later replay
cannot change a tensor the caller holds (the cost: a copy of the expert weights' gradients, which a large layer
feels). A backward whose forward was overwritten by a later forward of the same signature (two micro-batches forward
before either backward) recomputes its forward eagerly and backpropagates that: the same numbers, slower. A layer keeps
graphs for MAX_SIGNATURES signatures (each holds one forward's activations) and captures at most MAX_CAPTURES times
(each capture synchronizes the device and collects garbage), so shapes that change every call stay eager.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.moe.backends import choose_backend

MAX_SIGNATURES = 2  # graphs kept per layer (training batches, plus one other shape); the oldest goes first
MAX_CAPTURES = 4  # captures per layer: each costs a device synchronization and a garbage collection


@dataclass
class _Captured:
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, Tensor, Tensor]   # x, experts, weights as the graphs read them
    out: Tensor
    kept: Tensor
    grad_out: Tensor
    grads: tuple[Tensor | None, ...]        # of x, weights, *params (None where not wanted)
    generation: int = 0                      # forwards replayed: a backward checks its forward is still there


class CoreGraphs:
    """One layer's captured signatures. Not state to copy or save: a deep copy or an unpickled layer starts empty."""

    def __init__(self) -> None:
        self.seen: dict[tuple, int] = {}
        self.captures = 0
        self.captured: dict[tuple, _Captured | None] = {}  # None: the capture failed, this signature stays eager

    def __deepcopy__(self, memo) -> CoreGraphs:
        return CoreGraphs()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def applies(layer, x: Tensor, weights: Tensor) -> bool:
    """Whether this forward takes the graphs (the dispatch itself decides nothing else)."""
    if torch.compiler.is_compiling() or not (layer.graph_core and x.is_cuda and torch.is_grad_enabled()):
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    wanted = x.requires_grad or weights.requires_grad or any(p.requires_grad for p in _params(layer))
    return wanted and choose_backend(layer.backend, x) == "grouped"


def _params(layer) -> tuple[Tensor, Tensor]:
    return layer.experts.w_in, layer.experts.w_out


def _signature(layer, x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None) -> tuple:
    params = tuple((p.data_ptr(), p.requires_grad) for p in _params(layer))
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return (x.shape, x.dtype, x.requires_grad, experts.shape, experts.dtype, weights.dtype, weights.requires_grad, capacity,
            layer.backend, layer.drop_policy, autocast, params, x.device)


def compute(layer, x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None) -> tuple[Tensor, Tensor]:
    """(out [T, d], kept [T, k]) of the layer's local computation, through the graphs once captured."""
    graphs = layer.core_graphs
    key = _signature(layer, x, experts, weights, capacity)
    if key not in graphs.captured:
        graphs.seen[key] = graphs.seen.get(key, 0) + 1
        if graphs.seen[key] < 2 or graphs.captures >= MAX_CAPTURES:  # shapes that keep changing (a router choosing
            if len(graphs.seen) > 64:                                 # a data-dependent k) stop being captured
                graphs.seen.clear()
            return _eager(layer, x, experts, weights, capacity)
        del graphs.seen[key]
        graphs.captures += 1
        if len(graphs.captured) >= MAX_SIGNATURES:
            graphs.captured.pop(next(iter(graphs.captured)))
        graphs.captured[key] = _capture(layer, x, experts, weights, capacity)
    captured = graphs.captured[key]
    if captured is None:
        return _eager(layer, x, experts, weights, capacity)
    return _Replay.apply(captured, layer, capacity, x, experts, weights, *_params(layer))


def _eager(layer, x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None, bank=None) -> tuple[Tensor, Tensor]:
    from routerlab.moe.layer import local_compute  # layer.py imports this module

    return local_compute(layer, x, experts, weights, capacity, bank)


def _capture(layer, x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None) -> _Captured | None:
    from routerlab.moe.experts import BankOn

    # new leaves throughout: the inputs' copies, and the weights' memory under leaves of its own (a live eager graph's
    # AccumulateGrad nodes of the parameters, bound to the default stream, would break the capture)
    params = [p.detach().requires_grad_(p.requires_grad) for p in _params(layer)]
    bank = BankOn(layer.experts, *params)
    inputs = (x.detach().clone().requires_grad_(x.requires_grad), experts.clone(),
              weights.detach().clone().requires_grad_(weights.requires_grad))
    wanted = [t for t in (inputs[0], inputs[2], *params) if t.requires_grad]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):  # warm-up on the capture stream, as make_graphed_callables does
            out, _ = _eager(layer, *inputs, capacity, bank)
            torch.autograd.grad(out, wanted, torch.ones_like(out), allow_unused=True)
            del out
        torch.cuda.current_stream().wait_stream(stream)
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, stream=stream):
            out, kept = _eager(layer, *inputs, capacity, bank)
        grad_out = torch.empty_like(out)
        with torch.cuda.graph(bwd, pool=fwd.pool(), stream=stream):
            found = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    except RuntimeError:  # e.g. a backend that read the host after all: this signature stays eager
        torch.cuda.synchronize()
        return None
    grads = tuple(next(found) if t.requires_grad else None for t in (inputs[0], inputs[2], *params))
    return _Captured(fwd, bwd, inputs, out.detach(), kept, grad_out, grads)


def _copy(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


class _Replay(torch.autograd.Function):
    """The captured forward and backward as one autograd node; copies in and out of the graphs' tensors."""

    @staticmethod
    def forward(ctx, captured: _Captured, layer, capacity: int | None, x: Tensor, experts: Tensor, weights: Tensor, *params: Tensor):
        for static, given in zip(captured.inputs, (x, experts, weights)):
            static.copy_(given)
        captured.fwd.replay()
        captured.generation += 1
        ctx.captured, ctx.generation, ctx.layer, ctx.capacity = captured, captured.generation, layer, capacity
        ctx.save_for_backward(x, experts, weights, *params)  # their version counters, and the recomputation's inputs
        kept = captured.kept.clone()
        ctx.mark_non_differentiable(kept)
        return captured.out.clone(), kept

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_kept):
        captured = ctx.captured
        x, experts, weights, *params = ctx.saved_tensors
        if ctx.generation != captured.generation:  # a later forward replaced this one's activations
            return (None, None, None, *_recompute(ctx.layer, ctx.capacity, grad_out, x, experts, weights, params))
        captured.grad_out.copy_(grad_out)
        captured.bwd.replay()
        grad_x, grad_w, *grad_params = (_copy(g) for g in captured.grads)
        return (None, None, None, grad_x, None, grad_w, *grad_params)


def _recompute(layer, capacity: int | None, grad_out: Tensor, x: Tensor, experts: Tensor, weights: Tensor, params: list[Tensor]) -> tuple:
    with torch.enable_grad():
        x_, w_ = x.detach().requires_grad_(x.requires_grad), weights.detach().requires_grad_(weights.requires_grad)
        out, _ = _eager(layer, x_, experts, w_, capacity)
        wanted = [t for t in (x_, w_, *params) if t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    grad_x, grad_w, *grad_params = (next(found) if t.requires_grad else None for t in (x_, w_, *params))
    return grad_x, None, grad_w, *grad_params
