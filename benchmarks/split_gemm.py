"""Issue 19: could the expert GEMMs run at the ideal bmm's speed? A probe, one run, side by side.

    python3 benchmarks/split_gemm.py [--iters 30] [--json out.json]

At each of issue 19's four shapes and two load distributions (the preset router's at initialization: top-k of random
logits; and a skewed one, each expert's load scaled by a log-normal factor of sd 0.25), the six GEMMs of a SwiGLU expert
layer's forward + backward (fwd 1 xs @ w_in, fwd 2 g @ w_out, both dgrads, both wgrads), four ways:
  grouped     torch's CUTLASS grouped_mm on the real loads (what routerlab runs)
  balanced    the same kernel on equal loads (how much of its loss is the loads' spread)
  ideal       torch.bmm on equal loads (the bench's ideal)
  split       torch.bmm over the first C = T*k/E rows of every expert (the padded [E, C] layout) plus grouped_mm over
              what is left of the experts above C; the weight gradients as grouped_mm's of the overflow, then baddbmm
              of the main part onto them (no separate add)
Prints each way's total ms and its ratio to the ideal; split's forward output is checked against grouped's.
"""
from __future__ import annotations

import argparse
import json

import torch

from routerlab.bench.core import time_cuda
from routerlab.checkpoint import atomic_write_text
from routerlab.moe.kernels import grouped_mm

SHAPES = [(16384, 1024, 512, 64, 6), (16384, 1024, 512, 8, 1), (8192, 1024, 2816, 16, 2), (16384, 2048, 1408, 64, 6)]


