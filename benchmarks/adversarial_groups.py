"""Imbalance inside groups that averages out over the batch: per-sequence vs whole-batch expert load on `chars`.

Trains each router (top-1, defaults; 2 layers, 8 experts, dropless) with the one Trainer, then routes the fixed evaluation batches and measures, per MoE layer,
max/mean expert load over the whole evaluation (what `adversarial`'s prices see) and the same ratio inside each
64-character sequence, averaged over sequences (what `adversarial_critic` with group_size=64 sees).
Usage: OMP_NUM_THREADS=1 python benchmarks/adversarial_groups.py [steps] [seeds...]
"""
import sys

import torch

from routerlab.config import make_config
from routerlab.train import Trainer

ROUTERS = {
    "none": {"name": "softmax_topk", "k": 1},
    "switch_aux": {"name": "switch"},
    "bias_balanced": {"name": "bias_balanced", "k": 1},
    "adversarial": {"name": "adversarial", "k": 1},
    "adversarial_critic": {"name": "adversarial_critic", "k": 1, "group_size": 64},
}


@torch.no_grad()
def group_imbalance(trainer: Trainer) -> tuple[float, float]:
    """(max/mean load over all evaluation tokens, mean over sequences of max/mean load), averaged over layers."""
    trainer.model.eval()
    batch_ratio, seq_ratio = [], []
    counts = [0] * len(trainer.layers)
    per_seq: list[list[torch.Tensor]] = [[] for _ in trainer.layers]
    for batch in trainer.eval_set:
        trainer.model(batch.inputs, batch.token_ids)
        for i, layer in enumerate(trainer.layers):
            E = layer.router.num_experts
            top1 = layer.top1.view(batch.inputs.shape[0], -1)  # [B, L]: one row per sequence
            c = torch.nn.functional.one_hot(top1.clamp_min(0), E).sum(1).float()  # [B, E]
            per_seq[i].append(c)
            counts[i] = counts[i] + c.sum(0)
    for i in range(len(trainer.layers)):
        batch_ratio.append(float(counts[i].max() / counts[i].mean()))
        seqs = torch.cat(per_seq[i])
        seq_ratio.append(float((seqs.max(1).values / seqs.mean(1)).mean()))
    return sum(batch_ratio) / len(batch_ratio), sum(seq_ratio) / len(seq_ratio)


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seeds = [int(s) for s in sys.argv[2:]] or [0]
    print("| router | seed | eval loss | batch max/mean | per-sequence max/mean |")
    print("|---|--:|--:|--:|--:|")
    for name, router in ROUTERS.items():
        for seed in seeds:
            config = make_config({
                "seed": seed, "task": {"name": "chars", "block_size": 64}, "router": router,
                "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 8, "expert_hidden": 32},
                "train": {"steps": steps, "batch_size": 16, "lr": 3e-3, "eval_every": steps, "eval_batches": 4},
                "run": {"checkpoint": False},
            })
            trainer = Trainer(config, log=False)
            metrics = trainer.fit()
            whole, within = group_imbalance(trainer)
            print(f"| {name} | {seed} | {metrics['loss']:.3f} | {whole:.2f} | {within:.2f} |", flush=True)


if __name__ == "__main__":
    main()
