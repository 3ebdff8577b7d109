"""Issue 19 v8 probes on the E=64, k=6 preset (bf16-pure, graphed, statistics logged every 10 steps), one GPU.

    python3 benchmarks/step_overlap.py [--steps 30] [--no-overlap] [--json FILE]

Part 1, a logged step's anatomy: for each step, the wall time of `train_step`, the step proper (the trainer's own
timer: launch to the end-of-step sync) and the host time of writing a logged step's metrics (`_write_log`: the
metrics and TensorBoard writes; inside the next step since v8, after the step in v7, while the GPU had nothing queued). Part 2, an upper bound for hiding the optimizer under the
model's kernels: the captured forward + backward replayed alone, the optimizer step alone (grad norm + AdamW, as
the trainer runs it), the two one after the other, and the optimizer on a second stream while the graph replays.
The concurrent form reads weights while they are written (a timing probe only: its numbers are not a training
step); if it does not beat the serial form by a margin, no schedule that overlaps them can.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from routerlab.bench.core import time_cuda
from routerlab.bench.trainer import lm_config


def anatomy(trainer, steps: int) -> dict:
    spent = [0.0]  # ms of log writing inside the current train_step call
    name = "_write_log" if hasattr(trainer, "_write_log") else "_log_train"  # v7 trees: _log_train after the step
    inner = getattr(trainer, name)

    def timed(arg):
        t0 = time.perf_counter()
        inner(arg)
        spent[0] += (time.perf_counter() - t0) * 1e3

    setattr(trainer, name, timed)
    rows = []
    for _ in range(steps):
        spent[0] = 0.0
        t0 = time.perf_counter()
        trainer.train_step()
        wall = (time.perf_counter() - t0) * 1e3
        rows.append({"step": trainer.step, "wall ms": round(wall, 2), "step proper ms": round(trainer.step_log[-1][0] * 1e3, 2),
                     "log write ms": round(spent[0], 2)})
    delattr(trainer, name)
    return {"rows": rows}


def overlap(trainer, iters: int) -> dict:
    graph = trainer.step_graph.graph
    assert graph is not None, "the step is not graphed"
    optimizer, params = trainer.optimizer, trainer.step_graph.params
    grads = trainer.step_graph.grads
    optimizer.found_inf = torch.zeros((), device=trainer.device)

    def opt():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        optimizer.grad_scale = ((norm.float() + 1e-6) / 1.0).clamp_min(1.0)
        optimizer.step()

    def serial():
        graph.replay()
        opt()

    side = torch.cuda.Stream()

    def concurrent():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            opt()
        graph.replay()
        main.wait_stream(side)

    for p, g in zip(params, grads):
        p.grad = g
    out = {name: time_cuda(fn, iters) for name, fn in [("replay (fwd + bwd) ms", graph.replay), ("optimizer (norm + AdamW) ms", opt),
                                                        ("serial ms", serial), ("concurrent ms", concurrent)]}
    out["hidden ms (serial - concurrent)"] = out["serial ms"] - out["concurrent ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-overlap", action="store_true", help="part 1 only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from routerlab.train import Trainer

    run_dir = tempfile.mkdtemp(prefix="routerlab-overlap-")
    trainer = Trainer(lm_config("moe", "off", run_dir), log=True, run_dir=os.path.join(run_dir, "moe"))
    report = {"CUDA_MODULE_LOADING": os.environ.get("CUDA_MODULE_LOADING", "(default)"),
              "anatomy": anatomy(trainer, args.steps)}
    for r in report["anatomy"]["rows"]:
        print(json.dumps(r))
    rows = report["anatomy"]["rows"][12:]
    every = trainer.config.train.log_every
    for kind, pick in [("logged", lambda r: r["step"] % every == 0), ("after a logged step", lambda r: r["step"] % every == 1),
                       ("others", lambda r: r["step"] % every > 1)]:
        sel = [r for r in rows if pick(r)]
        if sel:
            print(f"# steps 13+ {kind}: {len(sel)}; median wall {statistics.median(r['wall ms'] for r in sel):.2f} ms, step proper "
                  f"{statistics.median(r['step proper ms'] for r in sel):.2f}, log write {statistics.median(r['log write ms'] for r in sel):.2f}")
    if not args.no_overlap:
        report["overlap"] = overlap(trainer, args.iters)
        print("# " + json.dumps({k: round(v, 3) for k, v in report["overlap"].items()}))
    trainer.close()
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            json.dump(report, fh, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
