"""MoELayer.graph_core (routerlab/moe/core_graph.py): an eager layer's router, dispatch, experts and combine replayed from
CUDA graphs give the eager layer's numbers, never hand a graph's tensor to the caller, and replay a forward again for a
backward whose forward a later forward overwrote. The captures need a GPU (run on the H200: docs/benchmarks.md, issue
19 v11 and v12); on the CPU a stand-in capture, whose replays run the region again, checks everything around the capture
(which tensors go in and out, gradients, the routing rebuilt, second replays), and the trainer's choice of where the
core is graphed."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from routerlab.moe import ExpertBank, MoELayer
from routerlab.moe import core_graph
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200: docs/benchmarks.md, issue 19 v11, v12)")
REGIONS = ["router + core", "core"]


@pytest.fixture(autouse=True)
def tf32_off():
    """torch's default, which the trainer changes (train.tf32) and other tests' trainers leave changed: with TF32 on, the
    captured router takes the gate kernel and agrees with the eager one to rounding only."""
    if not torch.cuda.is_available():
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


def make_layer(d, E, k, h, capacity_factor=None, drop_policy="position", region="router + core", router=None) -> MoELayer:
    torch.manual_seed(0)
    router = router or SoftmaxTopK(d, E, SoftmaxTopKParams(k=k, z_loss=1e-3, balance_batch=1e-2))
    if region == "core":  # a router that does not say its forward is pure decides eagerly
        router.forward_is_pure = lambda: False
    return MoELayer(router, ExpertBank(E, d, h), capacity_factor, drop_policy=drop_policy)


def layers(T=512, d=64, h=96, E=8, k=2, capacity_factor=None, drop_policy="position", dtype=torch.bfloat16, region="router + core"):
    graphed = make_layer(d, E, k, h, capacity_factor, drop_policy, region).to("cuda", dtype)
    eager = copy.deepcopy(graphed)
    eager.graph_core = False
    assert graphed.graph_core and not graphed.core_graphs.captured, "a deep copy starts without graphs"
    return graphed, eager, T, d


def regions(layer) -> list[str]:
    """The region of each signature the layer captured."""
    return [key[0] for key, c in layer.core_graphs.captured.items() if c is not None]


def step(layer, x, g, token_ids=None):
    """One forward + backward into .grad (the trainer's form); the output, the routing the layer records, the aux losses,
    x's and every parameter's gradient."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, token_ids)
    aux = [layer.aux_losses[name].float() for name in sorted(layer.aux_losses)]  # by name
    loss = (out.float() * g).sum() + sum(aux)
    loss.backward()
    experts, weights, logits, kept = (None if t is None else t.clone() for t in layer.recorded()[0])  # the routing the layer records
    return [out.detach().clone(), kept, experts, weights, logits, *(v.detach() for v in aux), x.grad] + [p.grad.clone() for p in layer.parameters()]


def assert_same(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} tensors against {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None and b is None) or torch.equal(a, b), f"{what}: tensor {i} differs (max {(a.float() - b.float()).abs().max():.3g})"


@cuda
@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("capacity_factor, drop_policy", [(None, "position"), (1.0, "position"), (0.75, "probability")])
def test_the_graphed_core_gives_the_eager_numbers(capacity_factor, drop_policy, region):
    """TF32 off (torch's default): the captured router takes the eager router's kernels, so every number is equal."""
    graphed, eager, T, d = layers(capacity_factor=capacity_factor, drop_policy=drop_policy, region=region)
    for i in range(4):  # call 1 eager, call 2 captures and replays, calls 3-4 replay
        x, g = torch.randn(T, d, device="cuda", dtype=torch.bfloat16), torch.randn(T, d, device="cuda")
        for layer in (graphed, eager):
            layer.zero_grad(set_to_none=True)
        assert_same(step(graphed, x, g), step(eager, x, g), f"call {i + 1}")
    assert regions(graphed) == [region], "the signature was captured"


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


def micro_batches(layer, inputs, grads, reverse: bool, token_ids=None) -> list:
    """Two micro-batches forward, then both backward (in reverse: the first one's graphed forward is overwritten by
    then); x's and every parameter's gradient."""
    layer.zero_grad(set_to_none=True)
    xs = [x.clone().requires_grad_(True) for x in inputs]
    outs = [layer(x, token_ids) for x in xs]
    pairs = list(zip(outs, grads))
    for out, g in reversed(pairs) if reverse else pairs:
        (out.float() * g).sum().backward()
    return [x.grad for x in xs] + [p.grad.clone() for p in layer.parameters()]


@cuda
@pytest.mark.parametrize("region", REGIONS)
def test_a_backward_after_a_later_forward_replays_its_forward_again(region):
    graphed, eager, T, d = layers(region=region)
    x0 = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    step(graphed, x0, torch.ones(T, d, device="cuda"))
    step(graphed, x0, torch.ones(T, d, device="cuda"))  # captured now
    inputs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    grads = [torch.randn(T, d, device="cuda") for _ in range(2)]
    got, want = micro_batches(graphed, inputs, grads, reverse=True), micro_batches(eager, inputs, grads, reverse=True)
    captured = next(iter(graphed.core_graphs.captured.values()))
    assert captured is not None and captured.generation == 4, "the capture's call, 2 forwards, 1 again for the first backward"
    assert_same(got, want, "micro-batches backward in reverse")


@cuda
def test_with_tf32_the_captured_router_agrees_with_the_eager_one_to_rounding():
    """TF32 on (the trainer's default): the captured router's gate is routers/triton_gate.py's kernel, the eager one's
    the cast path, so graphed and eager agree to rounding; a graphed layer still agrees with itself bit for bit, a
    backward that replays its forward again included."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        graphed, eager, T, d = layers()
        for i in range(3):
            x, g = torch.randn(T, d, device="cuda", dtype=torch.bfloat16), torch.randn(T, d, device="cuda")
            for layer in (graphed, eager):
                layer.zero_grad(set_to_none=True)
            got, want = step(graphed, x, g), step(eager, x, g)
            assert (got[2] == want[2]).float().mean() > 0.98, f"call {i + 1}: the chosen experts"
            assert torch.allclose(got[0].float(), want[0].float(), atol=0.05, rtol=0.05), f"call {i + 1}: the output"
        assert regions(graphed) == ["router + core"]
        inputs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        grads = [torch.randn(T, d, device="cuda") for _ in range(2)]
        assert_same(micro_batches(graphed, inputs, grads, reverse=True), micro_batches(graphed, inputs, grads, reverse=False),
                    "graphed, backward in reverse against in order")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


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
    """Steps the trainer does not graph whole (a loss term, as FedProx adds; several micro-batches): the same losses with
    each layer's router and core graphed as with every kernel eager, to rounding (the captured router takes its gate
    kernel)."""
    from routerlab.config import load_config
    from routerlab.train import Trainer

    base = ["train.device=cuda", "train.precision=bf16-pure", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.num_experts=8",
            "model.expert_hidden=32", "router.k=2", "task.block_size=32", "train.batch_size=8", "train.steps=6", "train.eval_every=100",
            "run.checkpoint=false", "train.micro_batches=2"]
    losses = {}
    for cuda_graph in (True, False):
        trainer = Trainer(load_config("configs/gpu/stdlib-110m-e64k6.yaml", base + [f"train.cuda_graph={str(cuda_graph).lower()}", f"run.dir={tmp_path / str(cuda_graph)}"]), log=False)
        trainer.add_loss_term("zero", lambda: torch.zeros((), device="cuda"))
        for _ in range(6):
            trainer.train_step()
        losses[cuda_graph] = trainer.losses
        if cuda_graph:
            assert all(regions(layer) == ["router + core"] for layer in trainer.layers)
    assert losses[True] == pytest.approx(losses[False], rel=5e-3)


def stand_in_capture(region, inputs, params):
    """core_graph._capture's contract on the CPU: the same aliases of the parameters and copies of the inputs, and
    "graphs" whose replays run the region again on them, writing into the same output and gradient tensors. The
    forward's replay fills the gradient tensors with NaN first: the real graphs share one memory pool, so the forward's
    temporaries may overwrite them."""
    aliases = [p.detach().requires_grad_(p.requires_grad) for p in params]
    assert all(a.data_ptr() == p.data_ptr() for a, p in zip(aliases, params)), "aliases, not copies"
    statics = tuple(None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
    leaves = (*statics, *aliases)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    live = {}

    def forward():
        with torch.enable_grad():  # a replay runs inside the autograd Function's forward, where grad mode is off
            live["outs"], layout = region(aliases, *statics)
        return layout

    def gradients(grad_outputs):
        outs = [o for o in live["outs"] if o.requires_grad]
        found = iter(torch.autograd.grad(outs, wanted, [g for g in grad_outputs if g is not None], allow_unused=True))
        return [next(found) if t is not None and t.requires_grad else None for t in leaves]

    layout = forward()
    outputs = tuple(o.detach().clone() for o in live["outs"])
    grad_outputs = tuple(torch.ones_like(o) if o.requires_grad else None for o in live["outs"])
    grads = tuple(None if g is None else torch.empty_like(g) for g in gradients(grad_outputs))  # None: unused, as the capture's

    def replay_forward():
        for static in grads:  # a real forward graph may lay its temporaries where the backward puts the gradients
            if static is not None:
                static.fill_(float("nan"))
        forward()
        for static, o in zip(outputs, live["outs"]):
            static.copy_(o.detach())

    def replay_backward():
        for static, g in zip(grads, gradients(grad_outputs)):
            if static is not None:
                static.copy_(g)

    graph = types.SimpleNamespace
    uses = tuple(None if g is None else core_graph._uses(g) for g in grads)
    return core_graph._Captured(graph(replay=replay_forward), graph(replay=replay_backward), statics, outputs, grad_outputs, grads, layout,
                                uses)


@pytest.mark.parametrize("router", ["softmax_topk", "hash"])
@pytest.mark.parametrize("region", REGIONS)
def test_around_the_capture_the_replays_give_the_eager_numbers(monkeypatch, region, router):
    """On the CPU, with a stand-in capture: what goes into the graphs and comes out (outputs, the routing rebuilt, aux
    losses), every gradient, and a backward whose forward was overwritten, equal the eager layer's bit for bit."""
    from routerlab.routers.hash import Hash, HashParams

    monkeypatch.setattr(core_graph, "_capture", stand_in_capture)
    monkeypatch.setattr(core_graph, "applies", lambda layer, x, differentiable: layer.graph_core and torch.is_grad_enabled())
    T, d, E = 64, 16, 4
    make = {"softmax_topk": lambda: None, "hash": lambda: Hash(d, E, HashParams())}[router]
    graphed = make_layer(d, E, 2, 8, 1.0, region=region, router=make())
    eager = copy.deepcopy(graphed)
    eager.graph_core = False
    ids = torch.randint(0, 100, (T,)) if router == "hash" else None
    for i in range(4):  # call 1 eager, call 2 captures and replays, calls 3-4 replay
        x, g = torch.randn(T, d), torch.randn(T, d)
        for layer in (graphed, eager):
            layer.zero_grad(set_to_none=True)
        assert_same(step(graphed, x, g, ids), step(eager, x, g, ids), f"call {i + 1}")
    assert regions(graphed) == [region]
    if router == "softmax_topk":
        assert set(graphed.aux_losses) == {"z_loss", "balance_batch"}, "the aux losses come back under their names"
    inputs, grads = [torch.randn(T, d) for _ in range(2)], [torch.randn(T, d) for _ in range(2)]
    got, want = micro_batches(graphed, inputs, grads, True, ids), micro_batches(eager, inputs, grads, True, ids)
    assert next(iter(graphed.core_graphs.captured.values())).generation == 6, "calls 2-4, 2 forwards, the first again"
    assert_same(got, want, "micro-batches backward in reverse")


