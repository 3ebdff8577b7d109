"""`routerlab bench`: speed of the MoE core, forward + backward, against fixed baselines.

  cpu  (default)  fp32, d=256 h=1024 E=8 k=2 T=4096: every backend's tokens/s against a dense SwiGLU FFN
                  with the same active FLOPs (hidden k*h), ratio = layer time / dense time
  gpu             bf16 on CUDA, the three shapes of issue 10: our MoELayer (softmax_topk routing,
                  permutation and combine included; as it runs by default, router and core replayed from CUDA
                  graphs, with the router eager, and with graph_core off), the ideal balanced bmm, the per-expert loop and the
                  transformers MoE block (when importable), TFLOP/s on active expert FLOPs
                  (6*d*h per token-slot, x3 for fwd+bwd), activation memory, per-stage breakdown,
                  and a correctness check of the fast path against `loop` on fresh random inputs

Imports only torch (and routerlab.moe / routerlab.routers, which import only torch), so
`python3 -m routerlab.bench gpu` runs on a bare GPU machine. Typer is imported only by `register`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from routerlab.moe import ExpertBank, MoELayer, combine, permute, plan_dispatch
from routerlab.moe.core_graph import CoreGraphs
from routerlab.moe.stats import compute_stats
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

GPU_SHAPES = [(16384, 4096, 14336, 8, 2), (16384, 2048, 1408, 64, 6), (8192, 1024, 2816, 16, 2)]
# issue 19: the shapes of a ~110M-active language model (small and fine-grained experts)
SMALL_SHAPES = [(16384, 1024, 512, 64, 6), (16384, 1024, 512, 8, 1), (8192, 1024, 2816, 16, 2), (16384, 2048, 1408, 64, 6)]
SHAPE_SETS = {"issue10": GPU_SHAPES, "issue19": SMALL_SHAPES}


def parse_shapes(text: str) -> list[tuple[int, int, int, int, int]]:
    """'all' / 'issue10' / 'issue19', indices into the issue-10 shapes ('1,2'), or shapes 'TxDxHxExK' separated
    by commas ('16384x1024x512x64x6,8192x1024x2816x16x2'). ValueError with what is valid otherwise."""
    text = text.strip()
    if text in ("all", "issue10"):
        return list(GPU_SHAPES)
    if text in SHAPE_SETS:
        return list(SHAPE_SETS[text])
    shapes = []
    for part in text.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < len(GPU_SHAPES):
            shapes.append(GPU_SHAPES[int(part)])
            continue
        dims = part.lower().split("x")
        if len(dims) != 5 or not all(v.isdigit() and int(v) > 0 for v in dims):
            raise ValueError(f"bad shape {part!r}: give 'all', 'issue10', 'issue19', indices 0-{len(GPU_SHAPES) - 1}, or T x d x h x E x k as positive integers, e.g. 16384x1024x512x64x6")
        T, d, h, E, k = map(int, dims)
        if k > E:
            raise ValueError(f"bad shape {part!r}: k={k} must be <= E={E}")
        shapes.append((T, d, h, E, k))
    return shapes
# issue 10's reference points, TFLOP/s: ideal balanced bmm, transformers 5.17 best, per-expert loop
ISSUE10 = {GPU_SHAPES[0]: (624, 593, 446), GPU_SHAPES[1]: (467, 239, 50), GPU_SHAPES[2]: (408, 189, 61)}


def make_layer(d: int, h: int, E: int, k: int, backend: str, device, dtype, capacity_factor: float | None = None) -> MoELayer:
    router = SoftmaxTopK(d, E, SoftmaxTopKParams(k=k))
    return MoELayer(router, ExpertBank(E, d, h), capacity_factor, backend).to(device=device, dtype=dtype)


class DenseFFN(torch.nn.Module):
    """SwiGLU d -> hidden -> d: the dense layer with the MoE layer's active FLOPs when hidden = k*h."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w13 = torch.nn.Linear(d, 2 * hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, -1)
        return self.w2(F.silu(a) * b)


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One forward + backward; grads returned fresh (autograd.grad) so nothing accumulates."""
    params = [p for p in module.parameters() if p.requires_grad]
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    return torch.autograd.grad(out, [x, *params], grad, allow_unused=True)


# -- CPU ------------------------------------------------------------------------------------------------

def time_cpu(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_cpu(d=256, h=1024, E=8, k=2, T=4096, repeats=7, backends=("loop", "padded")) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(T, d, requires_grad=True)
    grad = torch.randn(T, d)
    rows = []
    dense = DenseFFN(d, k * h)
    t_dense = time_cpu(lambda: fwd_bwd(dense, x, grad), repeats)
    rows.append(dict(name=f"dense SwiGLU (hidden {k * h})", seconds=t_dense, tokens_per_s=T / t_dense, ratio=1.0))
    for backend in backends:
        layer = make_layer(d, h, E, k, backend, "cpu", torch.float32)
        t = time_cpu(lambda: fwd_bwd(layer, x, grad), repeats)
        rows.append(dict(name=f"MoELayer backend={backend}", seconds=t, tokens_per_s=T / t, ratio=t / t_dense))
    return rows


# -- GPU ------------------------------------------------------------------------------------------------

def time_cuda(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() between CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_ms(fn, iters: int) -> tuple[float, dict[str, float], float]:
    """GPU kernel milliseconds of one fn() (torch.profiler, the sum over its kernels, mean of iters calls: the
    kernels' time as a replayed CUDA graph runs them, without the host's launches), the 8 largest by kernel name, and
    the kernels one fn() launches."""
    from collections import Counter

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    by_name, launches = Counter(), 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and "#" not in e.name:
            by_name[e.name[:60]] += (e.time_range.end - e.time_range.start) / 1e3 / iters
            launches += 1
    return sum(by_name.values()), dict(by_name.most_common(8)), launches / iters


def graph_ms(fn, iters: int = 20, replays: int = 10) -> float:
    """Median milliseconds of one fn() captured in a CUDA graph, `replays` replays between two events: the GPU's time
    with the launch gaps inside a graph, as the trainer's graphed step sees them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(lambda: [graph.replay() for _ in range(replays)], iters) / replays


