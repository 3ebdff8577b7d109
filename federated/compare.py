"""Strategies side by side: `python -m federated.compare --alphas 0.1 1.0 --seeds 0 1 2`.

Runs the default federated config (federated/digits.yaml) once per (seed, alpha, strategy) in the Ray
simulation and writes results/federated/compare.csv and compare.md (rewritten after every run, so a
stopped comparison keeps what finished).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from federated.config import load_setup
from federated.server_app import to_csv
from federated.simulation import simulate
from routerlab.checkpoint import atomic_write_text

STRATEGIES = ("fedavg", "expert_weighted", "personal_router")


def table(rows: list[dict]) -> str:
    lines = ["| alpha | strategy | seeds | global acc mean | global acc worst decile | personal acc mean | personal acc worst decile | rounds to target (per seed) | client-expert MI | MB per round |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["alpha"], r["strategy"]) for r in rows}, key=lambda k: (k[0], STRATEGIES.index(k[1])))
    pm = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"  # noqa: E731
    for alpha, strategy in keys:
        rs = [r for r in rows if r["alpha"] == alpha and r["strategy"] == strategy]
        lines.append(f"| {alpha} | {strategy} | {len(rs)} | {pm([r['global_acc_mean'] for r in rs])} | {pm([r['global_acc_worst10'] for r in rs])} | "
                     f"{pm([r['personal_acc_mean'] for r in rs])} | {pm([r['personal_acc_worst10'] for r in rs])} | "
                     f"{', '.join(str(r['rounds_to_target'] or '-') for r in rs)} | {np.mean([r['client_expert_mi'] for r in rs]):.3f} | "
                     f"{np.mean([(r['bytes_down'] + r['bytes_up']) / 1e6 for r in rs]):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. federated.rounds=8")
    ap.add_argument("--out", type=Path, default=Path("results/federated"))
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        for alpha in args.alphas:
            for strategy in args.strategies:
                overrides = [f"seed={seed}", f"federated.alpha={alpha}", f"federated.strategy={strategy}", "run.dir=runs/compare", *args.set]
                s = simulate(load_setup(None, overrides))
                rows.append({"seed": seed, "alpha": alpha, "strategy": strategy, **s["final"], "rounds_to_target": s["rounds_to_target"],
                             "wall_s": round(s["wall_s"], 1)})
                print(rows[-1], flush=True)
                atomic_write_text(args.out / "compare.csv", to_csv(rows))
                atomic_write_text(args.out / "compare.md", table(rows))


if __name__ == "__main__":
    main()
