"""MoELayer.graph_core (routerlab/moe/core_graph.py): an eager layer's dispatch, experts and combine replayed from CUDA
graphs give the eager layer's numbers exactly, never hand a graph's tensor to the caller, and recompute a backward whose
forward a later forward overwrote. The captures need a GPU (run on the H200: docs/benchmarks.md, issue 19 v11); the
trainer's choice of where the core is graphed is checked on the CPU too."""
from __future__ import annotations

import copy

import pytest
import torch

from routerlab.moe import ExpertBank, MoELayer
from routerlab.moe import core_graph
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200: docs/benchmarks.md, issue 19 v11)")


def layers(T=512, d=64, h=96, E=8, k=2, capacity_factor=None, drop_policy="position", dtype=torch.bfloat16):
    torch.manual_seed(0)
    router = SoftmaxTopK(d, E, SoftmaxTopKParams(k=k, z_loss=1e-3))
    graphed = MoELayer(router, ExpertBank(E, d, h), capacity_factor, drop_policy=drop_policy).to("cuda", dtype)
    eager = copy.deepcopy(graphed)
    eager.graph_core = False
    assert graphed.graph_core and not graphed.core_graphs.captured, "a deep copy starts without graphs"
    return graphed, eager, T, d


def step(layer, x, g):
    """One forward + backward into .grad (the trainer's form); (out, kept, x.grad, every parameter's grad)."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    loss = (out.float() * g).sum() + sum(v.float() for v in layer.aux_losses.values())
    loss.backward()
    kept = layer.recorded()[0][3].clone()  # the kept mask the layer records
    return [out.detach().clone(), kept, x.grad] + [p.grad.clone() for p in layer.parameters()]


def assert_same(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what}: tensor {i} differs (max {(a.float() - b.float()).abs().max():.3g})"


@cuda
@pytest.mark.parametrize("capacity_factor, drop_policy", [(None, "position"), (1.0, "position"), (0.75, "probability")])
def test_the_graphed_core_gives_the_eager_numbers(capacity_factor, drop_policy):
    graphed, eager, T, d = layers(capacity_factor=capacity_factor, drop_policy=drop_policy)
    for i in range(4):  # call 1 eager, call 2 captures and replays, calls 3-4 replay
        x, g = torch.randn(T, d, device="cuda", dtype=torch.bfloat16), torch.randn(T, d, device="cuda")
        for layer in (graphed, eager):
            layer.zero_grad(set_to_none=True)
        assert_same(step(graphed, x, g), step(eager, x, g), f"call {i + 1}")
    assert [c is not None for c in graphed.core_graphs.captured.values()] == [True], "the signature was captured"


@cuda
def test_a_graphed_output_is_the_callers_own():
    graphed, _, T, d = layers()
    xs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    outs = [graphed(x) for x in xs]  # the second and third replay into the same graph tensors
    assert any(c is not None for c in graphed.core_graphs.captured.values()), "the second call captured"
    for out in outs:
        out.sum().backward()  # each backward is the graph's or a recomputation
    again = [graphed(x).detach() for x in xs]
    for i, (out, want) in enumerate(zip(outs, again)):
        assert torch.equal(out.detach(), want), f"output {i} changed after later forwards"


@cuda
def test_a_backward_after_a_later_forward_recomputes():
    graphed, eager, T, d = layers()
    x0 = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    step(graphed, x0, torch.ones(T, d, device="cuda"))
    step(graphed, x0, torch.ones(T, d, device="cuda"))  # captured now
    inputs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    grads = [torch.randn(T, d, device="cuda") for _ in range(2)]
    results = []
    for layer in (graphed, eager):  # two micro-batches forward, then backward in reverse: the first one's forward is gone
        layer.zero_grad(set_to_none=True)
        xs = [x.clone().requires_grad_(True) for x in inputs]
        outs = [layer(x) for x in xs]
        for out, g in reversed(list(zip(outs, grads))):
            (out.float() * g).sum().backward()
        results.append([x.grad for x in xs] + [p.grad.clone() for p in layer.experts.parameters()])
    captured = next(iter(graphed.core_graphs.captured.values()))
    assert captured is not None and captured.generation >= 3
    assert_same(*results, "micro-batches backward in reverse")


@cuda
def test_no_grad_and_new_shapes_stay_bounded():
    graphed, _, T, d = layers()
    with torch.no_grad():
        for _ in range(3):
            graphed(torch.randn(T, d, device="cuda", dtype=torch.bfloat16))
    assert not graphed.core_graphs.captured, "an evaluation forward keeps no graph"
    for n in (T, T // 2, T // 4):  # three signatures, each called twice: the oldest graph is dropped
        for _ in range(2):
            graphed(torch.randn(n, d, device="cuda", dtype=torch.bfloat16)).sum().backward()
    assert len(graphed.core_graphs.captured) == core_graph.MAX_SIGNATURES


def test_the_trainer_graphs_the_core_only_where_it_does_not_graph_the_step(tmp_path):
    from routerlab.config import load_config
    from routerlab.train import Trainer

    base = ["train.device=cpu", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.num_experts=4", "model.expert_hidden=8", "router.k=2",
            "task.block_size=8", "train.batch_size=2", "train.steps=1", f"run.dir={tmp_path}", "run.checkpoint=false"]
    on = Trainer(load_config("configs/gpu/stdlib-110m-e64k6.yaml", base), log=False)
    assert on.step_graph is None and all(layer.graph_core for layer in on.layers), "no step graph (the CPU): each core is graphed where it can be"
    off = Trainer(load_config("configs/gpu/stdlib-110m-e64k6.yaml", base + ["train.cuda_graph=false"]), log=False)
    assert not any(layer.graph_core for layer in off.layers), "train.cuda_graph=false turns every graph off"
    relu = Trainer(load_config("configs/gpu/stdlib-110m-e64k6.yaml", base + ["router.name=relu"]), log=False)
    assert not any(layer.graph_core for layer in relu.layers), "a router that is not graph-safe may change the core's shapes every step"


@cuda
def test_training_with_graphed_cores_is_training_without(tmp_path):
    """Steps the trainer does not graph whole (two micro-batches): the same losses with each layer's core graphed as with
    every kernel eager."""
    from routerlab.config import load_config
    from routerlab.train import Trainer

    base = ["train.device=cuda", "train.precision=bf16-pure", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.num_experts=8",
            "model.expert_hidden=32", "router.k=2", "task.block_size=32", "train.batch_size=8", "train.steps=6", "train.eval_every=100",
            "run.checkpoint=false", "train.micro_batches=2"]
    losses = {}
    for cuda_graph in (True, False):
        trainer = Trainer(load_config("configs/gpu/stdlib-110m-e64k6.yaml", base + [f"train.cuda_graph={str(cuda_graph).lower()}", f"run.dir={tmp_path / str(cuda_graph)}"]), log=False)
        for _ in range(6):
            trainer.train_step()
        losses[cuda_graph] = trainer.losses
        if cuda_graph:
            assert trainer.step_graph is None and all(any(c is not None for c in layer.core_graphs.captured.values()) for layer in trainer.layers)
    assert losses[True][0] == losses[False][0], "the first step's loss, before any update"
    # later steps: eager runs of one config differ by a few ulps anyway (atomics in the embedding's backward)
    assert losses[True] == pytest.approx(losses[False], rel=5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_capture_computes_on_aliases_of_the_weights_what_the_layer_computes(dtype):
    """The capture runs the layer's computation on leaves sharing the expert weights' memory (experts.BankOn), so that
    it never touches the parameters' own autograd nodes: the same output and the same gradients (here on the CPU)."""
    from routerlab.moe.experts import BankOn
    from routerlab.moe.layer import local_compute

    torch.manual_seed(0)
    layer = MoELayer(SoftmaxTopK(16, 4, SoftmaxTopKParams(k=2)), ExpertBank(4, 16, 8)).to(dtype)
    x = torch.randn(32, 16, dtype=dtype, requires_grad=True)
    routing = layer.route(x)
    aliases = [p.detach().requires_grad_(True) for p in (layer.experts.w_in, layer.experts.w_out)]
    results = []
    for bank, weights in ((None, [layer.experts.w_in, layer.experts.w_out]), (BankOn(layer.experts, *aliases), aliases)):
        out, kept = local_compute(layer, x, routing.experts, routing.weights, None, bank)
        results.append([out, kept, *torch.autograd.grad(out.float().square().sum(), [x, routing.weights, *weights], retain_graph=True)])
    assert aliases[0].data_ptr() == layer.experts.w_in.data_ptr(), "an alias, not a copy"
    assert_same(results[1], results[0], "on aliases")