def activation_bytes(forward) -> int:
    """Bytes the forward leaves allocated (saved activations and the output)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before
    del out
    return used


class IdealBmm(torch.nn.Module):
    """Perfectly balanced tokens already grouped [E, T*k/E, d]: three bmm and eager SwiGLU, nothing else."""

    def __init__(self, d: int, h: int, E: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(E, d, h) / math.sqrt(d))
        self.w3 = torch.nn.Parameter(torch.randn(E, d, h) / math.sqrt(d))
        self.w2 = torch.nn.Parameter(torch.randn(E, h, d) / math.sqrt(h))

    def forward(self, x):
        return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2)


def transformers_block(d: int, h: int, E: int, k: int):
    """transformers' Mixtral MoE block for each experts implementation that fits; None when not importable."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception:  # noqa: BLE001 - optional baseline
        return None
    blocks = {}
    for impl in ("grouped_mm", "eager"):
        config = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=k)
        config._experts_implementation = impl
        blocks[impl] = lambda config=config: MixtralSparseMoeBlock(config)
    return blocks


@dataclass
class GpuRow:
    shape: tuple
    name: str
    ms: float
    tflops: float
    act_gib: float | None = None


@contextmanager
def pure_torch():
    """Switch the Triton kernels off: the pure-PyTorch reference path."""
    from routerlab import kernel_choice

    kernel_choice.triton_available()  # read before the switch, so that it is restored as found
    saved, kernel_choice._TRITON = kernel_choice._TRITON, False
    try:
        yield
    finally:
        kernel_choice._TRITON = saved


