"""Regret against an oracle: the loss each probe token would have had under each single expert.

For MoE layer l and expert e, layer l's router is swapped for one that sends every token to e (weight 1,
no capacity limit) and the probe batches are run again: L[t, e]. From that table and the token's loss
under the model's own routing (L_chosen):

    regret[t]  = L_chosen[t] - min_e L[t, e]      (negative when a top-k mixture beats every single expert)
    rank[t]    = 1 + #{e : L[t, e] < L[t, top1[t]]}  where top1 is the router's highest-weight expert
    MRR        = mean_t 1 / rank[t]                (1.0: the router always picks the best single expert)
    oracle[t]  = argmin_e L[t, e]                  (the `oracle` router replays it)

Exact per token where tokens do not interact after layer l (the MLP classifier: one token per example; the
last MoE layer of the LM). For an earlier LM layer every token of the sequence is forced at once, so L[t, e]
is the all-forced counterfactual, not the token-alone one. Other layers keep their own routers.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from routerlab.analysis.trace import token_losses
from routerlab.routers.oracle import forced


@dataclass
class LayerRegret:
    expert_loss: np.ndarray  # float64 [N, E]
    chosen_loss: np.ndarray  # float64 [N]
    top1: np.ndarray  # int64 [N], -1 when the token had no expert

    @property
    def best(self) -> np.ndarray:
        return self.expert_loss.argmin(1)

    @property
    def regret(self) -> np.ndarray:
        return self.chosen_loss - self.expert_loss.min(1)

    @property
    def rank(self) -> np.ndarray:
        """1-based rank of the router's top-1 expert among the single experts (ties count in its favour)."""
        has = self.top1 >= 0
        own = self.expert_loss[np.arange(len(self.top1)), np.where(has, self.top1, 0)]
        rank = 1 + (self.expert_loss < own[:, None]).sum(1)
        return np.where(has, rank, self.expert_loss.shape[1] + 1)

    def metrics(self) -> dict[str, float]:
        return {
            "regret": float(self.regret.mean()),
            "mrr": float((1.0 / self.rank).mean()),
            "top1_is_best": float((self.rank == 1).mean()),
            "oracle_loss": float(self.expert_loss.min(1).mean()),
            "chosen_loss": float(self.chosen_loss.mean()),
        }


@contextmanager
def swapped_router(layer, router):
    """Run a block with `router` in place of the layer's router and no capacity limit."""
    original, capacity = layer.router, layer.capacity_factor
    layer.router, layer.capacity_factor = router.to(layer.experts.w_in.device), None
    try:
        yield
    finally:
        layer.router, layer.capacity_factor = original, capacity


def _losses(model, batches) -> torch.Tensor:
    return torch.cat([token_losses(model, b) for b in batches])


@torch.no_grad()
def layer_regrets(trainer, batches) -> list[LayerRegret]:
    """The single-expert loss table and the chosen route's loss, for every MoE layer of the trainer's model."""
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        top1: list[list[torch.Tensor]] = [[] for _ in trainer.layers]
        chosen = []
        for batch in batches:
            chosen.append(token_losses(model, batch))
            for i, layer in enumerate(trainer.layers):
                top1[i].append(layer.top1.cpu())
        chosen_loss = torch.cat(chosen).numpy()
        out = []
        for i, layer in enumerate(trainer.layers):
            E = layer.num_experts
            table = torch.empty(len(chosen_loss), E, dtype=torch.float64)
            for e in range(E):
                with swapped_router(layer, forced(layer.router.d_model, E, e)):
                    table[:, e] = _losses(model, batches)
            out.append(LayerRegret(table.numpy(), chosen_loss, torch.cat(top1[i]).long().numpy()))
        return out
    finally:
        model.train(was_training)


def regret_metrics(regrets: list[LayerRegret]) -> dict[str, float]:
    """Per layer (`layer{i}/regret`, ...) and the mean over layers (`regret`, `mrr`, ...)."""
    out: dict[str, float] = {}
    per_layer = [r.metrics() for r in regrets]
    for name in per_layer[0] if per_layer else {}:
        out[name] = float(np.mean([m[name] for m in per_layer]))
        for i, m in enumerate(per_layer):
            out[f"layer{i}/{name}"] = m[name]
    return out


def probe_regret(trainer, probe: int = 1) -> dict[str, float]:
    """Mean over layers of regret, MRR and top1_is_best on the probe set (the ablation's columns)."""
    from routerlab.analysis.trace import probe_batches

    values = regret_metrics(layer_regrets(trainer, probe_batches(trainer, probe)))
    return {k: values[k] for k in ("regret", "mrr", "top1_is_best") if k in values}