def loads(T: int, E: int, k: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    experts = torch.randn(T, E, generator=gen).topk(k, dim=-1).indices
    counts = torch.bincount(experts.reshape(-1), minlength=E).double()
    if skew:
        counts = counts * torch.exp(skew * torch.randn(E, generator=gen, dtype=torch.float64))
        counts = counts / counts.sum() * T * k
    counts = counts.floor().long()
    counts[0] += T * k - counts.sum()
    return counts


def six(x, w_in, w_out, g, gy, gh, offs):
    """The six grouped calls of one SwiGLU expert layer's forward + backward (routerlab/moe/kernels.py's order)."""
    return [lambda: grouped_mm(x, w_in, offs=offs), lambda: grouped_mm(g, w_out, offs=offs),
            lambda: grouped_mm(gy, w_out.mT, offs=offs), lambda: grouped_mm(g.mT, gy, offs=offs),
            lambda: grouped_mm(gh, w_in.mT, offs=offs), lambda: grouped_mm(x.mT, gh, offs=offs)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev, bf, it = "cuda", torch.bfloat16, args.iters
    gen = torch.Generator().manual_seed(0)
    report = []
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}; ms of the six GEMMs (sum of medians of {it})")
    print("| shape (T, d, h, E, k) | loads | rows min-max | overflow rows | grouped | balanced | ideal bmm | split | "
          "grouped / ideal | split / ideal | split fwd 1 max rel. err |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for T, d, h, E, k in SHAPES:
        N, C = T * k, T * k // E
        w_in = torch.randn(E, d, 2 * h, device=dev, dtype=bf) / d**0.5
        w_out = torch.randn(E, h, d, device=dev, dtype=bf) / h**0.5
        x, g = torch.randn(N, d, device=dev, dtype=bf), torch.randn(N, h, device=dev, dtype=bf)
        gy, gh = torch.randn(N, d, device=dev, dtype=bf), torch.randn(N, 2 * h, device=dev, dtype=bf)
        xb, gb, gyb, ghb = (t.view(E, C, -1) for t in (x, g, gy, gh))
        ideal = [lambda: torch.bmm(xb, w_in), lambda: torch.bmm(gb, w_out), lambda: torch.bmm(gyb, w_out.mT),
                 lambda: torch.bmm(gb.mT, gyb), lambda: torch.bmm(ghb, w_in.mT), lambda: torch.bmm(xb.mT, ghb)]
        ideal_ms = sum(time_cuda(f, it) for f in ideal)
        balanced_offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * C
        balanced_ms = sum(time_cuda(f, it) for f in six(x, w_in, w_out, g, gy, gh, balanced_offs))
        for name, skew in (("random init", 0.0), ("skewed", 0.25)):
            counts = loads(T, E, k, skew, gen)
            offs = counts.cumsum(0).to(device=dev, dtype=torch.int32)
            grouped_ms = sum(time_cuda(f, it) for f in six(x, w_in, w_out, g, gy, gh, offs))
            # split: the main part is the [E, C] layout (each expert's first min(load, C) rows); the overflow, in expert
            # order, lives in buffers of N rows (a static worst case) of which grouped_mm reads offs_over[-1]
            over = (counts - C).clamp(min=0)
            offs_over = over.cumsum(0).to(device=dev, dtype=torch.int32)
            xo, go, gyo, gho = (torch.randn(N, t.shape[1], device=dev, dtype=bf) for t in (x, g, gy, gh))
            wg_in, wg_out = torch.empty_like(w_in), torch.empty_like(w_out)

            def split_calls():
                return [lambda: (torch.bmm(xb, w_in), grouped_mm(xo, w_in, offs=offs_over)),
                        lambda: (torch.bmm(gb, w_out), grouped_mm(go, w_out, offs=offs_over)),
                        lambda: (torch.bmm(gyb, w_out.mT), grouped_mm(gyo, w_out.mT, offs=offs_over)),
                        lambda: torch.baddbmm(grouped_mm(go.mT, gyo, offs=offs_over), gb.mT, gyb, out=wg_out),
                        lambda: (torch.bmm(ghb, w_in.mT), grouped_mm(gho, w_in.mT, offs=offs_over)),
                        lambda: torch.baddbmm(grouped_mm(xo.mT, gho, offs=offs_over), xb.mT, ghb, out=wg_in)]
            split_ms = sum(time_cuda(f, it) for f in split_calls())
            # check: expert e's rows of fwd 1 through split equal grouped's on the same rows
            main_rows = torch.minimum(counts, torch.tensor(C)).tolist()
            starts = (counts.cumsum(0) - counts).tolist()
            over_starts = (over.cumsum(0) - over).tolist()
            xs = torch.empty(N, d, device=dev, dtype=bf)
            for e in range(E):  # real rows of e: its main rows then its overflow rows
                xs[starts[e]:starts[e] + main_rows[e]] = xb[e, :main_rows[e]]
                xs[starts[e] + main_rows[e]:starts[e] + int(counts[e])] = xo[over_starts[e]:over_starts[e] + int(over[e])]
            ref = grouped_mm(xs, w_in, offs=offs)
            main_out, over_out = torch.bmm(xb, w_in), grouped_mm(xo, w_in, offs=offs_over)
            err = 0.0
            for e in range(E):
                got = torch.cat([main_out[e, :main_rows[e]], over_out[over_starts[e]:over_starts[e] + int(over[e])]])
                want = ref[starts[e]:starts[e] + int(counts[e])]
                err = max(err, float((got.float() - want.float()).abs().max() / want.float().abs().max()))
            row = {"shape": [T, d, h, E, k], "loads": name, "rows": [int(counts.min()), int(counts.max())],
                   "overflow_rows": int(over.sum()), "grouped_ms": grouped_ms, "balanced_ms": balanced_ms,
                   "ideal_ms": ideal_ms, "split_ms": split_ms, "split_rel_err": err}
            report.append(row)
            print(f"| {T}, {d}, {h}, {E}, {k} | {name} | {row['rows'][0]}-{row['rows'][1]} | {row['overflow_rows']} | "
                  f"{grouped_ms:.3f} | {balanced_ms:.3f} | {ideal_ms:.3f} | {split_ms:.3f} | {grouped_ms / ideal_ms:.3f} | "
                  f"{split_ms / ideal_ms:.3f} | {err:.1e} |", flush=True)
        del w_in, w_out, x, g, gy, gh, xo, go, gyo, gho
        torch.cuda.empty_cache()
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