def declared_pure() -> list[str]:
    from routerlab.routers.registry import router_entry, router_names

    return sorted(name for name in router_names() if vars(router_entry(name).obj).get("pure_forward", False))


@pytest.mark.parametrize("name", declared_pure())
def test_every_router_declaring_a_pure_forward_replays_to_its_eager_numbers(monkeypatch, name):
    """Each router whose class says `pure_forward`, at its default options in training, through the stand-in capture:
    replays and the second replay of an overwritten forward give its eager numbers, which a router that wrote state or
    drew random numbers in its forward would not."""
    from routerlab.routers.registry import build_router

    monkeypatch.setattr(core_graph, "_capture", stand_in_capture)
    monkeypatch.setattr(core_graph, "applies", lambda layer, x, differentiable: layer.graph_core and torch.is_grad_enabled())
    T, d, E = 64, 16, 4
    torch.manual_seed(0)
    graphed = make_layer(d, E, 2, 8, router=build_router({"name": name}, d, E))
    assert graphed.router.forward_is_pure()
    eager = copy.deepcopy(graphed)
    eager.graph_core = False
    ids = torch.randint(0, 100, (T,))
    for i in range(3):
        x, g = torch.randn(T, d), torch.randn(T, d)
        for layer in (graphed, eager):
            layer.zero_grad(set_to_none=True)
        assert_same(step(graphed, x, g, ids), step(eager, x, g, ids), f"call {i + 1}")
    assert regions(graphed) == ["router + core"]
    inputs, grads = [torch.randn(T, d) for _ in range(2)], [torch.randn(T, d) for _ in range(2)]
    assert_same(micro_batches(graphed, inputs, grads, True, ids), micro_batches(eager, inputs, grads, True, ids), "in reverse")


