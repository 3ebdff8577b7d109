"""Issue 19: the expert GEMMs of the E=64, k=6 preset's layer on one GPU, each call timed alone, side by side in one run.

    python3 benchmarks/expert_gemms.py [--tokens 16384] [--d 1024] [--hidden 512] [--experts 64] [--k 6]

Part 1, where the grouped GEMMs lose to the dense twin: each of the six grouped_mm calls of a SwiGLU expert layer's
forward + backward (torch's CUTLASS grouped GEMM, as routerlab/moe/kernels.py calls it) against one dense mm of the
same FLOPs and operand shapes, and the dense twin's six FFN GEMMs (hidden k * h). Part 2, a probe for fusing the
permute's gather into the GEMMs (ScatterMoE's form): Triton grouped GEMMs that read x's rows through the routing
index, for the first forward GEMM and the first weight gradient, against the gather plus grouped_mm they would
replace, with a small sweep of tile sizes; each checked against grouped_mm first. Part 3 (--autotune): each call through
Inductor's grouped_mm lowering under max-autotune (its persistent TMA Triton template against ATen's CUTLASS kernel,
the faster chosen), against grouped_mm eager.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from routerlab.bench.core import time_cuda
from routerlab.moe.kernels import grouped_mm


@triton.jit
def _tile(tile_end, starts, counts, E, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    """Tile t of the row tiles of all experts (each expert's rows cut in BM): (expert, first row, rows left)."""
    t = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    ends = tl.load(tile_end + ecols, mask=ecols < E, other=2**30)
    e = tl.sum((ends <= t).to(tl.int32), 0)
    e_safe = tl.minimum(e, E - 1)
    first_tile = tl.load(tile_end + e_safe) - tl.cdiv(tl.load(counts + e_safe), BM)
    local = (t - first_tile) * BM
    return e, tl.load(starts + e_safe) + local, tl.load(counts + e_safe) - local


@triton.jit
def _gather_gemm(x, idx, w, out, tile_end, starts, counts, E, K: tl.constexpr, NOUT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[rows of e] = x[idx[rows]] @ w[e]: grid (row tiles of all experts, NOUT / BN)."""
    e, row0, left = _tile(tile_end, starts, counts, E, BM, BLOCK_E)
    if e < E:
        rows = tl.arange(0, BM)
        rmask = rows < left
        src = tl.load(idx + row0 + rows, mask=rmask, other=0).to(tl.int64)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        a_ptr = x + src[:, None] * K + ks[None, :]
        b_ptr = w + e.to(tl.int64) * K * NOUT + ks[:, None] * NOUT + cols[None, :]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for _ in range(0, K, BK):
            a = tl.load(a_ptr, mask=rmask[:, None], other=0.0)
            acc = tl.dot(a, tl.load(b_ptr), acc)
            a_ptr += BK
            b_ptr += BK * NOUT
        tl.store(out + (row0 + rows)[:, None].to(tl.int64) * NOUT + cols[None, :], acc.to(out.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _gather_wgrad(x, idx, grad, out, starts, counts, D: tl.constexpr, NOUT: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[e] = x[idx[rows of e]]^T @ grad[rows of e]: grid (E, D / BM, NOUT / BN), a loop over the expert's rows."""
    e = tl.program_id(0)
    dcols = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    start, count = tl.load(starts + e), tl.load(counts + e)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for r0 in range(0, count, BK):
        rows = r0 + tl.arange(0, BK)
        rmask = rows < count
        src = tl.load(idx + start + rows, mask=rmask, other=0).to(tl.int64)
        a = tl.load(x + src[None, :] * D + dcols[:, None], mask=rmask[None, :], other=0.0)  # [BM, BK]: x rows as columns
        b = tl.load(grad + (start + rows)[:, None].to(tl.int64) * NOUT + cols[None, :], mask=rmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(out + e.to(tl.int64) * D * NOUT + dcols[:, None] * NOUT + cols[None, :], acc.to(out.dtype.element_ty))


def gather_gemm(x, idx, w, counts, offs, BM=128, BN=128, BK=64, warps=8, stages=3):
    E, K, NOUT = w.shape
    tiles = (counts + BM - 1) // BM
    tile_end = tiles.cumsum(0).to(torch.int32)
    starts = (offs - counts).to(torch.int32)
    out = torch.empty(idx.numel(), NOUT, device=x.device, dtype=x.dtype)
    grid = (idx.numel() // BM + E, NOUT // BN)
    _gather_gemm[grid](x, idx, w, out, tile_end, starts, counts.to(torch.int32), E, K=K, NOUT=NOUT, BM=BM, BN=BN, BK=BK,
                       BLOCK_E=triton.next_power_of_2(E), num_warps=warps, num_stages=stages)
    return out


def gather_wgrad(x, idx, grad, counts, offs, BM=128, BN=128, BK=64, warps=8, stages=3):
    E, D, NOUT = counts.numel(), x.shape[1], grad.shape[1]
    out = torch.empty(E, D, NOUT, device=x.device, dtype=x.dtype)
    _gather_wgrad[(E, D // BM, NOUT // BN)](x, idx, grad, out, (offs - counts).to(torch.int32), counts.to(torch.int32),
                                           D=D, NOUT=NOUT, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    return out


def autotuned(calls: dict, offs: torch.Tensor, iters: int) -> dict:
    """Each call's operands through torch.compile(mode="max-autotune-no-cudagraphs"): Inductor benchmarks its Triton
    grouped-GEMM template's configs against ATen's kernel and keeps the fastest (its choice is printed on stderr)."""
    out = {}
    print("\n| call | grouped_mm eager ms | max-autotune ms | eager / autotuned | max rel. error |")
    print("|---|--:|--:|--:|--:|")
    for name, (grouped, _, _) in calls.items():
        a, b = grouped.operands
        fn = torch.compile(lambda a, b, o: grouped_mm(a, b, offs=o), mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)
        try:
            got = fn(a, b, offs)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | |")
            continue
        ref = grouped()
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
        te, tc = time_cuda(grouped, iters), time_cuda(lambda: fn(a, b, offs), iters)
        out[name] = {"eager_ms": te, "autotuned_ms": tc, "rel_err": err}
        print(f"| {name} | {te:.3f} | {tc:.3f} | {te / tc:.2f} | {err:.1e} |", flush=True)
    return out


class _Call:
    """grouped_mm(a, b, offs) as a callable that remembers its operands."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> None:
        self.operands, self.offs = (a, b), offs

    def __call__(self) -> torch.Tensor:
        return grouped_mm(*self.operands, offs=self.offs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--autotune", action="store_true", help="part 3: Inductor's max-autotune grouped_mm per call")
    ap.add_argument("--skip-probe", action="store_true", help="leave out part 2")
    args = ap.parse_args()
    T, d, h, E, k = args.tokens, args.d, args.hidden, args.experts, args.k
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    # routing as the preset's router makes it at initialization: top-k of a softmax over random logits
    experts = torch.randn(T, E, device=dev).topk(k, dim=-1).indices
    order = torch.argsort(experts.t().reshape(-1), stable=True)
    token_of_row = (order % T).contiguous()
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    N = T * k
    x = torch.randn(T, d, device=dev, dtype=bf)
    xs = x[token_of_row]
    w_in = torch.randn(E, d, 2 * h, device=dev, dtype=bf) / d**0.5
    w_out = torch.randn(E, h, d, device=dev, dtype=bf) / h**0.5
    g = torch.randn(N, h, device=dev, dtype=bf)
    grad_y = torch.randn(N, d, device=dev, dtype=bf)
    grad_h13 = torch.randn(N, 2 * h, device=dev, dtype=bf)
    it = args.iters
    report = {"shape": {"T": T, "d": d, "h": h, "E": E, "k": k, "rows": N, "counts min/max": [int(counts.min()), int(counts.max())]}}
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}: T={T} d={d} h={h} E={E} k={k}, "
          f"rows per expert {int(counts.min())}-{int(counts.max())}; median ms of {it}")

    def tflops(flops, ms):
        return flops / ms / 1e9

    # part 1: the six grouped calls against a dense mm of the same FLOPs and operands
    calls = {
        "fwd 1: xs @ w_in": (_Call(xs, w_in, offs), lambda: xs @ w_in[0], 2 * N * d * 2 * h),
        "fwd 2: g @ w_out": (_Call(g, w_out, offs), lambda: g @ w_out[0], 2 * N * h * d),
        "bwd 2 dgrad: grad_y @ w_out^T": (_Call(grad_y, w_out.mT, offs), lambda: grad_y @ w_out[0].mT, 2 * N * d * h),
        "bwd 2 wgrad: g^T @ grad_y": (_Call(g.mT, grad_y, offs), lambda: g.mT @ grad_y, 2 * N * h * d),
        "bwd 1 dgrad: grad_h13 @ w_in^T": (_Call(grad_h13, w_in.mT, offs), lambda: grad_h13 @ w_in[0].mT, 2 * N * 2 * h * d),
        "bwd 1 wgrad: xs^T @ grad_h13": (_Call(xs.mT, grad_h13, offs), lambda: xs.mT @ grad_h13, 2 * N * d * 2 * h),
    }
    print("| call | grouped_mm ms | TFLOP/s | dense mm, same FLOPs, ms | TFLOP/s | grouped / dense time |")
    print("|---|--:|--:|--:|--:|--:|")
    part1, total_g, total_d = {}, 0.0, 0.0
    for name, (grouped, dense, flops) in calls.items():
        tg, td = time_cuda(grouped, it), time_cuda(dense, it)
        total_g, total_d = total_g + tg, total_d + td
        part1[name] = {"grouped_ms": tg, "dense_ms": td}
        print(f"| {name} | {tg:.3f} | {tflops(flops, tg):.0f} | {td:.3f} | {tflops(flops, td):.0f} | {tg / td:.2f} |")
    print(f"| all six | {total_g:.3f} | | {total_d:.3f} | | {total_g / total_d:.2f} |")
    # the dense twin's FFN: hidden k * h, one GEMM per call
    H = k * h
    xd, w1, w2 = torch.randn(T, d, device=dev, dtype=bf), torch.randn(d, 2 * H, device=dev, dtype=bf), torch.randn(H, d, device=dev, dtype=bf)
    gd, gyd, gh = torch.randn(T, H, device=dev, dtype=bf), torch.randn(T, d, device=dev, dtype=bf), torch.randn(T, 2 * H, device=dev, dtype=bf)
    twin = [lambda: xd @ w1, lambda: gd @ w2, lambda: gyd @ w2.mT, lambda: gd.mT @ gyd, lambda: gh @ w1.mT, lambda: xd.mT @ gh]
    twin_ms = [time_cuda(f, it) for f in twin]
    print(f"| the dense twin's six FFN GEMMs (hidden {H}) | | | {sum(twin_ms):.3f} | {tflops(3 * 2 * T * d * 3 * H, sum(twin_ms)):.0f} | "
          f"experts / twin {total_g / sum(twin_ms):.2f} |")
    report["part 1"] = {"calls": part1, "grouped_total_ms": total_g, "dense_total_ms": total_d, "twin_ms": twin_ms}

    if args.autotune:
        report["part 3"] = autotuned(calls, offs, it)
    # part 2: the gather fused into the first GEMM and the first weight gradient
    gather_ms = time_cuda(lambda: x[token_of_row], it)
    ref_fwd = grouped_mm(xs, w_in, offs=offs)
    ref_wgrad = grouped_mm(xs.mT, grad_h13, offs=offs)
    print(f"\n| fused gather (Triton) | BM x BN x BK, warps, stages | ms | TFLOP/s | max error vs grouped_mm | replaces (gather {gather_ms:.3f} + grouped_mm) ms |")
    print("|---|---|--:|--:|--:|--:|")
    part2 = {"gather_ms": gather_ms, "fwd": {}, "wgrad": {}}
    configs = [] if args.skip_probe else [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3)]
    for cfg in configs:
        BM, BN, BK, warps, stages = cfg
        for kind, fn, ref, flops, base in [
            ("fwd 1", lambda: gather_gemm(x, token_of_row, w_in, counts, offs, BM, BN, BK, warps, stages), ref_fwd, 2 * N * d * 2 * h,
             part1["fwd 1: xs @ w_in"]["grouped_ms"]),
            ("bwd 1 wgrad", lambda: gather_wgrad(x, token_of_row, grad_h13, counts, offs, BM, BN, BK, warps, stages), ref_wgrad, 2 * N * d * 2 * h,
             part1["bwd 1 wgrad: xs^T @ grad_h13"]["grouped_ms"]),
        ]:
            try:
                err = float((fn().float() - ref.float()).abs().max() / ref.float().abs().max())
                ms = time_cuda(fn, it)
            except Exception as exc:  # a tile that does not fit shared memory: report and go on
                print(f"| {kind} | {cfg} | failed: {str(exc).splitlines()[0][:80]} | | | |")
                continue
            part2["fwd" if kind == "fwd 1" else "wgrad"][str(cfg)] = {"ms": ms, "rel_err": err}
            print(f"| {kind} | {BM}x{BN}x{BK}, {warps}, {stages} | {ms:.3f} | {tflops(flops, ms):.0f} | {err:.1e} | {gather_ms + base:.3f} |")
    report["part 2"] = part2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
