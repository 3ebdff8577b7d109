"""Strategies and baselines side by side, over seeds: `python -m federated.compare --seeds 0 1 2`.

Every variant runs the same federated config (default federated/digits.yaml plus `--set` overrides) on
the in-process engine (`federated.inprocess`, the same ServerApp/ClientApp code as the simulation):
  centralized       one Trainer on the pooled data of the seen clients, num_clients x rounds x
                    local_steps steps (as many examples as the federation trains on), then the final
                    evaluation of every client through the ClientApp's own evaluate handler;
  local_only        each client trains alone (strategy local_only);
  <strategy>        fedavg / expert_weighted / personal_router, dense or expert-sparse
                    (`send_experts`), equal or unequal clients (`small_*`).
FedAvg + local fine-tuning is the `full_ft` column of the fedavg row (adapt_steps steps on each client).
Writes results/federated/compare.csv (one row per run) and compare.md (mean ± 95% t-interval over seeds,
and the paired difference from the named baseline), rewritten after every run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from federated.config import FederatedSetup, load_setup
from federated.server_app import summarize_final, to_csv
from routerlab.checkpoint import atomic_write, atomic_write_text


# name -> overrides; the default grid of the results table
VARIANTS = {
    "centralized": [],
    "local_only": ["federated.strategy=local_only"],
    "fedavg": ["federated.strategy=fedavg"],
    "expert_weighted": ["federated.strategy=expert_weighted"],
    "personal_router": ["federated.strategy=personal_router"],
    "expert_weighted sparse m=4": ["federated.strategy=expert_weighted", "federated.send_experts=4"],
    "expert_weighted sparse m=2": ["federated.strategy=expert_weighted", "federated.send_experts=2"],
    "expert_weighted sparse m=4, half small (m=2, k=1)": ["federated.strategy=expert_weighted", "federated.send_experts=4",
                                                   "federated.small_clients=5", "federated.small_experts=2", "federated.small_k=1"],
    # not in the default grid (time): the same sparse rule under the other weightings
    "fedavg sparse m=4": ["federated.strategy=fedavg", "federated.send_experts=4"],
    "personal_router sparse m=4": ["federated.strategy=personal_router", "federated.send_experts=4"],
}
DEFAULT_GRID = list(VARIANTS)[:8]
METRICS = ("seen_global_acc_mean", "seen_global_acc_worst10", "personal_acc_mean", "personal_acc_worst10", "seen_full_ft_acc_mean",
           "seen_full_ft_acc_worst10", "unseen_global_acc_mean", "unseen_router_ft_acc_mean", "unseen_full_ft_acc_mean", "mb_per_round")


def centralized(setup: FederatedSetup, run_dir: Path) -> dict:
    """The centralized baseline (see the module docstring); returns a summary like run_inprocess's."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from federated.client_app import app as client_app
    from federated.inprocess import InProcessGrid
    from federated.partition import pooled_task
    from federated.server_app import final_rows
    from federated.strategies.base import ExpertStrategy
    from routerlab.tasks import build_task
    from routerlab.train import Trainer

    started = time.time()
    fed = setup.fed
    trainer = Trainer(setup.config, task=pooled_task(build_task(setup.config.task), setup), log=False, progress=False)
    for _ in range(fed.num_clients * fed.rounds * fed.local_steps):
        trainer.train_step()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    grid = InProcessGrid(client_app, fed.num_clients + fed.unseen_clients)
    arrays = ArrayRecord({k: v for k, v in trainer.model.state_dict().items()})
    config = ConfigRecord({"setup": setup.to_json(), "round": fed.rounds, "final": True, "adapt-steps": fed.adapt_steps})
    messages = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n, message_type=MessageType.EVALUATE, group_id="final")
                for n in grid.get_node_ids()]
    rows = final_rows(grid.send_and_receive(messages), ExpertStrategy(setup))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "final.csv", to_csv(rows))
    atomic_write(run_dir / "model.pt", lambda tmp: torch.save(trainer.model.state_dict(), tmp))
    return {"final": {"personal_acc_mean": float("nan"), "personal_acc_worst10": float("nan")}, "final_clients": summarize_final(rows),
            "bytes_per_round": 0.0, "wall_s": time.time() - started}


