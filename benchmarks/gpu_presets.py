"""Every configs/gpu preset, briefly, plus the precision comparison: one script, one GPU, a time budget.

    python benchmarks/gpu_presets.py --out results/gpu --budget 200        # one H200 (docs/results.md)
    python benchmarks/gpu_presets.py --out /tmp/x --smoke                  # CPU: a few steps of tiny copies

For each run: eval loss (mean and standard error over the evaluation batches) against the unigram entropy of
the val split, steady-state tokens/s, step time, peak memory, MFU, dead experts and load CV. The MoE forms
and their dense twin of a size run the same steps (equal tokens) unless a run hits its time cap, which the
table then says. Results go to <out>/gpu_presets.json after every run (atomic), so a cut-off run keeps what
finished.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routerlab.config import load_config  # noqa: E402
from routerlab.tasks.tokenizer import write_atomic  # noqa: E402
from routerlab.train import Trainer  # noqa: E402

# (label, preset, overrides, steps, time cap in seconds): the most important comparisons first
PLAN = [
    ("25m-dense bf16-mixed", "stdlib-25m-dense", ["train.precision=bf16-mixed"], 600, 30),
    ("25m-e8k2 bf16-mixed", "stdlib-25m-e8k2", ["train.precision=bf16-mixed"], 600, 30),
    ("25m-e64k6 bf16-mixed", "stdlib-25m-e64k6", ["train.precision=bf16-mixed"], 600, 35),
    ("25m-dense fp32 (tf32)", "stdlib-25m-dense", ["train.precision=fp32"], 600, 30),
    ("25m-dense bf16-pure", "stdlib-25m-dense", ["train.precision=bf16-pure"], 600, 30),
    ("25m-dense bf16-mixed seed 1", "stdlib-25m-dense", ["train.precision=bf16-mixed", "seed=1"], 600, 30),
    ("110m-dense bf16-mixed", "stdlib-110m-dense", ["train.precision=bf16-mixed"], 300, 35),
    ("110m-e8k2 bf16-mixed", "stdlib-110m-e8k2", ["train.precision=bf16-mixed"], 300, 40),
    ("110m-e64k6 bf16-mixed", "stdlib-110m-e64k6", ["train.precision=bf16-mixed"], 300, 45),
]
SMOKE = ["model.d_model=32", "model.n_heads=2", "model.n_layers=2", "task.block_size=32", "train.batch_size=4", "train.device=cpu",
         "task.include=[json/*, email/mime/*, textwrap.py, bisect.py]", "task.val_frac=0.3"]


def run_one(label, preset, overrides, steps, cap, common):
    cfg = load_config(ROOT / "configs" / "gpu" / f"{preset}.yaml", overrides + common + [
        f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={steps}", "run.checkpoint=false",
        "train.compile=off"])  # eager: compile time would eat the short runs' time caps (speed's bench measures compile)
    trainer = Trainer(cfg, log=False)
    start = time.perf_counter()
    while trainer.step < steps and time.perf_counter() - start < cap:
        trainer.train_step()
    train_wall = time.perf_counter() - start
    metrics = trainer.evaluate()
    with torch.no_grad():  # the evaluation's own standard error, over its batches
        trainer.model.eval()
        per_batch = [float(trainer.task_loss(b.to(trainer.device, trainer.dtype))[0]) for b in trainer.eval_set]
    mean = sum(per_batch) / len(per_batch)
    se = math.sqrt(sum((x - mean) ** 2 for x in per_batch) / (len(per_batch) - 1) / len(per_batch)) if len(per_batch) > 1 else float("nan")
    info = trainer.data_info
    row = {
        "label": label, "preset": preset, "overrides": overrides, "steps": trainer.step, "planned_steps": steps,
        "capped": trainer.step < steps, "tokens": sum(n for _, n in trainer.step_log), "train_wall_s": round(train_wall, 1),
        "eval_loss": metrics["loss"], "eval_loss_se": se, "unigram_entropy_val": info.get("unigram_entropy_val"),
        "train_loss": float(sum(trainer.losses[-20:]) / len(trainer.losses[-20:])),
        "params_active": metrics.get("params_active"), "params_total": metrics.get("params_total"),
        "flops_per_token": trainer.flops_per_token(), "peak_flops_source": trainer.peak_flops()[1],
        **{k: metrics.get(k) for k in ("tokens_per_s", "step_time_ms", "peak_mem_gb", "mfu", "dead_experts", "load_cv", "max_vio")},
    }
    trainer.close()
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=200.0, help="seconds: no new run starts after this")
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU, 3 steps each (checks the script)")
    ap.add_argument("--cache", default=os.environ.get("ROUTERLAB_CACHE", "/tmp/routerlab-cache"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"task.cache_dir={args.cache}"] + (SMOKE if args.smoke else [])
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "python": sys.version.split()[0],
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "runs": [],
    }
    t0 = time.perf_counter()
    for label, preset, overrides, steps, cap in PLAN:
        if time.perf_counter() - t0 > args.budget:
            result["runs"].append({"label": label, "skipped": "time budget"})
            continue
        if args.smoke:
            steps, cap = 3, 60
        try:
            row, info = run_one(label, preset, overrides, steps, cap, common)
            result.setdefault("data", info)
        except Exception as err:  # one failed run must not cost the others
            row = {"label": label, "error": f"{type(err).__name__}: {err}"[:500]}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        result["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_atomic(out / "gpu_presets.json", json.dumps(result, indent=1).encode())
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
