"""Shared machinery of learned routers: a linear gate x -> logits [T, E] and the stability options.

Not a router itself; `softmax_topk`, `noisy_topk`, `switch` and the zoo's learned routers build on it.
Every option below is a field of `GateParams`, so every learned router accepts it (docs/routers.md,
"Balancing and stability options"):

  z_loss             coefficient of the ST-MoE z-loss  mean_x logsumexp(l(x))^2
  entropy            coefficient of the mean router entropy  mean_x H(p(x)); > 0 sharpens, < 0 explores
  temperature        logits are divided by it before anything else uses them
  smoothing, ema_decay
                     p~(x) = (1 - smoothing) p(x) + smoothing m,  m an EMA (decay ema_decay) of the batch-mean
                     gate probabilities; routing uses p~ (logits are replaced by lse(l) + log p~)
  router_clip        gradient-norm clip of the router's own parameters, applied in `before_step`
  jitter             multiplicative input noise U(1-jitter, 1+jitter) in training (Switch)
  fp32               compute the gate in float32 whatever the model dtype
  importance_balance, importance_power
                     importance-weighted balance loss  c * E * sum_i f_i P~_i,  P~_i = sum_x w_x p_i(x) / sum_x w_x,
                     w_x = (mean_j f_j / f_{e(x)})^power  (detached), e(x) the token's top-1 expert
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.routers.base import Router, switch_balance_loss, z_loss
from routerlab.routers.registry import RouterParams, require


@dataclass(frozen=True)
class GateParams(RouterParams):
    z_loss: float = 0.0  # ST-MoE router z-loss coefficient
    jitter: float = 0.0  # multiplicative input noise U(1-jitter, 1+jitter) in training (Switch)
    fp32: bool = True  # compute the gate in float32 whatever the model dtype
    entropy: float = 0.0  # coefficient of mean router entropy: > 0 sharpens, < 0 explores
    temperature: float = 1.0  # logits / temperature before softmax (and everything else)
    smoothing: float = 0.0  # weight of the EMA of gate probabilities mixed into every token's gate
    ema_decay: float = 0.99  # decay of that EMA (updated in training forwards)
    router_clip: float = 0.0  # max grad norm of the router's parameters (0 = off), applied in before_step
    importance_balance: float = 0.0  # coefficient of the importance-weighted balance loss (0 = off)
    importance_power: float = 1.0  # gamma in w_x = (mean f / f_{e(x)})^gamma

    def __post_init__(self) -> None:
        require(self.z_loss >= 0, f"z_loss must be >= 0, got {self.z_loss}")
        require(0 <= self.jitter < 1, f"jitter must be in [0, 1), got {self.jitter}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(0 <= self.smoothing < 1, f"smoothing must be in [0, 1), got {self.smoothing}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.router_clip >= 0, f"router_clip must be >= 0 (0 = off), got {self.router_clip}")
        require(self.importance_balance >= 0, f"importance_balance must be >= 0, got {self.importance_balance}")
        require(self.importance_power >= 0, f"importance_power must be >= 0, got {self.importance_power}")


def importance_weights(top1: Tensor, num_experts: int, power: float) -> Tensor:
    """w_x = (mean_j f_j / f_{e(x)})^power from the batch's top-1 choices; detached.

    With power 1 every expert's group of tokens carries the same total weight, so the balance signal is
    not dominated by the crowd on the over-used experts.
    """
    counts = torch.bincount(top1, minlength=num_experts).to(torch.float32)
    f = counts / counts.sum().clamp_min(1.0)
    ratio = (1.0 / num_experts) / f[top1].clamp_min(1e-9)
    return ratio.pow(power).detach()


class GatedRouter(Router):
    """A router whose scores come from a linear gate over the hidden state, with the stability options."""

    def __init__(self, d_model: int, num_experts: int, params: GateParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.register_buffer("gate_ema", torch.full((num_experts,), 1.0 / num_experts))

    # -- scores ---------------------------------------------------------------------------------------
    def raw_logits(self, x: Tensor, gate: nn.Linear | None = None) -> Tensor:
        """x @ W^T with jitter (training) and the fp32 option; no temperature, no smoothing."""
        gate = self.gate if gate is None else gate
        if self.training and self.params.jitter > 0:
            eps = self.params.jitter
            x = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
        if self.params.fp32:  # also under autocast (bf16-mixed), which would otherwise run the linear in bf16
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), gate.weight.float(), None if gate.bias is None else gate.bias.float())
        return gate(x)

    def apply_temperature(self, logits: Tensor) -> Tensor:
        t = self.params.temperature
        return logits if t == 1.0 else logits / t

    def apply_smoothing(self, logits: Tensor) -> Tensor:
        """p~ = (1 - smoothing) softmax(logits) + smoothing * EMA; returns lse(logits) + log p~ ([T, E])."""
        p = self.params
        if p.smoothing == 0:
            return logits
        probs = logits.softmax(-1)
        mixed = (1 - p.smoothing) * probs + p.smoothing * self.gate_ema.to(probs.dtype)
        if self.training:
            with torch.no_grad():
                self.gate_ema.mul_(p.ema_decay).add_((1 - p.ema_decay) * probs.detach().mean(0).to(self.gate_ema.dtype))
        # softmax(lse + log p~) = p~ and logsumexp(...) = lse, so the z-loss still sees the logit scale
        return torch.logsumexp(logits, -1, keepdim=True) + mixed.clamp_min(1e-30).log()

    def postprocess(self, logits: Tensor) -> Tensor:
        """Temperature, then gate smoothing toward the EMA of gate probabilities ([T, E] logits in and out)."""
        return self.apply_smoothing(self.apply_temperature(logits))

    def gate_logits(self, x: Tensor) -> Tensor:
        return self.postprocess(self.raw_logits(x))

    # -- losses ---------------------------------------------------------------------------------------
    def stability_losses(self, logits: Tensor, experts: Tensor | None = None) -> dict[str, Tensor]:
        """z-loss, entropy and importance-weighted balance terms (only those switched on).

        experts: [T, k] choices (-1 unused) for the importance weighting; default the top-1 of the logits.
        """
        p = self.params
        aux = {}
        if p.z_loss > 0:
            aux["z_loss"] = p.z_loss * z_loss(logits)
        if p.entropy != 0:
            logp = logits.float().log_softmax(-1)
            aux["entropy"] = p.entropy * -(logp.exp() * logp).sum(-1).mean()
        if p.importance_balance > 0 and logits.shape[0] > 0:
            probs = logits.float().softmax(-1)
            top1 = probs.argmax(-1)
            if experts is not None:
                top1 = torch.where(experts[:, 0] >= 0, experts[:, 0], top1)
            w = importance_weights(top1, self.num_experts, p.importance_power)
            chosen = top1[:, None] if experts is None else experts
            aux["importance_balance"] = p.importance_balance * switch_balance_loss(probs, chosen, self.num_experts, w)
        return aux

    # -- hooks ----------------------------------------------------------------------------------------
    def before_step(self) -> None:
        if self.params.router_clip > 0:
            grads = [q for q in self.parameters() if q.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.params.router_clip)