def check_correctness(device, dtype=torch.bfloat16, seed=None, capacity_factor: float | None = None) -> dict:
    """Fast path (auto, Triton) against `loop` on the pure-PyTorch path, fresh random inputs:
    relative errors of output and gradients. With a capacity factor < 1 many slots are dropped, so the
    fast path's buffers hold many padding rows; freed memory is filled with NaN first, so a kernel that
    reads a padding row it leaves unset shows up as a NaN error."""
    torch.manual_seed(seed if seed is not None else int(time.time()))
    T, d, h, E, k = 4096, 1024, 1408, 16, 4
    fast = make_layer(d, h, E, k, "auto", device, dtype, capacity_factor)
    ref = make_layer(d, h, E, k, "loop", device, dtype, capacity_factor)
    if device.type == "cuda":
        torch.full((2**29,), float("nan"), device=device, dtype=dtype)  # 1 GiB of NaN, freed into the cache
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, d, device=device, dtype=dtype)
    out = {}
    got = [fast(x)] + list(fwd_bwd(fast, x, grad))
    with pure_torch():
        want = [ref(x)] + list(fwd_bwd(ref, x, grad))
    names = ["out", "grad_x"] + [n for n, p in fast.named_parameters()]
    for n, a, b in zip(names, got, want):
        out[n] = float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())
    return out


def check_backends_and_dtypes(device) -> dict[str, float]:
    """Every backend in every dtype it accepts on the CPU, on `device`, against the `loop` backend in float64 on
    the CPU (relative L2 error of output, input grad and expert grads; max over them). Issue 19: `padded` raised
    in the SwiGLU kernel on CUDA, and float64 was computed in float32 by the SwiGLU and combine kernels."""
    from routerlab.moe.kernels import grouped_mm_supported

    T, d, h, E, k = 512, 64, 96, 8, 2
    torch.manual_seed(0)
    base = make_layer(d, h, E, k, "loop", "cpu", torch.float64)
    x64 = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    g64 = torch.randn(T, d, dtype=torch.float64)
    want = [base(x64)] + list(fwd_bwd(base, x64, g64))
    out = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for backend in ("loop", "padded", "grouped", "auto"):
            name = f"{backend} {str(dtype).removeprefix('torch.')}"
            layer = copy.deepcopy(base).to(device, dtype)
            layer.backend = backend
            x = x64.detach().to(device, dtype).requires_grad_(True)
            if backend == "grouped" and not grouped_mm_supported(x):
                continue
            try:
                got = [layer(x)] + list(fwd_bwd(layer, x, g64.to(device, dtype)))
                errs = [float((a.detach().double().cpu() - b.detach()).norm() / b.detach().norm()) for a, b in zip(got, want)]
                assert all(a.dtype == dtype for a in got), f"computed in {[a.dtype for a in got]}"
                out[name] = max(errs)
            except Exception as err:  # noqa: BLE001 - report it as a failure
                out[name] = float("nan")
                print(f"{name}: {type(err).__name__}: {err}"[:300])
    return out


def stage_breakdown(layer: MoELayer, x, grad, iters: int) -> dict[str, float]:
    """Milliseconds of each stage alone, forward and backward (CUDA events)."""
    router, bank = layer.router, layer.experts
    E = bank.num_experts
    res = {}
    routing = router(x)
    r_params = [p for p in router.parameters()]
    gw = torch.randn_like(routing.weights)
    res["router fwd"] = time_cuda(lambda: router(x), iters)
    res["router fwd+bwd"] = time_cuda(lambda: torch.autograd.grad(router(x).weights, [x, *r_params], gw), iters)
    res["plan (sort) fwd"] = time_cuda(lambda: plan_dispatch(routing.experts, E, None), iters)
    plan = plan_dispatch(routing.experts, E, None)
    xs = permute(x, plan)
    gxs = torch.randn_like(xs)
    res["permute fwd"] = time_cuda(lambda: permute(x, plan), iters)
    res["permute fwd+bwd"] = time_cuda(lambda: torch.autograd.grad(permute(x, plan), [x], gxs), iters)
    xs_leaf = xs.detach().requires_grad_(True)
    res["experts fwd"] = time_cuda(lambda: bank(xs_leaf, plan.counts, layer.backend), iters)
    res["experts fwd+bwd"] = time_cuda(lambda: torch.autograd.grad(bank(xs_leaf, plan.counts, layer.backend), [xs_leaf, *bank.parameters()], gxs), iters)
    y = bank(xs_leaf, plan.counts, layer.backend).detach().requires_grad_(True)
    w = routing.weights.detach().requires_grad_(True)
    res["combine fwd"] = time_cuda(lambda: combine(y, w, plan), iters)
    res["combine fwd+bwd"] = time_cuda(lambda: torch.autograd.grad(combine(y, w, plan), [y, w], grad), iters)
    res["stats fwd"] = time_cuda(lambda: compute_stats(routing.experts, routing.logits, plan.counts, plan.kept_per_token()), iters)
    return res


