"""Issue 19 target 1: where the eager MoE layer's time goes at issue 19's shapes, on one GPU in one run.

For each shape (`routerlab bench gpu`'s layer: softmax_topk, backend auto, bf16, forward + backward through
autograd.grad, two alternating inputs; as it runs by default, router and core replayed from CUDA graphs, with the
router eager (only the core graphed), and with graph_core off) and for the ideal balanced bmm beside it:
  eager ms    CUDA events around one call, synchronized after each (`routerlab bench gpu`'s timing)
  host ms     the host's time to issue one call (from a synchronized start to the call's return, no sync)
  graph ms    one call captured as a CUDA graph and replayed (the GPU's time, launch gaps inside included)
  kernel ms   the sum of the call's kernel times, its launches and its 8 largest kernels (torch.profiler)
Where host ms exceeds graph ms the eager call is host-bound. --profile adds cProfile's 30 most expensive functions
(own time) over `iters` calls of the layer as it runs by default at each shape.

    python3 benchmarks/eager_layer_host.py [--shapes issue19] [--iters 20] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

from routerlab.bench.core import IdealBmm, fwd_bwd, graph_ms, kernel_ms, make_layer, parse_shapes, time_cuda
from routerlab.checkpoint import atomic_write_text


def host_ms(fn, iters: int) -> float:
    """Median milliseconds the host takes to issue fn() from a synchronized start."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def measure(name: str, fn, iters: int, flops: float) -> dict:
    row = {"eager ms": time_cuda(fn, iters), "host ms": host_ms(fn, iters), "graph ms": graph_ms(fn)}
    row["kernel ms"], row["largest kernels ms"], row["launches"] = kernel_ms(fn, iters)
    row["TFLOP/s eager"] = flops / row["eager ms"] / 1e9
    print(f"| {name} | {row['eager ms']:.3f} | {row['host ms']:.3f} | {row['graph ms']:.3f} | {row['kernel ms']:.3f} | {row['launches']:.0f} |", flush=True)
    print(f"  largest kernels ms: {json.dumps({k: round(v, 3) for k, v in row['largest kernels ms'].items()})}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="issue19")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    report = {}
    print("| shape, what | eager ms | host ms | graph ms | kernel ms | launches |\n|---|--:|--:|--:|--:|--:|")
    for shape in parse_shapes(args.shapes):
        T, d, h, E, k = shape
        flops = 6 * d * h * T * k * 3
        torch.manual_seed(0)
        ideal = IdealBmm(d, h, E).to(device, dtype)
        gx = torch.randn(E, T * k // E, d, device=device, dtype=dtype, requires_grad=True)
        gg = torch.randn_like(gx)
        rows = {"ideal": measure(f"{shape} ideal bmm", lambda: fwd_bwd(ideal, gx, gg), args.iters, flops)}
        del ideal, gx, gg
        layer = make_layer(d, h, E, k, "auto", device, dtype)
        xs = [torch.randn(T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
        grad = torch.randn(T, d, device=device, dtype=dtype)
        state = {"i": 0}

        def step():
            state["i"] += 1
            return fwd_bwd(layer, xs[state["i"] % 2], grad)

        for name in ("layer", "layer, router eager", "layer, graph_core off"):
            if name == "layer, router eager":  # as a router that does not say its forward is pure: only the core graphed
                layer.router.forward_is_pure = lambda: False
            layer.graph_core = name != "layer, graph_core off"
            rows[name] = row = measure(f"{shape} MoELayer{name[5:]}", step, args.iters, flops)
            row["x ideal eager"], row["x ideal graph"] = rows["ideal"]["eager ms"] / row["eager ms"], rows["ideal"]["eager ms"] / row["graph ms"]
            print(f"  x ideal: eager {row['x ideal eager']:.3f}, whole call graphed {row['x ideal graph']:.3f}", flush=True)
        if args.profile:  # the layer as it runs by default
            del layer.router.forward_is_pure
            layer.graph_core = True
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
            rows["profile"] = text.getvalue()
            print(f"cProfile {shape}, {args.iters} calls:\n" + "\n".join(rows["profile"].splitlines()[:60]), flush=True)
        report[str(shape)] = rows
        del layer, xs
        torch.cuda.empty_cache()
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
