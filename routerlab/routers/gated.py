"""Shared machinery of learned routers: a linear gate x -> logits [T, E] and the stability options.

Not a router itself; `softmax_topk`, `noisy_topk`, `switch` and the zoo's learned routers build on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.routers.base import Router, z_loss
from routerlab.routers.registry import RouterParams, require


@dataclass(frozen=True)
class GateParams(RouterParams):
    z_loss: float = 0.0  # ST-MoE router z-loss coefficient
    jitter: float = 0.0  # multiplicative input noise U(1-jitter, 1+jitter) in training (Switch)
    fp32: bool = True  # compute the gate in float32 whatever the model dtype

    def __post_init__(self) -> None:
        require(self.z_loss >= 0, f"z_loss must be >= 0, got {self.z_loss}")
        require(0 <= self.jitter < 1, f"jitter must be in [0, 1), got {self.jitter}")


class GatedRouter(Router):
    """A router whose scores come from a linear gate over the hidden state."""

    def __init__(self, d_model: int, num_experts: int, params: GateParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def gate_logits(self, x: Tensor) -> Tensor:
        if self.training and self.params.jitter > 0:
            eps = self.params.jitter
            x = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
        if self.params.fp32:
            return F.linear(x.float(), self.gate.weight.float())
        return self.gate(x)

    def stability_losses(self, logits: Tensor) -> dict[str, Tensor]:
        aux = {}
        if self.params.z_loss > 0:
            aux["z_loss"] = self.params.z_loss * z_loss(logits)
        return aux
