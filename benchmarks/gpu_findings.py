"""The published-finding ablations at GPU scale, in one call of a fixed time budget on one machine.

    python benchmarks/gpu_findings.py --budget 440 --out OUT

1. Probe: the collapse model, 6 runs at once on the GPU for 60 steps -> aggregate training tokens/s.
2. In priority order (collapse, hash_vs_learned, zloss, specialization), run each file of
   configs/ablations/gpu/ with `routerlab ablate --per-gpu N`; a grid whose planned tokens do not fit the time
   left runs with fewer steps (the same for every cell of it), and the log says so. A grid still running at
   the deadline is stopped; its finished cells are reported (`--report-only`).
3. Everything lands in OUT (results/<name>/ folders, log.txt, plan.json).
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
GRIDS = [  # file, runs at once per GPU
    ("collapse", 6),
    ("hash_vs_learned", 6),
    ("zloss", 9),
    ("specialization", 7),
]
OVERHEAD = 1.3  # evaluation, start-up and the last wave's idle slots, on top of pure training time
MIN_STEPS = 100


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
        finished = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = False
        subprocess.run(cmd + ["1"], stdout=sink, stderr=subprocess.STDOUT)
    return time.time() - start, finished


def grid_tokens(out: Path) -> tuple[int, list[float]]:
    tokens, rates = 0, []
    for path in (out / "cells").glob("*.json"):
        cell = json.loads(path.read_text())
        tokens += cell.get("train_tokens", 0)
        rates.append(cell["metrics"].get("tokens_per_s", 0.0))
    return tokens, rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for everything")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny model, few steps")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    sink = open(args.out / "log.txt", "a")
    work = args.out / "configs"
    work.mkdir(exist_ok=True)
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    log(f"torch {torch.__version__}, {card}, {os.cpu_count()} CPUs", sink)

    def load(name: str) -> dict:
        spec = yaml.safe_load((ROOT / f"configs/ablations/gpu/{name}.yaml").read_text())
        if args.smoke:
            spec["base"]["model"].update(d_model=16, n_layers=1, n_heads=2)
            spec["base"]["train"].update(steps=4, batch_size=4, eval_every=2, eval_batches=2, device="cpu", dtype="float32")
            spec["axes"]["seed"] = spec["axes"]["seed"][:2]
        return spec

    t = time.time()
    from routerlab.tasks import build_task

    task = build_task({"name": "stdlib", "block_size": 256})
    log(f"stdlib task ready in {time.time() - t:.1f}s: {json.dumps(task.data_info())[:400]}", sink)

    # 1. probe: the collapse model, 6 runs at once
    spec = load("collapse")
    spec["name"] = "probe"
    spec["base"]["train"].update(steps=4 if args.smoke else 60, eval_every=60, eval_batches=2)
    spec["axes"] = {"router": [spec["axes"]["router"][1]], "seed": list(range(6))}
    spec.pop("baseline")
    probe = work / "probe.yaml"
    probe.write_text(yaml.safe_dump(spec))
    wall, _ = ablate(probe, args.out / "results" / "probe", 6, deadline - time.time(), sink)
    tokens, rates = grid_tokens(args.out / "results" / "probe")
    aggregate = sum(rates)
    log(f"probe: 6 runs x 60 steps at once in {wall:.1f}s wall; tokens/s per run {[round(r) for r in rates]}; "
        f"aggregate {aggregate:,.0f} tokens/s while training; {tokens / wall:,.0f} tokens/s over the wall time", sink)
    if aggregate <= 0:
        log("probe trained nothing: stopping (see the log above)", sink)
        return
    plan = {"probe_aggregate_tokens_per_s": aggregate, "probe_wall_s": wall, "grids": {}}

    # 2. the grids in priority order
    for name, per_gpu in GRIDS:
        left = deadline - time.time()
        spec = load(name)
        train = spec["base"]["train"]
        cells = math.prod(len(v) for v in spec["axes"].values())
        waves = math.ceil(cells / per_gpu)
        step_tokens = train["batch_size"] * spec["base"]["task"]["block_size"]
        need = OVERHEAD * waves * per_gpu * train["steps"] * step_tokens / aggregate + 25  # + worker start-up
        steps = train["steps"]
        if need > left:
            steps = int(train["steps"] * (left - 25) / (need - 25))
            if steps < (1 if args.smoke else MIN_STEPS):
                log(f"{name}: skipped, {left:.0f}s left, {need:.0f}s needed at full size", sink)
                plan["grids"][name] = {"skipped": True, "needed_s": need, "left_s": left}
                continue
            train["steps"] = steps
            train["eval_every"] = max(1, steps // 4)
            train["warmup_steps"] = min(train["warmup_steps"], steps // 10)
        file = work / f"{name}.yaml"
        file.write_text(yaml.safe_dump(spec, sort_keys=False))
        log(f"{name}: {cells} runs, {steps} steps = {steps * step_tokens / 1e6:.1f}M tokens per run; "
            f"planned {need:.0f}s at full size, {left:.0f}s left", sink)
        wall, finished = ablate(file, args.out / "results" / name, per_gpu, deadline - time.time(), sink)
        tokens, rates = grid_tokens(args.out / "results" / name)
        log(f"{name}: {'finished' if finished else 'STOPPED at the deadline'} in {wall:.1f}s; {tokens / 1e6:.1f}M tokens "
            f"trained ({tokens / wall:,.0f} tokens/s over the wall time, {sum(rates) / max(1, len(rates)):,.0f} per run)", sink)
        plan["grids"][name] = {"runs": cells, "steps": steps, "tokens_per_run": steps * step_tokens, "wall_s": wall,
                               "finished": finished, "tokens_trained": tokens, "per_gpu": per_gpu}
        (args.out / "plan.json").write_text(json.dumps(plan, indent=1))
    log("done", sink)


if __name__ == "__main__":
    main()
