"""Which routers train the same under train.cuda_graph as eagerly: one GPU, the 25M preset's model, a few steps each.

    python benchmarks/graph_routers.py [--steps 24] [--json FILE] [--only switch,gshard_top2]

For each router below (as the GPU grids of configs/ablations/gpu/*_25m.yaml set it up; one that no grid has, with its
defaults), the same seed trains `steps` steps with train.cuda_graph on and off; a router passes when the graphed run
was captured and replayed (no host sync found, no failed capture) and its evaluation loss matches the eager one within
TOLERANCE (bf16-mixed: the graph replays the same kernels, but noisy gates, random routing and sampled routers draw
their noise from the captured generator offsets). Exit 1 if any router fails: the scripts that run the grids check
this first.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

PRESET = "configs/gpu/stdlib-25m-e8k2.yaml"
ROUTERS = {  # label -> overrides of the preset
    "noisy_topk E16 w=0.01": ["router={name: noisy_topk, k: 2, w_importance: 0.01, w_load: 0.01}", "model.num_experts=16"],
    "sinkhorn": ["router={name: sinkhorn}"],
    "hash_balanced": ["router={name: hash_balanced}"],
    "hash_position": ["router={name: hash_position, seq_len: 512}"],
    "switch": ["router={name: switch}"],
    "gshard_top2": ["router={name: gshard_top2}"],
    "bias_balanced": ["router={name: bias_balanced}"],
    "adversarial": ["router={name: adversarial}"],
    "adversarial_critic": ["router={name: adversarial_critic}"],
    "quantile_balanced": ["router={name: quantile_balanced}"],
    "graph": ["router={name: graph}"],
    "hierarchical": ["router={name: hierarchical}"],
    "sparsemax": ["router={name: sparsemax}"],
    "entmax15": ["router={name: entmax15}"],
    "top_p": ["router={name: top_p}"],
    "reinforce": ["router={name: reinforce}"],
    "random": ["router={name: random}"],
    "hash_bigram": ["router={name: hash_bigram, seq_len: 512}"],
    "lsh": ["router={name: lsh}"],
}
TOLERANCE = 0.02  # nats of evaluation loss


def run(overrides: list[str], graphed: bool, steps: int, task) -> dict:
    from routerlab.config import load_config
    from routerlab.train import Trainer

    config = load_config(PRESET, overrides + [f"train.steps={steps}", f"train.eval_every={steps}", "train.eval_batches=4",
                                              "train.warmup_steps=4", f"train.cuda_graph={str(graphed).lower()}", "run.checkpoint=false"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(config, task=task, log=False)
        metrics = trainer.fit()
    graph = trainer.step_graph
    replayed = graph is not None and graph.graph is not None and graph.off is None
    notes = [str(w.message).splitlines()[0][:200] for w in caught if "cuda_graph" in str(w.message)]
    result = {"loss": metrics["loss"], "tokens_per_s": trainer.tokens_per_s, "replayed": replayed,
              "why_not": trainer.cuda_graph_off or (graph.off if graph else None), "warnings": notes}
    trainer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default="", help="labels to run, comma-separated (default: all)")
    args = parser.parse_args()
    chosen = [label for label in args.only.split(",") if label]
    unknown = sorted(set(chosen) - set(ROUTERS))
    if unknown:
        parser.error(f"unknown router label(s) {', '.join(unknown)}; valid: {', '.join(ROUTERS)}")
    from routerlab.tasks import build_task

    task = build_task({"name": "stdlib", "block_size": 512})
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}: {PRESET}, {args.steps} steps, graphed vs eager")
    print("| router | graphed: replayed | eval loss graphed | eval loss eager | diff | tokens/s graphed | tokens/s eager | pass |")
    print("|---|---|--:|--:|--:|--:|--:|---|")
    report, failed = {}, []
    for label, overrides in ROUTERS.items():
        if chosen and label not in chosen:
            continue
        on, off = run(overrides, True, args.steps, task), run(overrides, False, args.steps, task)
        ok = on["replayed"] and abs(on["loss"] - off["loss"]) <= TOLERANCE
        failed += [] if ok else [label]
        report[label] = {"graphed": on, "eager": off, "pass": ok}
        print(f"| {label} | {on['replayed']} {on['why_not'] or ''} | {on['loss']:.4f} | {off['loss']:.4f} | {on['loss'] - off['loss']:+.4f} "
              f"| {on['tokens_per_s']:,.0f} | {off['tokens_per_s']:,.0f} | {'yes' if ok else 'NO'} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
