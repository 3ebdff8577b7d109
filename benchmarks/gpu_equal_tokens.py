"""MoE presets against their dense twin at equal tokens (no time cap), two seeds each: one GPU, one call.

    python benchmarks/gpu_equal_tokens.py --out results/gpu-equal --steps 400

Each row is one run of benchmarks/gpu_presets.py's `run_one` with the time cap lifted, so every run of a
seed sees the same batches and the same number of tokens; the paired difference of each MoE form from
the dense twin of its size is taken seed by seed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_presets import run_one, write_atomic  # noqa: E402

PRESETS = ["stdlib-25m-dense", "stdlib-25m-e8k2", "stdlib-25m-e64k6"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cache", default=os.environ.get("ROUTERLAB_CACHE", "/tmp/routerlab-cache"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "runs": []}
    for seed in args.seeds:
        for preset in PRESETS:
            row, info = run_one(f"{preset} s{seed}", preset, ["train.precision=bf16-mixed", f"seed={seed}"], args.steps, 1e9,
                                [f"task.cache_dir={args.cache}"])
            row["seed"] = seed
            result.setdefault("data", info)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            write_atomic(out / "gpu_equal_tokens.json", json.dumps(result, indent=1).encode())


if __name__ == "__main__":
    main()
