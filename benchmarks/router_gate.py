"""Issue 19 v9: the float32 router gate of a bf16 model at the E=64, k=6 preset's layer (T=16384, d=1024, E=64), the
cast path (`F.linear(x.float(), W.float())`, TF32) against routerlab/routers/triton_gate.py's kernels, forward and
forward + backward, on one GPU in one run; the ideal is a copy moving the bytes the kernels must move (forward: read
x; backward: read x, write grad_x). Agreement first: logits and both gradients against the cast path. Times are the
sums of GPU kernel times (torch.profiler: as the trainer's graphed step runs them, without the host's launches), two
eager wall times (launches included), then the weight gradient's tile width and grid beside the default.

    python3 benchmarks/router_gate.py [--iters 50]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from routerlab.bench.core import kernel_ms, time_cuda
from routerlab.routers import triton_gate
from routerlab.routers.triton_gate import Fp32Gate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's default (train.tf32)
    T, d, E = args.tokens, args.d_model, args.experts
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(E, d, device="cuda") * d ** -0.5).bfloat16().requires_grad_(True)
    g = torch.randn(T, E, device="cuda")

    def cast(x, w):
        return F.linear(x.float(), w.float())

    def fwd_bwd(gate):
        return lambda: torch.autograd.grad(gate(x, w), [x, w], g)

    outs = {name: (gate(x, w), *torch.autograd.grad(gate(x, w), [x, w], g)) for name, gate in (("cast", cast), ("kernel", Fp32Gate.apply))}
    for what, a, b in zip(("logits", "grad x", "grad w"), outs["cast"], outs["kernel"]):
        rel = float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())
        print(f"# agreement, {what}: relative difference {rel:.2e}, bitwise equal share {float((a == b).float().mean()):.4f}")
    try:  # cuBLAS's bf16 GEMM with a float32 output: an alternative to the Triton kernels, where torch offers it
        torch.mm(x[:64].detach(), w.detach().t(), out_dtype=torch.float32)
        print("# torch.mm(bf16, bf16, out_dtype=torch.float32) runs on this torch")
    except (TypeError, RuntimeError) as e:
        print(f"# torch.mm(..., out_dtype=torch.float32): {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    nbytes = x.numel() * x.element_size()
    src = torch.empty(nbytes * 3 // 2, dtype=torch.uint8, device="cuda")  # a copy of 1.5 x's bytes moves 3 x's
    dst = torch.empty_like(src)
    rows, kernels = {}, {}
    for name, fn in [("ideal fwd+bwd: copy of 3 x's bytes", lambda: dst.copy_(src)),
                     ("ideal fwd: copy of x's bytes", lambda: dst[: nbytes // 2].copy_(src[: nbytes // 2])),
                     ("cast path fwd", lambda: cast(x, w)), ("kernel fwd", lambda: Fp32Gate.apply(x, w)),
                     ("cast path fwd+bwd", fwd_bwd(cast)), ("kernel fwd+bwd", fwd_bwd(Fp32Gate.apply))]:
        rows[name], kernels[name], _ = kernel_ms(fn, args.iters)
    for name in ("cast path fwd+bwd", "kernel fwd+bwd"):
        rows[f"{name}, eager wall (host launches included)"] = time_cuda(fwd_bwd(cast if "cast" in name else Fp32Gate.apply), args.iters)
    default = triton_gate.WEIGHT_BLOCK_D, triton_gate.PROGRAMS
    for block_d, programs in [(64, 128), (64, 512), (32, 256), (128, 256)]:  # the default's neighbours
        triton_gate.WEIGHT_BLOCK_D, triton_gate.PROGRAMS = block_d, programs
        try:
            rows[f"kernel fwd+bwd, weight gradient's BLOCK_D {block_d}, {programs} programs"] = kernel_ms(fwd_bwd(Fp32Gate.apply), args.iters)[0]
        except Exception as e:  # a tile too large for the SM's registers or shared memory: noted, not fatal
            print(f"# BLOCK_D {block_d}, {programs} programs: {type(e).__name__}: {str(e)[:200]}")
    triton_gate.WEIGHT_BLOCK_D, triton_gate.PROGRAMS = default
    for name, by_kernel in kernels.items():
        print(f"# kernels of {name} (ms): " + ", ".join(f"{k} {v:.4f}" for k, v in by_kernel.items()))
    print(f"| {torch.cuda.get_device_name()}, torch {torch.__version__}: gate T={T} d={d} E={E}, bf16 x; GPU kernel ms, mean of {args.iters} | ms | x ideal |")
    print("|---|--:|--:|")
    for k, v in rows.items():
        ideal = rows["ideal fwd+bwd: copy of 3 x's bytes"] if "bwd" in k else rows["ideal fwd: copy of x's bytes"]
        print(f"| {k} | {v:.4f} | {ideal / v:.2f} |")


if __name__ == "__main__":
    main()
