"""What an ablation measures beyond `Trainer.evaluate`, through the trainer's public parts.

- `heldout`: loss (with its standard error over examples) and accuracy on a split the run never selected
  on (`test`), when the task has one.
- `routing_as_trained`: the routing metrics of the evaluation batches with the model in training mode,
  i.e. with the router's noise, jitter or balancing assignment on. A balance loss controls this routing;
  `Trainer.evaluate` reports the routing as the model infers (noise off). Both are reported. Measured
  after training ends (stateful routers keep per-step state that only the next training step reads).
"""
from __future__ import annotations

import math

import torch

from routerlab.moe.stats import routing_metrics

TEST_SEED = 4321  # the test batches are the same for every run of a task (the evaluation uses its own seed)
AS_TRAINED_SEED = 2468  # router noise of the as-trained measurement: the same draw for every run
BALANCE_KEYS = ("load_cv", "max_vio", "dropped_frac", "dead_experts", "usage_entropy", "switch_balance")


def has_split(task, split: str) -> bool:
    """Whether the task holds examples of `split` (tensor tasks: `data`; corpus tasks: token arrays)."""
    if split in getattr(task, "data", {}):
        return True
    tokens = getattr(task, "tokens", {})
    return split in tokens and len(tokens[split]) > getattr(task, "block_size", 0) + 1


@torch.no_grad()
def heldout(trainer, split: str = "test", batches: int | None = None) -> dict[str, float]:
    """{test_loss, test_loss_se, test_accuracy} on fixed batches of `split` (examples drawn with TEST_SEED)."""
    cfg = trainer.config.train
    generator = torch.Generator().manual_seed(TEST_SEED)
    rows, correct, count = [], 0, 0
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for _ in range(batches or cfg.eval_batches):
            batch = trainer.task.batch(split, cfg.batch_size, generator).to(trainer.device, trainer.dtype)
            token_loss, logits = trainer.token_losses(batch)
            rows.append(token_loss.reshape(batch.targets.shape[0], -1).mean(1).double().cpu())
            correct += int((logits.argmax(-1) == batch.targets.reshape(-1)).sum())
            count += batch.targets.numel()
    finally:
        trainer.model.train(was_training)
    per_row = torch.cat(rows)
    return {
        f"{split}_loss": float(per_row.mean()),  # rows are equally long, so this is the per-token mean
        f"{split}_loss_se": float(per_row.std() / math.sqrt(len(per_row))) if len(per_row) > 1 else float("nan"),
        f"{split}_accuracy": correct / count,
    }


@torch.no_grad()
def routing_as_trained(trainer) -> dict[str, float]:
    """Balance metrics (mean over MoE layers) of the evaluation batches routed in training mode.

    Keys are the evaluation's names with `_as_trained` appended. The global RNG is forked, so measuring
    never changes what training draws next."""
    if not trainer.layers:
        return {}
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    was_training = trainer.model.training
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(AS_TRAINED_SEED)
        trainer.model.train()
        stats = [None] * len(trainer.layers)
        try:
            for batch in trainer.eval_set:
                trainer.token_losses(batch.to(trainer.device, trainer.dtype))
                stats = [s if acc is None else acc.merge(s) for acc, s in zip(stats, (l.stats for l in trainer.layers))]
        finally:
            trainer.model.train(was_training)
    per_layer = [routing_metrics(s) for s in stats]
    return {f"{k}_as_trained": sum(m[k] for m in per_layer) / len(per_layer) for k in BALANCE_KEYS if k in per_layer[0]}
