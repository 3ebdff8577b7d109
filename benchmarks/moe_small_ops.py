"""Issue 19 v10: the MoE layer's small work at the E=64, k=6 preset's layer (T=16384, d=1024, E=64, k=6) on one GPU in
one run, each form timed as a CUDA graph's replay (the launch gaps inside a graph included: what the trainer's graphed
step sees) and by its GPU kernel time and launches (torch.profiler):
- the dropless dispatch plan: PyTorch's stable-sort path against routerlab/moe/triton_plan.py's counting sort (checked
  equal first);
- the preset router forward + backward (bf16 x, float32 gate, softmax top-6, importance balance at power 0, z-loss):
  its aux losses as PyTorch ops on the fused top-k's outputs against the top-k kernels computing them
  (routerlab/routers/triton_topk.py);
- a layer's routing statistics (what a logged step reads): stats.compute_stats' PyTorch ops against
  routerlab/moe/triton_stats.py's two kernels;
- the permute's gather (routerlab/moe/triton_combine.py: gather_rows) against a copy of the bytes it writes (v10's
  call 1 also ran it at 2, 4 and 8 rows a program round: within 1.5% of one row, so not kept);
- the grouped SwiGLU experts forward + backward (h=512) as the layer computes them, the activation recomputed in the
  backward (v10's call 2 also ran it kept from the forward, through a flag since removed: 2.0235 against 2.0256 ms
  graphed, no gain).

    python3 benchmarks/moe_small_ops.py [--iters 20]
"""
from __future__ import annotations

import argparse
import json

import torch

from routerlab.bench.core import graph_ms, kernel_ms
from routerlab.moe import layer, triton_combine
from routerlab.moe.kernels import GroupedSwiGLUFFN
from routerlab.routers.gated import GatedRouter
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams


def patched(obj, name: str, value):
    """fn -> fn run with obj.name set to value (restored after each call)."""
    def wrap(fn):
        def run():
            saved = getattr(obj, name)
            setattr(obj, name, value)
            try:
                return fn()
            finally:
                setattr(obj, name, saved)
        return run
    return wrap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's default (train.tf32)
    T, d, E, k = 16384, 1024, 64, 6
    torch.manual_seed(0)
    experts = torch.randn(T, E, device="cuda").topk(k, dim=-1).indices
    rows = {}

    def measure(name: str, fn) -> None:
        ms, top, launches = kernel_ms(fn, args.iters)
        rows[name] = {"graphed ms": graph_ms(fn), "kernel ms": ms, "launches": launches, "top kernels": top}
        print(f"| {name} | {rows[name]['graphed ms']:.4f} | {ms:.4f} | {launches:.0f} |", flush=True)

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: T={T}, d={d}, E={E}, k={k}")
    print("| what | graphed ms | kernel ms | launches |\n|---|--:|--:|--:|")
    torch_plan = patched(layer, "triton_device", lambda t: False)
    got, want = layer.plan_dispatch(experts, E, None), torch_plan(lambda: layer.plan_dispatch(experts, E, None))()
    assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in ("order", "inv", "kept", "counts", "n_kept")), "plans differ"
    measure("plan, PyTorch (stable sort)", torch_plan(lambda: layer.plan_dispatch(experts, E, None)))
    measure("plan, counting-sort kernels", lambda: layer.plan_dispatch(experts, E, None))

    params = SoftmaxTopKParams(k=k, importance_balance=0.01, importance_power=0.0, z_loss=1e-3)
    router = SoftmaxTopK(d, E, params).cuda().bfloat16()
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, k, device="cuda", dtype=torch.bfloat16)

    def router_step():
        out = router(x)
        return torch.autograd.grad((out.weights * g).sum() + sum(out.aux.values()), [x, router.gate.weight])

    unfused = patched(GatedRouter, "fused_losses", lambda self, n: None)
    a, b = router_step(), unfused(router_step)()
    print("# router gradients, fused losses against PyTorch's: relative differences "
          + ", ".join(f"{float((p.double() - q.double()).norm() / q.double().norm()):.1e}" for p, q in zip(a, b)))
    measure("router fwd+bwd, losses as PyTorch ops", unfused(router_step))
    measure("router fwd+bwd, losses in the top-k kernels", router_step)

    from routerlab.moe import stats

    logits = torch.randn(T, E, device="cuda")
    kept = torch.ones(T, k, device="cuda", dtype=torch.bool)
    measure("routing statistics, PyTorch", patched(stats, "triton_device", lambda t: False)(
        lambda: stats.stats_from_routing(experts, logits, kept, E, 512)))
    measure("routing statistics, kernels", lambda: stats.stats_from_routing(experts, logits, kept, E, 512))

    plan = layer.plan_dispatch(experts, E, None)
    token_of_row = plan.token_of_row
    h = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(T * k * d, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    measure("ideal: copy of the gather's rows", lambda: dst.copy_(src))
    measure("gather_rows", lambda: triton_combine.gather_rows(h, token_of_row, plan.n_kept))
    w_in = (torch.randn(E, d, 2 * 512, device="cuda") * d ** -0.5).bfloat16().requires_grad_(True)
    w_out = (torch.randn(E, 512, d, device="cuda") * 512 ** -0.5).bfloat16().requires_grad_(True)
    xs = torch.randn(T * k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(T * k, d, device="cuda", dtype=torch.bfloat16)
    offs = plan.counts.cumsum(0).to(torch.int32)
    measure("experts fwd+bwd, activation recomputed", lambda: torch.autograd.grad(GroupedSwiGLUFFN.apply(xs, w_in, w_out, offs), [xs, w_in, w_out], grad_y))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
