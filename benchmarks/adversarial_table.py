"""Extra columns for the issue-4 comparison, from the ablation's per-run files (results/adversarial/cells/).

max/mean load, and the share of evaluation tokens a capacity factor of 1.25 would drop: the runs are dropless
(collapse needs it: dropping itself pushes the router off full experts), so `dropped` is 0 by construction.
Eval loads are summed over the evaluation batches; the capacity is scaled the same way (a lower bound of the
per-batch drops).  Usage: python benchmarks/adversarial_table.py [results/adversarial]
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "results/adversarial")
rows = defaultdict(list)
for path in sorted((folder / "cells").glob("*.json")):
    cell = json.loads(path.read_text())
    load = np.asarray(cell["loads"][0])
    capacity = 1.25 * load.sum() / load.size
    rows[cell["labels"]["router"]].append((load.max() / load.mean(), np.maximum(load - capacity, 0).sum() / load.sum(), cell["cpu_s"]))
print("| router | max/mean load | would drop at capacity 1.25 | CPU s per run |")
print("|---|--:|--:|--:|")
for router, values in rows.items():
    v = np.asarray(values)
    print(f"| {router} | {v[:, 0].mean():.2f} ± {v[:, 0].std(ddof=1):.2f} | {v[:, 1].mean():.3f} ± {v[:, 1].std(ddof=1):.3f} | {v[:, 2].mean():.0f} |")