@cuda
@pytest.mark.parametrize("name", declared_pure())
def test_every_router_declaring_a_pure_forward_is_captured_with_the_core_on_cuda(name):
    """Each declared router at its default options, bf16, TF32 off: its region is captured, and forward and backward,
    a second replay included, agree with the eager layer (exactly where no kernel adds with atomics)."""
    from routerlab.routers.registry import build_router

    T, d, E = 512, 64, 8
    torch.manual_seed(0)
    graphed = make_layer(d, E, 2, 96, router=build_router({"name": name}, d, E)).to("cuda", torch.bfloat16)
    eager = copy.deepcopy(graphed)
    eager.graph_core = False
    ids = torch.randint(0, 1000, (T,), device="cuda")
    for i in range(3):
        x, g = torch.randn(T, d, device="cuda", dtype=torch.bfloat16), torch.randn(T, d, device="cuda")
        for layer in (graphed, eager):
            layer.zero_grad(set_to_none=True)
        for j, (a, b) in enumerate(zip(step(graphed, x, g, ids), step(eager, x, g, ids))):
            assert (a is None and b is None) or torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2), f"call {i + 1}: tensor {j}"
    assert regions(graphed) == ["router + core"]
    inputs, grads = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)], [torch.randn(T, d, device="cuda") for _ in range(2)]
    for j, (a, b) in enumerate(zip(micro_batches(graphed, inputs, grads, True, ids), micro_batches(eager, inputs, grads, True, ids))):
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2), f"in reverse: tensor {j}"