def run_variant(name: str, overrides: list[str], seed: int, base: list[str], out: Path, config: str | None = None) -> dict:
    from federated.inprocess import run_inprocess

    setup = load_setup(config, [f"seed={seed}", *base, *overrides])
    run_dir = out / "runs" / f"{name.replace(' ', '_').replace(',', '').replace('=', '').replace('(', '').replace(')', '')}-s{seed}"
    s = centralized(setup, run_dir) if name == "centralized" else run_inprocess(setup, run_dir)
    row = {"variant": name, "seed": seed, "task": setup.config.task["name"], **s["final_clients"], "personal_acc_mean": s["final"]["personal_acc_mean"],
           "personal_acc_worst10": s["final"]["personal_acc_worst10"], "mb_per_round": s["bytes_per_round"] / 1e6, "wall_s": round(s["wall_s"], 1)}
    row["dense_mb_per_round"] = s["dense_bytes_per_round"] / 1e6 if "dense_bytes_per_round" in s else float("nan")
    return row


def fmt(values: list[float], digits: int = 3) -> str:
    """mean ± half-width of the 95% t-interval over seeds (the ablation report's summary)."""
    from routerlab.ablate.report import summarize

    v = [x for x in values if x == x]
    if not v:
        return "-"
    s = summarize(v)
    return f"{s.mean:.{digits}f}" if s.half != s.half else f"{s.mean:.{digits}f} ± {s.half:.{digits}f}"


# (column title, result key) of each table; the last column is the paired worst-decile difference from the baseline
ACCURACY_COLUMNS = [("seen global acc", "seen_global_acc_mean"), ("seen worst decile", "seen_global_acc_worst10"),
                    ("personal acc", "personal_acc_mean"), ("personal worst decile", "personal_acc_worst10"),
                    ("seen after FT", "seen_full_ft_acc_mean"), ("seen FT worst decile", "seen_full_ft_acc_worst10"),
                    ("unseen 0 steps", "unseen_global_acc_mean"), ("unseen router FT", "unseen_router_ft_acc_mean"),
                    ("unseen full FT", "unseen_full_ft_acc_mean")]
PERPLEXITY_COLUMNS = [("seen ppl", "seen_global_ppl_mean"), ("seen worst decile", "seen_global_ppl_worst10"),
                      ("seen after FT", "seen_full_ft_ppl_mean"), ("unseen 0 steps", "unseen_global_ppl_mean"),
                      ("unseen router FT", "unseen_router_ft_ppl_mean"), ("unseen full FT", "unseen_full_ft_ppl_mean")]


def table(rows: list[dict], baseline: str = "fedavg") -> str:
    """Markdown table of every variant: accuracy for classification, per-client perplexity (lower is better;
    the worst decile is the highest 10%) for language modelling."""
    lm = bool(rows) and "seen_global_ppl_mean" in rows[0]
    columns, worst, digits = (PERPLEXITY_COLUMNS, "seen_global_ppl_worst10", 2) if lm else (ACCURACY_COLUMNS, "seen_global_acc_worst10", 3)
    head = ("| variant | seeds | MB/round (down+up) | x fewer than fedavg | " + " | ".join(title for title, _ in columns)
            + f" | seen worst decile - {baseline} (paired) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_rows = {r["seed"]: r for r in rows if r["variant"] == baseline}
    dense = np.mean([r["mb_per_round"] for r in base_rows.values()]) if base_rows else float("nan")
    order = [v for v in VARIANTS if any(r["variant"] == v for r in rows)] + sorted({r["variant"] for r in rows} - set(VARIANTS))
    for name in order:
        rs = [r for r in rows if r["variant"] == name]
        mb = np.mean([r["mb_per_round"] for r in rs])
        ratio = f"{dense / mb:.2f}" if mb > 0 and dense == dense else "-"
        paired = [r[worst] - base_rows[r["seed"]][worst] for r in rs if r["seed"] in base_rows]
        cells = [fmt([r[key] for r in rs], digits) for _, key in columns]
        lines.append(f"| {name} | {len(rs)} | {mb:.3f} | {ratio} | " + " | ".join(cells)
                     + f" | {fmt(paired, digits) if name != baseline else '(baseline)'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_GRID, help=f"of: {', '.join(VARIANTS)}")
    ap.add_argument("--config", default=None, help="federated YAML config (default federated/digits.yaml)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every variant, e.g. federated.rounds=8")
    ap.add_argument("--out", type=Path, default=Path("results/federated"))
    args = ap.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; valid variants: {', '.join(VARIANTS)}")
    rows = []
    csv_path = args.out / "compare.csv"
    for seed in args.seeds:
        for name in args.variants:
            rows.append(run_variant(name, VARIANTS[name], seed, args.set, args.out, args.config))
            print(json.dumps(rows[-1]), flush=True)
            atomic_write_text(csv_path, to_csv(rows))
            atomic_write_text(args.out / "compare.md", table(rows))


if __name__ == "__main__":
    main()
