"""`MoELayer.graph_core`: an eager layer's router, dispatch, experts and combine replayed from CUDA graphs.

Why: at issue 19's small shapes an eager layer is host-bound. On an H200's host, issuing one forward + backward of the
layer took 2.3-3.1 ms for 31 kernels whose GPU time is 0.6-2.4 ms (benchmarks/eager_layer_host.py). The trainer graphs
the whole step where it can (routerlab/step_graph.py); this serves a layer used outside the trainer and the steps the
trainer cannot graph whole though every router is graph-safe (several processes, extra loss terms).

What is captured, per layer and input signature (shapes, dtypes, what needs a gradient, autocast, the parameters'
addresses, training or not, capacity):
  router + core   where the router's forward is pure (Router.forward_is_pure: it writes no state and draws no random
                  numbers): x and the token ids in; the output, the kept mask, the routing and its aux losses out
  core            otherwise: the router decides eagerly, and x, the chosen experts and their weights go in; the output
                  and the kept mask come out. Its ~20 kernels read only tensors whose shapes the input fixes.
When (`applies`): the layer's local dispatcher on CUDA, a backend that never reads the host (grouped), gradients wanted,
and not already inside a capture (train.cuda_graph's step) or a torch.compile trace.
  first call      eager, as without the switch (Triton compiles, grouped-GEMM set-up)
  second call     one more eager forward + backward on the capture stream, then the forward and the backward captured
                  (one memory pool), then replayed
  later calls     inputs copied into the graph's tensors, the forward replayed; backward: the gradient of each
                  differentiable output copied in (zero where unused), the backward replayed
A later replay never changes a tensor the caller holds. Outputs and the inputs' gradients are copies. The parameters'
gradients are the graph's own tensors, handed over without a copy (AccumulateGrad keeps them as p.grad; the copy of
the expert weights' gradients cost 0.5 ms a layer at d=2048, E=64, h=1408). So before each replay, forward and backward,
the layer checks that nothing outside still holds them: the backward writes them, and the forward's temporaries may lie
in the same memory (one pool for both graphs). A p.grad that still does (micro-batches, zero_grad(set_to_none=False))
is replaced by a copy first, the copy AccumulateGrad would have made; anything else that holds one (the same layer used
twice in one graph) gets that call computed eagerly, and the signature hands over copies from then on. A backward whose
forward a later forward of the same signature overwrote (two micro-batches forward before either backward) replays its
forward again on its saved inputs first: the same numbers, since the parameters cannot change in between (autograd's
version counters check it) and the region draws nothing (to rounding where a kernel adds with atomics). The captured router may take other kernels than the eager one
(routers/gated.py: uses_gate_kernel), so graphed and eager routing agree to rounding, not bit for bit. A layer keeps
graphs for MAX_SIGNATURES signatures (each holds one forward's activations) and captures at most MAX_CAPTURES times
(each capture synchronizes the device and collects garbage), so shapes that change every call stay eager.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.moe.backends import choose_backend
from routerlab.routers.base import Routing

MAX_SIGNATURES = 2  # graphs kept per layer (training batches, plus one other shape); the oldest goes first
MAX_CAPTURES = 4  # captures per layer: each costs a device synchronization and a garbage collection


@dataclass
class _Captured:
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    inputs: tuple[Tensor | None, ...]        # the graphs' copies of the inputs (None: an input not given)
    outputs: tuple[Tensor, ...]              # what the forward writes
    grad_outputs: tuple[Tensor | None, ...]  # the gradient of each output the backward reads (None: not differentiable)
    grads: tuple[Tensor | None, ...]         # of each input, then each parameter (None where not wanted)
    layout: object                            # what the region returns besides tensors (the aux losses' names)
    uses: tuple[int | None, ...]              # each gradient's storage use count while only the graphs hold it
    generation: int = 0                       # forwards replayed: a backward checks its forward is still there
    hands_over: bool = True                   # the parameters' gradients leave as the graph's tensors, not copies


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


def applies(layer, x: Tensor, differentiable) -> bool:
    """Whether this forward takes the graphs; differentiable: the region's parameters and float inputs besides x (any
    iterable: read only past the cheap checks)."""
    if torch.compiler.is_compiling() or not (layer.graph_core and x.is_cuda and torch.is_grad_enabled()):
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    wanted = x.requires_grad or any(t.requires_grad for t in differentiable)
    return wanted and choose_backend(layer.backend, x) == "grouped"


def expert_params(layer) -> tuple[Tensor, Tensor]:
    return layer.experts.w_in, layer.experts.w_out


def _signature(layer, params, *inputs: Tensor | None) -> tuple:
    described = tuple(None if t is None else (t.shape, t.dtype, t.requires_grad) for t in inputs)
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return (described, tuple((p.data_ptr(), p.requires_grad) for p in params), autocast, layer.backend, layer.drop_policy,
            inputs[0].device)


def compute(layer, x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None) -> tuple[Tensor, Tensor]:
    """(out [T, d], kept [T, k]) of the layer's local computation of a routing made eagerly, through the graphs once
    captured."""
    params = expert_params(layer)
    key = ("core", capacity, *_signature(layer, params, x, experts, weights))
    (out, kept), _ = _run(layer, key, functools.partial(_core, layer, capacity), (x, experts, weights), params)
    return out, kept


def route_and_compute(layer, x: Tensor, token_ids: Tensor | None) -> tuple[Routing, Tensor, Tensor]:
    """(routing, out [T, d], kept [T, k]) of a pure router and the layer's local computation, through the graphs once
    captured. The routing's weights and logits come detached (the layer records them; the combine used them inside)."""
    params = [*(p for _, p in layer.router.named_parameters()), *expert_params(layer)]  # the order _routed names them in
    router = layer.router
    state = (layer.training, router.training, router.sequence_length, layer.active_capacity_factor, layer.min_capacity,
             id(router.params), tuple(b.data_ptr() for b in router.buffers()), torch.backends.cuda.matmul.allow_tf32)
    key = ("router + core", state, *_signature(layer, params, x, token_ids))
    tensors, (has_logits, aux_names) = _run(layer, key, functools.partial(_routed, layer), (x, token_ids), params)
    out, kept, experts, weights, *rest = tensors
    logits = rest.pop(0) if has_logits else None
    return Routing(experts, weights, logits, dict(zip(aux_names, rest))), out, kept


