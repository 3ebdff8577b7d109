"""Issue 19 v11, v12: what train.cuda_graph does to training steps the trainer did not graph whole before v12, on one GPU in
one run.

The E=64, k=6 preset (configs/gpu/stdlib-110m-e64k6.yaml, bf16-pure, statistics logged every 50 steps) with each
router below, `train.cuda_graph=false` (every kernel launched eagerly) against `true`, alternating, and the same seed:
steady tokens/s (routerlab.bench.trainer.steady_tokens_per_s) and the training losses, which must agree.
  softmax_topk, micro_batches 2   the presets' router. v11: two micro-batches ruled the step's graph out, so each layer's
                                  core was graphed (routerlab/moe/core_graph.py); from v12 the step's graph replays each
                                  micro-batch (routerlab/step_graph.py)
  one_micro_batch                 the same router and global batch in one micro-batch (graphed whole since v8)
  relu, expert_choice, dselect_k  routers that read the host each step (never graph-safe)

    python3 benchmarks/core_graph_trainer.py [--steps 20] [--warmup 5] [--rounds 1] [--routers ...] [--json FILE]
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile

import torch

from routerlab.ablate.report import summarize
from routerlab.bench.trainer import PRESETS, steady_tokens_per_s
from routerlab.checkpoint import atomic_write_text
from routerlab.config import load_config
from routerlab.train import Trainer

CASES = {"softmax_topk": ["train.micro_batches=2"], "one_micro_batch": [], "relu": ["router.name=relu"], "expert_choice": ["router.name=expert_choice", "router.allow_noncausal=true"],
         "dselect_k": ["router.name=dselect_k"]}


def run(case: str, cuda_graph: bool, steps: int, warmup: int) -> dict:
    overrides = ["train.precision=bf16-pure", "train.compile=off", "train.log_every=50", f"train.cuda_graph={str(cuda_graph).lower()}",
                 "train.eval_every=1000000", "train.eval_batches=1", "train.steps=1000000", f"run.dir={tempfile.mkdtemp()}",
                 "run.checkpoint=false", *CASES[case]]
    trainer = Trainer(load_config(PRESETS["moe"], overrides), log=False)
    tokens_per_s, ms, _, split = steady_tokens_per_s(trainer, warmup, steps)
    row = {"case": case, "cuda_graph": cuda_graph, "step graph": trainer.step_graph is not None and trainer.step_graph.graph is not None,
           "core graphs": sum(1 for layer in trainer.layers for c in layer.core_graphs.captured.values() if c is not None),
           "tokens/s": tokens_per_s, "ms/step": ms, "median ms": split["median step ms"], "losses": trainer.losses[:8],
           "peak GiB": torch.cuda.max_memory_allocated() / 2**30}
    trainer.close()
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="pairs per router, alternating eager, graphed")
    ap.add_argument("--routers", default=",".join(CASES), help="cases, of " + ",".join(CASES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print("| router | train.cuda_graph | step graphed | core graphs | tokens/s | ms/step | median ms | peak GiB | losses 1-3 |\n|---|---|---|--:|--:|--:|--:|--:|---|")
    for case in args.routers.split(","):
        ratios = []
        for _ in range(args.rounds):
            for cuda_graph in (False, True):
                row = run(case, cuda_graph, args.steps, args.warmup)
                rows.append(row)
                print(f"| {case} | {cuda_graph} | {row['step graph']} | {row['core graphs']} | {row['tokens/s']:,.0f} | {row['ms/step']:.1f} | "
                      f"{row['median ms']:.1f} | {row['peak GiB']:.1f} | {', '.join(f'{v:.5f}' for v in row['losses'][:3])} |", flush=True)
            ratios.append(rows[-1]["tokens/s"] / rows[-2]["tokens/s"])
        s = summarize(ratios)
        print(f"  {case}: graphed / eager tokens/s, pair by pair {', '.join(f'{r:.3f}' for r in ratios)}; mean {s.mean:.3f}"
              f" (95% t-interval {s.low:.3f} to {s.high:.3f})", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
