"""The experts an environment routes to: a routerlab MoE model trained by the one `Trainer`.

The env never runs its own model or loop. It builds a `Trainer` whose router is `env_assigned`
(expert = token id mod E) and passes the assignment it wants as the batch's token ids:
  - frozen pre-training: token id = cluster label, so expert e learns clusters e, e+E, ... (the oracle);
  - cotrain: token id = the policy's action, so experts learn from exactly what the policy sent them.
The loss of every expert on every token comes from one batched forward of the same model over E copies
of the tokens, copy e routed to expert e.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from routerlab.config import make_config
from routerlab.errors import ConfigError
from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router
from routerlab.tasks import Batch, build_task
from routerlab.tasks.base import ClassificationTask
from routerlab.train import Trainer


@register_router("env_assigned", RouterParams)
class EnvAssigned(Router):
    """Expert = token id mod E, weight 1: the assignment is decided outside the model (the RL env)."""

    needs_token_ids = True

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ConfigError("router 'env_assigned' needs token ids (the assignment); it is used by the RL environments")
        experts = (token_ids % self.num_experts).unsqueeze(1)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device))


class LabelAssigned(ClassificationTask):
    """A classification task whose batches carry the specialization label as token id (oracle routing)."""

    has_token_ids = True

    def __init__(self, task: ClassificationTask) -> None:
        self.inner = task
        for name in ("name", "kind", "label_name", "num_labels", "num_classes", "input_dim"):
            setattr(self, name, getattr(task, name))
        self.data = task.data

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        b = super().batch(split, batch_size, generator)
        return Batch(b.inputs, b.targets, b.labels, token_ids=b.labels)


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """What the experts are: the task, the model size and how (long) they are pre-trained."""

    task: dict
    num_experts: int = 4
    d_model: int = 16
    expert_hidden: int = 32
    pretrain_steps: int = 300
    batch_size: int = 128
    lr: float = 1e-2
    seed: int = 0

    def config(self, steps: int, lr_schedule: str = "cosine"):
        return make_config({
            "seed": self.seed,
            "task": self.task,
            "model": {"d_model": self.d_model, "n_layers": 1, "num_experts": self.num_experts,
                      "expert_hidden": self.expert_hidden, "capacity_factor": None, "backend": "loop"},
            "router": {"name": "env_assigned"},
            "train": {"steps": steps, "batch_size": self.batch_size, "lr": self.lr, "lr_schedule": lr_schedule,
                      "grad_clip": 1.0, "eval_every": max(steps, 1), "eval_batches": 1, "log_every": max(steps, 1)},
            "run": {"checkpoint": False},
        })


def make_trainer(spec: ExpertSpec, steps: int, lr_schedule: str = "cosine") -> Trainer:
    task = build_task(spec.task)
    if not isinstance(task, ClassificationTask):
        raise ConfigError(f"TokenRouting needs a classification task held in memory (clusters, digits); got {task.name!r}")
    return Trainer(spec.config(steps, lr_schedule), task=LabelAssigned(task), log=False)


def pretrain_frozen(spec: ExpertSpec, cache: str | Path | None = None) -> Trainer:
    """Experts trained on oracle routing (cluster label -> expert); loaded from `cache` when it exists."""
    trainer = make_trainer(spec, spec.pretrain_steps)
    if cache is not None and Path(cache).is_file():
        trainer.load(cache)
        return trainer
    while trainer.step < spec.pretrain_steps:
        trainer.train_step()
    if cache is not None:
        trainer.save(cache)
    return trainer


@torch.no_grad()
def expert_losses(trainer: Trainer, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(loss [N, E] of every expert on every token, router input [N, d]) in one batched forward."""
    model = trainer.model
    model.eval()
    num_experts = trainer.layers[0].experts.num_experts
    n = inputs.shape[0]
    captured = {}

    def capture(module, args, output) -> None:  # returns None: the routing is left as it is
        captured.setdefault("x", args[0][:n])

    hook = trainer.layers[0].router.register_forward_hook(capture)
    try:
        ids = torch.arange(num_experts).repeat_interleave(n)
        logits = model(inputs.repeat(num_experts, 1), ids)
    finally:
        hook.remove()
        model.train()
    loss = F.cross_entropy(logits.float(), targets.repeat(num_experts), reduction="none")
    return loss.view(num_experts, n).t().contiguous(), captured["x"].float()


def train_on_assignment(trainer: Trainer, inputs: Tensor, targets: Tensor, labels: Tensor, experts: Tensor) -> float:
    """One trainer step on these tokens, each sent to the expert the policy chose (cotrain mode)."""
    return trainer.train_step(Batch(inputs, targets, labels, token_ids=experts))