def test_a_router_forward_is_pure_only_where_its_class_and_options_say_so():
    from routerlab.routers.noisy_topk import NoisyTopK, NoisyTopKParams

    router = SoftmaxTopK(8, 4, SoftmaxTopKParams())
    assert router.forward_is_pure(), "softmax_topk declares it, and its own weight-finishing hook is part of it"
    assert not NoisyTopK(8, 4, NoisyTopKParams()).forward_is_pure(), "noise: a second replay would draw other numbers"
    jitter = SoftmaxTopK(8, 4, SoftmaxTopKParams(jitter=0.1))
    assert not jitter.forward_is_pure() and jitter.eval().forward_is_pure(), "jitter draws in training only"
    assert not SoftmaxTopK(8, 4, SoftmaxTopKParams(balance_batch=0.01, balance_layers="pool")).forward_is_pure(), "writes balance_part"
    assert not type("Sub", (SoftmaxTopK,), {})(8, 4, SoftmaxTopKParams()).forward_is_pure(), "a subclass may add state"
    router.register_forward_hook(lambda *args: None)
    assert not router.forward_is_pure(), "a hook would run on the eager calls only"


DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def hand_over_layers(monkeypatch, device):
    """A graphed layer and its eager copy, and a maker of inputs: on the CPU through the stand-in capture (float32), on
    CUDA through real graphs (bf16, TF32 off)."""
    if device == "cpu":
        monkeypatch.setattr(core_graph, "_capture", stand_in_capture)
        monkeypatch.setattr(core_graph, "applies", lambda layer, x, differentiable: layer.graph_core and torch.is_grad_enabled())
        graphed, T, d, dtype = make_layer(16, 4, 2, 8), 64, 16, torch.float32
    else:
        graphed, T, d, dtype = make_layer(64, 8, 2, 96).to("cuda", torch.bfloat16), 512, 64, torch.bfloat16
    eager = copy.deepcopy(graphed)
    eager.graph_core = False
    return graphed, eager, lambda **kw: torch.randn(T, d, device=device, dtype=dtype, **kw), lambda: torch.randn(T, d, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_the_parameters_gradients_are_handed_over_and_never_overwritten_while_held(monkeypatch, device):
    """The graphs' gradient tensors become p.grad without a copy; a p.grad kept across backwards
    (zero_grad(set_to_none=False)) or a gradient held elsewhere is not overwritten by the next replay, and the numbers
    stay the eager layer's."""
    graphed, eager, new_x, new_g = hand_over_layers(monkeypatch, device)
    x, g = new_x(), new_g()
    for layer in (graphed, eager):
        step(layer, x, g)  # call 1 eager
        layer.zero_grad(set_to_none=True)
    assert_same(step(graphed, x, g), step(eager, x, g), "call 2: captured and replayed")
    captured = next(iter(graphed.core_graphs.captured.values()))
    handed = {p.grad.data_ptr() for p in graphed.parameters()}
    assert {t.data_ptr() for t in captured.grads if t is not None} >= handed, "every parameter's gradient is the graph's own"
    for i in range(2):  # zero_grad keeps the tensors: each backward adds into a copy of the zeroed p.grad
        for layer in (graphed, eager):
            layer.zero_grad(set_to_none=False)
        assert_same(step(graphed, x, g), step(eager, x, g), f"kept p.grad, call {i + 3}")
    assert captured.hands_over, "a p.grad the last backward handed over is copied, not computed again"
    for layer in (graphed, eager):
        layer.zero_grad(set_to_none=True)
    step(graphed, x, g), step(eager, x, g)
    held = [p.grad for p in graphed.parameters()]  # the graph's tensors, kept by someone while p.grad is set to None
    assert {h.data_ptr() for h in held} == handed
    want = [h.clone() for h in held]
    for layer in (graphed, eager):
        layer.zero_grad(set_to_none=True)
    x2 = new_x()
    assert_same(step(graphed, x2, g), step(eager, x2, g), "with the gradients held")
    assert_same(held, want, "the held gradients")
    assert not captured.hands_over, "computed eagerly once, copies from then on"
    assert_same(step(graphed, x, g), step(eager, x, g), "copies")


@pytest.mark.parametrize("device", DEVICES)
def test_a_gradient_held_elsewhere_turns_the_hand_over_off_and_the_backward_eager(monkeypatch, device):
    """The same layer twice in one graph: the second backward finds the first one's gradient still waiting to be summed,
    computes its own eagerly and the signature hands over copies from then on; the numbers are the eager layer's."""
    graphed, eager, new_x, _ = hand_over_layers(monkeypatch, device)
    x = new_x(requires_grad=True)  # both calls one signature: one graph, one set of gradient tensors
    for layer in (graphed, eager):
        layer(layer(x)).float().sum().backward()  # call 1 eager, call 2 captures
        layer.zero_grad(set_to_none=True)
    for i in range(2):
        got, want = (layer(layer(x)).float().sum() for layer in (graphed, eager))
        got.backward(), want.backward()
        assert_same([p.grad for p in graphed.parameters()], [p.grad for p in eager.parameters()], f"twice in one graph, call {i + 1}")
        for layer in (graphed, eager):
            layer.zero_grad(set_to_none=True)
    assert regions(graphed) == ["router + core"]
    assert next(iter(graphed.core_graphs.captured.values())).hands_over is False