def _core(layer, capacity: int | None, params, x: Tensor, experts: Tensor, weights: Tensor):
    from routerlab.moe.experts import BankOn
    from routerlab.moe.layer import local_compute  # layer.py imports this module

    return local_compute(layer, x, experts, weights, capacity, BankOn(layer.experts, *params)), None


def _routed(layer, params, x: Tensor, token_ids: Tensor | None):
    from routerlab.moe.experts import BankOn
    from routerlab.moe.layer import capacity_for, local_compute

    names = [name for name, _ in layer.router.named_parameters()]
    *gate, w_in, w_out = params
    routing = torch.func.functional_call(layer.router, dict(zip(names, gate)), (x,), {"token_ids": token_ids})
    capacity = capacity_for(x.shape[0], routing.experts.shape[1], layer.num_experts, layer.active_capacity_factor, layer.min_capacity)
    out, kept = local_compute(layer, x, routing.experts, routing.weights, capacity, BankOn(layer.experts, w_in, w_out))
    logits = () if routing.logits is None else (routing.logits.detach(),)
    tensors = (out, kept, routing.experts, routing.weights.detach(), *logits, *routing.aux.values())
    return tensors, (routing.logits is not None, tuple(routing.aux))


def _run(layer, key: tuple, region, inputs: tuple, params) -> tuple[tuple[Tensor, ...], object]:
    """region(params, *inputs) -> (tensors, layout), eagerly or replayed from the signature's graphs."""
    graphs = layer.core_graphs
    if key not in graphs.captured:
        graphs.seen[key] = graphs.seen.get(key, 0) + 1
        if graphs.seen[key] < 2 or graphs.captures >= MAX_CAPTURES:  # shapes that keep changing (a router choosing
            if len(graphs.seen) > 64:                                 # a data-dependent k) stop being captured
                graphs.seen.clear()
            return region(params, *inputs)
        del graphs.seen[key]
        graphs.captures += 1
        if len(graphs.captured) >= MAX_SIGNATURES:
            graphs.captured.pop(next(iter(graphs.captured)))
        graphs.captured[key] = _capture(region, inputs, params)
    captured = graphs.captured[key]
    if captured is None:
        return region(params, *inputs)
    if not _writable(captured, params):  # the forward's replay may reuse a held gradient's memory: this call is eager
        captured.hands_over = False
        return region(params, *inputs)
    return _Replay.apply(captured, region, len(inputs), *inputs, *params), captured.layout


