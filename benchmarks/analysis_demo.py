"""The real (CPU, small) run behind docs/analysis.md: train, trace at several steps, analyze, copy the PNGs.

    PYTHONPATH=. python benchmarks/analysis_demo.py [--out /tmp/analysis-demo] [--docs docs/img]

Task `clusters` (8 latent clusters, each with its own labelling function: the ground truth for
specialization), 8 experts, softmax top-2, 2 MoE layers, 600 steps of 64 examples, seed 0. Traces of the
probe set at steps 0, 50, 100, 200, 400, 600 (the drift figure), then `routerlab analyze`. `--routers` adds
runs of switch top-1 and the fixed `random` router for a regret/MRR comparison (not in the docs yet: they
did not finish on the shared CPU in the session that wrote docs/analysis.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from routerlab.analysis.recorder import TraceRecorder
from routerlab.analysis.report import analyze_run
from routerlab.config import load_config
from routerlab.train import Trainer

BASE = ["task.name=clusters", "task.num_clusters=8", "model.d_model=32", "model.n_layers=2", "model.num_experts=8",
        "model.expert_hidden=32", "train.steps=600", "train.batch_size=64", "train.eval_every=100", "train.eval_batches=4",
        "train.log_every=20", "train.lr=3e-3"]
ROUTERS = {"softmax_topk": ["router.name=softmax_topk", "router.k=2"], "switch": ["router.name=switch"], "random": ["router.name=random"]}
TRACE_STEPS = [0, 50, 100, 200, 400, 600]


def run(out: Path, name: str, extra: list[str], trace: bool) -> dict:
    config = load_config(None, BASE + extra + [f"run.dir={out}", f"run.name={name}"])
    trainer = Trainer(config)
    recorder = TraceRecorder(trainer, TRACE_STEPS if trace else [])
    try:
        for step in TRACE_STEPS if trace else [config.train.steps]:
            if step:
                trainer.fit(until=step)  # the trainer's own loop, stopped at each trace step
            if trace:
                recorder.record(step)
    finally:
        trainer.close()
        recorder.close()
    return analyze_run(out / name, probe=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/analysis-demo")
    parser.add_argument("--docs", default="", help="copy the first run's PNGs here as analysis-<name>.png")
    parser.add_argument("--routers", default=",".join(ROUTERS), help="which runs (separate processes can share --out)")
    parser.add_argument("--table", action="store_true", help="only print the table of the runs already analyzed under --out")
    args = parser.parse_args()
    out = Path(args.out)
    rows = {}
    for i, (name, extra) in enumerate(ROUTERS.items()):
        if args.table:
            path = out / name / "analysis" / "summary.json"
            if path.is_file():
                rows[name] = json.loads(path.read_text())
            continue
        if name not in args.routers.split(","):
            continue
        start = time.perf_counter()
        summary = run(out, name, extra, trace=i == 0)
        rows[name] = summary
        print(f"{name}: {time.perf_counter() - start:.0f} s")
        print((out / name / "analysis" / "summary.md").read_text())
        if i == 0 and args.docs:
            for png in summary["figures"]:
                shutil.copyfile(out / name / "analysis" / png, Path(args.docs) / f"analysis-{png}")
    print("| router | layer | eval loss (probe) | regret | MRR | top-1 is best | oracle loss | margin |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name, s in rows.items():
        for r in s["layers"]:
            print(f"| {name} | {r['layer']} | {r['chosen_loss']:.3f} | {r['regret']:.3f} | {r['mrr']:.3f} | {r['top1_is_best']:.3f} | {r['oracle_loss']:.3f} | {r['margin']:.3f} |")
    (out / "demo.json").write_text(json.dumps({k: v["layers"] for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
