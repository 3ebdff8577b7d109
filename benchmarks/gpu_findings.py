"""The published-finding ablations at GPU scale, in one call of a fixed time budget on one machine.

    python benchmarks/gpu_findings.py --budget 500 --out OUT [--grids hash_vs_learned zloss_25m ...]

Each named file of configs/ablations/gpu/ runs, in the order given, with `routerlab ablate --per-gpu N`
at the size the file says. The size is never cut to fit: a file whose tokens per run are below its
minimum (issue 16: 20M for collapse and hash_vs_learned, 5M for the others) is refused before anything
runs (exit 2), and a grid whose estimated time exceeds the time left is skipped with a log line.

The estimate is tokens of the grid / a rate in training tokens per second over a whole grid's wall time
(start-up, evaluation and the last wave's idle slots included): the rate measured on an earlier grid of
the same model in this call, else the rate `RATES` records from an earlier call. (The first version planned
from a 60-step probe, whose start-up-heavy rate was 1.7x too slow, and cut the steps of hash_vs_learned.)
A grid still running at the deadline is stopped; its finished cells are reported (`--report-only`).
Everything lands in OUT: results/<name>/ folders, log.txt, plan.json, configs/ (the files as run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# file -> (runs at once per GPU, minimum training tokens per run)
GRIDS = {
    "collapse": (6, 20_000_000),
    "hash_vs_learned": (18, 20_000_000),
    "zloss": (9, 5_000_000),
    "specialization": (7, 5_000_000),
    "zloss_25m": (9, 5_000_000),
    "specialization_25m": (11, 5_000_000),
    "collapse_25m": (3, 20_000_000),  # graphed runs: a few at once only fill each other's host gaps
    "hash_vs_learned_25m": (3, 20_000_000),
}
# model -> training tokens/s over a grid's wall time, lowest measured on one H200 (2026-12-02): the 2M-active
# model, 6-9 runs at once (benchmarks/h200/2026-12-02-gpu-findings/plan.json: 1.18M-1.78M); the 25M preset
# E=8 top-2, alone (benchmarks/h200/gpu_presets_2026-12-02.txt: 263k; several at once can only add); the same preset
# with train.cuda_graph, alone: 830k (softmax_topk), 994k (switch), 1,035k (hash) (docs/results.md, issue 16), rounded
# down for routers not measured yet. "-graph": train.cuda_graph not turned off (it graphs the graph-safe routers only);
# the 2M model's rates were measured eager, a floor for its graphed runs
RATES = {"d256x4": 1.18e6, "d256x4-graph": 1.18e6, "d512x8": 2.6e5, "d512x8-graph": 8.0e5}
START_S = 25.0  # worker start-up before the first step, on top of tokens / rate


def log(text: str, sink) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    sink.write(line + "\n")
    sink.flush()


RUN = ("import sys; from routerlab.ablate.study import run_ablation; "
       "r = run_ablation(sys.argv[1], out=sys.argv[2], per_gpu=int(sys.argv[3]), report_only=sys.argv[4] == '1', "
       "command='routerlab ablate ' + sys.argv[1] + ' --per-gpu ' + sys.argv[3]); "
       "print('cells done', len(r.results), 'failed', r.errors)")  # no entry points needed (a copied tree)


def ablate(file: Path, out: Path, per_gpu: int, timeout: float, sink) -> tuple[float, bool]:
    cmd = [sys.executable, "-c", RUN, str(file), str(out), str(per_gpu)]
    start = time.time()
    proc = subprocess.Popen(cmd + ["0"], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=max(1.0, timeout))
        finished = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = False
        subprocess.run(cmd + ["1"], stdout=sink, stderr=subprocess.STDOUT)
    return time.time() - start, finished


def grid_tokens(out: Path) -> int:
    return sum(json.loads(p.read_text()).get("train_tokens", 0) for p in (out / "cells").glob("*.json"))


def model_key(spec: dict) -> str:
    model, graphed = spec["base"]["model"], spec["base"]["train"].get("cuda_graph", True)
    return f"d{model['d_model']}x{model['n_layers']}" + ("-graph" if graphed else "")


def grid_size(spec: dict) -> tuple[int, int]:
    """(runs, training tokens per run) of an ablation file."""
    train = spec["base"]["train"]
    runs = math.prod(len(v) for v in spec["axes"].values())
    return runs, train["steps"] * train["batch_size"] * spec["base"]["task"]["block_size"]


def load(folder: Path, name: str, smoke: bool) -> dict:
    spec = yaml.safe_load((folder / f"{name}.yaml").read_text())
    if smoke:
        spec["base"]["model"].update(d_model=16, n_layers=1, n_heads=2)
        spec["base"]["task"]["block_size"] = 32
        spec["base"]["train"].update(steps=4, batch_size=4, eval_every=2, eval_batches=2, warmup_steps=0,
                                     device="cpu", precision="fp32")
        spec["axes"]["seed"] = spec["axes"]["seed"][:1]
    return spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for everything")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grids", nargs="+", default=["hash_vs_learned", "zloss_25m", "specialization_25m"],
                        choices=sorted(GRIDS), help="grid files (of --configs) in the order to run them")
    parser.add_argument("--configs", type=Path, default=ROOT / "configs/ablations/gpu", help="folder of the grid files")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny model, 4 steps, 1 seed")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    specs = {name: load(args.configs, name, args.smoke) for name in args.grids}
    for name, spec in specs.items():  # the minimum is a floor, checked before anything runs
        runs, tokens = grid_size(spec)
        if not args.smoke and tokens < GRIDS[name][1]:
            print(f"error: {args.configs / name}.yaml trains {tokens:,} tokens per run, below its minimum "
                  f"{GRIDS[name][1]:,}", file=sys.stderr)
            sys.exit(2)
        if not args.smoke and model_key(spec) not in RATES:
            print(f"error: no recorded rate for model {model_key(spec)} ({name}); add one to RATES", file=sys.stderr)
            sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    sink = open(args.out / "log.txt", "a")
    work = args.out / "configs"
    work.mkdir(exist_ok=True)
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    log(f"torch {torch.__version__}, {card}, {os.cpu_count()} CPUs, budget {args.budget:.0f}s", sink)
    from routerlab.tasks import build_task

    t = time.time()
    for block in sorted({spec["base"]["task"]["block_size"] for spec in specs.values()}):
        task = build_task({"name": "stdlib", "block_size": block})
    log(f"stdlib task ready in {time.time() - t:.1f}s: {json.dumps(task.data_info())[:400]}", sink)

    rates = dict(RATES) if not args.smoke else {model_key(spec): 1e9 for spec in specs.values()}
    plan = {"budget_s": args.budget, "grids": {}}
    for name in args.grids:
        spec, (per_gpu, minimum) = specs[name], GRIDS[name]
        runs, tokens = grid_size(spec)
        key = model_key(spec)
        need = START_S + runs * tokens / rates[key]
        left = deadline - time.time()
        entry = {"runs": runs, "tokens_per_run": tokens, "min_tokens_per_run": minimum, "per_gpu": per_gpu,
                 "model": key, "rate_planned": rates[key], "needed_s": round(need), "left_s": round(left)}
        if need > left:
            log(f"{name}: skipped: {runs} runs x {tokens / 1e6:.1f}M tokens need ~{need:.0f}s at {rates[key]:,.0f} "
                f"tokens/s; {left:.0f}s left (never run smaller than its minimum)", sink)
            plan["grids"][name] = {**entry, "skipped": True}
            continue
        file = work / f"{name}.yaml"
        file.write_text(yaml.safe_dump(spec, sort_keys=False))
        log(f"{name}: {runs} runs x {tokens / 1e6:.2f}M tokens, {per_gpu} at once; planned {need:.0f}s at "
            f"{rates[key]:,.0f} tokens/s, {left:.0f}s left", sink)
        wall, finished = ablate(file, args.out / "results" / name, per_gpu, deadline - time.time(), sink)
        trained = grid_tokens(args.out / "results" / name)
        if finished and trained:
            rates[key] = trained / wall  # the next grid of this model plans with what this one reached
        log(f"{name}: {'finished' if finished else 'STOPPED or FAILED'} in {wall:.1f}s; {trained / 1e6:.1f}M tokens "
            f"trained = {trained / wall:,.0f} tokens/s over the wall time", sink)
        plan["grids"][name] = {**entry, "wall_s": round(wall, 1), "finished": finished, "tokens_trained": trained,
                               "rate_measured": trained / wall}
        (args.out / "plan.json").write_text(json.dumps(plan, indent=1))
    (args.out / "plan.json").write_text(json.dumps(plan, indent=1))
    log("done", sink)


if __name__ == "__main__":
    main()