def _capture(region, inputs: tuple, params) -> _Captured | None:
    # new leaves throughout: the inputs' copies, and the parameters' memory under leaves of its own (a live eager graph's
    # AccumulateGrad nodes of the parameters, bound to the default stream, would break the capture)
    aliases = [p.detach().requires_grad_(p.requires_grad) for p in params]
    statics = tuple(None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
    leaves = (*statics, *aliases)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):  # warm-up on the capture stream, as make_graphed_callables does
            outs, _ = region(aliases, *statics)
            differentiable = [o for o in outs if o.requires_grad]
            torch.autograd.grad(differentiable, wanted, [torch.ones_like(o) for o in differentiable], allow_unused=True)
            del outs, differentiable
        torch.cuda.current_stream().wait_stream(stream)
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, stream=stream):
            outs, layout = region(aliases, *statics)
        grad_outputs = tuple(torch.empty_like(o) if o.requires_grad else None for o in outs)
        with torch.cuda.graph(bwd, pool=fwd.pool(), stream=stream):
            found = iter(torch.autograd.grad([o for o in outs if o.requires_grad], wanted, [g for g in grad_outputs if g is not None],
                                             allow_unused=True))
    except RuntimeError:  # e.g. a backend that read the host after all: this signature stays eager
        torch.cuda.synchronize()
        return None
    grads = tuple(next(found) if t is not None and t.requires_grad else None for t in leaves)
    uses = tuple(None if g is None else _uses(g) for g in grads)
    return _Captured(fwd, bwd, statics, tuple(o.detach() for o in outs), grad_outputs, grads, layout, uses)


def _uses(t: Tensor) -> int:
    """References to t's memory (torch's CUDA graph trees read the same count to find outputs still held)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _writable(captured: _Captured, params) -> bool:
    """Whether a replay may overwrite the gradients: nothing outside holds them, once a p.grad that still does is
    replaced by a copy. The backward writes them, and the forward may too: the two graphs share one memory pool, so the
    forward's temporaries can lie where the backward later puts a gradient."""
    n_inputs = len(captured.grads) - len(params)
    for p, g, free in zip(params, captured.grads[n_inputs:], captured.uses[n_inputs:]):
        if g is None or _uses(g) == free:
            continue
        if p.grad is not None and p.grad.data_ptr() == g.data_ptr():
            p.grad = p.grad.clone()
        if _uses(g) != free:
            return False
    return True


def _eager_gradients(captured: _Captured, region, saved, n_inputs: int, grad_outputs) -> list[Tensor | None]:
    """The backward without the graphs: the region's forward again on the saved inputs, then autograd."""
    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in saved]
    with torch.enable_grad():
        outs, _ = region(leaves[n_inputs:], *leaves[:n_inputs])
    pairs = [(o, g) for o, g, s in zip(outs, grad_outputs, captured.grad_outputs) if s is not None and g is not None]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) if pairs else [None] * len(wanted))
    return [next(found) if t is not None and t.requires_grad else None for t in leaves]


def _replay_forward(captured: _Captured, inputs) -> None:
    for static, given in zip(captured.inputs, inputs):
        if static is not None:
            static.copy_(given)
    captured.fwd.replay()
    captured.generation += 1


class _Replay(torch.autograd.Function):
    """The captured forward and backward as one autograd node; copies in and out of the graphs' tensors, but for the
    parameters' gradients (the module's docstring). apply(captured, region, number of inputs, *inputs, *parameters) ->
    copies of the region's tensors; the region (which holds the layer) stays with the node, not the capture, so a
    layer and its graphs form no reference cycle."""

    @staticmethod
    def forward(ctx, captured: _Captured, region, n_inputs: int, *given: Tensor | None):
        _replay_forward(captured, given[:n_inputs])
        ctx.captured, ctx.region, ctx.generation, ctx.n_inputs = captured, region, captured.generation, n_inputs
        ctx.save_for_backward(*given)  # the inputs, for a second replay, and the parameters' version counters
        outputs = tuple(t.clone() for t in captured.outputs)
        ctx.mark_non_differentiable(*(o for o, g in zip(outputs, captured.grad_outputs) if g is None))
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs: Tensor | None):
        captured, n_inputs = ctx.captured, ctx.n_inputs
        saved = ctx.saved_tensors
        if not _writable(captured, saved[n_inputs:]):
            captured.hands_over = False
            return (None, None, None, *_eager_gradients(captured, ctx.region, saved, n_inputs, grad_outputs))
        if ctx.generation != captured.generation:  # a later forward replaced this one's activations: bring them back
            _replay_forward(captured, saved[:n_inputs])
        for static, grad in zip(captured.grad_outputs, grad_outputs):
            if static is not None:
                static.zero_() if grad is None else static.copy_(grad)
        captured.bwd.replay()
        grads = (None if g is None else g.detach() if i >= n_inputs and captured.hands_over else g.clone() for i, g in enumerate(captured.grads))
        return (None, None, None, *grads)
