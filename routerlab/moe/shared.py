"""Shared experts: always-on experts beside the routed ones (DeepSeekMoE, Qwen-MoE).

n shared SwiGLU experts of hidden h, summed, are one SwiGLU of hidden n*h (the sum over experts is a sum over
hidden units), so they are kept as one: y = (silu(x W_g) * (x W_u)) W_o. Optionally gated per token by a
learned scalar (Qwen-MoE's shared_expert_gate): y <- sigmoid(x w) * y. The MoE layer adds y to the routed
output for every token; dropped tokens still get it. Parameters are named `shared.*`, never `experts.*`, so
expert parallelism replicates them like any dense weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SharedExperts(nn.Module):
    def __init__(self, d_model: int, num_shared: int, hidden: int, gated: bool = False) -> None:
        super().__init__()
        if num_shared < 1 or hidden < 1:
            raise ValueError(f"shared experts need num_shared >= 1 and hidden >= 1, got {num_shared}, {hidden}")
        self.num_shared, self.hidden = num_shared, hidden
        self.gate_up = nn.Linear(d_model, 2 * num_shared * hidden, bias=False)
        self.down = nn.Linear(num_shared * hidden, d_model, bias=False)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x: Tensor) -> Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        y = self.down(F.silu(g) * u)
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y

    def flops_per_token(self) -> int:
        """Forward multiply-adds x2: 2 * d * 3 * n * h (gate, up, down)."""
        return 6 * self.gate_up.in_features * self.num_shared * self.hidden