def layout_probe(T, d, h, E, k, device, dtype, iters) -> dict[str, float]:
    """grouped_mm fwd+bwd ms, weights stored [E, K, N] vs [E, N, K] (used transposed), balanced groups."""
    from routerlab.moe.kernels import grouped_mm as _grouped_mm

    N = T * k
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * (N // E)
    res = {}
    for name, K, Ncols in (("in", d, 2 * h), ("out", h, d)):
        a = torch.randn(N, K, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(N, Ncols, device=device, dtype=dtype)
        w_kn = torch.randn(E, K, Ncols, device=device, dtype=dtype, requires_grad=True)
        w_nk = torch.randn(E, Ncols, K, device=device, dtype=dtype, requires_grad=True)
        res[f"{name} [E,K,N]"] = time_cuda(lambda: torch.autograd.grad(_grouped_mm(a, w_kn, offs=offs), [a, w_kn], g), iters)
        res[f"{name} [E,N,K].mT"] = time_cuda(lambda: torch.autograd.grad(_grouped_mm(a, w_nk.mT, offs=offs), [a, w_nk], g), iters)
    return res


def run_gpu(shapes=GPU_SHAPES, iters=10, with_transformers=True, with_loop=True, stages=True, probe=True, log=print,
            compiled=False, graph=True) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "stages": {}, "probe": {}}
    report["check"] = check_correctness(device)
    log(f"correctness vs loop (rel. error): {json.dumps({k: round(v, 5) for k, v in report['check'].items()})}")
    report["check_dtypes"] = check_backends_and_dtypes(device)
    log(f"backends x dtypes vs loop float64 on CPU (max rel. error of out and grads): {json.dumps({k: float(f'{v:.2e}') for k, v in report['check_dtypes'].items()})}")
    report["check_padding"] = check_correctness(device, capacity_factor=0.5)
    log(f"correctness vs loop, capacity factor 0.5 (half the slots are padding rows), rel. error: {json.dumps({k: round(v, 5) for k, v in report['check_padding'].items()})}")
    for shape in shapes:
        T, d, h, E, k = shape
        flops = 6 * d * h * T * k * 3
        torch.manual_seed(0)
        xs = [torch.randn(T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
        grad = torch.randn(T, d, device=device, dtype=dtype)
        rows = []

        def record(name, module, inputs, g, graphed=False):
            """graphed: the module replays CUDA graphs whose memory pool holds the activations from the capture on, so a
            forward's allocations do not show them: no activation figure."""
            state = {"i": 0}

            def step():
                state["i"] += 1
                return fwd_bwd(module, inputs[state["i"] % len(inputs)], g)

            ms = time_cuda(step, iters)
            act = None if graphed else activation_bytes(lambda: module(inputs[0])) / 2**30
            row = GpuRow(shape, name, ms, flops / ms / 1e9, act)
            rows.append(row)
            log(f"{shape} {name:28s} {ms:9.3f} ms {row.tflops:7.1f} TFLOP/s  act {'-' if act is None else f'{act:6.2f}'} GiB")

        ideal = IdealBmm(d, h, E).to(device, dtype)
        gx = [torch.randn(E, T * k // E, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
        record("ideal balanced bmm", ideal, gx, torch.randn(E, T * k // E, d, device=device, dtype=dtype))
        del ideal, gx
        layer = make_layer(d, h, E, k, "auto", device, dtype)
        record("routerlab MoELayer (auto)", layer, xs, grad, graphed=True)  # router and core replayed from CUDA graphs (moe/core_graph.py)
        layer.router.forward_is_pure = lambda: False  # as a router that does not say its forward is pure: decided eagerly
        record("routerlab MoELayer (auto, router eager)", layer, xs, grad, graphed=True)
        del layer.router.forward_is_pure
        layer.core_graphs = CoreGraphs()  # the graphs' memory back
        layer.graph_core = False
        record("routerlab MoELayer (auto, graph_core off)", layer, xs, grad)
        if stages:
            report["stages"][str(shape)] = stage_breakdown(layer, xs[0], grad, iters)
            log(f"{shape} stages ms: {json.dumps({n: round(v, 3) for n, v in report['stages'][str(shape)].items()})}")
        if probe:
            report["probe"][str(shape)] = layout_probe(T, d, h, E, k, device, dtype, iters)
            log(f"{shape} grouped_mm layout ms: {json.dumps({n: round(v, 3) for n, v in report['probe'][str(shape)].items()})}")
        if compiled:  # what train.compile=moe does to each MoE layer (routerlab/compile.py)
            try:
                from routerlab.compile import compile_model

                wrapper = torch.nn.Sequential(copy.deepcopy(layer))
                compile_model(wrapper, "moe")
                t0 = time.perf_counter()
                fwd_bwd(wrapper, xs[0], grad)
                torch.cuda.synchronize()
                log(f"{shape} torch.compile: first call {time.perf_counter() - t0:.1f} s")
                record("routerlab MoELayer (torch.compile)", wrapper, xs, grad)
                del wrapper
            except Exception as err:  # noqa: BLE001 - report and go on
                log(f"{shape} torch.compile: {type(err).__name__}: {err}"[:300])
        if graph:
            try:  # launch gaps: the same layer, forward and backward each replayed as one CUDA graph
                graphed = copy.deepcopy(layer)  # graph_core off: the whole layer is captured
                graphed = torch.cuda.make_graphed_callables(graphed, (xs[0],))
                record("routerlab MoELayer (CUDA graph)", graphed, xs, grad, graphed=True)
                del graphed
            except Exception as err:  # noqa: BLE001 - report and go on
                log(f"{shape} CUDA graph: {type(err).__name__}: {err}"[:300])
        if with_loop:
            layer.backend = "loop"
            record("per-expert loop", layer, xs, grad)
        del layer
        blocks = transformers_block(d, h, E, k) if with_transformers else None
        for impl, build in (blocks or {}).items():
            try:
                with torch.device(device):
                    block = build().to(dtype)
                    for p in block.parameters():  # v5 may leave weights to the model's init: draw them
                        torch.nn.init.normal_(p, std=0.02)
                x3 = [x.view(1, T, d) for x in xs]
                record(f"transformers Mixtral {impl}", block, x3, grad.view(1, T, d))
                del block
            except Exception as err:  # noqa: BLE001 - optional baseline; say why it is missing
                log(f"{shape} transformers {impl}: {type(err).__name__}: {err}"[:300])
        torch.cuda.empty_cache()
        report["rows"] += [row.__dict__ | {"shape": list(shape)} for row in rows]
    return report


def act_cells(act: float | None, ideal: float | None) -> str:
    return "- | -" if act is None or ideal is None else f"{act:.2f} | {act / ideal:.2f}"


def gpu_table(report: dict) -> str:
    lines = ["| shape (T, d, h, E, k) | implementation | ms fwd+bwd | TFLOP/s | x ideal | act GiB | act x ideal | issue 10 ideal / HF / loop |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    by_shape: dict[tuple, list[dict]] = {}
    for row in report["rows"]:
        by_shape.setdefault(tuple(row["shape"]), []).append(row)
    for shape, rows in by_shape.items():
        ideal = next(r for r in rows if r["name"].startswith("ideal"))
        for r in rows:
            ref = "/".join(str(v) for v in ISSUE10.get(shape, ()))
            lines.append(f"| {', '.join(map(str, shape))} | {r['name']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['tflops'] / ideal['tflops']:.2f} | "
                         f"{act_cells(r['act_gib'], ideal['act_gib'])} | {ref} |")
    return "\n".join(lines)


def cpu_table(rows: list[dict]) -> str:
    lines = ["| implementation | ms fwd+bwd | tokens/s | x dense time |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['seconds'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m routerlab.bench", description=__doc__.splitlines()[0])
    ap.add_argument("target", nargs="?", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--shapes", default="all", help="'all'/'issue10', 'issue19', indices into the issue-10 shapes ('1,2'), or TxDxHxExK shapes, comma-separated")
    ap.add_argument("--compile", action="store_true", help="also time the layer under train.compile=moe (torch.compile)")
    ap.add_argument("--no-loop", action="store_true", help="skip the per-expert loop baseline")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown and the layout probe")
    ap.add_argument("--tf32", action="store_true", help="gpu: float32 matmuls in TF32, as the trainer runs them (train.tf32): the router's fp32 gate")
    ap.add_argument("--json", default=None, help="also write the full report here")
    args = ap.parse_args(argv)
    if args.target == "cpu":
        rows = run_cpu(repeats=args.iters)
        print(f"CPU fp32, d=256 h=1024 E=8 k=2 T=4096, fwd+bwd; {machine()}")
        print(cpu_table(rows))
        report = {"cpu": rows, "machine": machine()}
    else:
        try:
            shapes = parse_shapes(args.shapes)
        except ValueError as err:
            ap.error(str(err))  # one line, exit code 2
        torch.backends.cuda.matmul.allow_tf32 = args.tf32  # torch's default is off; the trainer's (train.tf32) on
        report = run_gpu(shapes, args.iters, not args.no_transformers, with_loop=not args.no_loop, stages=not args.no_stages,
                         probe=not args.no_stages, compiled=args.compile)
        report["tf32"] = args.tf32
        print(f"\n{report['device']}, torch {report['torch']}, bf16, fwd+bwd, TF32 {'on' if args.tf32 else 'off'}")
        print(gpu_table(report))
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            json.dump(report, fh, indent=1)
        import os

        os.replace(args.json + ".tmp", args.json)


def register(app) -> None:
    """`routerlab bench [cpu|gpu]` on the typer app."""
    import typer

    from routerlab.errors import ConfigError

    @app.command()
    def bench(
        target: str = typer.Argument("cpu", help="cpu (fp32 foundation benchmark) or gpu (issue 10 table, CUDA bf16)"),
        iters: int = typer.Option(7, help="timed repetitions (median reported)"),
        no_transformers: bool = typer.Option(False, "--no-transformers", help="skip the transformers baseline"),
        shapes: str = typer.Option("all", help="gpu: 'all'/'issue10', 'issue19', or TxDxHxExK shapes, comma-separated (e.g. 16384x1024x512x64x6)"),
        compile: bool = typer.Option(False, "--compile", help="gpu: also time the layer under torch.compile (train.compile=moe)"),
    ) -> None:
        """Speed of the MoE layer (forward + backward) against dense / ideal baselines."""
        from routerlab.cli import fail

        if target not in ("cpu", "gpu"):
            fail(f"target must be 'cpu' or 'gpu', got {target!r}")
        try:
            parse_shapes(shapes)
        except ValueError as err:
            fail(str(err))
        if target == "gpu" and not torch.cuda.is_available():
            fail("bench gpu needs a CUDA GPU; none is visible (use 'routerlab bench cpu')")
        try:
            main([target, "--iters", str(iters), "--shapes", shapes] + (["--no-transformers"] if no_transformers else []) + (["--compile"] if compile else []))
        except ConfigError as err:
            fail(str(err))


if __name__ == "__main__":
    main()
