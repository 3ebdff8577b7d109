"""`reinforce`: RL-R of Clark et al. 2022, a policy-gradient router trained jointly with the model.

In training each token's expert is sampled, e_t ~ pi(. | x_t) = softmax(W x_t); in evaluation the argmax.
The expert output enters with weight 1 (no gradient through the choice). After the forward the trainer
hands the router the detached per-token task loss l_t (`Router.observe_token_loss`), and the router
returns the surrogate whose gradient is the REINFORCE estimator:

    r_t = -l_t - balance * (E * f_{e_t} - 1)         f_e = fraction of the batch's tokens sent to e
    b   = bias-corrected EMA (decay baseline_decay) of the batch-mean reward of *previous* steps
          (the batch mean itself on the first step)
    L   = -pg_coef * mean_t (r_t - b) * log pi(e_t | x_t)  -  entropy * mean_t H(pi(. | x_t))
    grad L = -pg_coef * mean_t (r_t - b) grad log pi(e_t | x_t) - entropy * grad mean_t H(pi(. | x_t))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require


@dataclass(frozen=True)
class ReinforceParams(RouterParams):
    pg_coef: float = 1.0  # scale of the policy-gradient surrogate
    baseline_decay: float = 0.99  # EMA decay of the reward baseline
    entropy: float = 0.01  # entropy bonus coefficient (exploration)
    balance: float = 0.0  # weight of the balance reward -(E * f_e - 1)

    def __post_init__(self) -> None:
        require(self.pg_coef > 0, f"pg_coef must be > 0, got {self.pg_coef}")
        require(0 <= self.baseline_decay < 1, f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        require(self.entropy >= 0 and self.balance >= 0, f"entropy and balance must be >= 0, got {self.entropy}, {self.balance}")


@register_router("reinforce", ReinforceParams)
class Reinforce(Router):
    """Samples one expert from softmax(W x); trained by REINFORCE on -per-token loss (RL-R)."""

    # _chosen is set by the forward and taken by observe_token_loss within the same captured step; the baseline and
    # its step count are buffers updated in place; the sample draws on the device (multinomial's one-sample path)
    cuda_graph_safe = True

    def __init__(self, d_model: int, num_experts: int, params: ReinforceParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.register_buffer("baseline", torch.zeros(()))  # EMA of the batch-mean reward (not bias-corrected)
        self.register_buffer("baseline_steps", torch.zeros((), dtype=torch.long))
        self._chosen: tuple[Tensor, Tensor] | None = None  # (log pi(e_t|x_t) with grad, e_t) of the last training forward

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        # the policy in float32: the weight cast too, for a bf16 model (bf16-pure); under autocast both run as before
        logits = F.linear(x.float(), self.gate.weight.float())
        logp = logits.log_softmax(-1)
        aux = {}
        if self.training:
            experts = torch.multinomial(logp.detach().exp(), 1)
            self._chosen = (logp.gather(1, experts).squeeze(1), experts.squeeze(1))
            if self.params.entropy > 0:
                aux["entropy_bonus"] = -self.params.entropy * -(logp.exp() * logp).sum(-1).mean()
        else:
            experts = logp.argmax(-1, keepdim=True)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device), logits, aux)

    def rewards(self, token_loss: Tensor, experts: Tensor) -> Tensor:
        reward = -token_loss.float()
        if self.params.balance > 0:
            # a scatter, not bincount: bincount reads the largest id on the host (a sync on CUDA); the same counts
            counts = torch.zeros(self.num_experts, dtype=torch.long, device=experts.device).scatter_add_(0, experts, torch.ones_like(experts))
            f = counts.float() / experts.numel()
            reward = reward - self.params.balance * (self.num_experts * f[experts] - 1)
        return reward

    def observe_token_loss(self, token_loss: Tensor) -> dict[str, Tensor]:
        if self._chosen is None or self._chosen[0].shape[0] != token_loss.shape[0]:
            return {}
        logp, experts = self._chosen
        self._chosen = None
        reward = self.rewards(token_loss.to(logp.device), experts)
        mean = reward.mean()
        decay, n = self.params.baseline_decay, self.baseline_steps
        # mean on the first step, else the bias-corrected EMA: computed on the device (train.cuda_graph replays this
        # and reads no step count on the host), with the numbers of baseline / (1 - decay**n) for a Python float
        # (1 - decay**n in float64, then rounded; the division in float32 and rounded to the buffer's dtype)
        correction = (1 - torch.full((), decay, dtype=torch.float64, device=n.device) ** n).float()
        b = torch.where(n == 0, mean, (self.baseline.float() / correction).to(self.baseline.dtype))
        self.baseline.mul_(decay).add_((1 - decay) * mean)
        self.baseline_steps += 1
        return {"reinforce": -self.params.pg_coef * ((reward - b).detach() * logp).mean()}
