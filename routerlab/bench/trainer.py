"""Issue 19's trainer comparison on one GPU: an E=64, k=6 MoE LM against its dense twin, and where a step goes.

    python3 -m routerlab.bench.trainer [--steps 20] [--compile off,auto] [--cuda-graph on,off] [--optimizer-kernel triton,torch] [--kernels] [--mixed] [--json FILE]

Models: the presets configs/gpu/stdlib-110m-e64k6.yaml and its dense twin stdlib-110m-dense.yaml (d_model
1024, 8 layers, 16 heads, block 512, batch 32, SwiGLU; MoE: 64 experts of hidden 512, softmax_topk k=6, ~110M
active parameters of ~840M; dense: a SwiGLU FFN of hidden k*h = 3072 in every layer: the same active
parameters, the same attention), in bf16-pure (bf16 weights and optimizer state) unless --fp32; --mixed adds both in
the presets' own bf16-mixed (float32 weights, bf16 autocast). Routing statistics are logged every 10 steps to a
TensorBoard run under /tmp.
Steady-state tokens/s: `steps` train steps after `warmup` (compilation happens there), host clock around
them with the device synchronized at both ends.

The profile table times each part of the MoE model's step alone with CUDA events on the trainer's own
modules and batch shapes (x the number of layers): attention (norm + attention, fwd+bwd), dense rest
(embeddings, final norm, head, loss), router, dispatch (plan + permute), experts, combine, statistics, the
optimizer (grad clip + AdamW); host gaps = the measured step minus their sum (launch gaps, syncs, the batch).
Timed alone, launch-bound parts read as their host time, so the sum can exceed the step. --kernels adds, per run, the
GPU's own view (torch.profiler over 3 steps): kernel time by part of the step (KERNEL_PARTS, by kernel name), the
GPU's idle time (wall - union of kernel intervals), launches per step, and where the step's host syncs are.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from routerlab.bench import core


PRESETS = {"moe": "configs/gpu/stdlib-110m-e64k6.yaml", "dense": "configs/gpu/stdlib-110m-dense.yaml"}


def lm_config(kind: str, compile_mode: str, run_dir: str, dtype: str = "bfloat16", tf32: bool = True, smoke: bool = False, cuda_graph: bool = True,
              optimizer_kernel: str | None = None, log_every: int = 10):
    """The preset (configs/gpu/, run from the repository root) with this run's device, dtype, compile and TF32;
    routing statistics logged every `log_every` steps (10, stricter than the presets' 50, unless asked); no evaluation or
    checkpoint inside the timed steps."""
    from routerlab.config import load_config

    precision = {"bfloat16": "bf16-pure", "float32": "fp32", "bf16-mixed": "bf16-mixed"}[dtype]  # bfloat16, float32: the old train.dtype meanings
    overrides = [f"train.precision={precision}", f"train.compile={compile_mode}", f"train.tf32={str(tf32).lower()}", f"train.log_every={log_every}", f"train.cuda_graph={str(cuda_graph).lower()}",
                 "train.eval_every=1000000", "train.eval_batches=1", "train.steps=1000000", f"run.dir={run_dir}", "run.checkpoint=false"]
    if optimizer_kernel:  # None: the config's default (a trainer from before the switch has no such key)
        overrides.append(f"train.optimizer_kernel={optimizer_kernel}")
    if smoke:
        overrides += ["train.device=cpu", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "task.block_size=16", "train.batch_size=4"]
        overrides += ["model.num_experts=8", "model.expert_hidden=16", "router.k=2"] if kind == "moe" else ["model.dense_hidden=32"]
    return load_config(PRESETS[kind], overrides)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steady_tokens_per_s(trainer, warmup: int, steps: int) -> tuple[float, float, float, dict[str, float]]:
    """(tokens/s, ms per step, first-steps seconds, step times) over `steps` steps after `warmup` steps. Step times:
    the median step and the mean step that logged (the trainer ends each step synchronized, so each call's wall
    time is its step's, logging included), and the pauses of Python's garbage collector per step. The warm-up lasts
    at least until the first logged step: that one pays one-off costs (CUDA loads each kernel on its first launch, and
    some of the statistics' kernels run nowhere else), which are not the steady state."""
    t0 = time.perf_counter()
    warm = []
    for _ in range(max(warmup, trainer.config.train.log_every - trainer.step)):
        t1 = time.perf_counter()
        trainer.train_step()
        warm.append(round((time.perf_counter() - t1) * 1e3, 1))
    _sync()
    first = time.perf_counter() - t0
    times, logged, pauses = [], [], {}
    t0 = time.perf_counter()
    with gc_pauses(pauses):
        for _ in range(steps):
            t1 = time.perf_counter()
            trainer.train_step()
            times.append((time.perf_counter() - t1) * 1e3)
            logged.append(trainer.step % trainer.config.train.log_every == 0)
        _sync()
    seconds = time.perf_counter() - t0
    t = trainer.config.train
    tokens = steps * t.batch_size * t.micro_batches * trainer.task.block_size  # a step's global batch
    log_steps = [ms for ms, log in zip(times, logged) if log]
    split = {"median step ms": sorted(times)[len(times) // 2], "logged step ms (mean)": sum(log_steps) / len(log_steps) if log_steps else math.nan,
             "GC ms/step": {k: v * 1e3 / steps for k, v in sorted(pauses.items())},
             "warm-up step ms": warm, "step ms": [round(ms, 1) for ms in times], "logged": [i for i, log in enumerate(logged) if log]}
    return tokens / seconds, seconds / steps * 1e3, first, split


def _time_host(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def profile_step(trainer, iters: int = 5) -> dict[str, float]:
    """Milliseconds per step of each part of the (eager) MoE model, each timed alone (module docstring)."""
    from routerlab.bench.core import stage_breakdown

    model, cfg = trainer.model, trainer.config
    batch = trainer.task.batch("train", cfg.train.batch_size, torch.Generator().manual_seed(0)).to(trainer.device, trainer.dtype)
    B, L = batch.inputs.shape
    d, n = cfg.model.d_model, cfg.model.n_layers
    x = torch.randn(B, L, d, device=trainer.device, dtype=trainer.dtype, requires_grad=True)
    g = torch.randn_like(x)
    block = model.blocks[0]
    attn_params = [*block.norm1.parameters(), *block.attn.parameters()]
    time_cuda = core.time_cuda
    res = {"attention": n * time_cuda(lambda: torch.autograd.grad(block.attn(block.norm1(x)), [x, *attn_params], g), iters)}

    def rest():
        positions = torch.arange(L, device=x.device)
        h = model.tok(batch.inputs) + model.pos(positions)
        logits = model.head(model.norm_out(h + x))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.targets.reshape(-1))
        torch.autograd.grad(loss, [x, *model.tok.parameters(), *model.head.parameters()])

    res["dense rest (embed, head, loss)"] = time_cuda(rest, iters)
    layer = block.ffn
    tokens = block.norm2(x).detach().reshape(-1, d).requires_grad_(True)
    stages = stage_breakdown(layer, tokens, torch.randn_like(tokens), iters)
    res["router"] = n * stages["router fwd+bwd"]
    res["dispatch (plan + permute)"] = n * (stages["plan (sort) fwd"] + stages["permute fwd+bwd"])
    res["experts"] = n * stages["experts fwd+bwd"]
    res["combine"] = n * stages["combine fwd+bwd"]
    layer(tokens)
    res["statistics"] = n * time_cuda(lambda: (setattr(layer, "_stats", None), layer.stats), iters)

    def optimizer():
        trainer.parallel.clip_grad_norm_(model, cfg.train.grad_clip)
        trainer.optimizer.step()

    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    res["optimizer (clip + AdamW)"] = time_cuda(optimizer, iters)
    trainer.optimizer.zero_grad(set_to_none=True)
    return res


# kernel name patterns -> the part of the step they belong to (first match wins; names seen on the H200, torch 2.11)
KERNEL_PARTS = [
    ("attention (SDPA)", ("sdpa", "flash", "cudnn")),
    ("experts (grouped GEMM, SwiGLU)", ("GemmUniversal", "enable_3x_kernel_for_sm9x", "_fwd", "_bwd")),
    ("dispatch + combine (sort, permute, combine)", ("radix_sort", "RadixSort", "_plan_", "_gather_rows", "_gather_reduce", "_combine_grads", "searchsorted")),
    ("router (fp32 gate, top-k, softmax, losses)", ("f32f32", "sgemm", "TopK", "bitonicSort", "indexFunc", "softmax_warp", "_topk_softmax", "_router_losses", "_gate_", "_split_hi_lo")),
    ("optimizer (grad norm, AdamW)", ("multi_tensor_apply", "_adamw", "_grad_sq_sums")),
    ("dense GEMMs (projections, head; the twin's FFN)", ("nvjet", "gemm", "splitKreduce")),
    ("norms", ("layer_norm", "GammaBeta")),
    ("routing statistics (logged steps)", ("_stats_partials", "_stats_finish")),
]


def kernel_part(name: str) -> str:
    for part, patterns in KERNEL_PARTS:
        if any(p in name for p in patterns):
            return part
    return "other (elementwise, copies, casts, reductions)"


def kernel_profile(trainer, steps: int = 3, top: int = 40) -> dict:
    """torch.profiler over `steps` train steps: wall, GPU kernel time (sum and union), idle, kernel launches, the
    `top` kernels by time (ms per step) and the host syncs of one more step (CUDA sync debug mode, by source line)."""
    from collections import Counter

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from routerlab.step_graph import catching_syncs

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        _sync()
        wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
               and "#" not in e.name and not e.name.startswith("ProfilerStep")]  # kernels, not the GPU-side annotation ranges
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, gaps = union(spans)  # us
    stalls = [(a, b) for a, b in gaps if b - a >= STALL_US]
    by_name, by_part = Counter(), Counter()
    for e in kernels:
        by_name[e.name[:110]] += e.time_range.end - e.time_range.start
        by_part[kernel_part(e.name)] += e.time_range.end - e.time_range.start
    out = {"wall ms/step": wall, "kernel ms/step (sum)": sum(b - a for a, b in spans) / 1e3 / steps,
           "kernel ms/step (union)": busy / 1e3 / steps, "launches/step": len(kernels) / steps,
           "parts ms/step": {n: t / 1e3 / steps for n, t in by_part.most_common()},
           "top kernels ms/step": {n: t / 1e3 / steps for n, t in by_name.most_common(top)}}
    out["idle ms/step (wall - union)"] = wall - out["kernel ms/step (union)"]
    out["idle ms/step in gaps < 0.1 ms (launch gaps)"] = sum(b - a for a, b in gaps if b - a < STALL_US) / 1e3 / steps
    out["idle ms/step in gaps >= 0.1 ms (host stalls)"] = sum(b - a for a, b in stalls) / 1e3 / steps
    out["host stalls per step"] = len(stalls) / steps
    out["host during stalls ms/step (top-level CPU ops)"] = {n: t / 1e3 / steps for n, t in host_ops_during(events, stalls).most_common(top // 2)}
    _, syncs, _ = catching_syncs(trainer.train_step)
    out["host ms/step by part (5 more steps)"] = host_times(trainer)
    out["host syncs in one step (where)"] = dict(Counter(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in syncs))
    return out


@contextlib.contextmanager
def gc_pauses(seconds: dict):
    """Adds the seconds of each pause of Python's cyclic garbage collector inside the block to
    seconds["Python GC, generation N"] (a pause stops the host wherever an allocation triggers it)."""
    started = []

    def collection(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            key = f"Python GC, generation {info['generation']}"
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started.pop()

    gc.callbacks.append(collection)
    try:
        yield seconds
    finally:
        gc.callbacks.remove(collection)


def host_times(trainer, steps: int = 5) -> dict[str, float]:
    """Host milliseconds per step spent inside each part of the step (wrapped for `steps` steps, then restored), and
    the host time from the return of the step's host read to the next step's forward (graph replay or eager): the
    stretch in which the GPU has nothing queued; and the pauses of Python's garbage collector, by generation. Parts a
    trainer lacks are left out (this runs on older trees too)."""
    from collections import Counter

    from routerlab.tasks import base

    graph = getattr(trainer, "step_graph", None)
    targets = [("train_step (all)", trainer, "train_step"), ("host read (waits for the GPU)", trainer.parallel, "reduce_step"),
               ("next_batch (draw)", trainer, "next_batch"), ("Batch.to", base.Batch, "to"), ("model.train()", trainer.model, "train"),
               ("optimizer.zero_grad", trainer.optimizer, "zero_grad"), ("optimizer.step", trainer.optimizer, "step"),
               ("scheduler.step", trainer.scheduler, "step"), ("_log_train", trainer, "_log_train"),
               ("prefetch.draw", getattr(trainer, "prefetch", None), "draw"), ("prefetch.take", getattr(trainer, "prefetch", None), "take"),
               ("graph forward_backward (replay)", graph, "forward_backward"), ("eager forward_backward", trainer, "forward_backward")]
    spent, marks, saved = Counter(), {"read_end": None, "gaps": []}, []

    def wrap(name, fn):
        def timed(*args, **kwargs):
            if "forward_backward" in name and marks["read_end"] is not None:
                marks["gaps"].append(time.perf_counter() - marks["read_end"])
                marks["read_end"] = None
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
                if name.startswith("host read"):
                    marks["read_end"] = time.perf_counter()
        return timed

    for name, obj, attr in targets:
        if obj is not None and hasattr(obj, attr):
            saved.append((obj, attr, vars(obj).get(attr)))  # an instance's own attribute, or None for the class's
            setattr(obj, attr, wrap(name, getattr(obj, attr)))
    try:
        with gc_pauses(spent):
            for _ in range(steps):
                trainer.train_step()
            _sync()
    finally:
        for obj, attr, own in reversed(saved):
            if own is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own)
    out = {name: ms * 1e3 / steps for name, ms in spent.items()}
    out["read -> next forward (GPU has nothing queued)"] = 1e3 * sum(marks["gaps"]) / max(1, len(marks["gaps"]))
    return out


STALL_US = 100.0  # a GPU idle gap this long is the host not keeping up (a launch gap is a few us)


def union(spans: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total length of the union of sorted intervals, and the gaps between them."""
    busy, end, gaps = 0.0, -math.inf, []
    for a, b in spans:
        if b > end:
            if a > end > -math.inf:
                gaps.append((end, a))
            busy += b - max(a, end)
            end = b
    return busy, gaps


def host_ops_during(events, stalls: list[tuple[float, float]]):
    """Time (us) each top-level host op (an aten op, an Optimizer.step range, a CUDA runtime call) overlaps the
    stalls, summed over threads; "(no torch op: Python)" is stall time during which none runs."""
    from collections import Counter

    from torch.autograd import DeviceType

    ops = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    by_op = Counter()
    for a, b in stalls:
        covered = []
        for start, end, name in ops:
            lo, hi = max(a, start), min(b, end)
            if hi > lo:
                by_op[name[:80]] += hi - lo
                covered.append((lo, hi))
        by_op["(no torch op: Python)"] += (b - a) - union(sorted(covered))[0]
    return by_op


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m routerlab.bench.trainer", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", default="off,auto", help="train.compile values to run, comma-separated ('none': no bf16 runs)")
    ap.add_argument("--cuda-graph", default="on", help="train.cuda_graph values to run, comma-separated (on, off)")
    ap.add_argument("--optimizer-kernel", default="", help="train.optimizer_kernel values to run, comma-separated (triton, torch; default: the config's)")
    ap.add_argument("--kernels", action="store_true", help="also a torch.profiler kernel table and the host syncs of each bf16 run")
    ap.add_argument("--fp32", action="store_true", help="also the MoE model in float32 (TF32 on, then off)")
    ap.add_argument("--mixed", action="store_true", help="also both models in the presets' own precision, bf16-mixed (float32 weights and optimizer)")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every of the runs (the presets log every 50)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (checks this script, times nothing real)")
    args = ap.parse_args(argv)
    from routerlab.train import Trainer

    if args.smoke:
        core.time_cuda = _time_host  # CPU stand-in for the smoke run
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": device, "torch": torch.__version__, "runs": [], "profile": {}}
    run_dir = tempfile.mkdtemp(prefix="routerlab-bench-")
    modes = [m for m in args.compile.split(",") if m and m != "none"]
    graphs = [{"on": True, "off": False}[g] for g in args.cuda_graph.split(",") if g]
    optimizers = [o for o in args.optimizer_kernel.split(",") if o] or [None]
    runs = [(kind, mode, "bfloat16", True, graph, opt) for opt in optimizers for graph in graphs for mode in modes for kind in ("moe", "dense")]
    if args.mixed:
        runs += [(kind, "off", "bf16-mixed", True, graphs[0], opt) for opt in optimizers for kind in ("moe", "dense")]
    if args.fp32:  # eager, so that only TF32 differs
        runs += [("moe", "off", "float32", True, False, optimizers[0]), ("moe", "off", "float32", False, False, optimizers[0])]
    for kind, mode, dtype, tf32, graph, opt in runs:
        try:
            config = lm_config(kind, mode, run_dir, dtype, tf32, args.smoke, graph, opt, args.log_every)
            trainer = Trainer(config, log=True, run_dir=os.path.join(run_dir, f"{kind}-{mode}-{dtype}-{tf32}-{graph}-{opt}"))
            tps, ms, first, split = steady_tokens_per_s(trainer, args.warmup, args.steps)
            row = {"model": kind, "compile": mode, "dtype": dtype, "tf32": tf32, "cuda_graph": graph, "optimizer_kernel": getattr(config.train, "optimizer_kernel", "torch"), "graphed": trainer.step_graph is not None and trainer.step_graph.graph is not None,
                   "graph_off": trainer.cuda_graph_off or (trainer.step_graph.off if trainer.step_graph else None),
                   "tokens_per_s": tps, "ms_per_step": ms, **split, "warmup_s": first, "compiled_modules": len(trainer.compiled),
                   "losses": [round(v, 5) for v in trainer.losses[:args.warmup + 3]], "loss": trainer.losses[-1]}
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
            if args.kernels and dtype == "bfloat16" and mode == "off" and not args.smoke:
                report.setdefault("kernels", {})[f"{kind} cuda_graph={graph} optimizer_kernel={opt}"] = kp = kernel_profile(trainer)
                print(json.dumps({f"kernels {kind} cuda_graph={graph} optimizer_kernel={opt}": kp}), flush=True)
            if kind == "moe" and mode == "off" and dtype == "bfloat16" and not graph and opt == optimizers[0]:
                report["profile"] = profile_step(trainer)
                report["profile"]["measured step"] = ms
                print(json.dumps({"profile_ms": {k: round(v, 3) for k, v in report["profile"].items()}}), flush=True)
            trainer.close()
            del trainer
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"{kind} compile={mode} {dtype}: {type(err).__name__}: {err}"[:600], flush=True)
    print(table(report))
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            json.dump(report, fh, indent=1)
        os.replace(args.json + ".tmp", args.json)


def table(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}", "| model | compile | dtype | cuda_graph | optimizer | tokens/s | ms/step | median step ms | logged step ms | Python GC ms/step | dense twin / this |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    key = lambda r: (r["compile"], r["dtype"], r.get("cuda_graph"), r.get("optimizer_kernel"))  # noqa: E731
    dense = {key(r): r["tokens_per_s"] for r in report["runs"] if r["model"] == "dense"}
    for r in report["runs"]:
        ratio = dense.get(key(r))
        graph = ("on" if r.get("graphed") else f"off ({r.get('graph_off')})") if r.get("cuda_graph") else "off"
        cell = f"{ratio / r['tokens_per_s']:.2f}x" if ratio else "-"
        lines.append(f"| {r['model']} | {r['compile']} | {r['dtype']}{'' if r['tf32'] else ' (no TF32)'} | {graph} | {r.get('optimizer_kernel', 'torch')} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r.get('median step ms', math.nan):.1f} | {r.get('logged step ms (mean)', math.nan):.1f} | {sum(r.get('GC ms/step', {}).values()):.2f} | {cell} |")
    for run, kp in report.get("kernels", {}).items():
        lines += ["", f"| {run}: GPU kernel time per step (torch.profiler, {kp['launches/step']:.0f} launches) | ms |", "|---|---:|"]
        lines += [f"| {part} | {ms:.2f} |" for part, ms in kp["parts ms/step"].items()]
        lines += [f"| all kernels (union) | {kp['kernel ms/step (union)']:.2f} |", f"| host gaps (GPU idle: wall - union) | {kp['idle ms/step (wall - union)']:.2f} |"]
        if "host stalls per step" in kp:
            lines += [f"| of which gaps < 0.1 ms (launch gaps) | {kp['idle ms/step in gaps < 0.1 ms (launch gaps)']:.2f} |",
                      f"| of which gaps >= 0.1 ms ({kp['host stalls per step']:.1f} host stalls) | {kp['idle ms/step in gaps >= 0.1 ms (host stalls)']:.2f} |"]
            lines += [f"| host during stalls: {name} | {ms:.2f} |" for name, ms in kp["host during stalls ms/step (top-level CPU ops)"].items()]
        lines += [f"| wall (profiled) | {kp['wall ms/step']:.2f} |", f"| host syncs in a step | {kp['host syncs in one step (where)']} |"]
        lines += [f"| host inside {name} | {ms:.2f} |" for name, ms in kp.get("host ms/step by part (5 more steps)", {}).items()]
    if report["profile"]:
        prof = dict(report["profile"])
        step = prof.pop("measured step")
        lines += ["", "| part of the MoE step (eager, each timed alone) | ms | share |", "|---|---:|---:|"]
        for name, ms in prof.items():
            lines.append(f"| {name} | {ms:.2f} | {ms / step:.0%} |")
        gaps = step - sum(prof.values())
        lines.append(f"| host gaps (step - sum) | {gaps:.2f} | {gaps / step:.0%} |")
        lines.append(f"| measured step | {step:.2f} | 100% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
